"""FILA: Fisher-weighted initialisation of LoRA adapters for unlearning (Cha et al., "Towards Robust and
Parameter-Efficient Knowledge Unlearning for LLMs", ICLR 2025, arXiv 2408.06621, Section 4.2).

The adapter starts as the rank-r approximation of each targeted weight that is weighted towards the rows the
forget set needs more than the retain set, and the base weight keeps the rest, ``W_res = W - s·B·A``, so the
model's outputs are unchanged at initialisation while the unlearning updates concentrate where the forget
knowledge lives.

Choices made here, beyond the paper: the Fisher pass runs in eval mode (no dropout, so every process of a
distributed run computes the same initialisation) over the trainer's forget/retain pairs; the truncated SVD is
``torch.svd_lowrank`` (oversampled, fixed seed); after training the adapter is converted, with PEFT's rank-2r
conversion (``path_initial_model_for_weight_conversion``, as for PiSSA), into a standard adapter for the
*unmodified* base model, and the base weights are restored, so nothing ever depends on ``W_res``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from .errors import UsageError
from .trainers.losses import nll_loss

EPSILON = 1e-5
OVERSAMPLING = 8  # extra columns of the randomised SVD, truncated afterwards (Halko et al.)


def lora_layers(model, adapter: str = "default") -> dict[str, torch.nn.Module]:
    """The model's LoRA layers of ``adapter``, by module name; FILA needs them to wrap ``nn.Linear``."""
    from peft.tuners.lora import LoraLayer

    layers = {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer) and adapter in module.lora_A}
    for name, module in layers.items():
        if not isinstance(module.get_base_layer(), torch.nn.Linear) or getattr(module, "fan_in_fan_out", False):
            raise UsageError(f"--lora_init fila supports adapters on nn.Linear layers; {name} is a "
                             f"{type(module.get_base_layer()).__name__}: choose other --lora_target_modules")
    return layers


def empirical_fisher(model, weights: dict[str, torch.nn.Parameter], batches: Iterable[dict]) -> dict[str, dict[str, torch.Tensor]]:
    """Token-normalised empirical Fisher of each weight on the forget and the retain parts of ``batches``.

    Each batch (``{"forget": {...}, "retain": {...}}``) adds ``(∂L/∂W)² · n`` per part, where ``L`` is the
    part's mean token NLL and ``n`` its number of labelled tokens; the sums are divided by the total token
    counts. Returns ``{"forget": {name: F}, "retain": {name: F}}`` in fp32.
    """
    fisher = {part: {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()} for part in ("forget", "retain")}
    tokens = {"forget": 0, "retain": 0}
    flags = {name: w.requires_grad for name, w in weights.items()}
    was_training = model.training
    model.eval()
    try:
        for weight in weights.values():
            weight.requires_grad_(True)
        for batch in batches:
            for part in ("forget", "retain"):
                inputs = batch[part]
                count = int((inputs["labels"][:, 1:] != -100).sum())
                if count == 0:
                    continue
                logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
                gradients = torch.autograd.grad(nll_loss(logits, inputs["labels"]), list(weights.values()), allow_unused=True)
                for (name, _), gradient in zip(weights.items(), gradients):
                    if gradient is not None:
                        fisher[part][name] += gradient.float().square() * count
                tokens[part] += count
    finally:
        for name, weight in weights.items():
            weight.requires_grad_(flags[name])
        model.train(was_training)
    for part, count in tokens.items():
        if count == 0:
            raise UsageError(f"the {part} set has no answer tokens for the Fisher pass of --lora_init fila")
        for value in fisher[part].values():
            value /= count
    return fisher


def relative_importance(fisher_forget: torch.Tensor, fisher_retain: torch.Tensor, epsilon: float = EPSILON) -> torch.Tensor:
    """``I = F_forget / (ε + F_retain)``, element-wise: how much more the forget set needs a weight than the retain set."""
    return fisher_forget / (epsilon + fisher_retain)


def fila_factors(weight: torch.Tensor, importance: torch.Tensor, rank: int, scaling: float, seed: int = 0,
                 epsilon: float = EPSILON) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors ``(A, B)`` (``r×in``, ``out×r``, fp32) such that ``scaling·B·A`` is the Fisher-row-weighted
    rank-r approximation of ``weight``: with row weights ``w_i = sqrt(Σ_j I_ij)`` and ``diag(w)·W ≈ U S Vᵀ``,
    ``A = (V S'^½)ᵀ`` and ``B = diag(1/(w+ε)) U S'^½`` where ``S' = S / scaling``."""
    weight = weight.float()
    rows = importance.float().sum(dim=1).sqrt()
    with torch.random.fork_rng(devices=[weight.device] if weight.device.type == "cuda" else []):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(rows[:, None] * weight, q=min(rank + OVERSAMPLING, *weight.shape), niter=4)
    u, s, v = u[:, :rank], s[:rank], v[:, :rank]
    root = (s / scaling).sqrt()
    return (v * root).T.contiguous(), ((u * root) / (rows + epsilon)[:, None]).contiguous()


def initialise(model, batches: Iterable[dict], adapter: str = "default", seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Set every LoRA layer of ``adapter`` to its FILA factors and its base weight to ``W - s·B·A``.

    Returns the initial factors by layer name (what :func:`restore_base` needs to give the weights back).
    """
    layers = lora_layers(model, adapter)
    weights = {name: layer.get_base_layer().weight for name, layer in layers.items()}
    fisher = empirical_fisher(model, weights, batches)
    initial = {}
    with torch.no_grad():
        for name, layer in layers.items():
            weight, scaling = weights[name], layer.scaling[adapter]
            importance = relative_importance(fisher["forget"][name], fisher["retain"][name])
            a, b = fila_factors(weight, importance, layer.r[adapter], scaling, seed)
            a, b = a.to(layer.lora_A[adapter].weight.dtype), b.to(layer.lora_B[adapter].weight.dtype)
            layer.lora_A[adapter].weight.copy_(a)
            layer.lora_B[adapter].weight.copy_(b)
            weight.copy_((weight.float() - scaling * (b.float() @ a.float())).to(weight.dtype))
            initial[name] = (a.clone(), b.clone())
    return initial


def restore_base(model, initial: dict[str, tuple[torch.Tensor, torch.Tensor]], adapter: str = "default") -> None:
    """Give the base weights back: ``W = W_res + s·B₀·A₀``."""
    layers = lora_layers(model, adapter)
    with torch.no_grad():
        for name, (a, b) in initial.items():
            weight = layers[name].get_base_layer().weight
            weight.copy_((weight.float() + layers[name].scaling[adapter] * (b.float() @ a.float())).to(weight.dtype))


def to_standard_adapter(model, initial: dict[str, tuple[torch.Tensor, torch.Tensor]], adapter: str = "default") -> None:
    """Turn a trained FILA adapter into a standard one, in place: the adapter becomes PEFT's rank-2r conversion
    ``[A; A₀]``, ``[B, -B₀]`` (so ``s·B'A' = s·(BA - B₀A₀)``) and the base weights are restored, so the model
    computes the same function on the unmodified base, and saves an adapter that loads there."""
    work = Path(tempfile.mkdtemp(prefix="hubunlearn-fila-"))
    try:
        initial_dir = work / "initial"
        trained = {name: (layer.lora_A[adapter].weight.detach().clone(), layer.lora_B[adapter].weight.detach().clone())
                   for name, layer in lora_layers(model, adapter).items()}
        with torch.no_grad():  # PEFT's conversion reads the initial adapter from disk
            for name, layer in lora_layers(model, adapter).items():
                layer.lora_A[adapter].weight.copy_(initial[name][0])
                layer.lora_B[adapter].weight.copy_(initial[name][1])
            model.save_pretrained(str(initial_dir), selected_adapters=[adapter])
            for name, layer in lora_layers(model, adapter).items():
                layer.lora_A[adapter].weight.copy_(trained[name][0])
                layer.lora_B[adapter].weight.copy_(trained[name][1])
        model.save_pretrained(str(work / "converted"), selected_adapters=[adapter],
                              path_initial_model_for_weight_conversion=str(initial_dir))
        restore_base(model, initial, adapter)
        model.load_adapter(str(work / "converted"), adapter_name="fila-converted")
        model.set_adapter("fila-converted")
        model.delete_adapter(adapter)
        model.load_adapter(str(work / "converted"), adapter_name=adapter)
        model.set_adapter(adapter)
        model.delete_adapter("fila-converted")
    finally:
        shutil.rmtree(work, ignore_errors=True)
