"""Errors that reach the user as one line that says what to do.

Messages are written with the command's flags (``--utility_budget must be in (0, 1]``). Outside a ``hubunlearn``
command they name the Python argument instead (``utility_budget must be in (0, 1]``, ``attacks`` for ``--attack``,
``null_space=False`` for ``--no_null_space``); a command line quoted in a message (``hubunlearn push FOLDER
--repo_id ORG/NAME``) is kept as typed.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from contextvars import ContextVar

PYTHON_NAMES = {  # flag -> argument of the Python API, where the two differ
    "attack": "attacks",  # EvalConfig
    "authors": "num_authors",  # build_tofu_mini
    "forget": "forget_dataset",  # the trainers
    "retain": "retain_dataset",
}
_COMMAND_LINE = re.compile(r"hubunlearn (?:unlearn|eval|push|bench|trace|space|quickstart|tune)\b[^)]*")
_FLAG = re.compile(r"(?<![\w-])--(no_)?([a-z][a-z0-9_]*)(?: [A-Z][A-Z0-9/_.:-]*(?![\w/]))?")  # with a placeholder (SPEC)
_IN_COMMAND: ContextVar[bool] = ContextVar("hubunlearn_in_command", default=False)


@contextmanager
def command_messages():
    """While a ``hubunlearn`` command runs (and prints its error), messages name the command's flags."""
    token = _IN_COMMAND.set(True)
    try:
        yield
    finally:
        _IN_COMMAND.reset(token)


def python_names(message: str) -> str:
    """``message`` with each ``--flag`` (and the placeholder after it: ``--retain SPEC``) outside a quoted command
    line replaced by the Python argument's name."""
    def argument(match: re.Match) -> str:
        name = PYTHON_NAMES.get(match[2], match[2])
        return f"{name}=False" if match[1] else name

    pieces, end = [], 0
    for command in _COMMAND_LINE.finditer(message):
        pieces += [_FLAG.sub(argument, message[end:command.start()]), command[0]]
        end = command.end()
    text = "".join(pieces) + _FLAG.sub(argument, message[end:])
    return re.sub(r"\b([\w=]+) \(\1\)", r"\1", text)  # "forget_dataset (--forget SPEC)" would say the name twice


class HubUnlearnError(Exception):
    """A failure the user can act on. The CLI prints ``hubunlearn: error: <message>`` and exits."""

    exit_code = 1

    def __str__(self) -> str:
        message = super().__str__()
        return message if _IN_COMMAND.get() else python_names(message)


class UsageError(HubUnlearnError):
    """Bad input: an argument, a path, a data set or a model that cannot be used as given (exit 2)."""

    exit_code = 2


class NonFiniteLossError(HubUnlearnError):
    """Training produced a NaN or infinite loss or gradient; the weights keep their last good state."""

    def __init__(self, step: int, what: str = "loss", value: float = float("nan"), saved_to=None):
        self.step, self.what, self.value, self.saved_to = step, what, value, saved_to
        kept = f"saved the state after step {step - 1} to {saved_to}" if saved_to else f"the model keeps its state after step {step - 1}"
        super().__init__(
            f"the {what} became {value} at step {step}; training stopped and {kept}: "
            "lower --learning_rate (or --max_grad_norm) and run again"
        )


def known_flags(parser) -> list[str]:
    """The ``--`` flags of an ``argparse`` parser and of its subcommands' parsers (``bench run ...``)."""
    import argparse

    subcommands = [a.choices.values() for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    parsers = [parser, *(sub for choices in subcommands for sub in choices)]
    return [option for p in parsers for action in p._actions for option in action.option_strings if option.startswith("--")]


def did_you_mean(argument: str, flags) -> str:
    """``": did you mean --retain?"`` for a misspelled flag (``flags``: a parser, or a list of flags), or nothing."""
    import difflib

    match = difflib.get_close_matches(argument.split("=")[0], flags if isinstance(flags, list) else known_flags(flags), n=1)
    return f": did you mean {match[0]}?" if match else ""
