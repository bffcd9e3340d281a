"""Pure unlearning losses on logits and labels: no Trainer state, each unit-tested by hand.

Conventions: ``logits`` is ``(batch, length, vocab)``, ``labels`` is ``(batch, length)`` with ``-100`` on
tokens that do not count (prompt, padding). Position ``t`` of the logits predicts token ``t + 1``.

Memory: a full float32 log-softmax is ``batch × length × vocab × 4`` bytes (512 MiB for 4 × 256 tokens of a
128k vocabulary), kept for the backward pass. Losses that need only the gold token's log-probability use TRL's
``selective_log_softmax`` where its fused kernel runs (GPUs), elsewhere :class:`GoldLogProb` (a log-sum-exp on chunks of
positions, the gradient written into one buffer), and never build it; no loss slices logits that carry gradients
(the targets are shifted instead: :func:`next_token_targets`); losses that need the whole distribution (KL, IHL) work through :func:`chunked`, one chunk of positions at a
time, recomputing each chunk's float32 intermediates in the backward pass instead of storing them, and writing its
gradient into one buffer (``benchmarks/logprob_memory.py``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**25  # float32 values (128 MiB) a chunked loss upcasts at a time: chunk = this / (batch × vocab) positions


class _Chunked(torch.autograd.Function):
    """A per-position ``function`` over chunks of positions whose backward recomputes one chunk at a time and writes
    its gradient into a single buffer the size of the logits (slicing under autograd, or checkpointing each chunk,
    would allocate a full-size zero gradient per chunk)."""

    @staticmethod
    def forward(ctx, function, step, logits, *others):
        ctx.function, ctx.step = function, step
        ctx.save_for_backward(logits, *others)
        return torch.cat([function(logits[:, s : s + step], *(o[:, s : s + step] for o in others))
                          for s in range(0, logits.shape[1], step)], 1)

    @staticmethod
    def backward(ctx, grad_output):
        logits, *others = ctx.saved_tensors
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        for s in range(0, logits.shape[1], ctx.step):
            part = logits[:, s : s + ctx.step].detach().requires_grad_()
            with torch.enable_grad():
                value = ctx.function(part, *(o[:, s : s + ctx.step] for o in others))
            grad[:, s : s + ctx.step] = torch.autograd.grad(value, part, grad_output[:, s : s + ctx.step])[0]
        return (None, None, grad, *([None] * len(others)))


def chunked(function: Callable[..., torch.Tensor], logits: torch.Tensor, *others: torch.Tensor,
            chunk_positions: int | None = None) -> torch.Tensor:
    """``function(logits, *others)`` computed over chunks of positions (dimension 1 of each ``(batch, length, ...)``
    tensor) and concatenated along dimension 1; ``function`` maps ``(batch, c, ...)`` slices to a ``(batch, c)``
    result. Gradients flow to ``logits`` only (``others``: targets, a frozen reference's logits).

    ``chunk_positions`` defaults to :data:`CHUNK_ELEMENTS` ``/ (batch × vocab)``. The forward keeps no chunk's
    intermediates (a float32 softmax over the vocabulary); the backward recomputes them one chunk at a time and writes
    each chunk's gradient into one buffer, so the peak holds the logits' gradient and one chunk's intermediates, not
    the whole sequence's. The result and its gradients equal the unchunked computation's (up to float rounding)."""
    batch, length, vocab = logits.shape
    step = chunk_positions or max(1, CHUNK_ELEMENTS // max(1, batch * vocab))
    if step >= length:
        return function(logits, *others)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _Chunked.apply(function, step, logits, *others)
    return torch.cat([function(logits[:, s : s + step], *(o[:, s : s + step] for o in others)) for s in range(0, length, step)], 1)


class GoldLogProb(torch.autograd.Function):
    """``log softmax(logits)[..., target]`` in float32 and its gradient, ``step`` positions at a time.

    The forward keeps only the logits (saved, not copied) and one float32 log-sum-exp per position; the backward
    writes ``onehot(target) - softmax(logits)`` (times the incoming gradient) chunk by chunk into one preallocated
    gradient the size of the logits. No slice of the logits is taken under autograd (each such slice would get a
    full-size zero-filled gradient in the backward) and no row-by-row stack of gradients is built (TRL's CPU path), so
    the backward's peak is the logits' gradient plus one chunk's float32 softmax."""

    @staticmethod
    def forward(ctx, logits, targets, step):
        lse = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        out = torch.empty_like(lse)
        for s in range(0, logits.shape[1], step):
            part = logits[:, s : s + step].float()
            lse[:, s : s + step] = torch.logsumexp(part, -1)
            out[:, s : s + step] = part.gather(-1, targets[:, s : s + step, None]).squeeze(-1) - lse[:, s : s + step]
        ctx.step = step
        ctx.save_for_backward(logits, targets, lse)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        for s in range(0, logits.shape[1], ctx.step):
            g = grad_output[:, s : s + ctx.step, None].float()
            part = (logits[:, s : s + ctx.step].float() - lse[:, s : s + ctx.step, None]).exp_().mul_(-g)
            grad[:, s : s + ctx.step] = part.scatter_add_(-1, targets[:, s : s + ctx.step, None], g)
        return grad, None, None


def gold_log_probs(logits: torch.Tensor, targets: torch.Tensor, chunk_positions: int | None = None) -> torch.Tensor:
    """``log softmax(logits)[..., target]`` in float32, ``(batch, length)`` for ``(batch, length, vocab)`` logits
    and ``(batch, length)`` targets aligned with them (shift the targets, never the logits: see
    :func:`next_token_targets`), without a full log-softmax.

    Where TRL's fused Triton kernel runs (``selective_log_softmax`` on CUDA/XPU; it accumulates in float32) it is
    used on the whole tensor; elsewhere :class:`GoldLogProb`, chunks of ``chunk_positions`` positions (default
    :data:`CHUNK_ELEMENTS` ``/ (batch × vocab)``) upcast to float32 one at a time. TRL's fallback (a gather plus a
    row-by-row log-sum-exp) would keep a full-size gather gradient and a stack of per-row ones, and take bfloat16
    logits' log-softmax in bfloat16."""
    from transformers.utils import is_triton_available

    try:  # TRL's own test of where its kernel runs is private: a TRL without it takes the chunked path
        from trl.trainer.utils import _supports_trl_loss_kernel, selective_log_softmax
    except ImportError:
        _supports_trl_loss_kernel = None
    if _supports_trl_loss_kernel is not None and is_triton_available() and _supports_trl_loss_kernel(logits, targets):
        return selective_log_softmax(logits, targets).float()
    batch, _, vocab = logits.shape
    step = chunk_positions or max(1, CHUNK_ELEMENTS // max(1, batch * vocab))
    return GoldLogProb.apply(logits, targets, step)


def shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align predictions with targets: ``(logits[:, :-1], targets[:, 1:], mask)``; masked targets become 0."""
    logits, targets = logits[:, :-1, :], labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return logits, targets.masked_fill(~mask, 0), mask


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets, mask)``, ``(batch, length)`` each, aligned with every position of the logits: position ``t``'s
    target is label ``t + 1`` (0 where masked), the last position masked. Unlike :func:`shift` the logits are not
    sliced, so a chunked loss gets the whole tensor and hands back its gradient without a full-size copy."""
    targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], 1)
    mask = targets != IGNORE_INDEX
    return targets.masked_fill(~mask, 0), mask


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log p(y_t)`` of the labelled tokens (0 elsewhere; float32) and the mask of labelled tokens,
    ``(batch, length - 1)`` each (position ``t`` predicts token ``t + 1``)."""
    targets, mask = next_token_targets(labels)
    return (gold_log_probs(logits, targets) * mask)[:, :-1], mask[:, :-1]


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


def _inverted_hinge(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per position ``1 + p(y) - max_{v≠y} p(v)``: ``(batch, c)`` from ``(batch, c, vocab)`` logits."""
    probs = logits.float().softmax(-1)
    true_prob = torch.gather(probs, -1, targets.unsqueeze(-1)).squeeze(-1)
    other_probs = probs.scatter(-1, targets.unsqueeze(-1), -1.0)
    return 1.0 + true_prob - other_probs.max(-1).values


def inverted_hinge_loss(logits: torch.Tensor, labels: torch.Tensor, chunk_positions: int | None = None) -> torch.Tensor:
    """Inverted Hinge Loss (Cha et al., arXiv 2408.06621), mean over labelled tokens.

    Per token ``1 + p(y_t) - max_{v≠y_t} p(v)``, in ``[0, 2]``: it pushes the true token down and the
    runner-up up, instead of spreading gradient ascent's push over the whole vocabulary. Computed in chunks of
    positions (:func:`chunked`).
    """
    targets, mask = next_token_targets(labels)
    per_token = chunked(_inverted_hinge, logits, targets, chunk_positions=chunk_positions)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def _kl(logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """Per position ``KL(p_ref || p_θ)`` over the vocabulary: ``(batch, c)``."""
    reference_log_probs = reference_logits.float().log_softmax(-1)
    return F.kl_div(logits.float().log_softmax(-1), reference_log_probs, log_target=True, reduction="none").sum(-1)


def kl_to_reference(logits: torch.Tensor, reference_logits: torch.Tensor, attention_mask: torch.Tensor,
                    chunk_positions: int | None = None) -> torch.Tensor:
    """``KL(p_ref || p_θ)`` of the next-token distributions, mean over the predictions of every real token of the
    sequences, question and answer alike; padding never counts.

    ``attention_mask`` is ``(batch, length)``, nonzero on real tokens: position ``t`` counts when token ``t + 1`` is
    real. This is TOFU's retain term (Maini et al., arXiv 2401.06121, §4: the per-token KL to the original averaged
    over each whole retain sequence). OpenUnlearning's code averages over every position of the padded batch,
    padding included, so the term's weight shifts with the batch's padding (and, on the models of
    ``benchmarks/parity_graddiff.py``, unlearning all but stops); hubunlearn counted the answer tokens only before
    issue 16, leaving the rest of the sequence's predictions unconstrained. Computed in chunks of positions
    (:func:`chunked`).
    """
    mask = torch.cat([attention_mask[:, 1:] != 0, attention_mask.new_zeros((attention_mask.shape[0], 1), dtype=torch.bool)], 1)
    per_token = chunked(_kl, logits, reference_logits, chunk_positions=chunk_positions)  # the last position is masked
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


# ---- IdkNLL and IdkDPO: refusal answers (IdkNLL's forget term is nll_loss on the paired refusals) -----------------------


def idk_dpo_loss(refusal_log_prob: torch.Tensor, refusal_reference_log_prob: torch.Tensor, answer_log_prob: torch.Tensor,
                 answer_reference_log_prob: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO (Rafailov et al., arXiv 2305.18290) with the refusal preferred and the true answer rejected, on the scale of
    the unlearning literature (TOFU, arXiv 2401.06121; NPO): ``-(2/β) · mean log σ(β · (Δ_refusal - Δ_answer))``,
    ``Δ = log π_θ(y|x) - log π_ref(y|x)`` of sequences summed over their answer tokens. Each argument is ``(batch,)``.

    Equals ``(2/β)·ln 2`` when the policy is the reference and falls towards 0 as the refusal gains on the answer
    relative to the reference. TRL's DPO loss is the same without the ``2/β`` factor (and lives inside its trainer)."""
    margin = (refusal_log_prob - refusal_reference_log_prob) - (answer_log_prob - answer_reference_log_prob)
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()
