"""TOFU's metrics (Maini et al., arXiv 2401.06121), as the paper's code (locuslab/tofu) computes them.

Every probability is length-normalised: ``exp(mean log p(answer token))``. The per-example numbers come from
:func:`qa_statistics` (one batched pass); the set-level aggregates are pure functions over them.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple, Sequence

import numpy as np
from rouge_score import rouge_scorer, tokenizers
from scipy.special import softmax
from scipy.stats import hmean, ks_2samp

from ..data import DataFormat, encode_qa
from .extraction import answer_stats, exact_memorization
from .stats import TokenStats, split, token_stats

logger = logging.getLogger(__name__)

PARAPHRASED_KEY, PERTURBED_KEY = "paraphrased_answer", "perturbed_answer"
TRUTH_RATIO_KEYS = ["paraphrased_mean_log_prob", "perturbed_mean_log_probs", "truth_ratio", "normalised_probability"]
TRUTH_RATIO_EPSILON = 1e-10  # added to P(paraphrased), as OpenUnlearning does
MODEL_UTILITY_KEYS = tuple(f"{s}/{m}" for s in ("retain", "real_authors", "world_facts")
                           for m in ("probability", "rouge_recall", "truth_ratio"))


def rouge_l(generations: Sequence[str], references: Sequence[str]) -> list[dict[str, float]]:
    """ROUGE-L ``recall`` and ``f1`` of each generation against its reference (stemmed, as TOFU scores)."""
    # The tokenizer given explicitly: rouge_score's own default logs through absl, whose first record calls
    # logging.basicConfig() and so installs a root handler in the user's process.
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizers.DefaultTokenizer(use_stemmer=True))
    scores = [scorer.score(target=r, prediction=g)["rougeL"] for g, r in zip(generations, references, strict=True)]
    return [{"recall": s.recall, "f1": s.fmeasure} for s in scores]


def truth_ratio(paraphrased_mean_log_prob: float, perturbed_mean_log_probs: Sequence[float]) -> float:
    """``R = P(perturbed) / (P(paraphrased) + TRUTH_RATIO_EPSILON)`` of one question (TOFU, Sec. 2.2.1), from mean
    token log-probs (nats).

    Both sides are length-normalised; the perturbed side is TOFU code's mean of the perturbed *losses*, i.e. the
    geometric mean of the perturbed normalised probabilities. The epsilon is OpenUnlearning's: it matters only for
    a collapsed model (P(paraphrased) near 1e-10, mean log-prob below about -16), which it keeps finite.
    Low R: the model prefers the (paraphrased) truth. TOFU's code stores ``1/R``; every aggregate here agrees.
    """
    return math.exp(float(np.mean(perturbed_mean_log_probs))) / (math.exp(paraphrased_mean_log_prob) + TRUTH_RATIO_EPSILON)


def forget_truth_ratio_score(ratios: Sequence[float]) -> float:
    """Forget-set truth ratio: ``mean(min(R, 1/(R + TRUTH_RATIO_EPSILON)))`` (OpenUnlearning's guard), 1 when the
    model cannot tell truth from perturbation."""
    r = np.asarray(ratios, dtype=float)
    return float(np.mean(np.minimum(r, 1.0 / (r + TRUTH_RATIO_EPSILON))))


def retain_truth_ratio_score(ratios: Sequence[float]) -> float:
    """Truth ratio of the retain, real-author and world-fact sets: ``mean(max(0, 1 - R))``, higher is better."""
    return float(np.mean(np.maximum(0.0, 1.0 - np.asarray(ratios, dtype=float))))


def normalised_probability(true_mean_log_prob: float, perturbed_mean_log_probs: Sequence[float]) -> float:
    """``p_true / (p_true + Σ p_perturbed)`` of length-normalised probabilities (TOFU's real-author and world-fact probability)."""
    return float(softmax([true_mean_log_prob, *perturbed_mean_log_probs])[0])


def forget_quality(ratios: Sequence[float], reference_ratios: Sequence[float]) -> float:
    """p-value of the two-sample KS test between the forget-set truth ratios of the model and of the reference
    (retain-only) model. KS is invariant under ``R -> 1/R``, so it equals TOFU's value on its stored ``1/R``."""
    return float(ks_2samp(np.asarray(ratios, dtype=float), np.asarray(reference_ratios, dtype=float)).pvalue)


def model_utility(values: dict[str, float | None]) -> float:
    """Harmonic mean of the 9 numbers ``{retain, real_authors, world_facts}/{probability, rouge_recall, truth_ratio}``
    (keys as in :data:`MODEL_UTILITY_KEYS`); 0 when any is 0 (scipy's ``hmean`` convention). Other keys are ignored."""
    missing = [k for k in MODEL_UTILITY_KEYS if values.get(k) is None]
    if missing:
        raise ValueError(f"model utility needs {', '.join(MODEL_UTILITY_KEYS)}; missing: {', '.join(missing)}")
    numbers = [float(values[k]) for k in MODEL_UTILITY_KEYS]
    return 0.0 if min(numbers) == 0 else float(hmean(numbers))


class RowExamples(NamedTuple):
    """One row's teacher-forced examples: ``[answer, paraphrased answer?, *perturbed answers]`` (None when the
    question's prompt exceeds ``max_length``: every variant shares it), and the index of the truth ratio's base
    (the paraphrased answer when the row has one, else the answer; None without perturbed answers)."""

    examples: list[dict] | None
    base: int | None


def qa_examples(tokenizer, rows: Sequence[dict], data_format: DataFormat) -> list[RowExamples]:
    """Each row's :class:`RowExamples` in order (a warning counts the rows whose prompt is too long)."""
    q_key, a_key = data_format.question_key, data_format.answer_key
    encoded, skipped = [], 0
    for row in rows:
        perturbed = row.get(PERTURBED_KEY) or []
        perturbed = [perturbed] if isinstance(perturbed, str) else list(perturbed)
        paraphrased = [row[PARAPHRASED_KEY]] if perturbed and row.get(PARAPHRASED_KEY) else []
        examples = [encode_qa(tokenizer, str(row[q_key]), str(a), data_format.max_length) for a in [row[a_key], *paraphrased, *perturbed]]
        fits = all(e is not None for e in examples)
        skipped += not fits
        encoded.append(RowExamples(examples if fits else None, len(paraphrased) if perturbed else None))
    if skipped:
        logger.warning("%d prompts are longer than max_length=%d: their statistics are None", skipped, data_format.max_length)
    return encoded


def qa_row_statistics(row: RowExamples, stats: Sequence[TokenStats], eos_token_id: int | None) -> dict:
    """One row's answer statistics (see :func:`qa_statistics`) from the :class:`TokenStats` of ``row.examples``."""
    keys = ["probability", "mean_log_prob", "exact_memorization"] + (TRUTH_RATIO_KEYS if row.base is not None else [])
    if row.examples is None:
        return dict.fromkeys(keys)
    s = stats[0]
    result = {"probability": s.probability, "mean_log_prob": s.mean_log_prob,
              "exact_memorization": exact_memorization(answer_stats(s, row.examples[0], eos_token_id))}
    if row.base is not None:
        para, pert = stats[row.base].mean_log_prob, [t.mean_log_prob for t in stats[row.base + 1 :]]
        result.update(zip(TRUTH_RATIO_KEYS, [para, pert, truth_ratio(para, pert), normalised_probability(s.mean_log_prob, pert)]))
    return result


def qa_statistics(model, tokenizer, rows: Sequence[dict], data_format: DataFormat, batch_size: int = 32) -> list[dict]:
    """Per-row answer statistics from one batched :func:`token_stats` pass, one dict per row in order.

    Every row: ``probability`` (length-normalised, eos included as in TOFU), ``mean_log_prob`` and
    ``exact_memorization`` (fraction of answer tokens, eos left out, that are the teacher-forced argmax; Tirumala et
    al., arXiv 2205.10770). Rows with ``perturbed_answer``
    (a list) also get ``paraphrased_mean_log_prob``, ``perturbed_mean_log_probs``, ``truth_ratio`` and
    ``normalised_probability`` (answer vs perturbed answers). As in TOFU's code, the truth ratio's base is the
    ``paraphrased_answer`` when the row has one and the ``answer`` itself otherwise (real authors, world facts).
    A row whose prompt exceeds ``max_length`` gets ``None`` for every value.
    """
    encoded = qa_examples(tokenizer, rows, data_format)
    examples = [e for row in encoded for e in row.examples or []]
    stats = token_stats(model, examples, tokenizer.pad_token_id, batch_size, spread=False) if examples else []
    return [qa_row_statistics(row, row_stats, tokenizer.eos_token_id)
            for row, row_stats in zip(encoded, split(stats, [len(row.examples or []) for row in encoded]))]
