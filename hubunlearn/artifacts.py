"""Artifact folders: written to a temporary sibling, then moved into place, so nothing is ever half-written."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from .errors import UsageError

RECORD_NAME = "unlearning.json"
# Kept when an existing output folder is overwritten: the Trainer's own checkpoints and logs.
KEPT_ON_OVERWRITE = ("checkpoint-", "runs")
# Never shipped: pickles (the Trainer writes its arguments with torch.save).
NEVER_SHIPPED = ("training_args.bin",)
LIBRARIES = ("hubunlearn", "torch", "transformers", "peft", "accelerate", "datasets", "huggingface_hub", "safetensors")


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse a non-empty output folder unless the user asked to overwrite it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"output path {path} is a file: give a folder with --output_dir")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UsageError(f"output folder {path} is not empty: choose another --output_dir or pass --overwrite_output_dir")


class Terminated(SystemExit):
    """SIGTERM's exit (code 143), raised by the handler :func:`sigterm_unwinds` installs."""


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within: SIGTERM (``kill``, a scheduler's stop) raises ``Terminated`` (``SystemExit(143)``) like Ctrl-C's
    ``KeyboardInterrupt``, so that ``finally`` blocks run: staging folders are removed, child processes stopped,
    nothing is left half-written. Only on the main thread (signals are delivered there); elsewhere it changes nothing.

    Python swallows an exception raised where it cannot propagate (a ``__del__``, a weakref or gc callback: it prints
    "Exception ignored" and goes on). A stop landing there is sent again a moment later, from the
    ``sys.unraisablehook``, until it lands where it unwinds."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def unwind(signum, frame):
        raise Terminated(128 + signum)

    def send_again(unraisable):
        if isinstance(unraisable.exc_value, Terminated):  # not raised inside this hook: its own errors are swallowed too
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)).start()
        else:
            previous_hook(unraisable)

    previous = signal.signal(signal.SIGTERM, unwind)
    previous_hook, sys.unraisablehook = sys.unraisablehook, send_again
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = previous_hook


@contextlib.contextmanager
def staging_dir(destination: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``destination``; on success its files replace the destination's."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        yield staging
        publish(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _user_file_modes(folder: Path) -> None:
    """Give ``folder`` and everything in it the user's normal modes (0644/0755 under umask 022): ``mkdtemp`` and
    the safetensors writer make them private (0700/0600), so another user or a serving container could not read them."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def publish(staging: Path, destination: Path) -> None:
    """Move a finished folder into place: one rename when the destination is new or empty, else file by file
    with the record (``unlearning.json``) last, so its presence marks a complete artifact."""
    for name in NEVER_SHIPPED:
        (staging / name).unlink(missing_ok=True)
    _user_file_modes(staging)
    if destination.is_dir() and not any(destination.iterdir()):
        destination.rmdir()
    if not destination.exists():
        os.replace(staging, destination)
        return
    for old in destination.iterdir():
        if not old.name.startswith(KEPT_ON_OVERWRITE):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    entries = sorted(staging.iterdir(), key=lambda p: p.name == RECORD_NAME)
    for entry in entries:
        os.replace(entry, destination / entry.name)


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def write_record(folder: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write ``unlearning.json``."""
    path = Path(folder) / RECORD_NAME
    path.write_text(json.dumps(record, indent=2, sort_keys=False, default=str) + "\n")
    return path


def read_record(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / RECORD_NAME
    if not path.is_file():
        raise UsageError(f"{folder} has no {RECORD_NAME}: it is not a hubunlearn artifact")
    return json.loads(path.read_text())
