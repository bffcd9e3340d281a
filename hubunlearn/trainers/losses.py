"""Pure unlearning losses on logits and labels: no Trainer state, each unit-tested by hand.

Conventions: ``logits`` is ``(batch, length, vocab)``, ``labels`` is ``(batch, length)`` with ``-100`` on
tokens that do not count (prompt, padding). Position ``t`` of the logits predicts token ``t + 1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align predictions with targets: ``(logits[:, :-1], targets[:, 1:], mask)``; masked targets become 0."""
    logits, targets = logits[:, :-1, :], labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return logits, targets.masked_fill(~mask, 0), mask


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log p(y_t)`` of the labelled tokens (0 elsewhere) and the mask of labelled tokens."""
    logits, targets, mask = shift(logits, labels)
    log_probs = torch.gather(logits.float().log_softmax(-1), -1, targets.unsqueeze(-1)).squeeze(-1)
    return log_probs * mask, mask


def sequence_log_prob(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed ``log p(y | x)`` over labelled tokens, and the number of those tokens."""
    log_probs, mask = token_log_probs(logits, labels)
    return log_probs.sum(-1), mask.sum(-1)


def nll_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over all labelled tokens of the batch (the usual causal-LM loss)."""
    log_probs, mask = token_log_probs(logits, labels)
    return -log_probs.sum() / mask.sum().clamp(min=1)


def gradient_ascent_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Gradient ascent on the forget set: minimise ``-NLL`` (Jang et al., 2023)."""
    return -nll_loss(logits, labels)


def capped_gradient_ascent_loss(logits: torch.Tensor, labels: torch.Tensor, cap: float) -> torch.Tensor:
    """Gradient ascent with likelihood capping (Wang et al., arXiv 2406.09179): ``-mean_s min(NLL_s, δ)`` over
    sequences, ``NLL_s`` the sequence's mean token NLL; a sequence past ``δ`` stops contributing (zero gradient)."""
    log_probs, mask = token_log_probs(logits, labels)
    sequence_nll = -log_probs.sum(-1) / mask.sum(-1).clamp(min=1)
    return -sequence_nll.clamp(max=cap)[mask.any(-1)].mean()


def npo_loss(policy_log_prob: torch.Tensor, reference_log_prob: torch.Tensor, beta: float) -> torch.Tensor:
    """Negative Preference Optimization (Zhang et al., arXiv 2404.05868).

    ``-(2/β) · mean log σ(-β · (log π_θ(y|x) - log π_ref(y|x)))`` over sequences; equals ``(2/β)·ln 2``
    when the policy is the reference, and is bounded below by 0.
    """
    return -(2.0 / beta) * F.logsigmoid(-beta * (policy_log_prob - reference_log_prob)).mean()


def simnpo_loss(policy_log_prob: torch.Tensor, num_tokens: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimNPO (Fan et al., arXiv 2410.07163): reference-free NPO on the length-normalised log-likelihood.

    ``-(2/β) · mean log σ(-(β/|y|) · log π_θ(y|x) - γ)``.
    """
    normalised = policy_log_prob / num_tokens.clamp(min=1)
    return -(2.0 / beta) * F.logsigmoid(-beta * normalised - gamma).mean()


def inverted_hinge_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Inverted Hinge Loss (Cha et al., arXiv 2408.06621), mean over labelled tokens.

    Per token ``1 + p(y_t) - max_{v≠y_t} p(v)``, in ``[0, 2]``: it pushes the true token down and the
    runner-up up, instead of spreading gradient ascent's push over the whole vocabulary.
    """
    logits, targets, mask = shift(logits, labels)
    probs = logits.float().softmax(-1)
    true_prob = torch.gather(probs, -1, targets.unsqueeze(-1)).squeeze(-1)
    other_probs = probs.scatter(-1, targets.unsqueeze(-1), -1.0)
    per_token = 1.0 + true_prob - other_probs.max(-1).values
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def kl_to_reference(logits: torch.Tensor, reference_logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``KL(p_ref || p_θ)`` of the next-token distributions, mean over the predictions of every real token of the
    sequences, question and answer alike; padding never counts.

    ``attention_mask`` is ``(batch, length)``, nonzero on real tokens: position ``t`` counts when token ``t + 1`` is
    real. This is TOFU's retain term (Maini et al., arXiv 2401.06121, §4: the per-token KL to the original averaged
    over each whole retain sequence). OpenUnlearning's code averages over every position of the padded batch,
    padding included, so the term's weight shifts with the batch's padding (and, on the models of
    ``benchmarks/parity_graddiff.py``, unlearning all but stops); hubunlearn counted the answer tokens only before
    issue 16, leaving the rest of the sequence's predictions unconstrained.
    """
    logits, reference_logits = logits[:, :-1, :], reference_logits[:, :-1, :]
    mask = attention_mask[:, 1:] != 0
    reference_log_probs = reference_logits.float().log_softmax(-1)
    per_token = F.kl_div(logits.float().log_softmax(-1), reference_log_probs, log_target=True, reduction="none").sum(-1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: the positions whose next token is labelled (where the answer is read off)."""
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return positions


def representation_deviation_loss(hidden: torch.Tensor, original: torch.Tensor, mask: torch.Tensor, inverse_temperature: float) -> torch.Tensor:
    """KUDA's deviation objective (Fang et al., arXiv 2602.19275): ``(1/β)·softplus(β·s)``, mean over the masked
    tokens, with ``s = ⟨h, h⁰⟩ / ‖h⁰‖² = cos(h, h⁰)·‖h‖/‖h⁰‖`` the alignment of each representation with the frozen
    original's. Minimising it turns representations away from the original's; the push (``sigmoid(β·s)``) fades
    once they no longer point along it, so they are deviated, not blown up. The paper names a cosine-based loss
    with an inverse temperature β; the cosine alone has zero gradient at ``h = h⁰`` (where training starts), hence
    ``s``, which equals the cosine while the norms match. This form is our choice."""
    hidden, original = hidden.float(), original.float()
    alignment = (hidden * original).sum(-1) / original.pow(2).sum(-1).clamp(min=1e-12)
    per_token = F.softplus(inverse_temperature * alignment) / inverse_temperature
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def representation_mse_loss(hidden: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked tokens of the mean squared difference to ``target`` (broadcast): the frozen original's
    representations (retain terms), or RMU's control vector ``c·u`` (Li et al., arXiv 2403.03218)."""
    per_token = (hidden.float() - target.float()).pow(2).mean(-1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)
