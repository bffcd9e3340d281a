"""The output layer kept apart from the model's forward pass, so that losses build the logits a chunk at a time.

A causal LM's logits are ``batch × length × vocabulary`` values (8 × 256 positions of a 128k vocabulary: 1 GiB in
float32), kept for the backward pass, and their gradient is as large again. :class:`HeadLogits` stands for them: the
final hidden states ``(batch, length, hidden)`` and the output layer's weight ``(vocabulary, hidden)``. The losses of
:mod:`hubunlearn.trainers.losses` (:func:`~hubunlearn.trainers.losses.chunked`,
:func:`~hubunlearn.trainers.losses.gold_log_probs`) multiply one chunk of positions at a time, and their backward
recomputes each chunk's logits instead of storing them (the idea of Liger Kernel's fused linear cross-entropy,
Hsu et al., arXiv 2410.10989, for any per-position loss).

:func:`policy_logits` returns a :class:`HeadLogits` only where the logits are exactly ``hidden @ weight.T``: an
output layer that is a plain ``torch.nn.Linear`` without bias (not a LoRA layer), in a model family whose forward
adds nothing after it (:data:`PLAIN_HEAD_MODEL_TYPES`; Gemma 2's soft-capping or Cohere's logit scale would be lost),
and no sharding engine (FSDP, DeepSpeed) that owns the weight. Everywhere else it returns the model's own logits
tensor, which every loss also accepts.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Model types whose causal-LM forward returns exactly ``lm_head(final hidden states)`` (checked in transformers 5).
PLAIN_HEAD_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "olmo", "olmo2", "gpt2",
    "gpt_neox", "starcoder2", "smollm3",
})


@dataclass
class HeadLogits:
    """Logits ``hidden @ weight.T`` not yet computed: ``hidden`` ``(batch, length, hidden_size)``, ``weight``
    ``(vocab, hidden_size)`` (the output layer's, with its gradient when it trains). ``shape`` is the logits'."""

    hidden: torch.Tensor
    weight: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:-1], self.weight.shape[0]))

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def split(self, sizes: list[int]) -> tuple["HeadLogits", ...]:
        """Split by rows (dimension 0), like ``torch.Tensor.split``."""
        return tuple(HeadLogits(part, self.weight) for part in self.hidden.split(sizes))

    def positions(self, start: int, stop: int) -> torch.Tensor:
        """The logits of positions ``start:stop``, ``(batch, stop - start, vocab)``, computed now."""
        return F.linear(self.hidden[:, start:stop], self.weight)

    def materialize(self) -> torch.Tensor:
        """All the logits at once, ``(batch, length, vocab)``."""
        return F.linear(self.hidden, self.weight)


def output_layer(model) -> torch.nn.Linear | None:
    """The model's output layer when the logits are exactly ``hidden @ weight.T`` (see the module's docstring),
    else None."""
    unwrapped = getattr(model, "module", model)  # DistributedDataParallel
    head = unwrapped.get_output_embeddings() if hasattr(unwrapped, "get_output_embeddings") else None
    config = getattr(unwrapped, "config", None)
    if type(head) is not torch.nn.Linear or head.bias is not None or config is None:
        return None
    return head if getattr(config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES else None


@contextmanager
def final_hidden_states(model, chunked: bool = True):
    """Within this context the model's forward returns its final hidden states ``(batch, length, hidden)`` where the
    logits would be, when ``chunked`` and the output layer allows it (:func:`output_layer`); yields that layer (whose
    ``weight`` makes the logits), else None and the forward is unchanged.

    The output layer's ``forward`` is replaced by the identity, so hooks, gradient checkpointing, DDP and a KV cache
    see the same modules as ever, and the weight stays an input of the forward's graph (:class:`_PassHidden`)."""
    head = output_layer(model) if chunked else None
    if head is None:
        yield None
        return
    head.forward = lambda hidden: _PassHidden.apply(hidden, head.weight)
    try:
        yield head
    finally:
        del head.forward


def policy_logits(model, batch: dict[str, torch.Tensor], chunked: bool = True) -> torch.Tensor | HeadLogits:
    """The model's logits on ``batch`` (``input_ids``, ``attention_mask``): a :class:`HeadLogits` when ``chunked``
    and the output layer allows it (:func:`final_hidden_states`), else the logits tensor of the model's forward pass."""
    with final_hidden_states(model, chunked) as head:
        output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return output if head is None else HeadLogits(output, head.weight)


class _PassHidden(torch.autograd.Function):
    """The hidden states unchanged, with the output layer's weight recorded as an input that gets no gradient here
    (the losses give it its gradient). DDP looks for unused parameters by walking the graph back from the forward's
    outputs: without this, the weight would look unused, be reduced at once, and its gradient later count twice."""

    @staticmethod
    def forward(ctx, hidden, weight):
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        return grad, None
