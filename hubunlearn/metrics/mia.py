"""Membership-inference scores and their summaries.

Every score is oriented "higher = looks like a training member", so ``auc(members, nonmembers)`` is above 0.5
when the attack works (OpenUnlearning reports the same AUC: 1 when the forget rows are far likelier than the holdout rows). Scores read a :class:`~hubunlearn.metrics.stats.TokenStats` (the labelled tokens only).
"""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

from .stats import TokenStats

SIGMA_FLOOR = 1e-6  # Min-k%++ divides by σ; a (near-)deterministic next-token distribution has σ ≈ 0
MIN_K = 0.4  # the share of tokens Min-k% and Min-k%++ average: MUSE's privleak key (Min-40%) and OpenUnlearning's default
PRIVLEAK_CONVENTION = ("MUSE (Shi et al., arXiv 2407.06460), in percent: 100 * (AUC_unlearned - AUC_retrain) / AUC_retrain with "
                       "MUSE's AUC = 1 - ours (holdout rows as the positive class); 0 is ideal, about -100 when nothing was "
                       "unlearned (under-unlearning is negative), positive when over-unlearned")


def _lowest_mean(values: Sequence[float], k: float) -> float:
    if not len(values):
        raise ValueError("no labelled tokens to score")
    count = max(1, int(len(values) * k))
    return float(np.mean(np.sort(np.asarray(values, dtype=float))[:count]))


def loss_score(stats: TokenStats) -> float:
    """LOSS attack (Yeom et al., 2018): the mean token log-prob, i.e. minus the loss."""
    return stats.mean_log_prob


def zlib_score(stats: TokenStats, text: str) -> float:
    """zlib ratio (Carlini et al., arXiv 2012.07805): ``mean log-prob / len(zlib.compress(text))``.

    Carlini's ratio is loss / zlib entropy (low = memorised); this is its negative, as in Shi et al.'s Min-k% code.
    """
    return stats.mean_log_prob / len(zlib.compress(text.encode("utf-8")))


def min_k_score(stats: TokenStats, k: float = MIN_K) -> float:
    """Min-k% Prob (Shi et al., arXiv 2310.16789): mean of the lowest ``int(k·n)`` token log-probs (at least one)."""
    return _lowest_mean(stats.log_probs, k)


def min_k_plus_plus_score(stats: TokenStats, k: float = MIN_K) -> float:
    """Min-k%++ (Zhang et al., arXiv 2404.02936): Min-k% over ``(log p(y_t) - μ_t) / σ_t``, where μ_t and σ_t are
    the mean and standard deviation of ``log p(z)`` for ``z ~ p(· | y_<t)``; σ is floored at ``SIGMA_FLOOR``."""
    if stats.mean_log_probs is None or stats.std_log_probs is None:
        raise ValueError("Min-k%++ needs the spread of log p: compute the token statistics with token_stats(..., spread=True)")
    log_p, mu = np.asarray(stats.log_probs, dtype=float), np.asarray(stats.mean_log_probs, dtype=float)
    sigma = np.maximum(np.asarray(stats.std_log_probs, dtype=float), SIGMA_FLOOR)
    return _lowest_mean((log_p - mu) / sigma, k)


def mia_scores(stats_list: Sequence[TokenStats], texts: Sequence[str], k: float = MIN_K) -> dict[str, list[float]]:
    """All four scores of each example: ``{"loss", "zlib", "min_k", "min_k_plus_plus": [one per example]}``."""
    if len(stats_list) != len(texts):
        raise ValueError(f"{len(stats_list)} token statistics but {len(texts)} texts")
    return {
        "loss": [loss_score(s) for s in stats_list],
        "zlib": [zlib_score(s, t) for s, t in zip(stats_list, texts)],
        "min_k": [min_k_score(s, k) for s in stats_list],
        "min_k_plus_plus": [min_k_plus_plus_score(s, k) for s in stats_list],
    }


def auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC of telling members (label 1) from non-members by score; 0.5 is chance."""
    labels = [1] * len(member_scores) + [0] * len(nonmember_scores)
    return float(roc_auc_score(labels, [*member_scores, *nonmember_scores]))


def privleak(auc_unlearned: float, auc_reference: float) -> float:
    """MUSE PrivLeak (Shi et al., arXiv 2407.06460), in percent, from two of our AUCs (forget rows as members, as
    :func:`auc` computes them) on the unlearned and the retrained (reference) model.

    MUSE's code scores forget (label 0) against holdout (label 1) rows, so its AUC is ``1 - auc``; then
    ``privleak = 100 * ((1 - auc_unlearned) - (1 - auc_reference)) / (1 - auc_reference)``. A model that unlearned
    nothing (``auc_unlearned`` = 1) against a reference at chance (0.5) gives -100, as MUSE's target model (-99.8 on
    News) and OpenUnlearning do; 0 is ideal, positive means over-unlearning. Undefined for ``auc_reference`` = 1.
    """
    if auc_reference >= 1:
        raise ValueError("privleak is undefined for a reference AUC of 1 (MUSE's AUC of 0)")
    return 100 * (auc_reference - auc_unlearned) / (1 - auc_reference)
