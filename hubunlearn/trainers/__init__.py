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
from .eco import ECOConfig, ECOTrainer
from .npo import NPOConfig, NPOTrainer, SimNPOConfig, SimNPOTrainer
from .representation import KUDAConfig, KUDATrainer, RMUConfig, RMUTrainer

# The gradient methods: each trains the model's weights (or an adapter; KUDA and RMU a few FFN layers) on a forget loss.
METHODS: dict[str, type[UnlearnTrainer]] = {
    "ga": GradAscentTrainer,
    "graddiff": GradDiffTrainer,
    "kl": KLTrainer,
    "npo": NPOTrainer,
    "simnpo": SimNPOTrainer,
    "ihl": IHLTrainer,
    "kuda": KUDATrainer,
    "rmu": RMUTrainer,
}

# Every method `hubunlearn unlearn --method` knows: the gradient methods above, and ECO, which trains no weights.
UNLEARNING_METHODS: dict[str, type[UnlearnTrainer]] = {**METHODS, "eco": ECOTrainer}

__all__ = [name for name in dir() if name.endswith(("Config", "Trainer"))] + ["METHODS", "UNLEARNING_METHODS"]
