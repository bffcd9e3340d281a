"""``ECOConfig`` / ``ECOTrainer``: ECO as a method like the others (``hubunlearn unlearn --method eco``).

"Training" fits and calibrates the prompt classifier, then tunes the corruption strength σ by zeroth-order
search so that the corrupted model's forget answer probability matches a target: the reference model's (a
model never trained on the forget set) when ``--eco_reference`` is given, else ``--target_probability``. The
model's weights never change; the artifact is an ECO bundle (Liu et al., arXiv 2406.07933).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data import pad_examples
from ..eco.classifier import PromptClassifier, train_classifier
from ..eco.corruption import CORRUPTIONS, USES_STRENGTH
from ..eco.model import CorruptionSpec, ECOModel, base_model_record, find_embedding_module
from ..eco.selection import TOKEN_RULES
from ..eco.search import zeroth_order_search
from ..errors import UsageError
from . import engines, losses
from .base import UnlearnConfig, UnlearnTrainer

logger = logging.getLogger(__name__)
UNUSED_BY_ECO = {"learning_rate", "num_train_epochs", "max_steps", "lr_scheduler_type", "warmup_steps", "weight_decay",
                 "gradient_accumulation_steps", "retain_loss", "retain_weight", "forget_weight", "lora_init", "lora_export",
                 "utility_budget", "utility_metric", "utility_probe_size", "budget_check_steps"}


@dataclass
class ECOConfig(UnlearnConfig):
    """Classifier, corruption and strength-search settings of ECO."""

    corruption: str = field(default="rand_noise_first_n", metadata={"help": f"Corruption function: one of {', '.join(CORRUPTIONS)}."})
    corruption_dims: int = field(default=0, metadata={"help": "n (first n) or k (top k) embedding coordinates; 0: all of them."})
    token_selection: str = field(default="all_but_last", metadata={
        "help": "Prompt tokens to corrupt: all_but_last, all, or names (name-like spans; all_but_last where a prompt has none).",
        "choices": list(TOKEN_RULES)})
    embedding_module: str | None = field(default=None, metadata={"help": "Path of the token-embedding module (default: the model's input embeddings)."})
    classifier_alpha: float = field(default=0.05, metadata={"help": "Allowed miss rate on forget prompts (split-conformal recall >= 1 - alpha)."})
    classifier_max_fpr: float = field(default=0.01, metadata={
        "help": "False-positive rate allowed on held-out retain prompts (the threshold is lowered toward it, never below 0.5)."})
    classifier_model: str | None = field(default=None, metadata={
        "help": "Fine-tune this Hub (or local) sequence-classification model as the prompt classifier instead of the "
                "default character n-gram logistic regression."})
    general_prompts: str | None = field(default=None, metadata={
        "help": "Comma-separated data specs of general prompts the classifier must not flag (extra negatives, e.g. other QA sets; "
                "a built-in pool of general prompts is always added)."})
    holdout_fraction: float = field(default=0.25, metadata={"help": "Share of forget (and retain) prompts held out to calibrate the classifier."})
    eco_reference: str | None = field(default=None, metadata={"help": "Model trained without the forget set: its forget answer probability is the target."})
    target_probability: float = field(default=0.1, metadata={"help": "Surrogate target forget answer probability when there is no --eco_reference."})
    initial_strength: float = field(default=1.0, metadata={"help": "Starting corruption strength sigma."})
    zo_epsilon: float = field(default=0.05, metadata={"help": "Zeroth-order probe offset epsilon."})
    zo_learning_rate: float = field(default=20.0, metadata={"help": "Zeroth-order step size eta."})
    zo_steps: int = field(default=12, metadata={"help": "Zeroth-order steps."})
    min_strength: float = field(default=0.01, metadata={"help": "Floor of sigma."})
    tuning_examples: int = field(default=64, metadata={"help": "Forget examples the strength is tuned on."})
    retain_loss: str = field(default="none", metadata={"help": "Unused by ECO (nothing is trained); the retain set feeds the classifier."})

    def __post_init__(self):
        super().__post_init__()
        if self.corruption not in CORRUPTIONS:
            raise UsageError(f"unknown corruption '{self.corruption}': choose one of {', '.join(CORRUPTIONS)}")
        if not 0 < self.holdout_fraction < 1 or not 0 < self.target_probability < 1:
            raise UsageError("--holdout_fraction and --target_probability must be in (0, 1)")


class ECOTrainer(UnlearnTrainer):
    """ECO, embedding-corrupted prompts (Liu et al., "Large Language Model Unlearning via Embedding-Corrupted Prompts",
    NeurIPS 2024, arXiv 2406.07933): a prompt classifier flags forget-scope prompts, whose token embeddings are
    corrupted during the prefill by a strength tuned offline; the model's weights are untouched."""

    _name = "ECO"
    _paper = {"id": "2406.07933", "title": "Large Language Model Unlearning via Embedding-Corrupted Prompts",
              "authors": "Chris Yuhao Liu and Yaxuan Wang and Jeffrey Flanigan and Yang Liu", "year": 2024}
    config_class = ECOConfig

    keeps_retain_rows = True  # the retain prompts are the classifier's negatives, whatever retain_loss says

    def __init__(self, model, args: ECOConfig | None = None, forget_dataset=None, retain_dataset=None, *rest, peft_config=None, **kwargs):
        # Refused before the Trainer is built (it creates the output folder).
        if peft_config is not None:
            raise UsageError("ECO does not train the model's weights: drop --use_lora")
        if args is not None and engines.uses_checkpointing(args):
            raise UsageError("ECO does not train the model's weights: drop --activation_checkpointing (--gradient_checkpointing)")
        if retain_dataset is None:
            raise UsageError("ECO needs a retain set: its prompts are the classifier's negatives (pass --retain SPEC)")
        super().__init__(model, args, forget_dataset, retain_dataset, *rest, **kwargs)
        find_embedding_module(self.accelerator.unwrap_model(self.model), self.args.embedding_module)
        self.eco_model: ECOModel | None = None

    @property
    def artifact_kind(self) -> str:
        return "eco"

    def _prompts(self, rows, source: str) -> list[str]:
        """The prompts of ``rows``: the question column (or the text column of raw-text rows)."""
        for key in (self.args.question_key, self.args.text_key):
            if key in rows.column_names:
                return [str(q) for q in rows[key]]
        raise UsageError(f"{source} has no '{self.args.question_key}' or '{self.args.text_key}' column")

    def _general_prompts(self) -> list[str]:
        from ..data import load_rows

        specs = [part.strip() for part in (self.args.general_prompts or "").split(",") if part.strip()]
        return [prompt for spec in specs for prompt in self._prompts(load_rows(spec), f"--general_prompts {spec}")]

    def train(self, *args, **kwargs):
        """Fit and calibrate the classifier, then tune σ; no weight changes."""
        config = self.args
        forget = self._prompts(self.data_sources["forget"][1], "the forget set")
        retain = self._prompts(self.data_sources["retain"][1], "the retain set") + self._general_prompts()
        if config.classifier_model:
            from ..eco.transformer_classifier import TransformerPromptClassifier

            classifier = TransformerPromptClassifier.from_model(config.classifier_model)
        else:
            classifier = PromptClassifier()
        forget_held, retain_held = train_classifier(classifier, forget, retain, config.classifier_alpha, config.classifier_max_fpr,
                                                    config.holdout_fraction, config.seed)
        model = self.accelerator.unwrap_model(self.model).eval()
        dims = config.corruption_dims or model.get_input_embeddings().embedding_dim
        spec = CorruptionSpec(config.corruption, config.initial_strength, dims, config.token_selection, config.seed)
        self.eco_model = ECOModel(model, self.processing_class, classifier, spec, config.embedding_module,
                                  base_model_record(model, self.base_model_id, (self.base_model_facts or {}).get("revision")))
        flags = {"forget": classifier.flags(forget), "retain": classifier.flags(retain),
                 "held_out_forget": classifier.flags(forget_held), "held_out_negatives": classifier.flags(retain_held)}
        tuning = [self.pairs.forget[i] for i in range(0, len(self.pairs.forget), max(1, len(self.pairs.forget) // config.tuning_examples))]
        target = self._reference_target(tuning) if config.eco_reference else config.target_probability
        original = self._forget_probability(tuning, strength=None)
        trajectory = []
        if config.corruption in USES_STRENGTH:
            spec.strength, trajectory = zeroth_order_search(
                lambda sigma: abs(self._forget_probability(tuning, sigma) - target), config.initial_strength, config.zo_epsilon,
                config.zo_learning_rate, config.min_strength, config.zo_steps, tolerance=0.01)
        achieved = self._forget_probability(tuning, spec.strength)
        self.record_extras["eco"] = {
            "classifier": {"kind": config.classifier_model or "char-ngram-logistic", "threshold": classifier.threshold, "alpha": config.classifier_alpha,
                           "forget_recall": float(flags["forget"].mean()), "retain_false_positive_rate": float(flags["retain"].mean()),
                           "held_out_forget_recall": float(flags["held_out_forget"].mean()),
                           "held_out_false_positive_rate": float(flags["held_out_negatives"].mean()),
                           **classifier.record()},
            "corruption": {"name": spec.name, "strength": spec.strength, "dims": spec.dims, "tokens": spec.tokens},
            "strength_search": {"target_forget_probability": target, "target_from": config.eco_reference or "surrogate",
                                "forget_probability_before": original, "forget_probability_after": achieved, "trajectory": trajectory},
        }
        logger.info("ECO: classifier recall %.3f, retain FPR %.3f; sigma %.4g gives forget probability %.3f -> %.3f (target %.3f)",
                    flags["forget"].mean(), flags["retain"].mean(), spec.strength, original, achieved, target)
        return None

    @torch.no_grad()
    def _forget_probability(self, examples: list[dict], strength: float | None) -> float:
        """Mean length-normalised answer probability with every example corrupted at ``strength`` (None: clean).

        As in the paper's likelihood evaluations, the selection spans prompt and answer (scored in one pass);
        corrupting the prompt alone leaves the teacher-forced answer tokens to predict each other."""
        values = []
        for start in range(0, len(examples), 16):
            chunk = examples[start : start + 16]
            batch = pad_examples([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in chunk], self.processing_class.pad_token_id)
            batch = {k: v.to(self.args.device) for k, v in batch.items()}
            if strength is None:
                logits = self.eco_model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            else:
                self.eco_model.corruption.strength = strength
                logits = self.eco_model(batch["input_ids"], batch["attention_mask"], flags=torch.ones(len(chunk), dtype=torch.bool)).logits
            log_prob, count = losses.sequence_log_prob(logits, batch["labels"])
            values += torch.exp(log_prob / count.clamp(min=1)).tolist()
        return sum(values) / len(values)

    def _reference_target(self, examples: list[dict]) -> float:
        from ..modeling import load_model

        reference = load_model(self.args.eco_reference).to(self.args.device).eval()
        saved, self.eco_model.model = self.eco_model.model, reference
        try:
            return self._forget_probability(examples, strength=None)
        finally:
            self.eco_model.model = saved

    def unlearning_record(self) -> dict[str, Any]:
        record = super().unlearning_record()
        record["hyperparameters"] = {k: v for k, v in record["hyperparameters"].items() if k not in UNUSED_BY_ECO}
        return record

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self.eco_model is None:
            raise UsageError("nothing to save: call train() first")
        super().save_model(output_dir, _internal_call)

    def save_weights(self, folder: str) -> None:
        """The bundle (classifier, ``eco.json``) and the tokenizer; the base model is referenced, not copied."""
        if self.args.should_save:
            self.eco_model.save_pretrained(folder)
            self.processing_class.save_pretrained(folder)
