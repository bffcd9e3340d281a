"""KUDA's relaxed null-space projection (Fang et al., arXiv 2602.19275, Section 3.3; the idea as in AlphaEdit,
Fang et al., arXiv 2410.02355): updates of an FFN output projection ``W`` (``out × in``) are confined to the
directions its retain keys ``k`` (its inputs on retain tokens) barely use, so ``ΔW·k ≈ 0`` and the layer's
outputs on retained knowledge hardly move.

With the keys as rows of ``K``, ``KᵀK = U Λ Uᵀ``; the projector is ``P = U_s U_sᵀ`` over the eigenvectors with
``λ ≤ threshold · λ_max`` ("relaxed": small eigenvalues, not only exact zeros, whose count would be 0 once there
are more keys than dimensions). The threshold is relative to the largest eigenvalue (our choice, so it does not
depend on the scale of the activations). The projection is applied to the accumulated update after every optimiser
step, ``W ← W₀ + (W − W₀)·P``: with Adam the step is not the gradient, so projecting gradients would not keep
``ΔW`` in the subspace, and ``P`` being a projector makes the repeated projection exact.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from ..errors import UsageError
from ..modeling import model_device
from .layers import FFNLayers


@torch.no_grad()
def collect_keys(model, modules: list[torch.nn.Module], batches, max_tokens: int = 4096, seed: int = 0) -> list[torch.Tensor]:
    """Inputs of ``modules`` on the real tokens of ``batches`` (dicts with ``input_ids``, ``attention_mask`` and
    optionally ``positions``, a bool mask of the tokens to keep), a random sample of at most ``max_tokens`` per module
    ("random ratio sampling"); each ``[tokens, in_features]``."""
    keys: list[list[torch.Tensor]] = [[] for _ in modules]
    device = model_device(model)
    with FFNLayers.capture(modules, inputs=True) as captured:
        for batch in batches:
            attention_mask = batch["attention_mask"].to(device)
            model(input_ids=batch["input_ids"].to(device), attention_mask=attention_mask)
            mask = batch.get("positions", attention_mask).bool().to(device)
            for i in range(len(modules)):
                keys[i].append(captured[i][mask].float().cpu())
    if not keys or not keys[0]:
        raise UsageError("the null-space projection needs retain tokens: give a non-empty --retain set")
    generator = torch.Generator().manual_seed(seed)
    out = []
    for chunks in keys:
        k = torch.cat(chunks)
        if len(k) > max_tokens:
            k = k[torch.randperm(len(k), generator=generator)[:max_tokens]]
        out.append(k)
    return out


def null_space_projector(keys: torch.Tensor, threshold: float) -> torch.Tensor:
    """``P = U_s U_sᵀ`` over the eigenvectors of ``KᵀK`` with eigenvalue ``≤ threshold · λ_max``."""
    if len(keys) == 0:
        raise UsageError("the null-space projection needs retain tokens: give a non-empty --retain set")
    eigenvalues, eigenvectors = torch.linalg.eigh(keys.double().T @ keys.double())
    kept = eigenvectors[:, eigenvalues <= threshold * eigenvalues.max()]
    if kept.shape[1] == 0:
        raise UsageError(f"no direction has an eigenvalue below --null_space_threshold {threshold:g} × the largest: raise it")
    return (kept @ kept.T).float()


def subspace_energy(keys: torch.Tensor, projector: torch.Tensor) -> float:
    """Share ``‖K·P‖² / ‖K‖²`` of the keys' energy inside the projector's subspace: what an update confined there can
    reach. Forget keys that keep no more of it than retain keys do leave the projection nothing to forget with."""
    keys = keys.float().cpu()
    return float((keys @ projector.float().cpu()).pow(2).sum() / keys.pow(2).sum().clamp(min=1e-12))


def relative_output_change(original: torch.Tensor, updated: torch.Tensor, keys: torch.Tensor) -> float:
    """``‖(W − W₀)·K‖ / ‖W₀·K‖`` over keys: how much the layer's outputs on them moved."""
    original, updated, keys = (t.detach().float().cpu() for t in (original, updated, keys))
    return float(((updated - original) @ keys.T).norm() / (original @ keys.T).norm().clamp(min=1e-12))


class NullSpaceProjection(TrainerCallback):
    """After every optimiser step: ``W ← W₀ + (W − W₀)·P`` for each projected layer's weight (see the module docstring).

    The layers are held, not their weights: FSDP2 replaces each parameter by a sharded ``DTensor`` when training
    starts, so the weight is looked up at every step and read and written whole through :mod:`..trainers.engines`
    (ZeRO-3 partitions gathered, FSDP2 shards all-gathered; every process computes the same update)."""

    def __init__(self, layers: list[torch.nn.Linear], projectors: list[torch.Tensor]):
        from ..trainers import engines  # not at the top: the trainers import this module

        self.layers = layers
        self.projectors = [p.to(layer.weight.device, layer.weight.dtype) for layer, p in zip(layers, projectors)]
        self.originals = []
        with engines.gathered([layer.weight for layer in layers]):
            self.originals = [engines.full_value(layer.weight).detach().clone() for layer in layers]
        self.kept_dimensions = [int(round(float(p.trace()))) for p in projectors]

    @torch.no_grad()
    def project(self) -> None:
        from ..trainers import engines

        weights = [layer.weight for layer in self.layers]
        with engines.gathered(weights, modify=True):
            for i, (weight, original) in enumerate(zip(weights, self.originals)):
                full = engines.full_value(weight)
                if self.projectors[i].device != full.device:  # the engine moved the weights after the projection was built
                    self.projectors[i], self.originals[i] = self.projectors[i].to(full.device), original.to(full.device)
                engines.assign(weight, self.originals[i] + (full - self.originals[i]) @ self.projectors[i])

    def on_step_end(self, args, state, control, **kwargs):
        self.project()
