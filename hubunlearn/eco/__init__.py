"""ECO: unlearning by embedding-corrupted prompts (Liu et al., NeurIPS 2024, arXiv 2406.07933); weights untouched."""

from .classifier import PromptClassifier
from .corruption import CORRUPTIONS
from .model import CorruptionSpec, ECOModel

__all__ = ["CORRUPTIONS", "CorruptionSpec", "ECOModel", "PromptClassifier"]
