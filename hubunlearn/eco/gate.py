"""Closeness to the forget set: ECO's classifier flags a prompt only if it shares a term with the forget set.

A classifier trained on forget against retain prompts learns "unlike the retain set" as much as "about the
forget set"; a question about another person in the forget set's wording scores high on the wording alone
(issue 16). The gate asks for positive evidence instead: one of the prompt's words must match one of the forget
set's *distinctive terms*, the words of the forget prompts that no negative prompt (retain, the built-in pool,
``--general_prompts``) uses and that are names or rare words: rare in English (Zipf frequency below 4 by the
``wordfreq`` library: "mahfouz" 1.9, "kuwait" 3.7, "literary" 4.3, "journey" 4.7) or capitalised mid-sentence
in a forget prompt ("Basil", "Seine"). Without the frequency rule, ordinary words that only the forget prompts
happened to use ("recognition", "shaped") became terms, and questions about TOFU forget05's neighbours passed
the gate (``benchmarks/eco_heldout.py``). A forget set about a lower-case topic keeps its rare words
("chlorophyll"); if none is rare, the gate keeps every word the negatives do not use. Words match when their
normalised optimal-string-alignment similarity (rapidfuzz's ``OSA``: 1 − edits / longer length, a swap of two
adjacent letters is one edit) reaches ``similarity`` (0.75 by default): a typo or a dropped letter keeps a
name's match ("lovostor"/"lvoostor": 0.88, "tashi"/"tahsi": 0.8), another name that contains it or shares a
syllable does not ("elcas"/"temselcas": 0.56, "feymar"/"vosmar": 0.5).

The terms are stored in the bundle (``classifier.safetensors``, UTF-8 bytes): whoever holds the bundle can read
which names it guards, as they could by probing the classifier with candidate names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

MIN_LENGTH = 3  # shorter words (of, in, Al) are never terms
COMMON_ZIPF = 4.0  # words at least this frequent in English (wordfreq's Zipf scale) are terms only if name-like
_WORD = re.compile(r"[^\W_][\w'’\-]*")
_POSSESSIVE = re.compile(r"['’]s?$")


def words(text: str) -> list[str]:
    """The lower-cased words of ``text`` without a possessive ending ("Abilov's" -> "abilov")."""
    return [w for w in (_POSSESSIVE.sub("", m.group()).lower() for m in _WORD.finditer(text)) if len(w) >= MIN_LENGTH]


def capitalised_mid_sentence(text: str) -> set[str]:
    """The lower-cased words of ``text`` written with a capital after a sentence's first word (name-like)."""
    out = set()
    for m in _WORD.finditer(text):
        before = text[: m.start()].rstrip()
        if m.group()[0].isupper() and before and before[-1] not in ".?!:;\"'“‘(" and not text.isupper():
            word = _POSSESSIVE.sub("", m.group()).lower()
            if len(word) >= MIN_LENGTH:
                out.add(word)
    return out


class TermGate:
    """``passes(prompts)``: does each prompt hold a word within ``similarity`` of a forget-set term?"""

    def __init__(self, terms: Sequence[str], similarity: float):
        self.terms, self.similarity = list(terms), similarity

    @classmethod
    def fit(cls, forget_prompts: Sequence[str], negative_prompts: Iterable[str], similarity: float,
            common_zipf: float = COMMON_ZIPF) -> "TermGate":
        """The distinctive terms: words of ``forget_prompts`` that no negative prompt uses and that are rare in
        English (Zipf frequency below ``common_zipf``) or name-like (capitalised mid-sentence in a forget prompt).
        If that rule leaves no term (every candidate a common lower-case word), the candidates are kept."""
        from wordfreq import zipf_frequency

        used = {w for p in negative_prompts for w in words(p)}
        candidates = {w for p in forget_prompts for w in words(p)} - used
        named = {w for p in forget_prompts for w in capitalised_mid_sentence(p)}
        terms = {w for w in candidates if w in named or zipf_frequency(w, "en") < common_zipf}
        return cls(sorted(terms or candidates), similarity)

    def __len__(self) -> int:
        return len(self.terms)

    def best_similarity(self, prompts: Sequence[str]) -> np.ndarray:
        """``[len(prompts)]``: the largest similarity between a word of each prompt and a term (0 without one)."""
        from rapidfuzz.distance import OSA
        from rapidfuzz.process import cdist

        per_prompt = [words(p) for p in prompts]
        vocabulary = sorted({w for ws in per_prompt for w in ws})
        best = {}
        if vocabulary and self.terms:
            similarity = cdist(vocabulary, self.terms, scorer=OSA.normalized_similarity, dtype=np.float32)
            best = dict(zip(vocabulary, similarity.max(axis=1).tolist()))
        return np.array([max((best.get(w, 0.0) for w in ws), default=0.0) for ws in per_prompt])

    def passes(self, prompts: Sequence[str]) -> np.ndarray:
        return self.best_similarity(prompts) >= self.similarity

    def tensors(self) -> dict[str, np.ndarray]:
        """The terms as one ``uint8`` array of newline-separated UTF-8 (safetensors holds no strings)."""
        return {"gate_terms": np.frombuffer("\n".join(self.terms).encode(), dtype=np.uint8).copy()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], similarity: float) -> "TermGate":
        text = tensors["gate_terms"].tobytes().decode()
        return cls(text.split("\n") if text else [], similarity)
