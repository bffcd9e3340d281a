"""What the scripts in ``benchmarks/`` share: the machine record, the README tables they own, their command line."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

# Options a method has no default for, as the benchmarks and the tests that run every method give them: PDU's bound on
# the retain NLL in nats per token, at the authors' TOFU value (the taught models here retain better; an untrained
# model's retain NLL is above it, and PDU's dual variable grows).
REQUIRED_SETTINGS = {"pdu": {"retain_epsilon": 0.3}}
# glibc keeps freed blocks below its (rising) mmap threshold resident; in a child process started with this in its
# environment, the resident peak is the peak of the live tensors, not of what the allocator happened to keep.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def machine() -> dict:
    """Cores, torch threads and version, device: every results file records where it was measured."""
    import torch

    return {"cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": "cuda" if torch.cuda.is_available() else "cpu", "platform": platform.platform()}


def code_state(root: Path | None = None) -> dict:
    """The commit measured (``None`` outside a git checkout) and the library files that differed from it (uncommitted
    work, by content hash) when the run began: every result records the code it measured."""
    import hashlib
    import subprocess

    root = root or Path(__file__).resolve().parents[1]

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True).stdout.rstrip("\n")

    changed = [line[3:] for line in git("status", "--porcelain", "--", "hubunlearn").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD") or None,
            "uncommitted": {path: hashlib.sha256((root / path).read_bytes()).hexdigest()[:16] if (root / path).is_file() else None
                            for path in changed}}


def resident_memory_mib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB: ``VmRSS`` and ``VmHWM`` of ``/proc/self/status`` (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024  # kB


def reset_peak_memory() -> None:
    """Start the peak (``VmHWM``) again from the current resident size (Linux ``/proc/self/clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")


def replace_between(readme: Path, begin: str, end: str, text: str) -> None:
    """Put ``text`` between the ``begin`` and ``end`` markers of ``readme`` (a generated table, never hand-typed)."""
    content = readme.read_text()
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def benchmark_main(description: str, results_path: Path, schema: int, run: Callable[[argparse.Namespace], dict],
                   table: Callable[[dict], str], markers: tuple[str, str], readme: Path,
                   plot: Callable[[dict], None] | None = None, default_data: Path | None = None) -> None:
    """``script.py`` runs the benchmark, saves the JSON, draws its plots (``plot(results)``) and rewrites the README
    table (``table(results)`` between the ``markers`` of ``readme``); ``--table`` only rewrites the table and
    ``--plots`` only redraws the plots, both from the committed JSON (refusing one of another schema). Torch uses
    ``$OMP_NUM_THREADS`` threads (default: 2 at most)."""
    import torch

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--table", action="store_true", help="only regenerate the README table from the results JSON")
    if plot is not None:
        parser.add_argument("--plots", action="store_true", help="only redraw the plots from the results JSON")
    if default_data is not None:
        parser.add_argument("--data", type=Path, default=default_data, help="folder of TOFU's files")
    args = parser.parse_args()
    if args.table or getattr(args, "plots", False):
        results = json.loads(results_path.read_text())
        if results.get("schema") != schema:
            sys.exit(f"{results_path} has schema {results.get('schema')}, expected {schema}: run the benchmark again")
        if getattr(args, "plots", False):
            plot(results)
            return
    else:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))
        results = run(args)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        if plot:
            plot(results)
    replace_between(readme, *markers, table(results))
