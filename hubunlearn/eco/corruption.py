"""Corruption functions of ECO (Liu et al., "Large Language Model Unlearning via Embedding-Corrupted Prompts",
NeurIPS 2024, arXiv 2406.07933, Section 3.2 and Appendix): what happens to the selected token embeddings of a
flagged prompt.

Every function maps ``(embeddings [B, T, d], mask [B, T] bool, strength, dims, generator)`` to new embeddings
and touches only the masked positions (the paper's code lets ``reverse``/``shuffle`` ignore the mask; here
nothing does). ``dims`` is n (the first n coordinates) or k (the k largest in magnitude); ``strength`` is σ.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import UsageError


def _first_n(embeddings: torch.Tensor, n: int) -> torch.Tensor:
    selected = torch.zeros_like(embeddings, dtype=torch.bool)
    selected[..., : max(1, min(n, embeddings.shape[-1]))] = True
    return selected


def _top_k(embeddings: torch.Tensor, k: int) -> torch.Tensor:
    k = max(1, min(k, embeddings.shape[-1]))
    indices = embeddings.abs().topk(k, dim=-1).indices
    return torch.zeros_like(embeddings, dtype=torch.bool).scatter_(-1, indices, True)


def _noise(embeddings: torch.Tensor, strength: float, generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.randn(embeddings.shape, generator=generator, device="cpu", dtype=torch.float32)
    return (noise * strength).to(embeddings.device, embeddings.dtype)


def rand_noise_first_n(embeddings, mask, strength, dims, generator=None):
    """Add Gaussian noise N(0, σ²) to the first n coordinates."""
    where = _first_n(embeddings, dims) & mask[..., None]
    return torch.where(where, embeddings + _noise(embeddings, strength, generator), embeddings)


def rand_noise_top_k(embeddings, mask, strength, dims, generator=None):
    """Add Gaussian noise N(0, σ²) to the k coordinates largest in magnitude."""
    where = _top_k(embeddings, dims) & mask[..., None]
    return torch.where(where, embeddings + _noise(embeddings, strength, generator), embeddings)


def rand_noise_rand_n(embeddings, mask, strength, dims, generator=None):
    """Add Gaussian noise N(0, σ²) to n coordinates drawn at random (one draw per call)."""
    chosen = torch.randperm(embeddings.shape[-1], generator=generator)[: max(1, min(dims, embeddings.shape[-1]))]
    where = torch.zeros_like(embeddings, dtype=torch.bool)
    where[..., chosen.to(embeddings.device)] = True
    where &= mask[..., None]
    return torch.where(where, embeddings + _noise(embeddings, strength, generator), embeddings)


def _smallest_k(embeddings: torch.Tensor, k: int) -> torch.Tensor:
    indices = embeddings.topk(max(1, min(k, embeddings.shape[-1])), dim=-1, largest=False).indices
    return torch.zeros_like(embeddings, dtype=torch.bool).scatter_(-1, indices, True)


def _largest_k(embeddings: torch.Tensor, k: int) -> torch.Tensor:
    indices = embeddings.topk(max(1, min(k, embeddings.shape[-1])), dim=-1).indices
    return torch.zeros_like(embeddings, dtype=torch.bool).scatter_(-1, indices, True)


def sub_value_top_k(embeddings, mask, strength, dims, generator=None):
    """Subtract σ from the k largest (signed) coordinates."""
    return torch.where(_largest_k(embeddings, dims) & mask[..., None], embeddings - strength, embeddings)


def add_value_least_k(embeddings, mask, strength, dims, generator=None):
    """Add σ to the k smallest (signed) coordinates."""
    return torch.where(_smallest_k(embeddings, dims) & mask[..., None], embeddings + strength, embeddings)


def zero_out_first_n(embeddings, mask, strength, dims, generator=None):
    """Set the first n coordinates to zero (σ unused)."""
    return embeddings.masked_fill(_first_n(embeddings, dims) & mask[..., None], 0)


def zero_out_top_k(embeddings, mask, strength, dims, generator=None):
    """Set the k coordinates largest in magnitude to zero (σ unused)."""
    return embeddings.masked_fill(_top_k(embeddings, dims) & mask[..., None], 0)


def flip_sign_first_n(embeddings, mask, strength, dims, generator=None):
    """Negate the first n coordinates (σ unused)."""
    return torch.where(_first_n(embeddings, dims) & mask[..., None], -embeddings, embeddings)


def flip_sign_top_k(embeddings, mask, strength, dims, generator=None):
    """Negate the k coordinates largest in magnitude (σ unused)."""
    return torch.where(_top_k(embeddings, dims) & mask[..., None], -embeddings, embeddings)


def sub_value_first_n(embeddings, mask, strength, dims, generator=None):
    """Subtract σ from the first n coordinates."""
    return torch.where(_first_n(embeddings, dims) & mask[..., None], embeddings - strength, embeddings)


def add_value_first_n(embeddings, mask, strength, dims, generator=None):
    """Add σ to the first n coordinates."""
    return torch.where(_first_n(embeddings, dims) & mask[..., None], embeddings + strength, embeddings)


def reverse_order(embeddings, mask, strength, dims, generator=None):
    """Reverse the order of the selected tokens within each prompt (unselected positions stay put)."""
    out = embeddings.clone()
    for row in range(embeddings.shape[0]):
        positions = mask[row].nonzero().squeeze(-1)
        out[row, positions] = embeddings[row, positions.flip(0)]
    return out


def shuffle(embeddings, mask, strength, dims, generator=None):
    """Permute the selected tokens within each prompt at random (unselected positions stay put)."""
    out = embeddings.clone()
    for row in range(embeddings.shape[0]):
        positions = mask[row].nonzero().squeeze(-1)
        order = torch.randperm(len(positions), generator=generator).to(positions.device)
        out[row, positions] = embeddings[row, positions[order]]
    return out


CORRUPTIONS: dict[str, Callable] = {f.__name__: f for f in (
    rand_noise_first_n, rand_noise_rand_n, rand_noise_top_k, zero_out_first_n, zero_out_top_k, flip_sign_first_n,
    flip_sign_top_k, sub_value_first_n, add_value_first_n, sub_value_top_k, add_value_least_k, reverse_order, shuffle)}
USES_STRENGTH = {"rand_noise_first_n", "rand_noise_rand_n", "rand_noise_top_k", "sub_value_first_n", "add_value_first_n",
                 "sub_value_top_k", "add_value_least_k"}


def get_corruption(name: str) -> Callable:
    if name not in CORRUPTIONS:
        raise UsageError(f"unknown corruption '{name}': choose one of {', '.join(CORRUPTIONS)}")
    return CORRUPTIONS[name]
