"""Token-level forget losses that need no reference model: WGA and SatImp (token-weighted gradient ascent) and CE-U."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar
from functools import partial

from ..search_spaces import COMMON, Float
from ..errors import UsageError
from . import losses
from .base import UnlearnConfig, UnlearnTrainer


@dataclass
class WGAConfig(UnlearnConfig):
    """Weighted gradient ascent on the forget set plus a retain term (NLL by default, as OpenUnlearning's WGA)."""

    search_space: ClassVar[dict] = {**COMMON, "beta": Float(0.1, 5.0, log=True)}  # what `hubunlearn tune` searches

    beta: float = field(default=1.0, metadata={"help": "Exponent β of WGA's token weight p^β (p: the gold token's probability, detached)."})

    def __post_init__(self):
        super().__post_init__()
        if not self.beta >= 0:
            raise UsageError(f"--beta must be at least 0; got {self.beta}")


class WGATrainer(UnlearnTrainer):
    """Weighted gradient ascent (Wang et al., "Rethinking LLM Unlearning Objectives: A Gradient Perspective and Go
    Beyond", arXiv 2502.19301): gradient ascent with each forget token's log-likelihood weighted by
    ``p(y_t)^β`` (detached), mean over the batch's answer tokens, plus a retain term.

    Gradient ascent's gradient on a token, ``∇log p = ∇p / p``, carries the inverse confidence ``1/p``; the weight
    cancels it (β = 1), so tokens already unlikely stop dominating the update (the paper's remedy for excessive
    unlearning)."""

    _name = "WGA"
    _paper = {"id": "2502.19301", "title": "Rethinking LLM Unlearning Objectives: A Gradient Perspective and Go Beyond",
              "authors": "Qizhou Wang and Jin Peng Zhou and Zhanke Zhou and Saebyeol Shin and Bo Han and Kilian Q. Weinberger", "year": 2025}
    config_class = WGAConfig

    def forget_loss_from_logits(self, logits, forget):
        return losses.token_weighted_ascent_loss(logits, forget["labels"], partial(losses.wga_weight, beta=self.args.beta))


@dataclass
class SatImpConfig(UnlearnConfig):
    """SatImp's token-weighted gradient ascent on the forget set plus a retain term (NLL by default)."""

    search_space: ClassVar[dict] = {**COMMON, "beta1": Float(1.0, 10.0, log=True), "beta2": Float(0.1, 5.0, log=True)}  # what `hubunlearn tune` searches

    beta1: float = field(default=5.0, metadata={"help": "Saturation exponent β₁ of SatImp's token weight p^β₁·(1−p)^β₂."})
    beta2: float = field(default=1.0, metadata={"help": "Importance exponent β₂ of SatImp's token weight p^β₁·(1−p)^β₂."})

    def __post_init__(self):
        super().__post_init__()
        if not (self.beta1 >= 0 and self.beta2 >= 0):
            raise UsageError(f"--beta1 and --beta2 must be at least 0; got {self.beta1} and {self.beta2}")


class SatImpTrainer(UnlearnTrainer):
    """SatImp (Yang et al., "Exploring Criteria of Loss Reweighting to Enhance LLM Unlearning", arXiv 2505.11953):
    gradient ascent with each forget token's log-likelihood weighted by ``p^β₁ · (1 − p)^β₂`` (``p`` the gold token's
    probability, detached), mean over the batch's answer tokens, plus a retain term.

    The saturation factor ``p^β₁`` takes weight off tokens already unlikely; the importance factor ``(1 − p)^β₂`` off
    tokens the model is certain of. The forget weight is 1 (``--forget_weight``; OpenUnlearning's recipe uses 0.1)."""

    _name = "SatImp"
    _paper = {"id": "2505.11953", "title": "Exploring Criteria of Loss Reweighting to Enhance LLM Unlearning",
              "authors": "Puning Yang and Qizhou Wang and Zhuo Huang and Tongliang Liu and Chengqi Zhang and Bo Han", "year": 2025}
    config_class = SatImpConfig

    def forget_loss_from_logits(self, logits, forget):
        weight = partial(losses.satimp_weight, beta1=self.args.beta1, beta2=self.args.beta2)
        return losses.token_weighted_ascent_loss(logits, forget["labels"], weight)


@dataclass
class CEUConfig(UnlearnConfig):
    """CE-U on the forget set alone (no retain term by default, as in the paper)."""

    retain_loss: str = field(default="none", metadata={"help": "Retain term: 'none' (default, as in the paper), 'nll' or 'kl'."})


class CEUTrainer(UnlearnTrainer):
    """Cross Entropy Unlearning (Yang, "CE-U: Cross Entropy Unlearning", arXiv 2503.01224): the cross-entropy of the
    model against its own next-token distribution with the gold token's logit set to −∞ (detached), over the answer
    tokens but each one's first; no reference model, no retain term by default.

    Its gradient on the logits, ``p − q``, is bounded: it neither vanishes when the model is confident nor explodes
    once the gold token is unlikely, as gradient ascent's does."""

    _name = "CE-U"
    _paper = {"id": "2503.01224", "title": "CE-U: Cross Entropy Unlearning", "authors": "Bo Yang", "year": 2025}
    config_class = CEUConfig

    def forget_loss_from_logits(self, logits, forget):
        return losses.cross_entropy_unlearning_loss(logits, forget["labels"])
