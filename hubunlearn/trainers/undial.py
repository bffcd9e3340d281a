"""UNDIAL: self-distillation towards the original with the gold token's logit lowered."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from ..search_spaces import COMMON, Float
from ..errors import UsageError
from . import losses
from .base import UnlearnConfig, UnlearnTrainer


@dataclass
class UNDIALConfig(UnlearnConfig):
    """UNDIAL on the forget set plus a retain term (NLL by default, as OpenUnlearning's UNDIAL, a GradDiff variant;
    ``--retain_loss none`` distils on the forget set alone)."""

    search_space: ClassVar[dict] = {**COMMON, "beta": Float(1.0, 30.0, log=True)}  # what `hubunlearn tune` searches

    beta: float = field(default=10.0, metadata={
        "help": "Strength β: how far the gold token's logit of the original is lowered in the target distribution "
                "softmax(z_original − β·onehot(y)) (the paper searches 3, 10, 30; 0 distils the original unchanged)."})

    def __post_init__(self):
        super().__post_init__()
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise UsageError(f"--beta must be a finite number ≥ 0 (the logit subtracted from the gold token); got {self.beta}")


class UNDIALTrainer(UnlearnTrainer):
    """UNDIAL (Dong et al., "UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning in Large Language
    Models", arXiv 2402.10052, NAACL 2025): per forget answer token, the cross-entropy of the model's next-token
    distribution against the frozen original's with the gold token's logit lowered by β, softmaxed (a fixed target:
    unlike gradient ascent the loss is bounded below and training converges), plus the retain term.

    The original's logits on each forget batch come from the same reference as the retain KL: with LoRA the base with
    the adapter switched off, otherwise a frozen copy (``--reference_device same|cpu``; TRL's preparation under
    DeepSpeed/FSDP). The variant built is the paper's UNDIAL on every answer token (not its FUNDIAL, which weights
    chosen tokens)."""

    _name = "UNDIAL"
    _paper = {"id": "2402.10052", "title": "UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning in Large Language Models",
              "authors": "Yijiang River Dong and Hongzhou Lin and Mikhail Belkin and Ramon Huerta and Ivan Vulić", "year": 2024}
    config_class = UNDIALConfig
    forget_reads_reference_logits = True

    def forget_loss_from_logits(self, logits, forget):
        return losses.undial_loss(logits, self.reference_logits(forget), forget["labels"], self.args.beta)
