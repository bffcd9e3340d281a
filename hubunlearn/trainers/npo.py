"""Preference-style methods: NPO and SimNPO."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..search_spaces import COMMON, Float
from . import losses
from .base import UnlearnConfig, UnlearnTrainer


@dataclass
class NPOConfig(UnlearnConfig):
    """NPO on the forget set plus a retain term."""

    search_space: ClassVar[dict] = {**COMMON, "beta": Float(0.01, 1.0, log=True)}  # what `hubunlearn tune` searches

    beta: float = field(default=0.1, metadata={"help": "Inverse temperature β of NPO's log-sigmoid."})


class NPOTrainer(UnlearnTrainer):
    """Negative Preference Optimization (Zhang et al., "Negative Preference Optimization: From Catastrophic
    Collapse to Effective Unlearning", arXiv 2404.05868): a bounded loss on the forget likelihood ratio to
    the frozen original. The original enters only through its summed log-likelihood of each forget answer, cached
    once before training (``reference_statistics``): no reference model is held for the forget term."""

    _name = "NPO"
    _paper = {"id": "2404.05868", "title": "Negative Preference Optimization: From Catastrophic Collapse to Effective Unlearning",
              "authors": "Ruiqi Zhang and Licong Lin and Yu Bai and Song Mei", "year": 2024}
    config_class = NPOConfig
    reference_statistics = ("forget",)

    def forget_loss_from_logits(self, logits, forget):
        policy, _ = losses.sequence_log_prob(logits, forget["labels"])
        return losses.npo_loss(policy, forget["reference_log_prob"].to(policy.device), self.args.beta)


@dataclass
class SimNPOConfig(UnlearnConfig):
    """SimNPO on the forget set plus a retain term."""

    search_space: ClassVar[dict] = {**COMMON, "beta": Float(0.5, 5.0, log=True), "gamma": Float(0.0, 2.0)}  # what `hubunlearn tune` searches

    beta: float = field(default=2.5, metadata={"help": "Inverse temperature β of SimNPO's log-sigmoid."})
    gamma: float = field(default=0.0, metadata={"help": "Reward margin γ of SimNPO."})


class SimNPOTrainer(UnlearnTrainer):
    """SimNPO (Fan et al., "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM
    Unlearning", arXiv 2410.07163): NPO without a reference, on the length-normalised likelihood."""

    _name = "SimNPO"
    _paper = {"id": "2410.07163", "title": "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM Unlearning",
              "authors": "Chongyu Fan and Jiancheng Liu and Licong Lin and Jinghan Jia and Ruiqi Zhang and Song Mei and Sijia Liu", "year": 2024}
    config_class = SimNPOConfig

    def forget_loss_from_logits(self, logits, forget):
        policy, num_tokens = losses.sequence_log_prob(logits, forget["labels"])
        return losses.simnpo_loss(policy, num_tokens, self.args.beta, self.args.gamma)
