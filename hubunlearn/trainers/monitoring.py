"""Evaluation during training and the best state kept: TOFU's forget quality, measured every N steps, as a Trainer metric.

Every ``--eval_forget_quality_every N`` steps (or at the Trainer's own ``--eval_strategy``/``--eval_steps``), the
trainer's :meth:`evaluate` runs the same per-example statistics and aggregates as ``hubunlearn eval``
(:func:`~hubunlearn.evaluate.evaluate_sets`, :func:`~hubunlearn.evaluate.summarize`) on the first ``--eval_examples``
rows of each evaluation set: forget quality (the KS test of the forget truth ratios against a reference model's, whose
statistics are computed once and cached as eval's are, or read from ``--eval_reference_stats``), the forget and retain
answer probability and truth ratio, and optionally model utility. The numbers are logged like any Trainer metric
(``eval_forget_quality``, ...: the progress log, ``trainer.state.log_history``, and TensorBoard / W&B through
``--report_to``).

``--keep_best METRIC`` keeps a CPU copy of the trainable weights of the best evaluated state whose utility stays within
``--utility_budget τ`` (the retain ``--utility_metric`` probe at or above τ times the original's: the same test as
early stopping and calibration), the starting weights counting as step 0, and puts it back when training ends.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from ..errors import UsageError

if TYPE_CHECKING:
    from .base import UnlearnTrainer

logger = logging.getLogger(__name__)

# What --keep_best can rank states by, and whether higher is better.
KEEP_BEST = {"forget_quality": True, "forget_truth_ratio": True, "forget_probability": False, "model_utility": True}
# The logged numbers (with the Trainer's "eval_" prefix): (set, key in eval's set summary) or an aggregate's name.
LOGGED = {"forget_quality": "forget_quality", "forget_truth_ratio": ("forget", "truth_ratio"),
          "forget_probability": ("forget", "probability"), "retain_probability": ("retain", "probability"),
          "retain_truth_ratio": ("retain", "truth_ratio"), "model_utility": "model_utility"}
NEEDS_PERTURBED = ("forget_quality", "forget_truth_ratio")
REFERENCE_HOW = ("add --eval_reference MODEL (a model trained without the forget set, e.g. TOFU's retain model; its "
                 "statistics are cached) or --eval_reference_stats per_example.json (from an earlier hubunlearn eval)")


@dataclass
class EvaluationArguments:
    """The fields of evaluation during training (a part of every method's config)."""

    eval_forget_quality_every: int = field(default=0, metadata={
        "help": "Evaluate every N steps (0: off): forget quality against --eval_reference, forget and retain answer "
                "probability and truth ratio, as `hubunlearn eval` computes them, logged as eval_* metrics (--report_to). "
                "The Trainer's own --eval_strategy/--eval_steps run the same evaluation."})
    eval_reference: str | None = field(default=None, metadata={
        "help": "Reference model for forget quality during training: one trained without the forget set (TOFU's retain "
                "model). Its statistics are computed once and cached, as `hubunlearn eval --reference` does."})
    eval_reference_stats: str | None = field(default=None, metadata={
        "help": "per_example.json of an earlier `hubunlearn eval` of the reference, instead of --eval_reference."})
    eval_data: str | None = field(default=None, metadata={
        "help": "Folder or Hub id laid out like locuslab/TOFU, as eval's --data: evaluate on its forget split's, retain, "
                "real_authors and world_facts _perturbed sets. Default: the run's own forget and retain rows (truth "
                "ratios and forget quality only where they carry paraphrased_answer/perturbed_answer)."})
    eval_forget_split: str = field(default="forget10", metadata={"help": "With --eval_data: the TOFU forget split (forget01, forget05, forget10)."})
    eval_examples: int = field(default=32, metadata={"help": "Rows of each evaluation set evaluated (the first N, as eval's --max_examples)."})
    eval_model_utility: bool = field(default=False, metadata={
        "help": "Also log TOFU's model utility (needs --eval_data; adds greedy generations: slower)."})
    keep_best: str | None = field(default=None, metadata={
        "help": f"Keep the best evaluated state by this metric ({', '.join(KEEP_BEST)}) among those within --utility_budget "
                "(all of them without one; the starting weights count as step 0) and restore it when training ends. Early "
                "stopping (--budget_check_steps) still decides when training stops; the kept state needs no mixing."})

    def check_evaluation(self) -> None:
        """Refuse inconsistent settings in one line each; turn ``--eval_forget_quality_every N`` into the Trainer's
        step-based evaluation (before ``TrainingArguments`` checks its fields). Raises :class:`UsageError`."""
        every = self.eval_forget_quality_every
        if every < 0 or self.eval_examples < 1:
            raise UsageError("--eval_forget_quality_every must be at least 0 and --eval_examples at least 1")
        if self.keep_best is not None and self.keep_best not in KEEP_BEST:
            raise UsageError(f"unknown --keep_best '{self.keep_best}'; choose one of: {', '.join(KEEP_BEST)}")
        if self.eval_reference and self.eval_reference_stats:
            raise UsageError("give one of --eval_reference and --eval_reference_stats, not both")
        if self.eval_reference_stats and not Path(self.eval_reference_stats).is_file():
            raise UsageError(f"--eval_reference_stats {self.eval_reference_stats} does not exist: give a per_example.json from an earlier eval")
        if every:
            self.eval_strategy, self.eval_steps = "steps", every
        if self.keep_best is not None and not self.evaluates_in_training:
            raise UsageError(f"--keep_best {self.keep_best} picks among the evaluations during training: add "
                             "--eval_forget_quality_every N (or --eval_strategy steps --eval_steps N)")
        has_reference = bool(self.eval_reference or self.eval_reference_stats)
        if not has_reference and (every or self.keep_best == "forget_quality"):
            asked = "--eval_forget_quality_every" if every else "--keep_best forget_quality"
            raise UsageError(f"{asked}: forget quality needs a reference: {REFERENCE_HOW}")
        if (self.eval_model_utility or self.keep_best == "model_utility") and not self.eval_data:
            raise UsageError("model utility needs the real_authors and world_facts sets: give --eval_data (a folder or Hub id "
                             "laid out like locuslab/TOFU)")
        if self.keep_best == "model_utility":
            self.eval_model_utility = True
        if self.keep_best is not None:
            self.eval_on_start = True  # the starting weights are a candidate (step 0), always within the budget

    @property
    def evaluates_in_training(self) -> bool:
        return str(getattr(self.eval_strategy, "value", self.eval_strategy)) != "no"


class EvaluationDuringTraining(TrainerCallback):
    """The evaluation sets, the reference's statistics, every evaluation's numbers, and the kept state of one run.

    Built by the trainer when its config evaluates during training; :meth:`evaluate` is what the trainer's
    ``evaluate()`` returns (``{"eval_forget_quality": p, ...}``: floats; a number the data cannot give is left out,
    said once). Under ``accelerate`` the main process evaluates and sends the numbers to the others; each process then
    keeps and restores its own copy of the (replicated) trainable weights, so all end in the same state.
    """

    def __init__(self, trainer: "UnlearnTrainer", args):
        from ..data import DataFormat
        from ..evaluate import EvalConfig, load_sets
        from . import engines
        from .eco import ECOTrainer

        if isinstance(trainer, ECOTrainer) or not trainer.budget_checks_in_training:
            why = "trains no weights" if isinstance(trainer, ECOTrainer) else "makes its artifact from the trained weights after the last step"
            raise UsageError(f"evaluation during training does not apply to {trainer._name}, which {why}: drop "
                             "--eval_forget_quality_every/--eval_strategy and evaluate the artifact with hubunlearn eval")
        if engines.shards_weights(args):
            raise UsageError("evaluation during training runs the whole model on the main process, which FSDP and ZeRO-3 "
                             "shard: drop --eval_forget_quality_every/--eval_strategy, or use DDP or ZeRO-1/2")
        metrics = ["probability", "truth_ratio"]
        if args.eval_reference or args.eval_reference_stats:
            metrics.append("forget_quality")
        else:
            logger.info("evaluation during training without a reference: no forget quality (%s)", REFERENCE_HOW)
        if args.eval_model_utility:
            metrics += ["rouge", "model_utility"]
        self.config = EvalConfig(model=trainer.base_model_id, benchmark="tofu", data=args.eval_data, forget_split=args.eval_forget_split,
                                 metrics=tuple(metrics), max_examples=args.eval_examples, reference=args.eval_reference,
                                 reference_stats=args.eval_reference_stats, batch_size=args.per_device_eval_batch_size,
                                 device=_eval_device(args.device), data_format=DataFormat(max_length=args.max_length),
                                 progress=not args.disable_tqdm)
        self.sets = load_sets(self.config) if args.eval_data else self._own_sets(trainer, args.eval_examples)
        self.source = f"{args.eval_data} ({args.eval_forget_split})" if args.eval_data else "the run's own forget and retain rows"
        if args.keep_best in NEEDS_PERTURBED and not _has_perturbed(self.sets["forget"]):
            raise UsageError(f"--keep_best {args.keep_best} needs truth ratios, and the forget rows of {self.source} have no "
                             "paraphrased_answer/perturbed_answer: give --eval_data (a folder laid out like locuslab/TOFU) "
                             "or --keep_best forget_probability")
        self.trainer, self.reference, self.reference_source = trainer, None, None
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None  # {"step", "value", "utility_kept"} of the kept state
        self.snapshot: dict[str, torch.Tensor] | None = None
        self._said: set[str] = set()

    @staticmethod
    def _own_sets(trainer: "UnlearnTrainer", examples: int) -> dict[str, list[dict]]:
        sets = {}
        for name, (_, rows) in trainer.data_sources.items():
            if not {"question", "answer"} <= set(rows.column_names):
                raise UsageError(f"evaluation during training reads question-answer rows, and the {name} set has none: give "
                                 "--eval_data (a folder laid out like locuslab/TOFU)")
            sets[name] = [dict(rows[i]) for i in range(min(examples, len(rows)))]
        return sets

    @property
    def eval_dataset(self):
        """The forget rows evaluated (the Trainer wants an ``eval_dataset`` when its ``eval_strategy`` is set)."""
        import datasets

        return datasets.Dataset.from_list(self.sets["forget"])

    # ---- the Trainer's hooks ------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        """The reference's statistics, once, on the main process, before the first evaluation (``eval_on_start``)."""
        from ..evaluate import reference_statistics

        if (self.config.reference or self.config.reference_stats) and self.trainer.is_world_process_zero() and self.reference is None:
            self.reference, self.reference_source = reference_statistics(self.config, self.sets)

    def on_train_end(self, args, state, control, **kwargs):
        """Put the kept state back (every process: its own copy) and record the evaluations."""
        keep = self.trainer.args.keep_best
        if keep is not None and self.snapshot is not None:
            with torch.no_grad():
                for name, p in _trainable(self.trainer.accelerator.unwrap_model(self.trainer.model)).items():
                    p.copy_(self.snapshot[name])
            logger.info("--keep_best %s: restored step %d (%s %.4g)", keep, self.best["step"], keep, self.best["value"])
            if self.best["step"] == 0 and self.trainer.is_world_process_zero():  # no later state was strictly better
                logger.warning("--keep_best %s kept the starting weights (step 0): no later evaluation was better, so nothing "
                               "was unlearned. Evaluate more rows (--eval_examples; small sets give tied, coarse values), train "
                               "harder, or rank by --keep_best forget_probability", keep)
        self.snapshot = None
        self.trainer.record_extras["evaluation_during_training"] = self.record()

    # ---- one evaluation -------------------------------------------------------------------------------------------

    def evaluate(self, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Evaluate the current weights (main process; the numbers go to every process), consider them for
        ``--keep_best``, and return them with ``metric_key_prefix``."""
        from accelerate.utils import broadcast_object_list

        trainer = self.trainer
        shared: list[Any] = [None]
        if trainer.is_world_process_zero():
            try:
                shared = [self.measure()]
            except Exception as error:  # every process stops, not only the main one
                shared = [error]
        if trainer.args.world_size > 1:
            broadcast_object_list(shared, from_process=0)
        if isinstance(shared[0], Exception):
            raise shared[0]
        values, step = shared[0], trainer.state.global_step
        stopping = getattr(trainer, "_early_stopping", None)
        if stopping is not None and stopping.stopped_at == step:  # early stopping has just put back an earlier state
            step = stopping.kept_step
        self.history.append({"step": trainer.state.global_step, **({"weights_of_step": step} if step != trainer.state.global_step else {}),
                             **values})
        if trainer.args.keep_best is not None:
            self._consider(values, step)
        return {f"{metric_key_prefix}_{key}": value for key, value in values.items()}

    def measure(self) -> dict[str, float]:
        """The numbers of :data:`LOGGED` the data allow, from eval's own functions, and ``utility_kept`` (the budget
        probe over the original's) with ``--utility_budget``."""
        from ..evaluate import evaluate_sets, summarize

        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                per_example = evaluate_sets(model, trainer.processing_class, self.sets, self.config)
        finally:
            model.train(was_training)
        summary = summarize(per_example, self.config, self.reference)
        values: dict[str, float] = {}
        for name, where in LOGGED.items():
            if isinstance(where, tuple):
                value = summary["sets"].get(where[0], {}).get(where[1])
                why = f"the {where[0]} rows of {self.source} have no paraphrased_answer/perturbed_answer"
            elif where in summary["aggregates"]:
                value, why = summary["aggregates"][where]["value"], summary["aggregates"][where].get("unavailable")
            else:
                continue
            if value is not None and math.isfinite(value):
                values[name] = float(value)
            elif not isinstance(where, tuple) or where[0] in self.sets:
                self._say_once(name, f"evaluation during training: no {name} ({why}); logging the others")
        if trainer.args.utility_budget is not None and hasattr(trainer, "_probe_original"):
            original = trainer._probe_original
            values["utility_kept"] = trainer.probe() / original if original > 0 else 0.0
        return values

    def _consider(self, values: dict[str, float], step: int) -> None:
        """Keep the trainable weights when this state is within budget and strictly better than the kept one (ties
        keep the earlier state: fewer steps away from the original)."""
        keep, tau = self.trainer.args.keep_best, self.trainer.args.utility_budget
        value = values.get(keep)
        within = tau is None or values.get("utility_kept", 0.0) >= tau
        if value is None or not within:
            return
        higher = KEEP_BEST[keep]
        if self.best is None or (value > self.best["value"] if higher else value < self.best["value"]):
            model = self.trainer.accelerator.unwrap_model(self.trainer.model)
            self.snapshot = {name: p.detach().to("cpu", copy=True) for name, p in _trainable(model).items()}
            self.best = {"step": step, "value": value, **({"utility_kept": values["utility_kept"]} if tau is not None else {})}

    def _say_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            logger.warning(message)

    def record(self) -> dict[str, Any]:
        """What ``unlearning.json`` and the card say: the sets, the reference, every evaluation, and the kept state."""
        from ..evaluate import describe_reference

        args = self.trainer.args
        record: dict[str, Any] = {
            "every": args.eval_steps if str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "steps" else "epoch",
            "sets": self.source, "examples": {name: len(rows) for name, rows in self.sets.items()},
            "reference": describe_reference(self.reference_source) if self.reference_source else None,
            "history": self.history,
        }
        if args.keep_best is not None:
            kept = dict(self.best or {})
            direction = "highest" if KEEP_BEST[args.keep_best] else "lowest"
            budget = (f"among the evaluations whose retain {args.utility_metric} stayed at or above {args.utility_budget}× the "
                      "original's" if args.utility_budget is not None else "among all evaluations (no --utility_budget)")
            kept.update(metric=args.keep_best, utility_budget=args.utility_budget,
                        reason=f"the {direction} {args.keep_best} {budget}" if self.best else
                        f"no evaluation had a {args.keep_best} within the budget: the final weights were kept")
            record["keep_best"] = kept
        return record


def _has_perturbed(rows: list[dict]) -> bool:
    from ..metrics.tofu import PARAPHRASED_KEY, PERTURBED_KEY

    return bool(rows) and all(row.get(PERTURBED_KEY) and row.get(PARAPHRASED_KEY) for row in rows)


def _eval_device(device: torch.device) -> str:
    """Where the reference model computes its statistics, in eval's --device terms: the training device."""
    return str(device) if device.type == "cuda" else device.type if device.type == "cpu" else "auto"


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
