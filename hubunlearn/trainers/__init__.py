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
from .primal_dual import PDUConfig, PDUTrainer
from .representation import KUDAConfig, KUDATrainer, RMUConfig, RMUTrainer
from .task_vector import TaskVectorConfig, TaskVectorTrainer
from .undial import UNDIALConfig, UNDIALTrainer
from .token_weighted import CEUConfig, CEUTrainer, SatImpConfig, SatImpTrainer, WGAConfig, WGATrainer
from .refusal import IdkDPOConfig, IdkDPOTrainer, IdkNLLConfig, IdkNLLTrainer

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
    "undial": UNDIALTrainer,
    "task_vector": TaskVectorTrainer,
    "wga": WGATrainer,
    "satimp": SatImpTrainer,
    "ceu": CEUTrainer,
    "pdu": PDUTrainer,
    "idknll": IdkNLLTrainer,
    "idkdpo": IdkDPOTrainer,
}

# Every method `hubunlearn unlearn --method` knows: the gradient methods above, and ECO, which trains no weights.
UNLEARNING_METHODS: dict[str, type[UnlearnTrainer]] = {**METHODS, "eco": ECOTrainer}

# Other spellings the field uses (TOFU's grad_diff, OpenUnlearning's GradAscent, ...), after lower-casing and
# dropping '_', '-' and spaces; names that already match a method (NPO, SimNPO, RMU, ...) need no entry.
METHOD_ALIASES = {"gradascent": "ga", "gradientascent": "ga", "gradientdifference": "graddiff", "gradkl": "kl",
                  "idk": "idknll"}  # TOFU's forget_loss=idk
METHOD_ALIASES.update({"taskvector": "task_vector", "tv": "task_vector", "taskarithmetic": "task_vector"})  # MUSE's TV


def canonical_method(name: str) -> str:
    """The method ``name`` stands for, case-insensitively and in the field's spellings (``GradDiff``, ``grad_diff``,
    ``GradAscent``, ``grad_ascent``, ``NPO``, ``SimNPO``, ...); raises a one-line ``UsageError`` for an unknown one."""
    from ..errors import UsageError

    key = "".join(ch for ch in name.lower() if ch not in "_- ")
    key = METHOD_ALIASES.get(key, key)
    if key not in UNLEARNING_METHODS:
        raise UsageError(f"unknown method '{name}': choose one of {', '.join(UNLEARNING_METHODS)} "
                         "(any case; the field's spellings such as GradDiff, grad_ascent and SimNPO are accepted)")
    return key


__all__ = [name for name in dir() if name.endswith(("Config", "Trainer"))] + ["METHODS", "UNLEARNING_METHODS", "canonical_method"]
