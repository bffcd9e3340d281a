"""Evaluation metrics, each a function over per-example statistics from batched forward passes."""

from .likelihood import answer_probabilities, greedy_answers, exact_recall

__all__ = ["answer_probabilities", "greedy_answers", "exact_recall"]
