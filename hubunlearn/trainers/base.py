"""``UnlearnConfig`` / ``UnlearnTrainer``: the shared machinery of every gradient unlearning method.

The trainer draws a forget batch and a retain batch each step (see :class:`~hubunlearn.data.ForgetRetainDataset`),
runs them through the model in one forward pass (methods whose terms read only the logits), asks its method for the
forget loss, adds the retain term (``nll`` on retain data or ``kl`` to the frozen reference), stops on a non-finite
loss, and saves a self-describing artifact.

The frozen original enters three ways: as cached statistics (a method that needs only its summed log-likelihood of
each forget answer, NPO, declares ``reference_statistics``: they are computed once before training and travel with
the examples, and no reference model is held), as the base with the LoRA adapter switched off, or as a frozen copy
(full fine-tuning with the retain KL, and the representation methods) on the training device or, with
``--reference_device cpu``, on the CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import inspect
import logging
import math
import os
from collections import defaultdict
from datetime import datetime, timezone
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

import datasets
import torch
from transformers import PreTrainedModel, PrinterCallback, ProgressCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

from .. import __version__
from ..artifacts import check_output_dir, library_versions, staging_dir, write_record
from ..cards import card_text
from ..data import (
    ALTERNATE,
    DataFormat,
    DataSpec,
    ForgetRetainCollator,
    ForgetRetainDataset,
    completion,
    concatenate_batches,
    count_overlap,
    describe,
    load_rows,
    pad_examples,
    tokenize_rows,
    with_question_answer,
)
from ..controls import UTILITY_METRICS, ModelMixer, UtilityBudgetStopping, calibrate, check_budget, probe_metric
from ..errors import NonFiniteLossError, UsageError
from ..modeling import ensure_pad_token, hub_facts, load_model, load_tokenizer, model_device
from ..search_spaces import COMMON as COMMON_SEARCH_SPACE
from . import engines, losses
from .head import HeadLogits, policy_logits
from .monitoring import EvaluationArguments, EvaluationDuringTraining

logger = logging.getLogger(__name__)
TRAINING_ARGUMENT_FIELDS = {f.name for f in dataclasses.fields(TrainingArguments)}
RETAIN_LOSSES = ("nll", "kl", "none")
LORA_INITS = ("default", "fila")
LORA_EXPORTS = ("adapter", "merged")
REFERENCE_DEVICES = ("same", "cpu")
UTILITY_FLOOR = 0.8  # a run that keeps less of the retain answer probability than this share ends with a warning
FORGOT_LITTLE = 0.9  # a run whose forget answer probability stays above this share of the original's ends with a warning


@dataclass
class UnlearnConfig(EvaluationArguments, TrainingArguments):
    """Arguments shared by every unlearning method; each method adds its own fields."""

    retain_losses: ClassVar[tuple[str, ...]] = RETAIN_LOSSES  # what --retain_loss accepts for this method
    # What `hubunlearn tune` searches (hubunlearn.search_spaces): field -> range; each method adds its own parameters.
    search_space: ClassVar[dict] = COMMON_SEARCH_SPACE

    retain_loss: str = field(
        default="nll",
        metadata={"help": "Retain term: 'nll' on retain data, 'kl' to the frozen original model, or 'none'.", "choices": list(RETAIN_LOSSES)},
    )
    retain_weight: float = field(default=1.0, metadata={"help": "Weight of the retain term."})
    forget_weight: float = field(default=1.0, metadata={"help": "Weight of the forget term."})
    max_length: int = field(default=512, metadata={"help": "Longest example in tokens; raw text is chunked to this length."})
    question_key: str = field(default="question", metadata={"help": "Column holding the question of question-answer rows."})
    answer_key: str = field(default="answer", metadata={"help": "Column holding the answer of question-answer rows."})
    text_key: str = field(default="text", metadata={"help": "Column holding raw text (used when there is no question/answer pair)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace the artifact in a non-empty --output_dir."})
    lora_init: str = field(default="default", metadata={
        "help": "LoRA initialisation: 'default' (PEFT's) or 'fila' (Fisher-weighted, Cha et al., arXiv 2408.06621).",
        "choices": list(LORA_INITS)})
    lora_export: str = field(default="adapter", metadata={
        "help": "What a LoRA run saves: 'adapter' (loads on the unmodified base) or 'merged' (a full checkpoint).",
        "choices": list(LORA_EXPORTS)})
    utility_budget: float | None = field(default=None, metadata={
        "help": "Unlearning with Control (Wang et al., arXiv 2406.09179): after training, mix with the original to the "
                "largest alpha whose retain metric is at least this share (0 < tau <= 1) of the original's."})
    utility_metric: str = field(default="extraction_strength", metadata={
        "help": "Retain metric of --utility_budget: 'extraction_strength' or 'probability'.", "choices": list(UTILITY_METRICS)})
    utility_probe_size: int = field(default=32, metadata={
        "help": "Forget and retain examples the before/after answer probability (summary, utility-lost warning) and the "
                "--utility_budget metric are measured on."})
    record_examples: int = field(default=3, metadata={
        "help": "Questions (never answers) of each set recorded in unlearning.json as demo prompts for the Space (0: none)."})
    reference_device: str | None = field(default=None, metadata={
        "help": "Where a full fine-tuning run keeps the frozen copy of the original it reads logits from (--retain_loss kl, "
                "UNDIAL's forget term; KUDA and RMU need 'same'): 'same' (default: the training device) or 'cpu', which frees one copy of the "
                "weights on the accelerator (2 bytes per parameter in bf16: 16 GB for an 8B model) at the cost of a CPU "
                "forward pass of each retain batch every step and the copy of its logits back (batch x length x vocabulary "
                "x 4 bytes), typically slower than the GPU step itself. NPO holds no reference model (it caches the "
                "original's forget answer likelihoods once) and LoRA runs switch the adapter off instead: there this "
                "option is refused.", "choices": list(REFERENCE_DEVICES)})
    chunked_output_layer: bool = field(default=True, metadata={
        "help": "Build the logits from the final hidden states a chunk of positions at a time inside each loss, "
                "forward and backward, instead of holding batch x length x vocabulary logits and their gradient (1 GiB "
                "each for 8 x 256 tokens of a 128k vocabulary in float32); costs one more output-layer product per "
                "step. Applies to Llama-like models whose logits are the output layer's product alone, without "
                "FSDP/DeepSpeed; elsewhere the full logits are used."})
    budget_check_steps: int = field(default=0, metadata={
        "help": "With --utility_budget: check the retain probe every N steps; stop, and restore the last state within "
                "budget, when it is crossed (0: off)."})
    # Defaults that suit unlearning better than fine-tuning's.
    learning_rate: float = field(default=1e-5, metadata={"help": "Initial AdamW learning rate."})
    num_train_epochs: float = field(default=5.0, metadata={"help": "Passes over the forget set."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Forget (and retain) examples per device per step."})
    logging_steps: float = field(default=1, metadata={
        "help": "Log the losses every N steps: to the progress bar's postfix and the --report_to targets (never printed per step)."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpoint strategy during training ('no', 'steps', 'epoch')."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: batches carry forget and retain parts."})

    def __post_init__(self):
        self._fit_precision_to_machine()
        self.check_evaluation()  # evaluation during training, --keep_best (trainers/monitoring.py)
        try:
            super().__post_init__()
        except ValueError as error:  # TrainingArguments' own validation: one line, not a traceback
            raise UsageError(f"{str(error).splitlines()[0]} (see hubunlearn unlearn --help)") from error
        for spec in dataclasses.fields(self):  # the method's own numbers: an infinite or NaN one only fails mid-run
            value = getattr(self, spec.name)
            if (spec.name not in TRAINING_ARGUMENT_FIELDS or spec.name == "learning_rate") and isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"--{spec.name} must be a finite number; got {value}")
        if self.retain_loss not in self.retain_losses:
            raise UsageError(f"unknown --retain_loss '{self.retain_loss}'; choose one of: {', '.join(self.retain_losses)}")
        for name, choices in (("lora_init", LORA_INITS), ("lora_export", LORA_EXPORTS), ("utility_metric", UTILITY_METRICS)):
            if getattr(self, name) not in choices:
                raise UsageError(f"unknown --{name} '{getattr(self, name)}'; choose one of: {', '.join(choices)}")
        if self.utility_budget is not None:
            check_budget(self.utility_budget)
        if self.reference_device is not None and self.reference_device not in REFERENCE_DEVICES:
            raise UsageError(f"unknown --reference_device '{self.reference_device}'; choose one of: {', '.join(REFERENCE_DEVICES)}")
        if self.learning_rate < 0:
            raise UsageError(f"--learning_rate must not be negative; got {self.learning_rate}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise UsageError("nothing to train: give --num_train_epochs above 0 or --max_steps above 0")
        if self.utility_probe_size < 1 or self.budget_check_steps < 0:
            raise UsageError("--utility_probe_size must be at least 1 and --budget_check_steps at least 0")

    def _fit_precision_to_machine(self) -> None:
        """``--bf16`` without an accelerator trains in bfloat16 on the CPU (autocast), as asked, instead of ending in
        transformers' error; ``--fp16`` has no CPU autocast in accelerate, so it is refused with what to use instead."""
        on_cpu = self.use_cpu or not torch.accelerator.is_available()
        if on_cpu and (self.fp16 or self.fp16_full_eval):
            raise UsageError("--fp16 needs a GPU: on the CPU use --bf16 (bfloat16 autocast) or neither")
        if on_cpu and (self.bf16 or self.bf16_full_eval) and not self.use_cpu:
            self.use_cpu = True
            logger.info("no GPU found: training in bf16 on the CPU, as --bf16 asks")

    @property
    def data_format(self) -> DataFormat:
        return DataFormat(self.question_key, self.answer_key, self.text_key, self.max_length)

    def method_hyperparameters(self) -> dict[str, Any]:
        """The fields this config adds to ``TrainingArguments``, plus the optimisation settings that matter."""
        keys = [f.name for f in dataclasses.fields(self) if f.name not in TRAINING_ARGUMENT_FIELDS and f.name != "overwrite_output_dir"]
        keys += ["learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "weight_decay", "seed"]
        return {key: _plain(getattr(self, key)) for key in keys}


def _plain(value: Any) -> Any:
    """Enums (the scheduler type, ...) as their values, so records and cards read naturally."""
    return value.value if isinstance(value, enum.Enum) else value


class _EpochForPairing(TrainerCallback):
    """Tells the forget/retain pairing which epoch it is in, so retain partners change between epochs."""

    def __init__(self, dataset: ForgetRetainDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(round(state.epoch or 0))


class _StopOnNonFiniteGradient(TrainerCallback):
    """Checks the gradients before every optimiser step: a NaN update would spoil the last good state."""

    def __init__(self, trainer: "UnlearnTrainer"):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._check_gradients()


class _LossProgress(ProgressCallback):
    """The progress bar with the current losses in its postfix, instead of a printed dict per logging step."""

    SHOWN = ("loss", "forget_loss", "retain_loss")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {key: f"{logs[key]:.4g}" for key in self.SHOWN if isinstance(logs.get(key), (int, float))}
            if shown:
                self.training_bar.set_postfix(shown, refresh=False)


class UnlearnTrainer(Trainer):
    """Base trainer: subclasses set ``_name``/``_paper`` and implement :meth:`forget_loss`.

    Args:
        model: a ``PreTrainedModel`` or a Hub id / local folder to load one from.
        args: the method's config.
        forget_dataset / retain_dataset: a data spec string (see :mod:`hubunlearn.data`), a ``datasets.Dataset``
            or a list of rows, of question-answer pairs or raw text.
        processing_class: the tokenizer (loaded from ``model`` when omitted).
        ref_model: the frozen original for ``kl``, NPO's cached statistics and the representation methods (a copy of
            ``model`` when omitted and a model is needed; with LoRA, the base model with the adapter switched off; for
            NPO's statistics, ``model`` itself before training: no copy is made).
        peft_config: a ``peft.LoraConfig`` to unlearn through an adapter instead of all weights.
    """

    _tag_names = ["unlearning", "hubunlearn"]
    _name = "Unlearn"
    _paper: dict | None = None  # {"id": arXiv id, "title", "authors": "A and B", "year"}: feeds the card's citation
    _also_cites: tuple[dict, ...] = ()  # papers the method builds on, cited after its own (same keys)
    config_class = UnlearnConfig
    uses_reference = False  # the method reads a frozen copy of the original directly (KUDA, RMU: its activations)
    # Parts of each batch whose examples carry the frozen original's summed answer log-likelihood, ``reference_log_prob``,
    # cached once before training (NPO: ("forget",)); a method that needs nothing else from the original holds no copy.
    reference_statistics: ClassVar[tuple[str, ...]] = ()
    keeps_retain_rows = False  # the method reads the retain rows even when no retain loss is trained on (ECO)
    # The forget term reads the frozen original's logits on each forget batch (UNDIAL): the reference is obtained as
    # for the retain KL (adapter-off base with LoRA, else a frozen copy placed by --reference_device).
    forget_reads_reference_logits: ClassVar[bool] = False
    # --budget_check_steps probes the model being trained; a method whose artifact is made from it only after the
    # last step (task-vector negation) turns this off, and the CLI's utility guard then calibrates at the end only.
    budget_checks_in_training: ClassVar[bool] = True

    def __init__(
        self,
        model: PreTrainedModel | str,
        args: UnlearnConfig | None = None,
        forget_dataset: datasets.Dataset | list | str | None = None,
        retain_dataset: datasets.Dataset | list | str | None = None,
        processing_class=None,
        ref_model: PreTrainedModel | None = None,
        peft_config=None,
        callbacks: list[TrainerCallback] | None = None,
    ):
        args = args or self.config_class(output_dir=f"{self._name.lower()}-output")
        check_output_dir(args.output_dir, args.overwrite_output_dir)
        if forget_dataset is None:
            raise UsageError("no forget set: pass forget_dataset (--forget SPEC)")
        if args.retain_loss != "none" and retain_dataset is None:
            raise UsageError(f"{self._name} with retain_loss='{args.retain_loss}' needs a retain set: pass --retain SPEC"
                             + (" (or --retain_loss none)" if "none" in args.retain_losses else ""))
        if args.lora_init == "fila" and peft_config is None:
            raise UsageError("--lora_init fila initialises a LoRA adapter: add --use_lora (or pass peft_config)")
        if args.lora_export == "merged" and peft_config is None:
            raise UsageError("--lora_export merged merges a LoRA adapter: add --use_lora (or pass peft_config)")
        for needs, name in ((args.lora_init == "fila", "--lora_init fila (its Fisher pass)"), (args.utility_budget is not None, "--utility_budget (its retain probe)")):
            if needs and retain_dataset is None:
                raise UsageError(f"{name} needs a retain set: pass --retain SPEC")
        if args.retain_loss == "none" and retain_dataset is not None and not self.keeps_retain_rows:
            logger.warning("retain_loss is 'none': the retain set is not trained on, only measured (the utility check; "
                           "set --retain_loss nll or kl to train on it)")
        if isinstance(model, str):
            processing_class = processing_class or load_tokenizer(model)
            model = load_model(model)
        if processing_class is None:
            processing_class = load_tokenizer(model.config._name_or_path)
        ensure_pad_token(processing_class)
        engines.check(model, args, self._name)  # checkpointing support, FSDP/DeepSpeed settings, before any work

        data_format = args.data_format
        self.data_sources = {}
        forget_rows = self._rows(forget_dataset, "forget")
        retain_rows = self._rows(retain_dataset, "retain") if retain_dataset is not None else None
        self._warn_overlap(forget_rows, retain_rows, data_format)
        forget_examples = self.forget_examples(forget_rows, processing_class, args)
        retain_examples = tokenize_rows(retain_rows, processing_class, data_format, "retain") if retain_rows is not None else None

        self.base_model_id = model.config._name_or_path
        self.base_model_facts: dict | None = None  # commit and license on the Hub, looked up at save time if unset
        self._reference_given = ref_model is not None
        self._reference_logits_needed = self.uses_reference or args.retain_loss == "kl" or self.forget_reads_reference_logits
        # With FILA the base holds W - s·B·A during training, so switching the adapter off is not the original.
        self._adapter_off_reference = peft_config is not None and args.lora_init != "fila"
        copies = self._reference_logits_needed and ref_model is None and not self._adapter_off_reference
        self._check_reference_device(args, holds_copy=copies or ref_model is not None)
        if copies:
            ref_model = copy.deepcopy(model)
        self._original_state = None  # what full-model mixing interpolates from
        if args.utility_budget is not None and peft_config is None:
            self._original_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if peft_config is not None:
            set_seed(args.seed)  # the adapter's random init is part of the run: make it follow the config's seed
            model = _with_adapter(model, peft_config)
        self._lora_settings = _lora_settings(model)
        if args.retain_loss == "none" and retain_examples is not None:  # kept for FILA's Fisher pass or the probe only
            self._probe_examples, retain_examples = retain_examples, None
        else:
            self._probe_examples = retain_examples
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)

        self.pairs = ForgetRetainDataset(forget_examples, retain_examples, seed=args.seed)
        self.evaluation = EvaluationDuringTraining(self, args) if args.evaluates_in_training else None  # trainers/monitoring.py
        super().__init__(
            model=model,
            args=args,
            data_collator=ForgetRetainCollator(processing_class.pad_token_id),
            train_dataset=self.pairs,
            eval_dataset=self.evaluation.eval_dataset if self.evaluation else None,
            processing_class=processing_class,
            callbacks=[_EpochForPairing(self.pairs), _StopOnNonFiniteGradient(self), *(callbacks or []),
                       *([self.evaluation] if self.evaluation else [])],
        )
        # Per-step dicts go to --report_to targets only: the bar shows the losses, a summary ends the run.
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(_LossProgress)
        self.pop_callback(PrinterCallback)
        self.loss_is_scaled_for_ga = False
        self._before: dict[str, float] | None = None
        self.reference_on_cpu = args.reference_device == "cpu"
        if ref_model is not None and self.reference_on_cpu:
            ref_model = ref_model.to("cpu")  # never prepared: the accelerator would move it to the training device
        elif ref_model is not None:
            ref_model = engines.prepare_reference(ref_model, self.accelerator)  # TRL's helpers under DeepSpeed/FSDP
        self.ref_model = ref_model
        # Forget and retain through one forward pass when both terms read only the policy's logits (the method
        # implements forget_loss_from_logits and keeps the base retain_term); KUDA and RMU read activations.
        self.one_pass = (type(self).forget_loss is UnlearnTrainer.forget_loss and type(self).retain_term is UnlearnTrainer.retain_term)
        self.unlearning_metrics: dict[str, Any] = {}
        self.record_extras: dict[str, Any] = {}  # anything else the caller wants in unlearning.json
        self.record_extras["engine"] = engines.describe(self)
        self._logged = defaultdict(list)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names + [self._name.lower()])
        self._finished = False
        self._fila_initial = None
        if args.lora_init == "fila":
            from .. import fila

            self._fila_initial = fila.initialise(self.model, self._fisher_batches(), seed=args.seed)
            self.record_extras["fila"] = {"fisher_pairs": len(self.pairs.forget), "exported": "standard LoRA adapter of rank 2r for the unmodified base"
                                          if args.lora_export == "adapter" else "merged into a full checkpoint"}

    def _check_reference_device(self, args: UnlearnConfig, holds_copy: bool) -> None:
        """``--reference_device`` places a frozen copy: refused where none is held, and ``cpu`` where the method reads
        the copy's activations on the training device (KUDA, RMU)."""
        if args.reference_device is None:
            return
        if not holds_copy:
            how = ("switches the LoRA adapter off for the original's logits" if self._adapter_off_reference and self._reference_logits_needed
                   else f"caches the original's {' and '.join(self.reference_statistics)} answer likelihoods" if self.reference_statistics
                   else "needs no reference model")
            raise UsageError(f"--reference_device places a frozen reference model, and {self._name} with --retain_loss "
                             f"{args.retain_loss} holds none (it {how}): drop --reference_device")
        if args.reference_device == "cpu" and self.uses_reference:
            raise UsageError(f"--reference_device cpu: {self._name} reads the reference model's activations on the training "
                             "device; drop the option (or give 'same')")

    def _fisher_batches(self):
        """The forget/retain pairs of one epoch, collated and on the training device, for FILA's Fisher pass."""
        size = self.args.per_device_train_batch_size
        pairs = ForgetRetainDataset(self.pairs.forget, self._probe_examples, seed=self.args.seed)
        for start in range(0, len(pairs), size):
            batch = self.data_collator([pairs[i] for i in range(start, min(start + size, len(pairs)))])
            yield {part: {k: v.to(self.args.device) for k, v in batch[part].items()} for part in ("forget", "retain")}

    # ---- controls (Unlearning with Control) and the end of training ----------------------------------------------

    def _probe_size(self, rows) -> int:
        """Rows of ``rows`` (a set's examples) in the probe: ``len()`` of a ``Dataset`` counts rows, of a slice of one
        its columns, so never slice."""
        return min(self.args.utility_probe_size, len(rows))

    def _probe_rows(self, rows) -> list[dict]:
        """The first ``--utility_probe_size`` rows, one by one."""
        return [rows[i] for i in range(self._probe_size(rows))]

    def probe(self) -> float:
        """The ``--utility_metric`` of the current model on the first ``--utility_probe_size`` retain examples."""
        examples = self._probe_rows(self._probe_examples)
        return probe_metric(self.accelerator.unwrap_model(self.model), self.processing_class, examples, self.args.utility_metric)

    def measure(self) -> dict[str, float]:
        """Mean answer probability of the current model on the first ``utility_probe_size`` forget and retain examples
        (``{"forget": p, "retain": p}``; no ``"retain"`` without a retain set): the run's before/after figures."""
        model = self.accelerator.unwrap_model(self.model)
        sets = {"forget": self.pairs.forget, "retain": self._probe_examples}
        return {name: probe_metric(model, self.processing_class, self._probe_rows(rows), "probability")
                for name, rows in sets.items() if rows is not None}

    def train(self, *args, **kwargs):
        self.cache_reference_statistics()
        self._before = self.measure()
        if self.args.utility_budget is not None:
            probability = self.args.utility_metric == "probability" and "retain" in self._before
            self._probe_original = self._before["retain"] if probability else self.probe()
            if self.args.budget_check_steps:
                self._early_stopping = UtilityBudgetStopping(self.probe, self._probe_original, self.args.utility_budget,
                                                             self.args.budget_check_steps)
                self.add_callback(self._early_stopping)
        output = super().train(*args, **kwargs)
        self.finish_training()
        self._record_utility(self.measure())
        return output

    def _record_utility(self, after: dict[str, float]) -> None:
        """Answer probability before and after, and the share of the retain one lost: in ``unlearning.json`` and on the
        card; below ``UTILITY_FLOOR`` of the original's it ends the run with a warning."""
        utility = {"metric": "answer probability",
                   "examples": {name: self._probe_size(rows) for name, rows in
                                (("forget", self.pairs.forget), ("retain", self._probe_examples)) if rows is not None},
                   **{name: {"before": self._before[name], "after": value} for name, value in after.items()}}
        if "retain" in after and self._before["retain"] > 0:
            kept = after["retain"] / self._before["retain"]
            utility.update(retain_kept=kept, utility_lost=max(0.0, 1.0 - kept))
            if kept < UTILITY_FLOOR:
                utility["warning"] = (
                    f"the unlearned model keeps only {kept:.0%} of the original's retain answer probability "
                    f"({self._before['retain']:.3g} -> {after['retain']:.3g} on {utility['examples']['retain']} retain examples): "
                    f"it lost {1 - kept:.0%} of its utility. Lower --learning_rate or the steps, raise --retain_weight, or set "
                    "--utility_budget (e.g. 0.9 with --budget_check_steps 5) to stop early and mix back within the budget")
                if self.is_world_process_zero():
                    logger.warning(utility["warning"])
        stopping = getattr(self, "_early_stopping", None)
        if stopping is not None and stopping.stopped_at is not None and stopping.kept_step == 0:
            utility["forgetting_warning"] = (
                f"the utility budget was crossed at the first check (step {stopping.stopped_at}), so the original weights were "
                "restored: nothing was unlearned. Lower --learning_rate, or check more often (a smaller --budget_check_steps)")
        elif "forget" in after and after["forget"] > FORGOT_LITTLE * self._before["forget"]:
            utility["forgetting_warning"] = (
                f"the forget answer probability barely moved ({self._before['forget']:.3g} -> {after['forget']:.3g}): the run "
                "forgot little. Raise --learning_rate or the steps (the defaults are conservative on small models)")
            if self.is_world_process_zero():
                logger.warning(utility["forgetting_warning"])
        self.record_extras["utility"] = utility

    def _train_runtime(self) -> float | None:
        """Seconds the Trainer logged for the run (None before it ended)."""
        return next((h["train_runtime"] for h in self.state.log_history if "train_runtime" in h), None)

    def summary(self) -> str:
        """A few lines a person reads at the end of a run: steps, time, final losses, answer probability before and after."""
        logged = next((h for h in reversed(self.state.log_history) if "forget_loss" in h), {})
        runtime = self._train_runtime()
        losses = ", ".join(f"{name} {logged[f'{name}_loss']:.4g}" for name in ("forget", "retain") if f"{name}_loss" in logged)
        lines = [f"{self._name}: {self.state.global_step} steps" + (f" in {runtime:.1f} s" if runtime is not None else "")
                 + (f"; final loss: {losses}" if losses else "")]
        utility = self.record_extras.get("utility")
        if utility:
            lines.append(f"{'answer probability':<20}{'before':>9}{'after':>9}")
            for name in ("forget", "retain"):
                if name in utility:
                    kept = f"   (kept {utility['retain_kept']:.1%})" if name == "retain" and "retain_kept" in utility else ""
                    lines.append(f"  {name} ({utility['examples'][name]} ex.)".ljust(20)
                                 + f"{utility[name]['before']:>9.4f}{utility[name]['after']:>9.4f}{kept}")
        calibration = self.record_extras.get("calibration")
        if calibration:
            stopped = (calibration.get("early_stopping") or {}).get("stopped_at_step")
            lines.append(f"utility budget {calibration['tau']}× ({calibration['metric']}): "
                         + (f"stopped at step {stopped} and restored step {calibration['early_stopping']['restored_step']}; "
                            if stopped is not None else "")
                         + ("no mixing needed" if calibration["alpha"] == 1 else f"mixed back to α = {calibration['alpha']:.3g}"))
        kept = (self.record_extras.get("evaluation_during_training") or {}).get("keep_best")  # trainers/monitoring.py
        if kept and "step" in kept:
            lines.append(f"--keep_best {kept['metric']}: kept step {kept['step']} ({kept['metric']} {kept['value']:.4g})")
        if utility and "forgetting_warning" in utility:
            lines.append("WARNING: forgot little (forget answer probability kept above "
                         f"{FORGOT_LITTLE:.0%} of the original's)")
        if utility and "warning" in utility:
            lines.append(f"WARNING: utility lost {utility['utility_lost']:.0%} (below {UTILITY_FLOOR:.0%} of the original's retain answer probability kept)")
        return "\n".join(lines)

    def finish_training(self) -> None:
        """After the last step (once): FILA's adapter becomes a standard one, the utility budget is applied, and a
        ``merged`` export folds the adapter into the weights."""
        if self._finished:
            return
        self._finished = True
        model = self.accelerator.unwrap_model(self.model)
        if self._fila_initial is not None:
            from .. import fila

            fila.to_standard_adapter(model, self._fila_initial)
            self._fila_initial = None
        self.after_training(model)
        if self.args.utility_budget is not None and hasattr(self, "_probe_original"):
            self._calibrate(model)
        if self.args.lora_export == "merged":
            self.model = model.merge_and_unload()

    def after_training(self, model) -> None:
        """What a method does to the trained weights before the utility budget and a merged export see them (the
        unwrapped ``model``; a FILA adapter is already a standard one): nothing, except for task-vector negation."""

    def _calibrate(self, model) -> None:
        mixer = ModelMixer(model, self._original_state)

        def measure(alpha: float) -> float:
            mixer.set_alpha(alpha)
            return self.probe()

        alpha, curve = calibrate(measure, self._probe_original, self.args.utility_budget)
        value = dict(curve).get(alpha)  # calibrate measures every alpha it can return
        mixer.set_alpha(alpha)
        mixer.bake()
        self._original_state = None
        stopping = getattr(self, "_early_stopping", None)
        self.record_extras["calibration"] = {
            "tau": self.args.utility_budget, "metric": f"retain {self.args.utility_metric}", "probe_size": self._probe_size(self._probe_examples),
            "original": self._probe_original, "alpha": alpha, "value": value,
            "curve": [{"alpha": a, "value": v} for a, v in curve],
            **({"early_stopping": {"every": self.args.budget_check_steps, "stopped_at_step": stopping.stopped_at,
                                   "restored_step": stopping.kept_step if stopping.stopped_at is not None else None,
                                   "checks": stopping.history}} if stopping else {}),
        }
        logger.info("utility budget %.2f: alpha = %.4g (retain %s %.4g -> %.4g)", self.args.utility_budget, alpha,
                    self.args.utility_metric, self._probe_original, value)

    # ---- data -------------------------------------------------------------------------------------------------

    def _rows(self, source, name: str) -> datasets.Dataset:
        spec = None
        if isinstance(source, (str, DataSpec)):
            spec = DataSpec.parse(source)
            source = load_rows(spec)
        elif isinstance(source, list):
            source = datasets.Dataset.from_list(source) if source else datasets.Dataset.from_dict({})
        source = with_question_answer(source)
        if len(source) == 0:
            raise UsageError(f"the {name} set is empty: give at least one row")
        self.data_sources[name] = (spec, source)
        return source

    def forget_examples(self, rows: datasets.Dataset, tokenizer, args: UnlearnConfig) -> datasets.Dataset:
        """The forget set's training examples (``input_ids``, ``labels``, ``prompt_length``; :func:`tokenize_rows`). A
        method that trains on more than the rows' own answers adds columns here (IdkNLL and IdkDPO: the paired refusal,
        ``alternate_input_ids``/``alternate_labels``), so they travel with each example through shuffling and sharding."""
        return tokenize_rows(rows, tokenizer, args.data_format, "forget")

    def _warn_overlap(self, forget, retain, data_format: DataFormat) -> None:
        if retain is None or "input_ids" in forget.column_names:
            return
        shape = data_format.shape_of(forget.column_names, "the forget set")
        columns = data_format.columns(shape)
        if not set(columns) <= set(retain.column_names):
            return
        overlap = count_overlap(forget, retain, columns)
        if overlap:
            logger.warning("%d forget examples also appear in the retain set: they are pushed both ways", overlap)

    # ---- the frozen original's statistics ------------------------------------------------------------------------

    def cache_reference_statistics(self) -> None:
        """Store the frozen original's summed answer log-likelihood of every example of each part named in
        ``reference_statistics`` as its ``reference_log_prob`` column (once; the collator carries it into batches), and
        of the alternate completion examples carry (IdkDPO's refusals) as ``alternate_reference_log_prob``.

        The original is the reference model when one was given, else the model itself before its first step (LoRA and
        FILA adapters start as the identity). Batched (``--per_device_eval_batch_size``) without gradients, in eval
        mode and under the run's mixed precision; under ``accelerate`` each process computes an equal share of the
        rows (the last row repeated to even them, so every process runs as many forward passes) and the shares are
        gathered. A method that needs nothing else from the original then holds no reference model."""
        for part in self.reference_statistics:
            examples = getattr(self.pairs, part)
            for prefix in ("", ALTERNATE):
                column = f"{prefix}reference_log_prob"
                if f"{prefix}input_ids" in examples.column_names and column not in examples.column_names:
                    examples = examples.add_column(column, self._original_log_probs(examples, prefix))
            setattr(self.pairs, part, examples)
        if self.reference_statistics and not self._reference_logits_needed:
            self.ref_model = None  # a given reference model served the statistics only: free it

    def get_train_dataloader(self):
        """The Trainer's loader, over examples that carry their reference statistics (computed here if ``train()`` has
        not done it yet, e.g. when a caller draws batches itself)."""
        self.cache_reference_statistics()
        return super().get_train_dataloader()

    def _original_log_probs(self, examples, prefix: str = "") -> list[float]:
        """``log π_ref(answer | prompt)`` summed over each example's labelled tokens (of its ``prefix`` completion:
        its own, or the ``alternate_`` one), in float32, in row order."""
        model = self.ref_model if self._reference_given else self.accelerator.unwrap_model(self.model)
        device = model_device(model)
        size, was_training = self.args.per_device_eval_batch_size, model.training
        model.eval()
        try:
            with self.accelerator.split_between_processes(list(range(len(examples))), apply_padding=True) as mine:
                values = []
                for start in range(0, len(mine), size):
                    batch = {k: v.to(device) for k, v in pad_examples([completion(examples[i], prefix) for i in mine[start : start + size]], self.processing_class.pad_token_id).items()}
                    with torch.no_grad(), self.accelerator.autocast():
                        values.append(losses.sequence_log_prob(self.logits(model, batch), batch["labels"])[0].float())
        finally:
            model.train(was_training)
        indices = self.accelerator.gather(torch.tensor(mine, device=self.args.device))
        values = self.accelerator.gather(torch.cat(values).to(self.args.device))
        table = torch.zeros(len(examples), dtype=torch.float64)
        table[indices.cpu()] = values.cpu().double()
        return table.tolist()

    def reference_usage(self) -> dict[str, Any]:
        """How the run used the frozen original, for ``unlearning.json`` and the card: ``kind`` is where its logits or
        activations came from during training (``model``: a frozen copy on ``device``; ``adapter_off_base``: the base
        with the LoRA adapter switched off; ``statistics``: nowhere, only cached statistics; ``none``), and
        ``statistics`` the parts whose answer log-likelihoods were cached before training."""
        if self.ref_model is not None:
            kind, device = "model", "cpu" if self.reference_on_cpu else self.args.device.type
        elif self._reference_logits_needed:
            kind, device = "adapter_off_base", self.args.device.type
        else:
            kind, device = ("statistics" if self.reference_statistics else "none"), None
        usage: dict[str, Any] = {"kind": kind, "device": device}
        if self.reference_statistics:
            usage["statistics"] = {"parts": list(self.reference_statistics), "value": "summed answer log-likelihood",
                                   "computed_with": "the reference model given" if self._reference_given else "the starting weights"}
            if any(f"{ALTERNATE}input_ids" in getattr(self.pairs, part).column_names for part in self.reference_statistics):
                usage["statistics"]["of"] = "each answer and its paired alternate answer"  # IdkDPO's refusals
        return usage

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """With evaluation during training on (``--eval_forget_quality_every``, ``--eval_strategy``): forget quality and
        the other numbers of :mod:`.monitoring`, logged and handed to the callbacks as the Trainer's own metrics are."""
        if self.evaluation is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        metrics = self.evaluation.evaluate(metric_key_prefix)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ---- losses -----------------------------------------------------------------------------------------------

    def forget_loss_from_logits(self, logits: torch.Tensor | HeadLogits, forget: dict[str, torch.Tensor]) -> torch.Tensor:
        """The method's loss from the policy's logits ``(batch, length, vocab)`` on a forget batch (``input_ids``,
        ``attention_mask``, ``labels``, and ``reference_log_prob`` for a method with ``reference_statistics``).
        ``logits`` may be :class:`HeadLogits`: read them through :mod:`.losses` (``gold_log_probs``,
        ``token_log_probs``, ``chunked``), which build them a chunk at a time, never with tensor operations."""
        raise NotImplementedError

    def forget_inputs(self, forget: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The rows the forget term reads logits of, from a collated forget batch: the batch itself by default; IdkNLL
        the paired refusals, IdkDPO the true answers stacked over the refusals. Both :meth:`compute_loss`'s paths
        (one forward pass with the retain batch, or separate ones) run the model on these rows and hand their logits
        and this batch to :meth:`forget_loss_from_logits`."""
        return forget

    def forget_loss(self, model, forget: dict[str, torch.Tensor]) -> torch.Tensor:
        """The method's loss on a forget batch; a method that reads more than the logits (activations) overrides this."""
        return self.forget_loss_from_logits(self.logits(model, forget), forget)

    def logits(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor | HeadLogits:
        """The model's logits on ``batch``: the final hidden states and the output layer (:class:`HeadLogits`, built
        a chunk at a time by the losses) where ``--chunked_output_layer`` holds and the model allows it, else the
        logits tensor."""
        return policy_logits(model, batch, chunked=self.args.chunked_output_layer and engines.sharding(self.args) is None)

    def joint_logits(self, model, forget: dict[str, torch.Tensor], retain: dict[str, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The policy's logits on the forget and the retain batch from one forward pass over both, each padded to the
        wider one's width (right padding: real tokens get the same logits as in their own batch, padding has labels
        ``-100`` and attention 0), as ``(forget_logits, retain_logits, forget, retain)``: the logits split by rows,
        both at the joint width, and the batches at that width (their other keys, such as ``reference_log_prob``,
        kept). The logits are split with ``torch.split``, never sliced along the positions: the backward of a slice
        fills a full-size zero gradient per part, ``torch.split``'s concatenates the parts' gradients once."""
        joint = concatenate_batches([forget, retain], self.processing_class.pad_token_id)
        sizes = [forget["input_ids"].shape[0], retain["input_ids"].shape[0]]
        parts = [dict(batch) for batch in (forget, retain)]
        for key, value in joint.items():
            for part, rows in zip(parts, value.split(sizes)):
                part[key] = rows
        forget_logits, retain_logits = self.logits(model, joint).split(sizes)
        return forget_logits, retain_logits, parts[0], parts[1]

    @torch.no_grad()
    def reference_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of the frozen original: the reference model (on the CPU with ``--reference_device cpu``: the batch
        goes there and the logits come back), or the base with the adapter switched off."""
        if self.ref_model is None:
            with self.accelerator.unwrap_model(self.model).disable_adapter():
                return self.logits(self.model, batch)
        if not self.reference_on_cpu:
            return self.logits(self.ref_model, batch)
        on_cpu = {key: batch[key].to("cpu") for key in ("input_ids", "attention_mask")}
        logits = self.logits(self.ref_model, on_cpu)
        return (logits.materialize() if isinstance(logits, HeadLogits) else logits).to(batch["input_ids"].device)

    def retain_loss_from_logits(self, logits: torch.Tensor, retain: dict[str, torch.Tensor]) -> torch.Tensor:
        """The retain term from the policy's logits on a retain batch: KL to the original, or NLL."""
        if self.args.retain_loss == "kl":
            return losses.kl_to_reference(logits, self.reference_logits(retain), retain["attention_mask"])
        return losses.nll_loss(logits, retain["labels"])

    def retain_term(self, model, retain: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.retain_loss_from_logits(self.logits(model, retain), retain)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget, retain = self.forget_inputs(inputs["forget"]), inputs.get("retain")
        if self.one_pass and retain is not None:
            forget_logits, retain_logits, forget, retain = self.joint_logits(model, forget, retain)
            forget_loss = self.forget_loss_from_logits(forget_logits, forget)
            retain_loss = self.retain_loss_from_logits(retain_logits, retain)
        else:
            forget_loss = self.forget_loss(model, forget)
            retain_loss = self.retain_term(model, retain) if retain is not None else None
        loss = self.total_loss(forget_loss, retain_loss)
        self._logged["forget_loss"].append(forget_loss.item())
        if retain_loss is not None:
            self._logged["retain_loss"].append(retain_loss.item())
        if model.training:
            self._stop_if_not_finite(loss)
        return (loss, None) if return_outputs else loss

    def total_loss(self, forget_loss: torch.Tensor, retain_loss: torch.Tensor | None) -> torch.Tensor:
        """The training loss from the forget term and the retain term (``None`` without one): ``forget_weight · forget +
        retain_weight · retain``. A method that combines them otherwise (PDU's Lagrangian) overrides this."""
        loss = self.args.forget_weight * forget_loss
        return loss if retain_loss is None else loss + self.args.retain_weight * retain_loss

    def _stop_if_not_finite(self, value: torch.Tensor, what: str = "loss") -> None:
        """Raise on every rank at once, before the weights change, so they keep their last good state."""
        finite = self.accelerator.gather(torch.isfinite(value.detach()).all().reshape(1).float())
        if not bool(finite.all()):
            shown = value.item() if value.numel() == 1 and not math.isfinite(value.item()) else float("nan")
            raise NonFiniteLossError(self.state.global_step + 1, what, shown)

    def _check_gradients(self) -> None:
        norms = [p.grad.detach().norm() for p in self.model.parameters() if p.grad is not None]
        if norms:
            self._stop_if_not_finite(torch.stack(norms).norm(), "gradient norm")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for key, values in self._logged.items():
            if values and "loss" in logs:
                logs[key] = round(sum(values) / len(values), 6)
        if "loss" in logs:
            self._logged.clear()
        super().log(logs, start_time)

    # ---- artifact ---------------------------------------------------------------------------------------------

    @property
    def artifact_kind(self) -> str:
        return "lora" if hasattr(self.accelerator.unwrap_model(self.model), "peft_config") else "full"

    def unlearning_record(self) -> dict[str, Any]:
        """What ``unlearning.json`` says about this run."""
        hyperparameters = self.args.method_hyperparameters()
        if self._lora_settings:
            hyperparameters["lora"] = self._lora_settings
        data_format = self.args.data_format
        base = self.base_model_facts or hub_facts(self.base_model_id)
        return {
            "hubunlearn_version": __version__,
            "method": self._name,
            "method_description": inspect.getdoc(type(self)).split("\n\n")[0].replace("\n", " "),
            "paper": self._paper,
            **({"also_cites": list(self._also_cites)} if self._also_cites else {}),
            "tags": sorted(set(self._tag_names) | {self._name.lower()}),
            "artifact": self.artifact_kind,
            "base_model": {"name_or_path": self.base_model_id, **base},
            "hyperparameters": hyperparameters,
            "data": {name: describe(spec, rows, data_format) for name, (spec, rows) in self.data_sources.items()},
            "training": {
                "global_steps": self.state.global_step,
                "train_runtime_s": self._train_runtime(),
                "precision": {"mixed": "bf16" if self.args.bf16 else "fp16" if self.args.fp16 else None, "tf32": self.args.tf32,
                              "weights": str(self.accelerator.unwrap_model(self.model).dtype).removeprefix("torch.")},
            },
            "hardware": {
                "device": self.args.device.type,
                "accelerator": torch.cuda.get_device_name(self.args.device) if self.args.device.type == "cuda" else None,
                "num_processes": self.args.world_size,
                "cpu_count": os.cpu_count(),
            },
            "reference": self.reference_usage(),
            "metrics": self.unlearning_metrics,
            "examples": self._examples(),
            "versions": library_versions(),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **self.record_extras,
        }

    def _examples(self) -> dict[str, list[str]]:
        """The first ``record_examples`` questions of each set: demo prompts (the Space shows them)."""
        key = self.args.question_key
        return {name: [str(q) for q in rows[key][: self.args.record_examples]]
                for name, (_, rows) in self.data_sources.items() if key in rows.column_names and self.args.record_examples}

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the artifact (weights or adapter, tokenizer, ``unlearning.json``, ``README.md``) atomically."""
        if _internal_call:  # the Trainer's own checkpoints
            return super().save_model(output_dir, _internal_call=True)
        self.finish_training()
        output_dir = output_dir or self.args.output_dir
        context = staging_dir(output_dir) if self.args.should_save else nullcontext(None)
        with context as staging:
            self.save_weights(str(staging) if staging else output_dir)
            if staging is not None:
                record = self.unlearning_record()
                (staging / "README.md").write_text(card_text(record, folder=output_dir))
                write_record(staging, record)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self.push_to_hub()

    def save_weights(self, folder: str) -> None:
        """The artifact's weights (or adapter) and tokenizer, through the Trainer's own saving (every rank calls it)."""
        super().save_model(folder, _internal_call=True)

    def push_to_hub(self, commit_message: str | None = None, blocking: bool = True, token: str | None = None,
                    revision: str | None = None, **kwargs):
        """Push the saved artifact through ``hubunlearn push``'s path: same card, one commit (main process only)."""
        from ..hub import push

        if not self.is_world_process_zero():
            return None
        return push(self.args.output_dir, self.hub_model_id or self.args.hub_model_id, private=bool(self.args.hub_private_repo),
                    revision=revision or self.args.hub_revision, commit_message=commit_message, token=token or self.args.hub_token)


def _lora_settings(model) -> dict | None:
    if not hasattr(model, "peft_config"):
        return None
    lora = model.peft_config["default"].to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in lora.items()
            if k in ("r", "lora_alpha", "lora_dropout", "target_modules", "init_lora_weights", "bias")}


def _with_adapter(model: PreTrainedModel, peft_config):
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config)
    except ValueError as error:
        if "target" not in str(error).lower():
            raise
        names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)})
        raise UsageError(
            f"--use_lora: no module matches target modules {sorted(peft_config.target_modules or [])}; "
            f"this model's linear layers are: {', '.join(names)} (set --lora_target_modules)"
        ) from error
