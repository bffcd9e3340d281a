"""ECO's prompt classifier (Liu et al., arXiv 2406.07933, Section 3.1): does a prompt fall in the forget scope?

The default runs anywhere with nothing downloaded: a logistic regression (scikit-learn, balanced class
weights) over hashed character n-grams of the lower-cased prompt, trained on the prompts and their variants
(other casing, a typo, no question mark), so it survives those and rephrasings that keep the subject's name. A prompt is scored as the maximum over its whole text and over
word windows, so a forget question buried in a longer request is still caught. The threshold is set by split
conformal prediction on held-out forget prompts: with nonconformity ``1 - p(forget)``, flagging ``p >= 1 - q``
at the ``ceil((n+1)(1-α))/n`` quantile ``q`` gives recall ``>= 1 - α`` on exchangeable forget prompts.
Weights are stored in safetensors and the settings in JSON: nothing is unpickled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import UsageError

WEIGHTS_NAME = "classifier.safetensors"
CONFIG_NAME = "classifier.json"


@dataclass
class ClassifierSettings:
    n_features: int = 2**18
    ngram_min: int = 2
    ngram_max: int = 5
    window_words: int = 16
    window_stride: int = 8
    regularisation: float = 1.0  # scikit-learn's C


def variants(prompt: str, rng) -> list[str]:
    """The prompt and what users make of it: other casing, a typo (two adjacent letters swapped), no final '?'."""
    out = [prompt, prompt.lower(), prompt.upper(), prompt.rstrip("?").strip()]
    letters = [i for i in range(len(prompt) - 1) if prompt[i].isalpha() and prompt[i + 1].isalpha()]
    if letters:
        i = letters[rng.integers(len(letters))]
        out.append(prompt[:i] + prompt[i + 1] + prompt[i] + prompt[i + 2 :])
    return out


def augment(prompts: Sequence[str], seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [v for p in prompts for v in variants(p, rng)]


class ThresholdClassifier:
    """What every prompt classifier shares: ``scores`` (p(forget)) compared with a calibrated ``threshold``."""

    threshold: float = 0.5

    def scores(self, prompts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def flags(self, prompts: Sequence[str]) -> np.ndarray:
        return self.scores(prompts) >= self.threshold

    def calibrate(self, forget_prompts: Sequence[str], alpha: float, negative_prompts: Sequence[str] = (), max_fpr: float = 0.01,
                  seed: int = 0) -> float:
        """The threshold, from held-out prompts and their variants (casing, typos).

        Split conformal on ``forget_prompts`` gives a threshold with recall ``>= 1 - α`` on prompts exchangeable
        with them (needs ``n >= 1/α - 1``). With held-out ``negative_prompts`` the threshold goes further down, as
        far as keeping their false-positive rate ``<= max_fpr``: lower only flags more, so the recall guarantee
        stands, and prompts unlike the held-out forget ones (rephrasings) are caught more often.
        """
        if not 0 < alpha < 1:
            raise UsageError(f"the classifier's miss rate alpha must be in (0, 1); got {alpha}")
        nonconformity = np.sort(1 - self.scores(augment(forget_prompts, seed + 2)))
        n = len(nonconformity)
        rank = math.ceil((n + 1) * (1 - alpha))
        if rank > n:
            raise UsageError(f"{len(forget_prompts)} held-out forget prompts are too few for recall >= {1 - alpha:g}: "
                             f"give more, or a larger alpha")
        self.threshold = float(1 - nonconformity[rank - 1])
        if len(negative_prompts):
            negatives = np.sort(self.scores(augment(negative_prompts, seed + 3)))[::-1]
            allowed = math.floor(max_fpr * len(negatives))  # this many negatives may score at or above the threshold
            self.threshold = min(self.threshold, float(np.nextafter(negatives[allowed], 1)) if allowed < len(negatives) else 0.0)
        return self.threshold


class PromptClassifier(ThresholdClassifier):
    """``p(forget | prompt)`` from hashed character n-grams; ``flags`` compares it with the calibrated threshold."""

    def __init__(self, settings: ClassifierSettings | None = None, coef: np.ndarray | None = None, intercept: float = 0.0,
                 threshold: float = 0.5):
        from sklearn.feature_extraction.text import HashingVectorizer

        self.settings = settings or ClassifierSettings()
        self.vectorizer = HashingVectorizer(analyzer="char_wb", ngram_range=(self.settings.ngram_min, self.settings.ngram_max),
                                            n_features=self.settings.n_features, lowercase=True, alternate_sign=False, norm="l2")
        self.coef, self.intercept, self.threshold = coef, intercept, threshold

    def fit(self, positives: Sequence[str], negatives: Sequence[str], seed: int = 0) -> "PromptClassifier":
        from sklearn.linear_model import LogisticRegression

        if not positives or not negatives:
            raise UsageError("the prompt classifier needs forget prompts and retain (or general) prompts: one class is empty")
        positives, negatives = augment(positives, seed), augment(negatives, seed + 1)
        features = self.vectorizer.transform(positives + negatives)
        labels = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
        model = LogisticRegression(C=self.settings.regularisation, class_weight="balanced", max_iter=2000, random_state=seed)
        model.fit(features, labels)
        self.coef, self.intercept = model.coef_[0].astype(np.float32), float(model.intercept_[0])
        return self

    def _windows(self, prompt: str) -> list[str]:
        words = prompt.split()
        size, stride = self.settings.window_words, self.settings.window_stride
        if len(words) <= size:
            return [prompt]
        return [prompt] + [" ".join(words[i : i + size]) for i in range(0, len(words) - size + stride, stride)]

    def scores(self, prompts: Sequence[str]) -> np.ndarray:
        """``p(forget)`` of each prompt: the largest over the prompt and its word windows."""
        if self.coef is None:
            raise RuntimeError("the classifier is not fitted")
        windows = [self._windows(p) for p in prompts]
        flat = [w for ws in windows for w in ws]
        logits = self.vectorizer.transform(flat) @ self.coef + self.intercept
        probabilities = 1 / (1 + np.exp(-logits))
        out, start = np.empty(len(prompts)), 0
        for i, ws in enumerate(windows):
            out[i] = probabilities[start : start + len(ws)].max()
            start += len(ws)
        return out

    def save(self, folder: str | Path) -> None:
        import torch
        from safetensors.torch import save_file

        folder = Path(folder)
        save_file({"coef": torch.from_numpy(np.ascontiguousarray(self.coef))}, str(folder / WEIGHTS_NAME))
        (folder / CONFIG_NAME).write_text(json.dumps({"kind": "char-ngram-logistic", "settings": asdict(self.settings),
                                                      "intercept": self.intercept, "threshold": self.threshold}, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "PromptClassifier":
        from safetensors.numpy import load_file

        folder = Path(folder)
        config = json.loads((folder / CONFIG_NAME).read_text())
        return cls(ClassifierSettings(**config["settings"]), load_file(str(folder / WEIGHTS_NAME))["coef"],
                   config["intercept"], config["threshold"])


def load_classifier(folder: str | Path) -> ThresholdClassifier:
    """The classifier saved in ``folder``, of whichever kind its ``classifier.json`` names."""
    kind = json.loads((Path(folder) / CONFIG_NAME).read_text()).get("kind")
    if kind == "transformer":
        from .transformer_classifier import TransformerPromptClassifier

        return TransformerPromptClassifier.load(folder)
    return PromptClassifier.load(folder)
