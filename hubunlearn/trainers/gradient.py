"""Gradient methods: gradient ascent, GradDiff, KL, and the Inverted Hinge Loss."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UsageError
from . import losses
from .base import UnlearnConfig, UnlearnTrainer


@dataclass
class GradAscentConfig(UnlearnConfig):
    """Gradient ascent on the forget set alone (no retain term by default)."""

    retain_loss: str = field(default="none", metadata={"help": "Retain term: 'nll', 'kl' or 'none'."})
    nll_cap: float | None = field(default=None, metadata={
        "help": "Likelihood capping (Wang et al.): a forget sequence whose mean NLL passes this value stops contributing."})

    def __post_init__(self):
        super().__post_init__()
        if self.nll_cap is not None and not self.nll_cap > 0:
            raise UsageError(f"--nll_cap must be a positive NLL (nats per token); got {self.nll_cap}")


class GradAscentTrainer(UnlearnTrainer):
    """Gradient ascent: maximise the forget set's NLL (Jang et al., "Knowledge Unlearning for Mitigating
    Privacy Risks in Language Models", arXiv 2210.01504)."""

    _name = "GradAscent"
    _paper = {"id": "2210.01504", "title": "Knowledge Unlearning for Mitigating Privacy Risks in Language Models",
              "authors": "Joel Jang and Dongkeun Yoon and Sohee Yang and Sungmin Cha and Moontae Lee and Lajanugen Logeswaran and Minjoon Seo", "year": 2022}
    config_class = GradAscentConfig

    def forget_loss_from_logits(self, logits, forget):
        if self.args.nll_cap is not None:
            return losses.capped_gradient_ascent_loss(logits, forget["labels"], self.args.nll_cap)
        return losses.gradient_ascent_loss(logits, forget["labels"])


@dataclass
class GradDiffConfig(GradAscentConfig):
    """Gradient ascent on the forget set plus NLL on the retain set."""

    retain_loss: str = field(default="nll", metadata={"help": "Retain term: 'nll' (default), 'kl' or 'none'."})


class GradDiffTrainer(GradAscentTrainer):
    """GradDiff: gradient ascent on forget, descent on retain (Liu et al., "Continual Learning and Private
    Unlearning", arXiv 2203.12817; the TOFU baseline)."""

    _name = "GradDiff"
    _paper = {"id": "2203.12817", "title": "Continual Learning and Private Unlearning",
              "authors": "Bo Liu and Qiang Liu and Peter Stone", "year": 2022}
    config_class = GradDiffConfig


@dataclass
class KLConfig(GradAscentConfig):
    """Gradient ascent on the forget set plus KL to the original model on the retain set."""

    retain_loss: str = field(default="kl", metadata={"help": "Retain term: 'kl' (default), 'nll' or 'none'."})


class KLTrainer(GradAscentTrainer):
    """KL minimisation: gradient ascent on forget, ``KL(original || model)`` on retain (Maini et al., TOFU,
    arXiv 2401.06121)."""

    _name = "KL"
    _paper = {"id": "2401.06121", "title": "TOFU: A Task of Fictitious Unlearning for LLMs",
              "authors": "Pratyush Maini and Zhili Feng and Avi Schwarzschild and Zachary C. Lipton and J. Zico Kolter", "year": 2024}
    config_class = KLConfig


@dataclass
class IHLConfig(UnlearnConfig):
    """Inverted Hinge Loss on the forget set plus retain NLL (1:1, as in the paper's code)."""


class IHLTrainer(UnlearnTrainer):
    """Inverted Hinge Loss (Cha et al., "Towards Robust and Parameter-Efficient Knowledge Unlearning for LLMs",
    ICLR 2025, arXiv 2408.06621): per forget token ``1 + p(y) - max_{v≠y} p(v)``, plus retain NLL."""

    _name = "IHL"
    _paper = {"id": "2408.06621", "title": "Towards Robust and Parameter-Efficient Knowledge Unlearning for LLMs",
              "authors": "Sungmin Cha and Sungjun Cho and Dasol Hwang and Moontae Lee", "year": 2024}
    config_class = IHLConfig

    def forget_loss_from_logits(self, logits, forget):
        return losses.inverted_hinge_loss(logits, forget["labels"])
