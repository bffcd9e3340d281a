"""Search spaces of ``hubunlearn tune``: what each method's hyperparameters may be.

Each method declares its space next to its config, as the ``search_space`` class attribute of its config class (a
``dict`` of field name -> :class:`Float` / :class:`Int` / :class:`Choice`); :class:`~hubunlearn.trainers.UnlearnConfig`
holds the shared part (learning rate, steps, retain weight) that methods extend. The dimensions are plain data (no
Optuna import), turned into ``trial.suggest_*`` calls by :meth:`suggest`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

from .errors import UsageError


@dataclass(frozen=True)
class Float:
    """A real number in ``[low, high]``, sampled uniformly or, with ``log``, uniformly in its logarithm."""

    low: float
    high: float
    log: bool = False

    def suggest(self, trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def narrowed(self, text: str) -> "Float":
        low, high = _bounds(text, float)
        return Float(low, high, self.log)

    def describe(self) -> str:
        return f"{self.low:g}:{self.high:g}{' (log)' if self.log else ''}"


@dataclass(frozen=True)
class Int:
    """An integer in ``[low, high]`` (both included), uniform or, with ``log``, uniform in its logarithm."""

    low: int
    high: int
    log: bool = False

    def suggest(self, trial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, log=self.log)

    def narrowed(self, text: str) -> "Int":
        low, high = _bounds(text, int)
        return Int(low, high, self.log)

    def describe(self) -> str:
        return f"{self.low}:{self.high}{' (log)' if self.log else ''}"


@dataclass(frozen=True)
class Choice:
    """One of ``choices``."""

    choices: tuple

    def suggest(self, trial, name: str) -> Any:
        return trial.suggest_categorical(name, list(self.choices))

    def narrowed(self, text: str) -> "Choice":
        kind = type(self.choices[0])
        try:
            choices = tuple(kind(part) for part in text.split("|") if part)
        except ValueError:
            raise UsageError(f"'{text}' is not a list of {kind.__name__} values: write A|B|C") from None
        if not choices:
            raise UsageError(f"'{text}' names no value: write A|B|C")
        return Choice(choices)

    def describe(self) -> str:
        return "|".join(str(c) for c in self.choices)


Dimension = Union[Float, Int, Choice]


def _bounds(text: str, kind: type) -> tuple:
    parts = text.split(":")
    try:
        low, high = (kind(part) for part in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        low = high = None
    if low is None or not (math.isfinite(low) and math.isfinite(high)):
        raise UsageError(f"'{text}' is not a range: write LOW:HIGH (finite {kind.__name__} values)")
    if not low < high:
        raise UsageError(f"the range {text} is empty: LOW must be below HIGH")
    return low, high


# The dimensions every method shares (UnlearnConfig.search_space); the retain weight only where a retain term trains,
# the LoRA rank (an `unlearn` argument, not a config field) only with --use_lora.
LEARNING_RATE = Float(1e-6, 1e-3, log=True)
MAX_STEPS = Int(5, 100, log=True)
RETAIN_WEIGHT = Float(0.1, 10.0, log=True)
LORA_RANK = Choice((4, 8, 16, 32))
COMMON = {"learning_rate": LEARNING_RATE, "max_steps": MAX_STEPS, "retain_weight": RETAIN_WEIGHT}


def method_space(config_class, use_lora: bool = False, retain_loss: str | None = None) -> dict[str, Dimension]:
    """The search space of a method's ``config_class`` for a run with or without LoRA and with ``retain_loss``
    (default: the config's own default): its ``search_space``, less the retain weight when no retain term trains,
    plus the LoRA rank with ``use_lora``."""
    retain_loss = retain_loss or config_class.__dataclass_fields__["retain_loss"].default
    space = dict(config_class.search_space)
    if retain_loss == "none":
        space.pop("retain_weight", None)
    if use_lora:
        space["lora_r"] = LORA_RANK
    return space


def restrict(space: dict[str, Dimension], text: str | None, flag: str = "--space") -> dict[str, Dimension]:
    """``space`` restricted to the names in ``text`` (``NAME[=LOW:HIGH|A|B...],...``: the dimensions to search, each
    optionally with a new range or choices); all of ``space`` when ``text`` is empty. An unknown name is a
    ``UsageError`` that lists the valid ones."""
    if not text:
        return dict(space)
    chosen = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, equals, bounds = item.partition("=")
        name, bounds = name.strip(), bounds.strip()
        if name not in space:
            raise UsageError(f"unknown search-space parameter '{name}' in {flag}: choose from {', '.join(space)}")
        if name in chosen:
            raise UsageError(f"{flag} names {name} twice: give each parameter once")
        if equals and not bounds:
            raise UsageError(f"{flag} {name}= gives no range: write {name}=LOW:HIGH (or choices A|B), or {name} alone for its whole range")
        try:
            chosen[name] = space[name].narrowed(bounds) if bounds else space[name]
        except UsageError as error:
            raise UsageError(f"{flag} {name}: {error}") from None
        if isinstance(chosen[name], (Float, Int)) and chosen[name].log and chosen[name].low <= 0:
            raise UsageError(f"{flag} {name}: a log-scale range must start above 0")
    if not chosen:
        raise UsageError(f"{flag} names no parameter: choose from {', '.join(space)}")
    return chosen


def describe(space: dict[str, Dimension]) -> dict[str, str]:
    """``{name: "low:high (log)"}`` / ``{name: "a|b|c"}``: the space as recorded in the study, tables and cards."""
    return {name: dimension.describe() for name, dimension in space.items()}
