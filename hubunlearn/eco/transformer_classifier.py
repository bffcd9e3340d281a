"""ECO's prompt classifier as a fine-tuned sequence-classification model (``--classifier_model ID``), as in the
paper (Liu et al., arXiv 2406.07933, which fine-tunes RoBERTa with class-weighted cross-entropy). Any Hub or local
``AutoModelForSequenceClassification`` works; it is saved in safetensors under ``classifier/`` in the bundle."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError
from .classifier import CONFIG_NAME, ThresholdClassifier, augment

FOLDER = "classifier"


class TransformerPromptClassifier(ThresholdClassifier):
    def __init__(self, model, tokenizer, threshold: float = 0.5, source: str | None = None):
        self.model, self.tokenizer, self.threshold, self.source = model.eval(), tokenizer, threshold, source

    @classmethod
    def from_model(cls, name_or_path: str) -> "TransformerPromptClassifier":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=2, use_safetensors=True)
        except OSError as error:
            raise UsageError(f"--classifier_model {name_or_path} could not be loaded: {str(error).splitlines()[0]}") from error
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
        return cls(model, tokenizer, source=name_or_path)

    def fit(self, positives: Sequence[str], negatives: Sequence[str], seed: int = 0, epochs: int = 3,
            learning_rate: float = 5e-5, batch_size: int = 16) -> "TransformerPromptClassifier":
        """Fine-tune on the prompts and their variants with class-weighted cross-entropy (weights N / N_class)."""
        if not positives or not negatives:
            raise UsageError("the prompt classifier needs forget prompts and retain (or general) prompts: one class is empty")
        positives, negatives = augment(positives, seed), augment(negatives, seed + 1)
        texts, labels = positives + negatives, torch.tensor([1] * len(positives) + [0] * len(negatives))
        weights = len(labels) / torch.bincount(labels, minlength=2).float()
        generator = torch.Generator().manual_seed(seed)
        optimiser = torch.optim.AdamW(self.model.parameters(), lr=learning_rate, weight_decay=0.1)
        self.model.train()
        for _ in range(epochs):
            for batch in torch.randperm(len(texts), generator=generator).split(batch_size):
                inputs = self.tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, truncation=True, max_length=128)
                logits = self.model(**inputs.to(self.model.device)).logits
                loss = torch.nn.functional.cross_entropy(logits, labels[batch].to(logits.device), weight=weights.to(logits.device))
                loss.backward()
                optimiser.step()
                optimiser.zero_grad()
        self.model.eval()
        return self

    @torch.no_grad()
    def scores(self, prompts: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(prompts), 32):
            inputs = self.tokenizer(list(prompts[start : start + 32]), return_tensors="pt", padding=True, truncation=True, max_length=128)
            out.append(self.model(**inputs.to(self.model.device)).logits.float().softmax(-1)[:, 1].cpu().numpy())
        return np.concatenate(out) if out else np.empty(0)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.model.save_pretrained(folder / FOLDER)  # safetensors
        self.tokenizer.save_pretrained(folder / FOLDER)
        (folder / CONFIG_NAME).write_text(json.dumps({"kind": "transformer", "source": self.source, "threshold": self.threshold}, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "TransformerPromptClassifier":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(folder)
        config = json.loads((folder / CONFIG_NAME).read_text())
        model = AutoModelForSequenceClassification.from_pretrained(folder / FOLDER, use_safetensors=True)
        return cls(model, AutoTokenizer.from_pretrained(folder / FOLDER), config["threshold"], config.get("source"))
