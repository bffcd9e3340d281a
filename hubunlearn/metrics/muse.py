"""MUSE's metrics (Shi et al., arXiv 2407.06460), as the benchmark's reference code (swj0419/muse_bench) computes them.

Pure functions over strings and per-example numbers; :mod:`hubunlearn.muse` runs the model. ROUGE numbers are on a
0-1 scale (OpenUnlearning's; MUSE's own tables multiply by 100), PrivLeak is in percent.

- VerbMem: ROUGE-L F1 between the greedy 128-token continuation of a prompt and the ground truth cut to its first
  128 tokens (:func:`truncate_to_tokens`, special tokens included in the count, as MUSE tokenises it).
- KnowMem: ROUGE-L F1 between the answer and the greedy 32-token answer to :func:`knowmem_prompt`, cut at the first
  stop string (:func:`cut_at_stop`).
- PrivLeak: the Min-K% (k = 0.4) AUC between forget and holdout texts (:func:`muse_auc`), relative to a retrained
  model's (:func:`privleak`).
"""

from __future__ import annotations

from typing import Sequence

from rouge_score import rouge_scorer, tokenizers
from sklearn.metrics import roc_auc_score

from .mia import MIN_K, min_k_score
from .stats import TokenStats

VERBMEM_NEW_TOKENS = 128  # VerbMem's continuation length, and the ground truth's cut (tokens)
KNOWMEM_NEW_TOKENS = 32  # KnowMem's answer length (tokens)
STOP_STRINGS = ("\n\n", "\nQuestion", "Question:")  # a KnowMem answer ends before the first of these
# The retrained models' Min-40% AUC between the privleak forget and holdout texts, in MUSE's orientation (its
# constants.py, key forget_holdout_Min-40%): the reference of the released targets when no retrained model is given.
PUBLISHED_REFERENCE_AUC = {"news": 0.4772, "books": 0.5393}
PRIVLEAK_CONVENTION = ("MUSE (Shi et al., arXiv 2407.06460), in percent: 100 * (AUC - AUC_retrain) / AUC_retrain, where AUC "
                       "is roc_auc with the holdout texts as the positive class scored by Min-40% (mean of the lowest 40% token "
                       "log-probs): near 0 when the model treats forget texts like unseen ones; 0 is ideal, about -100 when the "
                       "forget texts look memorised (under-unlearning is negative), positive when over-unlearned. "
                       "OpenUnlearning reports 1 - this AUC with the same privleak")


def rouge_l_f1(generations: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 of each generation against its reference, without stemming (MUSE's ``use_stemmer=False``)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizers.DefaultTokenizer(use_stemmer=False))
    return [scorer.score(target=r, prediction=g)["rougeL"].fmeasure for g, r in zip(generations, references, strict=True)]


def truncate_to_tokens(tokenizer, text: str, max_tokens: int = VERBMEM_NEW_TOKENS) -> str:
    """``text`` cut to its first ``max_tokens`` tokens (special tokens added by the tokenizer count, as in MUSE's
    VerbMem) and decoded without the special tokens."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_tokens]
    return tokenizer.decode(ids, skip_special_tokens=True)


def knowmem_prompt(examples: Sequence[tuple[str, str]], question: str) -> str:
    """The in-context (question, answer) pairs, each as ``Question: q\\nAnswer: a\\n\\n``, then ``Question: q\\nAnswer: ``."""
    return "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in examples) + f"Question: {question}\nAnswer: "


def cut_at_stop(text: str, stops: Sequence[str] = STOP_STRINGS) -> str:
    """``text`` up to the first occurrence of any stop string (all of it when none occurs)."""
    ends = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return text[: min(ends)] if ends else text


def min_k_scores(stats_list: Sequence[TokenStats], k: float = MIN_K) -> list[float]:
    """Min-K% of each text (Shi et al., arXiv 2310.16789): the mean of its lowest ``int(k·T)`` token log-probs, at
    least one token (MUSE takes none, a NaN, when ``k·T < 1``). Higher = likelier = looks seen. MUSE stores minus
    this; the AUC below is oriented accordingly."""
    return [min_k_score(s, k) for s in stats_list]


def muse_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """MUSE's privleak AUC: ROC AUC with the holdout texts as the positive class, scored by Min-K% (higher = looks
    seen). 0 when every forget text looks more seen than every holdout text (memorised), 0.5 at chance. Equals
    ``1 - hubunlearn.metrics.mia.auc(forget, holdout)``."""
    if not forget_scores or not holdout_scores:
        raise ValueError("the AUC needs at least one forget and one holdout text")
    labels = [0] * len(forget_scores) + [1] * len(holdout_scores)
    return float(roc_auc_score(labels, [*forget_scores, *holdout_scores]))


def privleak(auc: float, reference_auc: float) -> float:
    """MUSE's PrivLeak in percent: ``100 * (auc - reference_auc) / reference_auc``, both AUCs from :func:`muse_auc`
    (the unlearned and the retrained model). A model that memorised the forget texts (AUC 0) against a reference at
    chance (0.5) gives -100. Raises ``ValueError`` for a reference AUC outside (0, 1): at 0 it divides by zero, and
    a reference that separates forget from holdout texts perfectly (0 or 1) never saw them the same way, so
    PrivLeak against it is meaningless (in OpenUnlearning's orientation 1 is the division by zero)."""
    if not 0 < reference_auc < 1:
        raise ValueError(f"PrivLeak is undefined for a reference AUC of {reference_auc:g}: it must lie strictly between 0 and 1")
    return 100 * (auc - reference_auc) / reference_auc
