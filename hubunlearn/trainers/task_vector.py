"""Task-vector negation: fine-tune on the forget set, then subtract that update from the original."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..search_spaces import COMMON, Float
from ..controls import mix_state_dicts, scale_lora_deltas
from ..errors import UsageError
from . import engines, losses
from .base import UnlearnConfig, UnlearnTrainer


MAX_NEGATION_WEIGHT = 100.0  # far past any useful negation; larger weights overflow the weights' float range


@dataclass
class TaskVectorConfig(UnlearnConfig):
    """Fine-tuning (gradient descent, NLL) on the forget set, then ``θ = θ₀ − w·Δ``; no retain term."""

    search_space: ClassVar[dict] = {**COMMON, "negation_weight": Float(0.25, 4.0, log=True)}  # what `hubunlearn tune` searches

    retain_loss: str = field(default="none", metadata={
        "help": "Only 'none': the fine-tune trains on the forget set alone (MUSE's task-vector baseline); a retain term "
                "would enter Δ and be subtracted too. A --retain set is still measured (and used by --utility_budget)."})
    negation_weight: float = field(default=1.0, metadata={
        "help": "w in θ = θ₀ − w·Δ (Δ: what fine-tuning on the forget set changed); above 0, default 1, the plain negation "
                "−Δ (Ilharco et al. tune this coefficient on held-out data). --utility_budget then scales it down to the "
                "largest α·w within the budget."})

    def __post_init__(self):
        if self.retain_loss != "none":
            raise UsageError(f"task_vector trains no retain term (Δ would carry it, and negating Δ would unlearn the retain set "
                             f"too): drop --retain_loss {self.retain_loss} (a --retain set is still measured)")
        super().__post_init__()
        if not (math.isfinite(self.negation_weight) and 0 < self.negation_weight <= MAX_NEGATION_WEIGHT):
            raise UsageError(f"--negation_weight must be above 0 and at most {MAX_NEGATION_WEIGHT:g} (θ = θ₀ − w·Δ; task arithmetic "
                             f"uses about 1); got {self.negation_weight}")
        if self.budget_check_steps:
            raise UsageError("--budget_check_steps probes the model during training, which for task_vector is the fine-tuned "
                             "(amplified) one: drop it; --utility_budget alone calibrates the negated model at the end")


class TaskVectorTrainer(UnlearnTrainer):
    """Task-vector negation (Ilharco et al., "Editing Models with Task Arithmetic", arXiv 2212.04089; the TV baseline
    of MUSE, arXiv 2407.06460): fine-tune on the forget set (gradient descent on its NLL) to amplify it, then subtract
    that update from the original, ``θ = θ₀ − w·Δ`` with ``Δ = θ_fine-tuned − θ₀`` and ``w`` = ``--negation_weight``.

    Full fine-tuning keeps a CPU copy of θ₀ and writes ``(1 + w)·θ₀ − w·θ_fine-tuned`` (``mix_state_dicts`` at
    ``α = −w``) into the model; a LoRA fine-tune's Δ is its adapter ``s·B·A``, so ``B`` is multiplied by ``−w`` in place
    and the adapter, again a LoRA adapter, loads on the unmodified base (PEFT's ``add_weighted_adapter`` is not used: a
    single adapter with a negative weight comes out un-negated there, peft issue 3004). FILA works (its adapter is
    first converted to a standard one, whose delta is Δ), as does ``--lora_export merged``. ``--utility_budget`` mixes
    the negated model with the original, which scales ``w`` down to ``α·w``; ``--budget_check_steps`` (which would probe
    the fine-tuned model) is refused, as are FSDP and ZeRO-3 (their weights are sharded) and LoRA variants whose update
    is not ``s·B·A`` (DoRA, LoRA bias, trained bias or ``modules_to_save``)."""

    _name = "TaskVector"
    _paper = {"id": "2212.04089", "title": "Editing Models with Task Arithmetic",
              "authors": "Gabriel Ilharco and Marco Tulio Ribeiro and Mitchell Wortsman and Suchin Gururangan and Ludwig Schmidt "
                         "and Hannaneh Hajishirzi and Ali Farhadi", "year": 2022}
    config_class = TaskVectorConfig
    budget_checks_in_training = False

    def __init__(self, model, args: TaskVectorConfig | None = None, forget_dataset=None, retain_dataset=None, processing_class=None,
                 ref_model=None, peft_config=None, callbacks=None):
        if args is not None and engines.shards_weights(args):
            raise UsageError("task_vector subtracts the fine-tuned weights from the original's in one process, which FSDP and "
                             "ZeRO-3 shard: run it with ZeRO stage 2 or plain data parallelism")
        _check_lora(peft_config)
        super().__init__(model, args, forget_dataset, retain_dataset, processing_class, ref_model, peft_config, callbacks)
        if peft_config is None and self._original_state is None:  # θ₀ (base keeps one only for --utility_budget)
            self._original_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        self.record_extras["task_vector"] = {"negation_weight": self.args.negation_weight,
                                             "delta": "lora adapter" if peft_config is not None else "full weights"}

    def forget_loss_from_logits(self, logits, forget):
        return losses.nll_loss(logits, forget["labels"])

    @torch.no_grad()
    def after_training(self, model) -> None:
        """``θ = θ₀ − w·Δ`` in place (see the class docstring)."""
        weight = self.args.negation_weight
        if hasattr(model, "peft_config"):
            scale_lora_deltas(model, -weight)
            return
        trained = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        model.load_state_dict(mix_state_dicts(self._original_state, trained, -weight))
        if self.args.utility_budget is None:
            self._original_state = None  # the budget's mixing reads it next; otherwise free it


def _check_lora(peft_config) -> None:
    """A negated adapter is ``−w·s·B·A`` only for plain LoRA factors: refuse what adds other trained terms."""
    if peft_config is None:
        return
    extra = [name for name, on in (("use_dora", getattr(peft_config, "use_dora", False)), ("lora_bias", getattr(peft_config, "lora_bias", False)),
                                   (f"bias='{getattr(peft_config, 'bias', 'none')}'", getattr(peft_config, "bias", "none") != "none"),
                                   ("modules_to_save", bool(getattr(peft_config, "modules_to_save", None)))) if on]
    if extra:
        raise UsageError(f"task_vector negates a LoRA adapter's s·B·A, which {extra[0]} adds to: use a plain LoRA config")
