"""Causal tracing of FFN layers, in the style of ROME (Meng et al., arXiv 2202.05262), as KUDA's first step
(Fang et al., arXiv 2602.19275, Section 3.1).

For each forget example: a clean run; a corrupted run, with Gaussian noise of ``noise_scale`` × the embedding
matrix's standard deviation added to some prompt token embeddings; then, per layer, the corrupted run again with
that layer's FFN output restored to its clean value. The indirect effect of the layer is the restored answer score
minus the corrupted one, where the answer score is the geometric-mean probability of the answer tokens
(teacher-forced). Two token rules: ``prompt`` noises every prompt token and restores at every position (the
effect counts wherever the layer recalls the fact; the first FFN then tends to win, as restoring it everywhere
undoes much of the noise); ``subject`` noises the name-like tokens (of the question and of the answer, which
often repeats the name) and restores at the last token of each name only, as ROME's MLP traces do. Choices of
ours, the paper gives none: the rules, the geometric mean (answers have many tokens), ``samples`` noise draws
averaged. A sliding window then picks the contiguous layers with the largest summed effect.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import IGNORE_INDEX, pad_examples
from ..errors import UsageError
from ..modeling import model_device
from .layers import FFNLayers
from .positions import span_ends, token_positions

TRACE_RULES = ("prompt", "subject")
RULE_WORDS = {"prompt": "token rule prompt: every prompt token noised, FFN output restored at every position",
              "subject": "token rule subject: the names noised, FFN output restored at each name's last token"}


@dataclass
class TraceResult:
    """Per-example indirect effects ``[examples, layers]`` and the clean and corrupted answer scores."""

    effects: torch.Tensor
    clean: torch.Tensor
    corrupted: torch.Tensor
    noise_std: float
    window: list[int] = field(default_factory=list)
    tokens: str = "prompt"  # the token rule (TRACE_RULES)

    @property
    def mean_effects(self) -> list[float]:
        return self.effects.mean(0).tolist()

    def as_record(self) -> dict:
        return {"layers": self.window, "mean_indirect_effect": [round(v, 6) for v in self.mean_effects],
                "clean_score": float(self.clean.mean()), "corrupted_score": float(self.corrupted.mean()),
                "examples": len(self.clean), "noise_std": self.noise_std}


def _answer_score(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from ..trainers.losses import sequence_log_prob  # not at the top: the trainers import this module

    log_prob, count = sequence_log_prob(logits, labels)
    return (log_prob / count.clamp(min=1)).exp()


def best_window(effects: list[float], window: int) -> list[int]:
    """The ``window`` contiguous layers with the largest summed effect."""
    if not 1 <= window <= len(effects):
        raise UsageError(f"--window {window} does not fit the model's {len(effects)} layers: choose 1..{len(effects)}")
    sums = [sum(effects[i : i + window]) for i in range(len(effects) - window + 1)]
    start = max(range(len(sums)), key=sums.__getitem__)
    return list(range(start, start + window))


@torch.no_grad()
def causal_trace(model, ffn: FFNLayers, batch: dict[str, torch.Tensor], noise_scale: float = 3.0, samples: int = 3,
                 seed: int = 0, noised: torch.Tensor | None = None, restored: torch.Tensor | None = None) -> TraceResult:
    """Indirect effect of each layer's FFN on the answers of ``batch`` (``input_ids``, ``attention_mask``,
    ``labels`` with the prompt masked); ``noised``: ``[B, T]`` tokens to corrupt (default: the prompt);
    ``restored``: where the clean FFN output is put back (default: everywhere). See the module docstring."""
    model.eval()
    device = model_device(model)
    batch = {k: v.to(device) for k, v in batch.items()}
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    noised = ((batch["labels"] == IGNORE_INDEX) & batch["attention_mask"].bool()) if noised is None else noised.to(device)
    if not noised.any():
        raise UsageError("causal tracing needs prompts to corrupt: give question-answer rows")
    keep = None if restored is None else restored.to(device)[..., None]
    embeddings = model.get_input_embeddings()
    noise_std = noise_scale * float(embeddings.weight.float().std())
    generator = torch.Generator(device="cpu").manual_seed(seed)

    with ffn.capture(ffn.mlps) as clean_outputs:
        clean = _answer_score(model(**inputs).logits, batch["labels"])
    clean_outputs = dict(clean_outputs)
    state = {"noise": None, "restore": None}

    def add_noise(module, args, output):
        return output + state["noise"] * noised[..., None]

    def restore(index):
        def hook(module, args, output):
            if state["restore"] != index:
                return None
            return clean_outputs[index] if keep is None else torch.where(keep, clean_outputs[index], output)
        return hook

    handles = [embeddings.register_forward_hook(add_noise)] + [m.register_forward_hook(restore(i)) for i, m in enumerate(ffn.mlps)]
    try:
        corrupted, effects = torch.zeros_like(clean), torch.zeros(len(clean), len(ffn), device=clean.device)
        for _ in range(samples):
            shape = (*batch["input_ids"].shape, embeddings.embedding_dim)
            state["noise"] = (torch.randn(shape, generator=generator) * noise_std).to(device, embeddings.weight.dtype)
            state["restore"] = None
            low = _answer_score(model(**inputs).logits, batch["labels"])
            corrupted += low / samples
            for layer in range(len(ffn)):
                state["restore"] = layer
                effects[:, layer] += (_answer_score(model(**inputs).logits, batch["labels"]) - low) / samples
    finally:
        for handle in handles:
            handle.remove()
    return TraceResult(effects.cpu(), clean.cpu(), corrupted.cpu(), noise_std)


def trace_title(title: str, result: TraceResult, columns: int) -> str:
    """``title`` and the token rule with the chosen layers, wrapped to lines of at most ``columns`` characters."""
    import textwrap

    rule = f"{RULE_WORDS.get(result.tokens, result.tokens)}; red: the chosen layers {result.window}"
    return "\n".join(textwrap.wrap(title, columns) + textwrap.wrap(rule, columns))


def plot_trace(result: TraceResult, path: str | Path, title: str = "Causal tracing of FFN layers") -> Path:
    """Heat map of the indirect effect (examples × layers) under a bar chart of its mean, the chosen window in red;
    the title (wrapped to the figure's width) names the token rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    effects = result.effects.numpy()
    layers = range(effects.shape[1])
    width = max(5.5, 0.6 * effects.shape[1] + 2)
    figure, (bars, heat) = plt.subplots(2, 1, figsize=(width, 6.5), sharex=True, gridspec_kw={"height_ratios": [1, 2]},
                                        layout="constrained")
    bars.bar(layers, effects.mean(0), color=["tab:red" if i in result.window else "tab:gray" for i in layers])
    bars.set_ylabel("mean indirect effect")
    figure.suptitle(trace_title(title, result, int(width * 11)), fontsize=10)  # 11 characters of 10-point text per inch
    image = heat.imshow(effects, aspect="auto", cmap="Reds", interpolation="nearest")
    heat.set_xlabel("layer (FFN output restored)")
    heat.set_ylabel("forget example")
    heat.set_xticks(list(layers))
    figure.colorbar(image, ax=[bars, heat], label="answer score restored − corrupted")
    path = Path(path)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def trace(model, ffn: FFNLayers, examples: list[dict], pad_token_id: int, window: int, batch_size: int = 8,
          tokens: str = "prompt", tokenizer=None, **options) -> TraceResult:
    """``causal_trace`` over tokenized ``examples`` in batches, with the best ``window`` of layers chosen; ``tokens``:
    ``prompt`` or ``subject`` (needs the ``tokenizer``), see the module docstring."""
    if not examples:
        raise UsageError("causal tracing needs forget examples: the forget set is empty")
    best_window([0.0] * len(ffn), window)  # a bad window fails before the expensive part
    parts = []
    for i in range(0, len(examples), batch_size):
        batch = pad_examples(examples[i : i + batch_size], pad_token_id)
        if tokens == "subject":
            subject = token_positions(batch, "subject", tokenizer, prompt_only=False)
            options.update(noised=subject, restored=span_ends(subject))
        parts.append(causal_trace(model, ffn, batch, **options))
    result = TraceResult(torch.cat([p.effects for p in parts]), torch.cat([p.clean for p in parts]),
                         torch.cat([p.corrupted for p in parts]), parts[0].noise_std)
    result.window = best_window(result.mean_effects, window)
    result.tokens = tokens
    return result
