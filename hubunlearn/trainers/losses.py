"""Pure unlearning losses on logits and labels: no Trainer state, each unit-tested by hand.

Conventions: ``logits`` is ``(batch, length, vocab)``, ``labels`` is ``(batch, length)`` with ``-100`` on
tokens that do not count (prompt, padding). Position ``t`` of the logits predicts token ``t + 1``.

Memory: a full float32 log-softmax is ``batch × length × vocab × 4`` bytes (512 MiB for 4 × 256 tokens of a
128k vocabulary), kept for the backward pass. Losses that need only the gold token's log-probability use TRL's
``selective_log_softmax`` where its fused kernel runs (GPUs), elsewhere :class:`GoldLogProb` (a log-sum-exp on chunks of
positions, the gradient written into one buffer), and never build it; no loss slices logits that carry gradients
(the targets are shifted instead: :func:`next_token_targets`); losses that need the whole distribution (KL, IHL) work through :func:`chunked`, one chunk of positions at a
time, recomputing each chunk's float32 intermediates in the backward pass instead of storing them, and writing its
gradient into one buffer (``benchmarks/logprob_memory.py``). The trainers hand these losses
:class:`~hubunlearn.trainers.head.HeadLogits` where the model allows (the final hidden states and the output layer):
then no loss holds the logits either, each chunk's are built from the hidden states and dropped (``benchmarks/scale.py``).
A method's loss reads logits only through :func:`gold_log_probs`, :func:`token_log_probs` and :func:`chunked`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .head import HeadLogits

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**25  # float32 values (128 MiB) a chunked loss upcasts at a time: chunk = this / (batch × vocab) positions
CPU_CHUNK_ELEMENTS = 2**23  # 32 MiB on the CPU, where the models are small and a chunk's intermediates weigh more


def default_chunk_positions(batch: int, vocab: int, device: torch.device) -> int:
    """Positions per chunk: :data:`CHUNK_ELEMENTS` (:data:`CPU_CHUNK_ELEMENTS` on the CPU) ``/ (batch × vocab)``,
    at least 1. Large chunks keep an accelerator's products wide; small ones keep the CPU's transient memory low."""
    elements = CPU_CHUNK_ELEMENTS if device.type == "cpu" else CHUNK_ELEMENTS
    return max(1, elements // max(1, batch * vocab))


def _positions(tensor, start: int, stop: int) -> torch.Tensor:
    """Positions ``start:stop`` (dimension 1) of a tensor, or of :class:`~hubunlearn.trainers.head.HeadLogits`
    computed now."""
    return tensor.positions(start, stop) if isinstance(tensor, HeadLogits) else tensor[:, start:stop]


def _whole(tensor) -> torch.Tensor:
    return tensor.materialize() if isinstance(tensor, HeadLogits) else tensor


class _Chunked(torch.autograd.Function):
    """A per-position ``function`` over chunks of positions whose backward recomputes one chunk at a time and writes
    its gradient into a single buffer the size of the logits (slicing under autograd, or checkpointing each chunk,
    would allocate a full-size zero gradient per chunk)."""

    @staticmethod
    def forward(ctx, function, step, logits, *others):
        ctx.function, ctx.step = function, step
        ctx.save_for_backward(logits)
        ctx.others = others  # targets and a frozen reference's logits: no gradients, read as they are
        return torch.cat([function(logits[:, s : s + step], *(_positions(o, s, s + step) for o in others))
                          for s in range(0, logits.shape[1], step)], 1)

    @staticmethod
    def backward(ctx, grad_output):
        logits = ctx.saved_tensors[0]
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        for s in range(0, logits.shape[1], ctx.step):
            part = logits[:, s : s + ctx.step].detach().requires_grad_()
            with torch.enable_grad():
                value = ctx.function(part, *(_positions(o, s, s + ctx.step) for o in ctx.others))
            grad[:, s : s + ctx.step] = torch.autograd.grad(value, part, grad_output[:, s : s + ctx.step])[0]
        return (None, None, grad, *([None] * len(ctx.others)))


class _ChunkedHead(torch.autograd.Function):
    """:class:`_Chunked` on :class:`~hubunlearn.trainers.head.HeadLogits`: each chunk's logits are computed from the
    hidden states and the output layer's weight in the forward pass and again in the backward, never kept; the
    backward writes the hidden states' gradient into one buffer and sums the weight's over the chunks. Autocast, where
    the forward ran under it, is resumed for the recomputation.

    With a frozen output layer (LoRA, FILA: the weight needs no gradient) nothing is recomputed: each position's value
    depends on its own hidden state only, so the forward keeps ``∂value/∂hidden`` per position (the hidden states'
    size) and the backward scales it by the incoming gradient."""

    @staticmethod
    def forward(ctx, function, step, hidden, weight, *others):
        ctx.function, ctx.step, ctx.others = function, step, others
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.frozen_weight = not weight.requires_grad
        if not ctx.frozen_weight:
            ctx.save_for_backward(hidden, weight)
            return torch.cat([function(F.linear(hidden[:, s : s + step], weight), *(_positions(o, s, s + step) for o in others))
                              for s in range(0, hidden.shape[1], step)], 1)
        unit, values = torch.zeros_like(hidden, memory_format=torch.contiguous_format), []
        for s in range(0, hidden.shape[1], step):
            part = hidden[:, s : s + step].detach().requires_grad_()
            with torch.enable_grad():
                value = function(F.linear(part, weight), *(_positions(o, s, s + step) for o in others))
                if value.requires_grad:
                    unit[:, s : s + step] = torch.autograd.grad(value.sum(), part)[0]
            values.append(value.detach())
        ctx.save_for_backward(unit)
        return torch.cat(values, 1)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.frozen_weight:
            unit = ctx.saved_tensors[0]
            return (None, None, unit * grad_output.unsqueeze(-1).to(unit.dtype), None, *([None] * len(ctx.others)))
        hidden, weight = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)
        grad_weight = torch.zeros_like(weight)
        leaf_weight = weight.detach().requires_grad_()
        device, enabled, dtype = ctx.autocast
        for s in range(0, hidden.shape[1], ctx.step):
            part = hidden[:, s : s + ctx.step].detach().requires_grad_()
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                value = ctx.function(F.linear(part, leaf_weight), *(_positions(o, s, s + ctx.step) for o in ctx.others))
            grad_part, grad_chunk_weight = torch.autograd.grad(value, (part, leaf_weight), grad_output[:, s : s + ctx.step])
            grad_hidden[:, s : s + ctx.step] = grad_part
            grad_weight += grad_chunk_weight
        return (None, None, grad_hidden, grad_weight, *([None] * len(ctx.others)))


def chunked(function: Callable[..., torch.Tensor], logits: torch.Tensor | HeadLogits, *others: torch.Tensor | HeadLogits,
            chunk_positions: int | None = None) -> torch.Tensor:
    """``function(logits, *others)`` computed over chunks of positions (dimension 1 of each ``(batch, length, ...)``
    tensor) and concatenated along dimension 1; ``function`` maps ``(batch, c, ...)`` slices to a ``(batch, c)``
    result, each position's value from that position's inputs alone (chunking and the frozen output layer's
    gradient rely on it). Gradients flow to ``logits`` only (``others``: targets, a frozen reference's logits). ``logits`` and the
    reference's may be :class:`~hubunlearn.trainers.head.HeadLogits`, whose logits are then built one chunk at a time
    (in the backward pass too), never all at once.

    ``chunk_positions`` defaults to :func:`default_chunk_positions`. The forward keeps no chunk's
    intermediates (a float32 softmax over the vocabulary); the backward recomputes them one chunk at a time and writes
    each chunk's gradient into one buffer, so the peak holds the logits' gradient and one chunk's intermediates, not
    the whole sequence's. The result and its gradients equal the unchunked computation's (up to float rounding)."""
    batch, length, vocab = logits.shape
    step = chunk_positions or default_chunk_positions(batch, vocab, logits.device)
    head = isinstance(logits, HeadLogits)
    if step >= length and not head:
        return function(logits, *(_whole(o) for o in others))
    if torch.is_grad_enabled() and (logits.hidden.requires_grad or logits.weight.requires_grad if head else logits.requires_grad):
        if head:
            return _ChunkedHead.apply(function, step, logits.hidden, logits.weight, *others)
        return _Chunked.apply(function, step, logits, *others)
    return torch.cat([function(_positions(logits, s, s + step), *(_positions(o, s, s + step) for o in others)) for s in range(0, length, step)], 1)


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


def _gold_log_prob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per position ``log softmax(logits)[target]`` in float32: ``(batch, c)`` from ``(batch, c, vocab)``."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def gold_log_probs(logits: torch.Tensor | HeadLogits, targets: torch.Tensor, chunk_positions: int | None = None) -> torch.Tensor:
    """``log softmax(logits)[..., target]`` in float32, ``(batch, length)`` for ``(batch, length, vocab)`` logits
    and ``(batch, length)`` targets aligned with them (shift the targets, never the logits: see
    :func:`next_token_targets`), without a full log-softmax.

    Where TRL's fused Triton kernel runs (``selective_log_softmax`` on CUDA/XPU; it accumulates in float32) it is
    used on the whole tensor; elsewhere :class:`GoldLogProb`, chunks of ``chunk_positions`` positions (default
    :func:`default_chunk_positions`) upcast to float32 one at a time; on :class:`~hubunlearn.trainers.head.HeadLogits`,
    :func:`chunked`, which builds each chunk's logits and recomputes them in the backward pass. TRL's fallback (a gather plus a
    row-by-row log-sum-exp) would keep a full-size gather gradient and a stack of per-row ones, and take bfloat16
    logits' log-softmax in bfloat16."""
    if isinstance(logits, HeadLogits):
        return chunked(_gold_log_prob, logits, targets, chunk_positions=chunk_positions)
    from transformers.utils import is_triton_available

    try:  # TRL's own test of where its kernel runs is private: a TRL without it takes the chunked path
        from trl.trainer.utils import _supports_trl_loss_kernel, selective_log_softmax
    except ImportError:
        _supports_trl_loss_kernel = None
    if _supports_trl_loss_kernel is not None and is_triton_available() and _supports_trl_loss_kernel(logits, targets):
        return selective_log_softmax(logits, targets).float()
    batch, _, vocab = logits.shape
    step = chunk_positions or default_chunk_positions(batch, vocab, logits.device)
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


class _HeadMeanNLL(torch.autograd.Function):
    """Mean NLL on :class:`~hubunlearn.trainers.head.HeadLogits` with its gradients computed in the forward pass, one
    chunk of positions at a time (Liger Kernel's fused linear cross-entropy, Hsu et al., arXiv 2410.10989): the
    loss is a mean, so each position's gradient is known before the backward pass, which only scales the stored
    gradients of the hidden states and the weight by the incoming scalar; no chunk is computed twice."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, mask, step):
        count = mask.sum().clamp(min=1)
        grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, hidden.shape[1], step):
            part, gold, keep = hidden[:, s : s + step], targets[:, s : s + step, None], mask[:, s : s + step, None]
            logits = F.linear(part, weight).float()
            log_norm = torch.logsumexp(logits, -1, keepdim=True)
            total += ((log_norm - logits.gather(-1, gold)) * keep).sum()
            grad = (logits - log_norm).exp_().scatter_add_(-1, gold, torch.full_like(log_norm, -1.0)).mul_(keep / count)
            grad_hidden[:, s : s + step] = grad.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight += grad.flatten(0, 1).T.to(part.dtype) @ part.flatten(0, 1)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_output, None if grad_weight is None else (grad_weight * grad_output).to(ctx.weight_dtype),
                None, None, None)


def nll_loss(logits: torch.Tensor | HeadLogits, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over all labelled tokens of the batch (the usual causal-LM loss). On
    :class:`~hubunlearn.trainers.head.HeadLogits` that train, :class:`_HeadMeanNLL` (gradients in the forward pass)."""
    if isinstance(logits, HeadLogits) and torch.is_grad_enabled() and (logits.hidden.requires_grad or logits.weight.requires_grad):
        targets, mask = next_token_targets(labels)
        batch, _, vocab = logits.shape
        return _HeadMeanNLL.apply(logits.hidden, logits.weight, targets, mask, default_chunk_positions(batch, vocab, logits.device))
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


# ---- UNDIAL (issue 19) -------------------------------------------------------------------------------------------


def undial_target(reference_logits: torch.Tensor, targets: torch.Tensor, beta: float) -> torch.Tensor:
    """UNDIAL's target distribution (Dong et al., arXiv 2402.10052): ``softmax(z_ref − β·onehot(y))`` in float32,
    ``(..., vocab)`` from the original's logits ``z_ref`` ``(..., vocab)`` and the gold tokens ``y`` ``(...)``: the
    original's next-token distribution with the gold token's logit lowered by ``β`` (the rest renormalised)."""
    adjusted = reference_logits.float().scatter_add(-1, targets.unsqueeze(-1), reference_logits.new_full((*targets.shape, 1), -beta, dtype=torch.float32))
    return adjusted.softmax(-1)


def _undial_cross_entropy(logits: torch.Tensor, reference_logits: torch.Tensor, targets: torch.Tensor, beta: float) -> torch.Tensor:
    """Per position ``−Σ_v q_v · log p_θ(v)``, ``q`` = :func:`undial_target`: ``(batch, c)``."""
    return -(undial_target(reference_logits, targets, beta) * logits.float().log_softmax(-1)).sum(-1)


def undial_loss(logits: torch.Tensor, reference_logits: torch.Tensor, labels: torch.Tensor, beta: float,
                chunk_positions: int | None = None) -> torch.Tensor:
    """UNDIAL (Dong et al., "UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning in Large Language
    Models", arXiv 2402.10052): self-distillation towards the original with the gold token pushed down.

    Per labelled token, the cross-entropy ``−Σ_v q_v log p_θ(v)`` of the policy's next-token distribution against
    the fixed target ``q = softmax(z_ref − β·onehot(y))`` (:func:`undial_target`), averaged over the labelled
    tokens of the batch. ``logits`` and ``reference_logits`` (the frozen original's, no gradient) are
    ``(batch, length, vocab)``, ``labels`` ``(batch, length)`` with ``-100`` where nothing counts. Its gradient in the
    logits is ``p_θ − q``: zero when ``β = 0`` and the policy is the original. Computed in chunks of positions
    (:func:`chunked`), so no full-vocabulary float32 tensor of the whole sequence is built."""
    targets, mask = next_token_targets(labels)
    per_token = chunked(lambda part, reference, gold: _undial_cross_entropy(part, reference, gold, beta), logits,
                        reference_logits, targets, chunk_positions=chunk_positions)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


# ---- WGA, SatImp, CE-U and PDU (issue 19) ---------------------------------------------------------------------------


def token_weighted_ascent_loss(logits: torch.Tensor, labels: torch.Tensor,
                               weight: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Token-weighted gradient ascent: ``mean_t w_t · log p(y_t)`` over the labelled tokens of the batch, with
    ``w_t = weight(p(y_t))`` computed from the gold token's probability and detached (a weight scales each token's
    gradient, it is never optimised itself). The mean over labelled tokens is :func:`gradient_ascent_loss`'s, which
    this equals for ``w = 1``. ``logits`` ``(batch, length, vocab)``, ``labels`` ``(batch, length)``; a scalar
    (nats, ≤ 0 for weights ≥ 0)."""
    log_probs, mask = token_log_probs(logits, labels)
    weights = weight(log_probs.detach().exp()) * mask
    return (weights * log_probs).sum() / mask.sum().clamp(min=1)


def wga_weight(probability: torch.Tensor, beta: float) -> torch.Tensor:
    """WGA's token weight ``p^β`` (Wang et al., arXiv 2502.19301): it cancels gradient ascent's ``1/p`` factor for
    β = 1, so tokens already unlikely stop driving the update."""
    return probability.pow(beta)


def satimp_weight(probability: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
    """SatImp's token weight ``p^β₁ · (1 − p)^β₂`` (Yang et al., arXiv 2505.11953): saturation (``p^β₁``, little
    weight on tokens already forgotten) times importance (``(1 − p)^β₂``)."""
    return probability.pow(beta1) * (1 - probability).pow(beta2)


def without_first_answer_token(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` with each row's first labelled token masked (``-100``), as CE-U trains (arXiv 2503.01224, the footnote
    of its training settings)."""
    labelled = labels != IGNORE_INDEX
    return labels.masked_fill(labelled & (labelled.cumsum(-1) == 1), IGNORE_INDEX)


def _cross_entropy_unlearning(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per position ``−Σ_v q_v log p_v``, ``q = softmax(logits with the gold logit at −∞)`` detached: ``(batch, c)``."""
    logits = logits.float()
    target = logits.detach().scatter(-1, targets.unsqueeze(-1), float("-inf")).softmax(-1)
    return -(target * logits.log_softmax(-1)).sum(-1)


def cross_entropy_unlearning_loss(logits: torch.Tensor, labels: torch.Tensor, chunk_positions: int | None = None) -> torch.Tensor:
    """CE-U (Yang, "CE-U: Cross Entropy Unlearning", arXiv 2503.01224): the cross-entropy of the model's next-token
    distribution against its own distribution with the gold token's logit set to −∞ (softmaxed, detached), mean over
    the labelled tokens except each row's first (:func:`without_first_answer_token`).

    Its gradient on the logits is ``p − q``: bounded, it takes the gold token's probability mass and hands it to the
    other tokens in proportion to their own, where gradient ascent's ``1/p`` explodes. ``logits`` ``(batch, length,
    vocab)``, ``labels`` ``(batch, length)``; a scalar in nats. Computed in chunks of positions (:func:`chunked`)."""
    targets, mask = next_token_targets(without_first_answer_token(labels))
    per_token = chunked(_cross_entropy_unlearning, logits, targets, chunk_positions=chunk_positions)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def _logit_margin(logits: torch.Tensor) -> torch.Tensor:
    """Per position ``(max_v z_v − mean_v z_v)²`` in float32: ``(batch, c)``."""
    logits = logits.float()
    return (logits.amax(-1) - logits.mean(-1)).pow(2)


def logit_margin_flattening_loss(logits: torch.Tensor, labels: torch.Tensor, chunk_positions: int | None = None) -> torch.Tensor:
    """PDU's forget term (Entesari et al., "Constrained Entropic Unlearning", arXiv 2506.05314): the squared gap
    between the largest and the mean logit, ``(max_v z_v − mean_v z_v)²``, mean over the positions that predict a
    labelled token. Zero exactly when the logits are flat (the next-token distribution uniform); softmax-free, so its
    gradient does not vanish near uniformity as an entropy's does. ``logits`` ``(batch, length, vocab)``, ``labels``
    ``(batch, length)``; a scalar in squared logit units. Computed in chunks of positions (:func:`chunked`)."""
    _, mask = next_token_targets(labels)
    per_token = chunked(_logit_margin, logits, chunk_positions=chunk_positions)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def dual_ascent(multiplier: float, constraint: float, epsilon: float, step_size: float) -> float:
    """One projected dual-ascent step on the multiplier of the constraint ``constraint ≤ ε``:
    ``λ ← max(0, λ + η · (constraint − ε))`` (it grows while the constraint is violated, shrinks to 0 while it holds)."""
    return max(0.0, multiplier + step_size * (constraint - epsilon))


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
