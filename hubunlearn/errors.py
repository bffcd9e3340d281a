"""Errors that reach the user as one line that says what to do."""

from __future__ import annotations


class HubUnlearnError(Exception):
    """A failure the user can act on. The CLI prints ``hubunlearn: error: <message>`` and exits."""

    exit_code = 1


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
