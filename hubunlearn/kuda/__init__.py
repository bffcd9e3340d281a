"""Representation unlearning: KUDA (Fang et al., arXiv 2602.19275) and RMU (Li et al., arXiv 2403.03218) share
the machinery here: finding the FFN layers, causal tracing, and the relaxed null-space projection."""

from .layers import FFNLayers
from .projection import NullSpaceProjection, null_space_projector
from .tracing import TraceResult, best_window, causal_trace

__all__ = ["FFNLayers", "NullSpaceProjection", "TraceResult", "best_window", "causal_trace", "null_space_projector"]
