"""``ECOModel``: a causal LM whose flagged prompts have their token embeddings corrupted during the prefill
(Liu et al., "Large Language Model Unlearning via Embedding-Corrupted Prompts", arXiv 2406.07933).

The weights are never touched. A forward hook on the input-embedding module corrupts the selected positions
of flagged rows, only on calls that see more than one position (the prompt's prefill): with the KV cache,
generated tokens pass through untouched. Unflagged prompts leave the hook inert, so their logits and
generations are bit-identical to the base model's.

Thread safety: the selection of a call lives in a context variable, so it is seen only by the thread (or task)
that made the call. Concurrent calls on the same bundle, and calls on the unguarded base model (the Space's
"original"), never see another call's selection.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import UsageError
from .classifier import ThresholdClassifier, load_classifier
from .corruption import get_corruption
from .selection import TOKEN_RULES, name_token_mask, selected_positions

BUNDLE_NAME = "eco.json"
# (bundle, [B, T] bool selection) of the call running in this thread or task; None outside a call.
_ACTIVE_SELECTION: ContextVar[tuple["ECOModel", torch.Tensor] | None] = ContextVar("eco_selection", default=None)


@dataclass
class CorruptionSpec:
    """What a flagged prompt undergoes: the corruption function, its strength σ and dims (n or k), which tokens."""

    name: str = "rand_noise_first_n"
    strength: float = 1.0
    dims: int = 1
    tokens: str = "all_but_last"
    seed: int = 0

    def __post_init__(self):
        get_corruption(self.name)
        if self.tokens not in TOKEN_RULES:
            raise UsageError(f"unknown token selection '{self.tokens}': choose one of {', '.join(TOKEN_RULES)}")


def find_embedding_module(model, path: str | None) -> torch.nn.Module:
    if path is None:
        return model.get_input_embeddings()
    try:
        return model.get_submodule(path)
    except AttributeError as error:
        raise UsageError(f"embedding module '{path}' not found in {type(model).__name__}: set --embedding_module to the "
                         "path of its token embedding (e.g. model.embed_tokens)") from error


class ECOModel(torch.nn.Module):
    """Wraps ``model``; ``forward``/``generate`` take the prompts' text (or explicit ``flags``) to decide per row."""

    def __init__(self, model, tokenizer, classifier: ThresholdClassifier, corruption: CorruptionSpec,
                 embedding_module: str | None = None, base_model: dict | None = None):
        super().__init__()
        self.model, self.tokenizer, self.classifier, self.corruption = model, tokenizer, classifier, corruption
        self.embedding_module_path = embedding_module
        self.base_model = base_model or {"name_or_path": model.config._name_or_path}
        self._function = get_corruption(corruption.name)
        find_embedding_module(model, embedding_module).register_forward_hook(self._corrupt)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def generation_config(self):
        return self.model.generation_config

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def tie_weights(self, *args, **kwargs):  # the wrapped model's (lm-evaluation-harness's HFLM calls it)
        return self.model.tie_weights(*args, **kwargs)

    @contextmanager
    def _selecting(self, selection: torch.Tensor):
        """Corrupt ``selection`` during this thread's (or task's) forward passes, and only there."""
        token = _ACTIVE_SELECTION.set((self, selection))
        try:
            yield
        finally:
            _ACTIVE_SELECTION.reset(token)

    def _corrupt(self, module, inputs, output):
        active = _ACTIVE_SELECTION.get()
        if active is None or active[0] is not self:
            return None
        selection = active[1]
        if output.dim() != 3 or output.shape[1] <= 1 or not selection.any():
            return None
        if selection.shape != output.shape[:2]:
            return None  # not this call's prompt (e.g. a cached continuation)
        generator = torch.Generator().manual_seed(self.corruption.seed)
        return self._function(output, selection, self.corruption.strength, self.corruption.dims, generator)

    def flags(self, prompts: Sequence[str]) -> torch.Tensor:
        return torch.as_tensor(self.classifier.flags(list(prompts)), dtype=torch.bool)

    classifies_prompts = True  # metrics pass ``classify_lengths`` so the classifier reads prompts, not answers

    def _prepare(self, input_ids, attention_mask, prompts, flags, classify_lengths=None):
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if flags is None:
            if prompts is None:
                rows = [ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask)]
                if classify_lengths is not None:
                    rows = [ids[:length] for ids, length in zip(rows, classify_lengths)]
                prompts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
            flags = self.flags(prompts)
        return attention_mask, torch.as_tensor(flags, dtype=torch.bool)

    def _select(self, input_ids, mask, flags) -> torch.Tensor:
        names = name_token_mask(self.tokenizer, input_ids, mask) if self.corruption.tokens == "names" and flags.any() else None
        return selected_positions(mask, flags, self.corruption.tokens, names)

    def forward(self, input_ids, attention_mask=None, prompts: Sequence[str] | None = None, flags=None, prompt_length=None,
                classify_lengths: Sequence[int] | None = None, **kwargs):
        """Logits with flagged rows corrupted. The classifier reads ``prompts``, or else the decoded rows (their
        first ``classify_lengths`` tokens when scoring prompt + answer, so that it sees only the prompt, as in the
        paper); ``prompt_length`` (an int, or one per row, right padding) keeps the corruption on the prompt."""
        attention_mask, flags = self._prepare(input_ids, attention_mask, prompts, flags, classify_lengths)
        corruptible = attention_mask
        if prompt_length is not None:  # the prompt's positions only
            lengths = torch.as_tensor(prompt_length, device=attention_mask.device).reshape(-1, 1)
            corruptible = attention_mask * (torch.arange(attention_mask.shape[1], device=attention_mask.device) < lengths)
        with self._selecting(self._select(input_ids, corruptible, flags)):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, prompts: Sequence[str] | None = None, flags=None, **kwargs):
        """Generation with only the prefill corrupted (the KV cache is kept on, so decoding steps are clean)."""
        attention_mask, flags = self._prepare(input_ids, attention_mask, prompts, flags)
        kwargs["use_cache"] = True  # always (a caller's use_cache=True too, as the metrics pass it): decoding steps read the cache
        with self._selecting(self._select(input_ids, attention_mask, flags)):
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    # ---- the bundle -----------------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> None:
        """The bundle: classifier (safetensors + JSON) and ``eco.json``; the base model is referenced, not copied."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.classifier.save(folder)
        (folder / BUNDLE_NAME).write_text(json.dumps({"corruption": asdict(self.corruption), "embedding_module": self.embedding_module_path,
                                                      "base_model": self.base_model}, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, base_model=None, tokenizer=None, revision: str | None = None) -> "ECOModel":
        """Load a bundle (folder or Hub repo) and its base model (``base_model``: a loaded model, or loaded from the
        bundle's record); a bundle made for another base model is refused."""
        from ..modeling import load_model, load_tokenizer

        folder = Path(name_or_path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(name_or_path), revision=revision))
        if not (folder / BUNDLE_NAME).is_file():
            raise UsageError(f"{name_or_path} is not an ECO bundle (no {BUNDLE_NAME})")
        bundle = json.loads((folder / BUNDLE_NAME).read_text())
        recorded = bundle["base_model"]
        if base_model is None or isinstance(base_model, str):
            name = base_model or recorded["name_or_path"]
            tokenizer = tokenizer or load_tokenizer(name, recorded.get("revision") if base_model is None else None)
            base_model = load_model(name, recorded.get("revision") if base_model is None else None)
        _check_base(base_model, recorded)
        tokenizer = tokenizer or load_tokenizer(base_model.config._name_or_path)
        return cls(base_model, tokenizer, load_classifier(folder), CorruptionSpec(**bundle["corruption"]),
                   bundle.get("embedding_module"), recorded)


def _check_base(model, recorded: dict) -> None:
    wanted = recorded.get("config")
    if not wanted:
        return
    actual = {key: getattr(model.config, key, None) for key in wanted}
    if actual != wanted:
        raise UsageError(f"this ECO bundle was made for {recorded['name_or_path']}, not {model.config._name_or_path} "
                         f"(their configs differ: {', '.join(k for k in wanted if actual[k] != wanted[k])}): load it on its own base model")


def base_model_record(model, name_or_path: str, revision: str | None = None) -> dict:
    """What a bundle says about its base: id, revision, and the config facts that identify it."""
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    return {"name_or_path": name_or_path, "revision": revision,
            "config": {key: getattr(model.config, key, None) for key in keys}}
