"""Unlearning methods as TRL-style config + trainer pairs."""

from .base import UnlearnConfig, UnlearnTrainer
from .gradient import (
    GradAscentConfig,
    GradAscentTrainer,
    GradDiffConfig,
    GradDiffTrainer,
    IHLConfig,
    IHLTrainer,
    KLConfig,
    KLTrainer,
)
from .npo import NPOConfig, NPOTrainer, SimNPOConfig, SimNPOTrainer

METHODS: dict[str, type[UnlearnTrainer]] = {
    "ga": GradAscentTrainer,
    "graddiff": GradDiffTrainer,
    "kl": KLTrainer,
    "npo": NPOTrainer,
    "simnpo": SimNPOTrainer,
    "ihl": IHLTrainer,
}

__all__ = [name for name in dir() if name.endswith(("Config", "Trainer"))] + ["METHODS"]
