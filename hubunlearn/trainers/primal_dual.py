"""PDU: unlearning as a constrained problem, the retain NLL bounded by ε, solved by primal-dual descent-ascent."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from accelerate.utils import reduce
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..search_spaces import COMMON, Float
from ..errors import UsageError
from . import losses
from .base import UnlearnConfig, UnlearnTrainer


@dataclass
class PDUConfig(UnlearnConfig):
    """Logit-margin flattening on the forget set, subject to retain NLL ≤ ε, with a dual variable updated every step."""

    # what `hubunlearn tune` searches: the dual variable's start replaces the retain weight
    search_space: ClassVar[dict] = {**{k: v for k, v in COMMON.items() if k != "retain_weight"},
                                    "initial_multiplier": Float(10.0, 300.0, log=True), "dual_step_size": Float(0.1, 10.0, log=True)}

    retain_losses: ClassVar[tuple[str, ...]] = ("nll",)  # the constraint is on the retain NLL

    retain_loss: str = field(default="nll", metadata={"help": "Retain term: 'nll', the constrained quantity (the only choice)."})
    retain_epsilon: float | None = field(default=None, metadata={
        "help": "Required: the bound ε on the retain NLL (mean nats per retain answer token) that unlearning must keep. Pick it "
                "above the original model's retain NLL, e.g. 1.1-1.5x it (the paper's advice: ε = (1 + tolerance) x the "
                "original's retain loss)."})
    dual_step_size: float = field(default=1.0, metadata={
        "help": "Step η of the dual ascent λ ← max(0, λ + η·(retain NLL − ε)), taken after every optimiser step."})
    initial_multiplier: float = field(default=100.0, metadata={
        "help": "Starting value of the dual variable λ, the retain term's weight (the authors start it at 50-100: the "
                "forget term, a squared logit gap, is large). It replaces --retain_weight."})
    restore_callback_states_from_checkpoint: bool = field(default=True, metadata={
        "help": "Resuming from a checkpoint restores the dual variable saved in it (kept on for PDU)."})

    def __post_init__(self):
        super().__post_init__()
        if self.retain_epsilon is None:
            raise UsageError("PDU needs --retain_epsilon: the bound on the retain NLL (nats per token) to keep; pick one above "
                             "the original model's retain NLL, e.g. 1.2x it")
        if not self.retain_epsilon > 0:
            raise UsageError(f"--retain_epsilon must be above 0 (a bound on the retain NLL, in nats per token); got {self.retain_epsilon}")
        if not (self.dual_step_size >= 0 and self.initial_multiplier >= 0):
            raise UsageError(f"--dual_step_size and --initial_multiplier must be at least 0; got {self.dual_step_size} and {self.initial_multiplier}")
        if self.retain_weight != 1.0:
            raise UsageError("PDU weighs the retain term by its dual variable: drop --retain_weight (set --initial_multiplier)")


class DualAscent(TrainerCallback, ExportableState):
    """PDU's dual variable λ ≥ 0: after each optimiser step, one projected ascent step on the mean retain NLL of that
    step's batches, averaged over the processes (so λ is the same on every one). Saved in the Trainer's checkpoints
    (``trainer_state.json``'s ``stateful_callbacks``) and restored when training resumes from one."""

    def __init__(self, multiplier: float, epsilon: float, step_size: float):
        self.multiplier, self.epsilon, self.step_size = float(multiplier), float(epsilon), float(step_size)
        self.pending: list[torch.Tensor] = []

    def record(self, retain_loss: torch.Tensor) -> None:
        """A training batch's retain NLL (kept on its device until the step ends: no synchronisation per batch)."""
        self.pending.append(retain_loss.detach().float())

    def on_step_end(self, args, state, control, **kwargs):
        if self.pending:
            constraint = reduce(torch.stack(self.pending).mean(), "mean").item()
            self.pending.clear()
            self.multiplier = losses.dual_ascent(self.multiplier, constraint, self.epsilon, self.step_size)

    def state(self) -> dict:
        return {"args": {"multiplier": self.multiplier, "epsilon": self.epsilon, "step_size": self.step_size}, "attributes": {}}


class PDUTrainer(UnlearnTrainer):
    """Primal-dual unlearning (Entesari et al., "Constrained Entropic Unlearning: A Primal-Dual Framework for Large
    Language Models", arXiv 2506.05314): minimise the logit-margin flattening loss ``(max_v z_v − mean_v z_v)²`` on the
    forget answers subject to retain NLL ≤ ε, through the Lagrangian ``forget + λ·(retain NLL − ε)``: gradient descent
    on the weights, and after every step projected dual ascent ``λ ← max(0, λ + η·(retain NLL − ε))``.

    The variant built: the dual update after every step from the first (OpenUnlearning's PDU also offers an update once
    per epoch and warm-up epochs without dual updates, the paper's warm start: not built), the forget term averaged over
    the positions that predict an answer token (OpenUnlearning's averages over every position of the padded batch,
    question and padding included). λ₀ = 100 follows the authors' advice of 50-100; η = 1 is OpenUnlearning's default
    (the paper's own table could not be read when this was written). λ is logged as ``retain_multiplier`` and recorded
    in ``unlearning.json``."""

    _name = "PDU"
    _paper = {"id": "2506.05314", "title": "Constrained Entropic Unlearning: A Primal-Dual Framework for Large Language Models",
              "authors": "Taha Entesari and Arman Hatami and Rinat Khaziev and Anil Ramakrishna and Mahyar Fazlyab", "year": 2025}
    config_class = PDUConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(DualAscent(self.args.initial_multiplier, self.args.retain_epsilon, self.args.dual_step_size))

    @property
    def dual(self) -> DualAscent:
        """The dual variable's callback (a resumed run replaces it by the one restored from the checkpoint)."""
        return next(callback for callback in self.callback_handler.callbacks if isinstance(callback, DualAscent))

    def forget_loss_from_logits(self, logits, forget):
        return losses.logit_margin_flattening_loss(logits, forget["labels"])

    def total_loss(self, forget_loss, retain_loss):
        dual = self.dual
        if self.model.training:
            dual.record(retain_loss)
            self._logged["retain_multiplier"].append(dual.multiplier)
        return self.args.forget_weight * forget_loss + dual.multiplier * (retain_loss - self.args.retain_epsilon)

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        self.record_extras["dual"] = {"retain_multiplier": self.dual.multiplier, "retain_epsilon": self.args.retain_epsilon,
                                      "updates": "projected dual ascent after every optimiser step"}
        return output
