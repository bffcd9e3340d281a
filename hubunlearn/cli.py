"""The ``hubunlearn`` command: thin parsers over the library."""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import HubUnlearnError

COMMANDS = {
    "unlearn": "Remove a forget set from a model with one of the unlearning methods; save a checkpoint or adapter.",
    "push": "Publish an artifact folder to the Hugging Face Hub in one commit, with its model card.",
    "quickstart": "Run the built-in offline example: teach a tiny model a fictitious world, then unlearn part of it.",
}


def _unlearn(argv: list[str]) -> int:
    from .unlearn import parse_unlearn_args, run_unlearn

    from accelerate import PartialState

    arguments, config = parse_unlearn_args(argv)
    output_dir = run_unlearn(arguments, config)
    if PartialState().is_main_process:
        kind = "LoRA adapter" if arguments.use_lora else "checkpoint"
        print(f"hubunlearn: saved the {arguments.method} {kind} and unlearning.json to {output_dir}")
    return 0


def _push(argv: list[str]) -> int:
    from .hub import push

    parser = argparse.ArgumentParser(prog="hubunlearn push", description=COMMANDS["push"])
    parser.add_argument("folder", help="An artifact folder (weights + unlearning.json), as `hubunlearn unlearn` writes it.")
    parser.add_argument("--repo_id", required=True, help="Target repository, ORG/NAME; created when missing.")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument("--revision", help="Branch to commit to (created when missing); default: main.")
    parser.add_argument("--create_pr", action="store_true", help="Open a pull request instead of committing to the branch.")
    parser.add_argument("--commit_message", help="Commit title.")
    parser.add_argument("--base_model_id", help="Hub id of the base model, when the artifact was made from a local folder.")
    parser.add_argument("--dry_run", action="store_true", help="Check the folder and list what would be uploaded; upload nothing.")
    args = parser.parse_args(argv)
    result = push(args.folder, args.repo_id, private=args.private, revision=args.revision, create_pr=args.create_pr,
                  commit_message=args.commit_message, base_model_id=args.base_model_id, dry_run=args.dry_run)
    if args.dry_run:
        print(f"hubunlearn: would upload to {args.repo_id} in one commit:")
        for name in result.files:
            print(f"  {name} ({(result.folder / name).stat().st_size:,} bytes)")
        for name, content in result.rewritten.items():
            print(f"  {name} ({len(content):,} bytes, written for the Hub)")
        return 0
    print(f"hubunlearn: pushed {args.folder} to {args.repo_id}: {result.pr_url or result.commit_url}")
    return 0


def _quickstart(argv: list[str]) -> int:
    from .quickstart import format_report, run_quickstart

    parser = argparse.ArgumentParser(prog="hubunlearn quickstart", description=COMMANDS["quickstart"])
    parser.add_argument("--output_dir", default="quickstart-output", help="Where the adapter and unlearning.json go.")
    args = parser.parse_args(argv)
    print(format_report(run_quickstart(args.output_dir)))
    return 0


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"hubunlearn: {record.levelname.lower()}: {record.getMessage()}"


def _show_warnings() -> None:
    logger = logging.getLogger("hubunlearn")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_Formatter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


HANDLERS = {"unlearn": _unlearn, "push": _push, "quickstart": _quickstart}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="hubunlearn",
        description="Make causal language models forget, measure it, and publish the result on the Hugging Face Hub.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<12}{text}" for name, text in COMMANDS.items())
        + "\n\nRun 'hubunlearn COMMAND --help' for a command's options.",
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"hubunlearn: error: unknown command '{argv[0]}': choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    _show_warnings()
    try:
        return HANDLERS[argv[0]](argv[1:])
    except HubUnlearnError as error:
        print(f"hubunlearn: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("hubunlearn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
