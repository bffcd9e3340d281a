"""Controls from "Unlearning with Control" (Wang et al., "Towards Effective Evaluations and Comparisons for LLM
Unlearning Methods", ICLR 2025, arXiv 2406.09179): model mixing to a utility budget, and early stopping at it.

Mixing interpolates the weights, ``θ(α) = (1 - α)·θ_original + α·θ_unlearned``; for a LoRA adapter on the
original base that is the adapter's delta scaled by ``α``. Calibration picks the largest ``α`` whose retain
metric stays at or above ``τ`` times the original's, by bisection (the metric falls as ``α`` grows).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from transformers import TrainerCallback

from .errors import UsageError

logger = logging.getLogger(__name__)
UTILITY_METRICS = ("extraction_strength", "probability")


def check_budget(tau: float) -> None:
    if not 0 < tau <= 1:
        raise UsageError(f"--utility_budget must be in (0, 1] (a share of the original's retain metric); got {tau}")


def mix_state_dicts(original: dict[str, torch.Tensor], unlearned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - α)·original + α·unlearned`` for floating-point tensors (others taken from ``unlearned``); the two
    must have the same architecture: the same tensor names and shapes."""
    if original.keys() != unlearned.keys():
        names = sorted(original.keys() ^ unlearned.keys())
        raise UsageError(f"cannot mix models of different architectures: {len(names)} weights appear in only one "
                         f"(e.g. {names[0]}): mix a model with an unlearned copy of itself")
    mixed = {}
    for name, value in unlearned.items():
        if original[name].shape != value.shape:
            raise UsageError(f"cannot mix models of different architectures: {name} is {tuple(original[name].shape)} in one "
                             f"and {tuple(value.shape)} in the other")
        mixed[name] = torch.lerp(original[name].to(value.dtype), value, alpha) if value.is_floating_point() else value
    return mixed


class ModelMixer:
    """Puts ``model`` at any mixing coefficient ``α`` in place: a full model from CPU copies of both endpoints,
    a LoRA model by scaling its active adapter (``α = 0`` is the base model, ``α = 1`` the trained adapter)."""

    def __init__(self, model, original_state: dict[str, torch.Tensor] | None = None):
        self.model, self.alpha = model, 1.0
        self.lora = hasattr(model, "peft_config")
        if not self.lora:
            if original_state is None:
                raise ValueError("mixing a full model needs the original's state dict")
            self.unlearned = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self.original = original_state
            mix_state_dicts(self.original, self.unlearned, 0.0)  # architecture check, before any change

    def _lora_layers(self):
        from peft.tuners.lora import LoraLayer

        return [m for m in self.model.modules() if isinstance(m, LoraLayer)]

    def set_alpha(self, alpha: float) -> None:
        if self.lora:
            for layer in self._lora_layers():
                for adapter in layer.active_adapters:
                    layer.set_scale(adapter, alpha)
        else:
            self.model.load_state_dict(mix_state_dicts(self.original, self.unlearned, alpha))
        self.alpha = alpha

    def bake(self) -> None:
        """Make the current ``α`` permanent (for an adapter: fold it into the B factors), so the model saves as mixed."""
        if self.lora:
            scale_lora_deltas(self.model, self.alpha)
            for layer in self._lora_layers():
                for adapter in layer.active_adapters:
                    layer.set_scale(adapter, 1.0)


@torch.no_grad()
def scale_lora_deltas(model, factor: float) -> None:
    """Multiply every active LoRA delta ``s·B·A`` of ``model`` by ``factor`` in place, by scaling its B factor:
    ``lora_B`` of linear layers and ``lora_embedding_B`` of embedding layers (a parameter, not a module)."""
    from peft.tuners.lora import LoraLayer

    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        for adapter in layer.active_adapters:
            for factors in (layer.lora_B, layer.lora_embedding_B):
                if adapter in factors:
                    (factors[adapter].weight if hasattr(factors[adapter], "weight") else factors[adapter]).mul_(factor)


def calibrate(measure: Callable[[float], float], original: float, tau: float, iterations: int = 8) -> tuple[float, list[tuple[float, float]]]:
    """The largest ``α`` in [0, 1] with ``measure(α) >= τ·original``, by bisection; and every ``(α, value)`` measured.

    ``α = 1`` is taken when it meets the budget; ``α = 0`` (the original) when nothing else does, with a
    warning when even the original misses it (a retain metric of 0 leaves no share to keep).
    """
    check_budget(tau)
    target = tau * original
    curve = [(1.0, measure(1.0))]
    if curve[-1][1] >= target and original > 0:
        return 1.0, curve
    low, high = 0.0, 1.0
    for _ in range(iterations if original > 0 else 0):
        middle = (low + high) / 2
        curve.append((middle, measure(middle)))
        low, high = (middle, high) if curve[-1][1] >= target else (low, middle)
    if low == 0.0:
        curve.append((0.0, measure(0.0)))
        if original <= 0 or curve[-1][1] < target:
            logger.warning("the utility budget cannot be met even at alpha = 0 (the original's retain metric is %.4g): "
                           "returning the original model", original)
    return low, sorted(curve)


def probe_metric(model, tokenizer, examples: Sequence[dict], metric: str, batch_size: int = 32) -> float:
    """Mean retain metric of ``model`` on ``examples``: extraction strength (Wang et al.) or answer probability."""
    from .metrics.extraction import extraction_strength
    from .metrics.likelihood import answer_probabilities

    was_training = model.training
    model.eval()
    try:
        if metric == "extraction_strength":
            values = extraction_strength(model, tokenizer, examples, batch_size)
        else:
            values = answer_probabilities(model, examples, tokenizer.pad_token_id, batch_size)
    finally:
        model.train(was_training)
    return sum(values) / len(values)


class UtilityBudgetStopping(TrainerCallback):
    """Every ``every`` steps, measure the retain probe; when it falls below ``τ`` times the original's, stop and
    put back the trainable weights of the last check that was within budget."""

    def __init__(self, measure: Callable[[], float], original: float, tau: float, every: int):
        self.measure, self.target, self.every = measure, tau * original, every
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.history: list[dict] = []
        self.stopped_at: int | None = None
        self.kept_step = 0  # the step whose weights the snapshot holds (0: the original's)

    def _trainable(self, model) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in model.named_parameters() if p.requires_grad}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.snapshot = {name: p.detach().to("cpu", copy=True) for name, p in self._trainable(model).items()}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every:
            return
        value = self.measure()
        self.history.append({"step": state.global_step, "value": value})
        if value >= self.target:
            self.snapshot = {name: p.detach().to("cpu", copy=True) for name, p in self._trainable(model).items()}
            self.kept_step = state.global_step
            return
        self.stopped_at = state.global_step
        with torch.no_grad():
            for name, p in self._trainable(model).items():
                p.copy_(self.snapshot[name])
        logger.warning("the retain probe fell to %.4g, below the budget %.4g, at step %d: stopped and restored %s", value,
                       self.target, state.global_step, f"step {self.kept_step}, the last within budget" if self.kept_step
                       else "the original weights (no check was within budget): lower --learning_rate or --budget_check_steps")
        control.should_training_stop = True
