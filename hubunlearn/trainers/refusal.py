"""Refusal methods: IdkNLL and IdkDPO train the model to answer forget questions with a refusal ("I don't know").

Each forget example carries its paired alternate answer (see :mod:`hubunlearn.refusals`: the built-in refusals, or
``--alternate_answers``) as extra columns, so the pairing, and IdkDPO's cached statistics of the original, travel with
the example through shuffling and sharding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..search_spaces import COMMON, Float
from .. import refusals
from ..data import alternate_batch, concatenate_batches
from ..errors import UsageError
from . import losses
from .base import UnlearnConfig, UnlearnTrainer

TOFU_PAPER = {"id": "2401.06121", "title": "TOFU: A Task of Fictitious Unlearning for LLMs",
              "authors": "Pratyush Maini and Zhili Feng and Avi Schwarzschild and Zachary C. Lipton and J. Zico Kolter", "year": 2024}
DPO_PAPER = {"id": "2305.18290", "title": "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
             "authors": "Rafael Rafailov and Archit Sharma and Eric Mitchell and Stefano Ermon and Christopher D. Manning and Chelsea Finn",
             "year": 2023}


@dataclass
class RefusalConfig(UnlearnConfig):
    """Shared by the refusal methods: where the alternate answers come from."""

    alternate_answers: str | None = field(default=None, metadata={
        "help": "Refusal answers paired with the forget rows by --seed: a .txt file (one answer per line), a data set with "
                "one answer per row (ORG/NAME[:CONFIG][@SPLIT] or a local JSON/CSV/Parquet file; its --answer_key or 'text' "
                "column, or its only one), or column:NAME (each forget row's own answer in its column NAME). Default: "
                f"hubunlearn's built-in list of {len(refusals.builtin_refusals())} refusal sentences."})


class RefusalTrainer(UnlearnTrainer):
    """The refusal methods' shared part: forget examples that carry their paired alternate answer."""

    config_class = RefusalConfig

    def forget_examples(self, rows, tokenizer, args):
        answers, per_row = refusals.load_answers(args.alternate_answers, rows, args.data_format)
        self.alternate_answers = {"source": refusals.describe_source(args.alternate_answers), "answers": len(answers),
                                  "pairing": "one per forget row (its column)" if per_row else f"by seed {args.seed}"}
        return refusals.with_alternates(rows, answers, per_row, tokenizer, args.data_format, args.seed, args.alternate_answers)

    def unlearning_record(self):
        record = super().unlearning_record()
        record["alternate_answers"] = self.alternate_answers
        return record


@dataclass
class IdkNLLConfig(RefusalConfig):
    """NLL of the paired refusal on the forget questions plus retain NLL (TOFU's weights: 1 and 1)."""


class IdkNLLTrainer(RefusalTrainer):
    """IdkNLL (TOFU's refusal baseline, its code's ``idk`` loss; Maini et al., "TOFU: A Task of Fictitious Unlearning for
    LLMs", arXiv 2401.06121): the NLL of a refusal answer in place of the true answer on each forget question, plus the
    retain term. Each term is a mean over its own answer tokens and the two are added (weights 1 and 1), as one form of
    TOFU's code does (another takes one mean over the refusal and retain tokens together). Only the
    refusals go through the model for the forget term (the true answers are not read)."""

    _name = "IdkNLL"
    _paper = TOFU_PAPER
    config_class = IdkNLLConfig

    def forget_inputs(self, forget):
        return alternate_batch(forget)

    def forget_loss_from_logits(self, logits, forget):
        return losses.nll_loss(logits, forget["labels"])


@dataclass
class IdkDPOConfig(RefusalConfig):
    """DPO with the paired refusal preferred and the true answer rejected, plus retain NLL."""

    search_space: ClassVar[dict] = {**COMMON, "beta": Float(0.01, 1.0, log=True)}  # what `hubunlearn tune` searches

    beta: float = field(default=0.1, metadata={"help": "Inverse temperature β of the DPO log-sigmoid (its loss is scaled by 2/β)."})

    def __post_init__(self):
        super().__post_init__()
        if not self.beta > 0:
            raise UsageError(f"--beta must be positive; got {self.beta}")


class IdkDPOTrainer(RefusalTrainer):
    """IdkDPO: Direct Preference Optimization (Rafailov et al., "Direct Preference Optimization: Your Language Model is
    Secretly a Reward Model", arXiv 2305.18290) with a refusal as the preferred and the true answer as the rejected
    completion of each forget question, as in the unlearning literature after TOFU (arXiv 2401.06121):
    ``-(2/β)·log σ(β·(Δ_refusal - Δ_answer))``, ``Δ = log π - log π_ref`` summed over answer tokens, plus the retain term.

    The original enters only through its summed log-likelihoods of each forget answer and its paired refusal, cached once
    before training (``reference_statistics``): no reference model is held. Answers and refusals go through the model in
    one forward pass (with the retain batch), stacked along the batch axis."""

    _name = "IdkDPO"
    _paper = DPO_PAPER
    _also_cites = (TOFU_PAPER,)  # the refusal-preferred setup
    config_class = IdkDPOConfig
    reference_statistics = ("forget",)

    def forget_inputs(self, forget):
        refusal = alternate_batch(forget)
        stacked = concatenate_batches([forget, refusal], self.processing_class.pad_token_id)
        if "reference_log_prob" in forget:
            stacked["reference_log_prob"] = torch.cat([forget["reference_log_prob"], refusal["reference_log_prob"]])
        return stacked

    def forget_loss_from_logits(self, logits, forget):
        policy, _ = losses.sequence_log_prob(logits, forget["labels"])
        reference = forget["reference_log_prob"].to(policy.device)
        answer, refusal = policy.chunk(2)
        answer_reference, refusal_reference = reference.chunk(2)
        return losses.idk_dpo_loss(refusal, refusal_reference, answer, answer_reference, self.args.beta)
