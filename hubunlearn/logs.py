"""hubunlearn's own log lines (``hubunlearn: info: …``), shown once, with or without a logging setup.

Like ``transformers``, the library puts a handler on its ``"hubunlearn"`` logger at import, so a Python user sees
the info lines (the budget's α, ECO's σ and recall, KUDA's energy shares) without configuring anything. The
handler steps aside as soon as the application configures logging (a handler on the root logger), which then
shows each record once in its own format. The ``hubunlearn`` command owns its process's output: while a command
runs, records stop at the ``"hubunlearn"`` logger (no propagation), so a root handler that a library installs
mid-run (absl's ``logging.basicConfig()`` in ``rouge_score``) cannot print them a second time.

Quieten the library with ``logging.getLogger("hubunlearn").setLevel(logging.WARNING)``.

A command also hides what the libraries print about their own calls, never about the user's input: PEFT reading
a deprecated ``transformers`` property, the Trainer's ``pin_memory`` default on a machine without an accelerator,
and the "Loading weights" and "Writing model shards" bars of local files (a download's progress bar stays). Every
other warning shows. ``huggingface_hub``'s retries of a Hub that does not answer (two lines a try, for half a minute)
are folded into one line that says what failed and how to skip the wait.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from contextlib import contextmanager

LOGGER_NAME = "hubunlearn"
LIBRARY_WARNINGS = (  # (category, message regex): libraries warning about their own calls
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),  # PEFT reads transformers' deprecated property
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found"),  # the Trainer's default, on a CPU
)
QUIET_BARS = ("Loading weights", "Writing model shards")  # transformers' bars over a local checkpoint's tensors and files
HUB_HTTP_LOGGER = "huggingface_hub.utils._http"  # logs each failed try and each wait of its retries
_previous_tqdm_hook: list = []  # the hook quiet_weight_loading replaced, while a command runs


class StderrHandler(logging.StreamHandler):
    """Writes ``hubunlearn: <level>: <message>`` to whatever ``sys.stderr`` is at the time of the record (pytest's
    capture, a redirected stream), unless the application configured logging: a handler on the root logger that
    the record reaches, or one of its own on the ``"hubunlearn"`` logger."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("hubunlearn: %(levelname_lower)s: %(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass

    def filter(self, record: logging.LogRecord) -> bool:
        logger = logging.getLogger(LOGGER_NAME)
        if any(handler is not self for handler in logger.handlers) or (logger.propagate and logging.root.handlers):
            return False  # the application's own handlers show it
        record.levelname_lower = record.levelname.lower()
        return super().filter(record)


def install_default_handler() -> None:
    """Give the ``"hubunlearn"`` logger its stderr handler (once) and, unless someone set a level, level INFO."""
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(handler, StderrHandler) for handler in logger.handlers):
        logger.addHandler(StderrHandler())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


class FoldedHubRetries(logging.Filter):
    """On ``huggingface_hub``'s HTTP logger: the first failed try of a request becomes one ``hubunlearn: warning``
    line; the other tries and the "Retrying in Ns" lines are dropped. Other records pass."""

    FAILED_TRY = re.compile(r"^'?(?P<error>.*?)'? thrown while requesting (?P<method>\w+) (?P<url>\S+)$", re.S)  # 'OSError', HTTP Error 503

    def __init__(self):
        super().__init__()
        self.said = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        failed = self.FAILED_TRY.match(message)
        if failed and not self.said:
            self.said = True
            logging.getLogger(LOGGER_NAME).warning(
                "the Hub did not answer (%s, for %s): huggingface_hub retries for about half a minute; with no network, "
                "HF_HUB_OFFLINE=1 uses what is cached at once", failed["error"].splitlines()[0], failed["url"])
        return not (failed or message.startswith("Retrying in "))


@contextmanager
def command_output():
    """While a ``hubunlearn`` command runs: INFO and up, each record printed once by the handler above (records do
    not propagate to root handlers), the caller's settings restored afterwards (tests run commands in-process)."""
    install_default_handler()
    logger = logging.getLogger(LOGGER_NAME)
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False
    retries = FoldedHubRetries()
    logging.getLogger(HUB_HTTP_LOGGER).addFilter(retries)
    try:
        with warnings.catch_warnings():
            for category, message in LIBRARY_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        logger.setLevel(level)
        logger.propagate = propagate
        logging.getLogger(HUB_HTTP_LOGGER).removeFilter(retries)
        if _previous_tqdm_hook:
            from transformers.utils.logging import set_tqdm_hook

            set_tqdm_hook(_previous_tqdm_hook.pop())


def quiet_weight_loading() -> None:
    """Inside :func:`command_output`: no "Loading weights" or "Writing model shards" bar from ``transformers`` (other
    bars stay). Called by
    the commands once their arguments are checked, since importing ``transformers`` takes seconds."""
    from transformers.utils.logging import set_tqdm_hook

    def hook(factory, args, kwargs):
        if kwargs.get("desc") in QUIET_BARS:
            kwargs = {**kwargs, "disable": True}
        return factory(*args, **kwargs)

    previous = set_tqdm_hook(hook)
    if not _previous_tqdm_hook:
        _previous_tqdm_hook.append(previous)
