"""The ``hubunlearn`` command: thin parsers over the library."""

from __future__ import annotations

import argparse
import sys

from .errors import HubUnlearnError, UsageError, command_messages, did_you_mean, known_flags
from .logs import command_output, quiet_weight_loading

COMMANDS = {
    "unlearn": "Remove a forget set from a model with one of the unlearning methods; save a checkpoint or adapter.",
    "eval": "Measure what a model forgot and what it cost: TOFU or MUSE metrics, extraction strength, MIAs, attacks.",
    "push": "Publish an artifact folder to the Hugging Face Hub in one commit, with its model card.",
    "bench": "Benchmarks: `bench run` compares every method on TOFU-mini; `bench plot` redraws its plot; `bench build-tofu` trains TOFU-mini itself; "
             "`bench muse` runs MUSE's scalability or sustainability criterion.",
    "trace": "Causal tracing (KUDA's first step): which FFN layers carry a forget set; per-layer table and heat map.",
    "space": "Show the original and the unlearned model side by side in a Gradio app, locally or as a Hub Space.",
    "tune": "Search a method's hyperparameters (Optuna) for the setting that forgets most within a model-utility budget.",
    "quickstart": "Run the built-in offline example: teach a tiny model a fictitious world, then unlearn part of it.",
}


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line that says where to look, exit code 2 (through UsageError). A flag must be spelled
    out (no abbreviations), and a misspelled one is named, with the closest flag, before any other complaint (a
    misspelled required flag would otherwise read as a missing one)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def parse_args(self, args=None, namespace=None):
        flags = set(known_flags(self))
        for argument in sys.argv[1:] if args is None else args:
            if argument == "--":
                break
            if str(argument).startswith("--") and str(argument).split("=")[0] not in flags:
                self.error(f"unrecognized arguments: {argument}")
        return super().parse_args(args, namespace)

    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):
            message += did_you_mean(message.split()[2], self)
        raise UsageError(f"{message} (see {self.prog} --help)")


def _unlearn(argv: list[str]) -> int:
    from .unlearn import parse_unlearn_args, run_unlearn

    from accelerate import PartialState

    from .artifacts import read_record

    arguments, config = parse_unlearn_args(argv)
    quiet_weight_loading()
    output_dir = run_unlearn(arguments, config)
    if PartialState().is_main_process:
        kind = {"eco": "bundle", "lora": "LoRA adapter", "full": "checkpoint"}[read_record(output_dir)["artifact"]]
        print(f"hubunlearn: saved the {arguments.method} {kind} and unlearning.json to {output_dir}")
    return 0


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _eval(argv: list[str]) -> int:
    from .evaluate import DEFAULT_METRICS, METRICS, EvalConfig, format_summary, record_into_artifact, run_eval

    parser = _Parser(prog="hubunlearn eval", description=COMMANDS["eval"])
    parser.add_argument("--model", required=True, help="Hub id or folder of the model (a full unlearned checkpoint, an ECO bundle).")
    parser.add_argument("--revision", help="Branch, tag or commit of a Hub --model (default: main).")
    parser.add_argument("--adapter", help="A LoRA adapter (Hub id or folder) to apply on --model.")
    parser.add_argument("--benchmark", default="tofu", help="tofu (default), muse (with --corpus), wmdp (lm-evaluation-harness) or world (the built-in example).")
    parser.add_argument("--corpus", help="MUSE's corpus with --benchmark muse: news or books.")
    parser.add_argument("--forget_split", default="forget10", help="TOFU forget split: forget01, forget05 or forget10.")
    parser.add_argument("--data", help="Folder laid out like locuslab/TOFU or muse-bench/MUSE-News (default: the Hub dataset).")
    parser.add_argument("--metrics", type=_csv, default=DEFAULT_METRICS, help=f"Comma-separated, from: {', '.join(METRICS)}; with --benchmark muse: "
                        "verbmem_f, knowmem_f, knowmem_r, privleak (default: all four).")
    parser.add_argument("--max_examples", type=int, help="Evaluate the first N rows of each set.")
    parser.add_argument("--reference", help="Model trained without the forget set; its statistics are cached.")
    parser.add_argument("--reference_stats", help="per_example.json of an earlier eval, used as the reference.")
    parser.add_argument("--holdout", help="Data spec of unseen rows, for membership inference (--metrics mia).")
    parser.add_argument("--attack", type=_csv, default=(), help="Robustness probes: relearn, paraphrase, prefix.")
    parser.add_argument("--relearn_steps", type=int, default=10, help="Fine-tuning steps of the relearn attack.")
    parser.add_argument("--relearn_learning_rate", type=float, default=1e-4, help="Learning rate of the relearn attack.")
    parser.add_argument("--output_dir", default="eval-output", help="Where summary.json and per_example.json go.")
    parser.add_argument("--record_to", help="An artifact folder whose unlearning.json (and card) should show this eval.")
    parser.add_argument("--stage", default="after", choices=("after", "before", "reference"),
                        help="Column of the card's table for this eval: after, before or reference.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--trust_remote_code", action="store_true", help="Run the model repository's own code.")
    parser.add_argument("--device", default="auto", help="Where the model computes: auto (default: the GPU when there is one), cpu, cuda or cuda:N.")
    parser.add_argument("--wmdp_tasks", type=_csv, default=("wmdp_bio", "wmdp_cyber", "wmdp_chem", "mmlu"),
                        help="--benchmark wmdp: a subset of wmdp_bio, wmdp_cyber, wmdp_chem, mmlu (default: all four).")
    parser.add_argument("--lm_eval_tasks", type=_csv, default=(), help="lm-evaluation-harness tasks added as utility measures (any benchmark).")
    parser.add_argument("--lm_eval_include", type=_csv, default=(), help="Folders or YAML files of harness tasks of your own (e.g. local data).")
    args = parser.parse_args(argv)
    if args.record_to:  # before the evaluation, not after it
        from .artifacts import read_record

        read_record(args.record_to)
    quiet_weight_loading()
    config = EvalConfig(model=args.model, revision=args.revision, adapter=args.adapter, benchmark=args.benchmark, forget_split=args.forget_split,
                        corpus=args.corpus, data=args.data, metrics=args.metrics, max_examples=args.max_examples, reference=args.reference,
                        reference_stats=args.reference_stats, holdout=args.holdout, attacks=args.attack,
                        relearn_steps=args.relearn_steps, relearn_learning_rate=args.relearn_learning_rate,
                        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, trust_remote_code=args.trust_remote_code,
                        device=args.device, wmdp_tasks=args.wmdp_tasks, lm_eval_tasks=args.lm_eval_tasks,
                        lm_eval_include=args.lm_eval_include)
    summary = run_eval(config, args.output_dir)
    print(format_summary(summary))
    print(f"hubunlearn: wrote summary.json and per_example.json to {args.output_dir}")
    if args.record_to:
        print(f"hubunlearn: recorded the results in {record_into_artifact(summary, args.record_to, args.stage)}")
    return 0


def _push(argv: list[str]) -> int:
    from contextlib import nullcontext

    from huggingface_hub.utils import disable_progress_bars
    from huggingface_hub.utils import logging as hf_logging

    from .hub import push

    parser = _Parser(prog="hubunlearn push", description=COMMANDS["push"])
    parser.add_argument("folder", help="An artifact folder (weights + unlearning.json), as `hubunlearn unlearn` writes it.")
    parser.add_argument("--repo_id", required=True, help="Target repository, ORG/NAME; created when missing.")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument("--revision", help="Branch to commit to (created when missing); default: main.")
    parser.add_argument("--create_pr", action="store_true", help="Open a pull request instead of committing to the branch.")
    parser.add_argument("--commit_message", help="Commit title.")
    parser.add_argument("--base_model_id", help="Hub id of the base model, when the artifact was made from a local folder.")
    parser.add_argument("--dry_run", action="store_true", help="Check the folder and list what would be uploaded; upload nothing.")
    args = parser.parse_args(argv)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the client's own retry chatter: push says what happened, in one line
    try:
        with nullcontext() if sys.stderr.isatty() else disable_progress_bars():  # upload progress on a terminal only
            result = push(args.folder, args.repo_id, private=args.private, revision=args.revision, create_pr=args.create_pr,
                          commit_message=args.commit_message, base_model_id=args.base_model_id, dry_run=args.dry_run)
    finally:
        hf_logging.set_verbosity(verbosity)
    if result is None:  # nothing changed: push said so, with the current commit
        return 0
    if args.dry_run:
        print(f"hubunlearn: would upload to {args.repo_id} in one commit:")
        for name in result.files:
            print(f"  {name} ({(result.folder / name).stat().st_size:,} bytes)")
        for name, content in result.rewritten.items():
            print(f"  {name} ({len(content):,} bytes, written for the Hub)")
        return 0
    print(f"hubunlearn: pushed {args.folder} to {args.repo_id}: {result.pr_url or result.commit_url}")
    return 0


def _bench(argv: list[str]) -> int:
    from .tofu_mini import DEFAULT_EPOCHS, FORGET_SPLITS, LEARNING_RATE, build_tofu_mini, tofu_data_folder

    argv, unlearn_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = _Parser(prog="hubunlearn bench", description=COMMANDS["bench"])
    actions = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    actions.required = True
    build = actions.add_parser("build-tofu", help="Train TOFU-mini (target and reference models) from TOFU's data; cached.")
    build.add_argument("--authors", type=int, default=20, help="Retain authors: the first N authors of TOFU's `full` (default 20).")
    build.add_argument("--forget_split", default="forget10", help=f"Whose authors to forget: {', '.join(FORGET_SPLITS)}.")
    build.add_argument("--data", default="locuslab/TOFU", help="Folder of TOFU's files, or the Hub dataset id (default locuslab/TOFU).")
    build.add_argument("--hidden_size", type=int, default=256)
    build.add_argument("--num_layers", type=int, default=4)
    build.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    build.add_argument("--learning_rate", type=float, default=LEARNING_RATE)
    build.add_argument("--cache_dir", help="Parent folder of the build (default: the hubunlearn cache).")
    run = actions.add_parser("run", help="Every method on TOFU-mini: quality, time, memory, scaling; JSON, Pareto plot, README table.")
    run.add_argument("--methods", type=_csv, default=(), help="Comma-separated methods (default: all of them).")
    run.add_argument("--split", default="forget10", help=f"Forget split of the TOFU-mini build: {', '.join(FORGET_SPLITS)}.")
    run.add_argument("--steps", type=int, default=50, help="Optimiser steps per method (default 50).")
    run.add_argument("--batch_size", type=int, default=8)
    run.add_argument("--tau", type=float, default=0.9, help="Utility budget of the calibrated runs (0: none).")
    run.add_argument("--data", help="Folder of TOFU's files, or the Hub dataset id (default locuslab/TOFU).")
    run.add_argument("--results_dir", default="benchmarks/results", help="Where the JSON and the plot go.")
    run.add_argument("--readme", help="A README whose table (between the bench markers) is rewritten from the JSON.")
    run.add_argument("--tofu_mini", help="A built TOFU-mini, the tofu-mini-HASH folder `bench build-tofu` prints, instead of building one from --data.")
    run.add_argument("--authors", type=int, help="TOFU-mini retain authors (default 20).")
    run.add_argument("--hidden_size", type=int, help="TOFU-mini hidden size (default 256 on CPU, 768 on a GPU).")
    run.add_argument("--num_layers", type=int, help="TOFU-mini layers (default 4 on CPU, 8 on a GPU).")
    run.add_argument("--epochs", type=int, help="TOFU-mini training epochs.")
    run.add_argument("--max_eval_examples", type=int, help="Evaluate the first N rows of each set (quick runs).")
    run.add_argument("--no_scaling", action="store_true", help="Skip the forget-size and model-size scaling runs.")
    run.add_argument("--tune_trials", type=int, default=0,
                     help="Add tuned rows: each weight-changing method at the best of N `hubunlearn tune` trials within --tau (default 0: none).")
    run.add_argument("--tune_eval_examples", type=int, default=50, help="Rows per evaluation set in the tuned rows' search (default 50).")
    run.add_argument("--no_shared", action="store_true", help="Measure only the tuned rows; the file's shared-setting rows are kept.")
    run.add_argument("--reuse_searches", action="store_true",
                     help="Tuned rows: train and measure again at the setting the results file's search of the same "
                          "--tune_trials, --tune_eval_examples and --tau found, without searching again (after a code change).")
    run.add_argument("--fresh", action="store_true",
                     help="Replace a results file measured with other settings (without it such a file is refused, never mixed or dropped).")
    plot = actions.add_parser("plot", help="Redraw the Pareto plot from the results JSON of an earlier run (runs nothing).")
    plot.add_argument("--results_dir", default="benchmarks/results", help="Where the JSON is; the plot goes beside it.")
    plot.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="Whose results: cpu (default) or cuda.")
    _add_bench_muse(actions)
    args = parser.parse_args(argv)
    if unlearn_args and args.action != "muse":
        raise UsageError(f"only `hubunlearn bench muse` takes unlearn flags after --; `bench {args.action}` got {' '.join(unlearn_args)}")
    if args.action == "muse":
        return _bench_muse(args, unlearn_args)
    if args.action == "plot":
        from .bench import replot

        print(f"hubunlearn: redrew {replot(args.results_dir, args.device)}")
        return 0
    quiet_weight_loading()
    if args.action == "run":
        return _bench_run(args)
    if args.forget_split not in FORGET_SPLITS:
        raise UsageError(f"unknown forget split '{args.forget_split}': choose one of {', '.join(FORGET_SPLITS)}")
    for name in ("hidden_size", "num_layers", "epochs", "learning_rate"):
        if not getattr(args, name) > 0:
            raise UsageError(f"--{name} must be positive; got {getattr(args, name)}")
    mini = build_tofu_mini(tofu_data_folder(args.data, args.forget_split), args.authors, args.forget_split, args.hidden_size,
                           args.num_layers, args.epochs, cache_dir=args.cache_dir, learning_rate=args.learning_rate)
    info = mini.info
    print(f"hubunlearn: TOFU-mini ({info['parameter_count']:,} parameters, {info['authors']['retain']} retain and "
          f"{info['authors']['forget']} forget authors) is in {mini.root}")
    print(f"{'answer probability':<20}" + "".join(f"{name:>14}" for name in info["answer_probability"]["target"]))
    for model, values in info["answer_probability"].items():
        print(f"{model:<20}" + "".join(f"{value:>14.3f}" for value in values.values()))
    print(f"evaluate against its reference:\n  hubunlearn eval --model {mini.target_dir} --data {mini.data_dir} "
          f"--forget_split {mini.forget_split} --reference {mini.reference_dir}")
    return 0


def _trace(argv: list[str]) -> int:
    from pathlib import Path

    from .data import DataFormat, load_rows, tokenize_rows
    from .kuda.layers import FFNLayers
    from .kuda.tracing import TRACE_RULES, plot_trace, trace
    from .modeling import load_model, load_tokenizer

    parser = _Parser(prog="hubunlearn trace", description=COMMANDS["trace"])
    parser.add_argument("--model", required=True, help="Hub id or folder of the model to trace.")
    parser.add_argument("--forget", required=True, help="Forget set (question-answer rows): ORG/NAME[:CONFIG][@SPLIT], a file, or FOLDER:CONFIG.")
    parser.add_argument("--question_key", default="question", help="Column of the forget set's questions.")
    parser.add_argument("--answer_key", default="answer", help="Column of the forget set's answers.")
    parser.add_argument("--window", type=int, default=1, help="Contiguous layers to choose (largest summed effect).")
    parser.add_argument("--examples", type=int, default=32, help="Forget examples to average over.")
    parser.add_argument("--noise_scale", type=float, default=3.0, help="Prompt noise in standard deviations of the embeddings.")
    parser.add_argument("--samples", type=int, default=3, help="Noise draws per example.")
    parser.add_argument("--tokens", choices=TRACE_RULES, default="prompt",
                        help="Noise the whole prompt and restore everywhere, or noise the subject (name-like tokens) and restore its last token (ROME).")
    parser.add_argument("--output", default="causal_trace.png", help="Where the heat map goes (PNG).")
    parser.add_argument("--layers_module", help="Path of the decoder layers' ModuleList (default: found by length).")
    parser.add_argument("--mlp_module", default="mlp", help="Name of the FFN block inside a decoder layer.")
    parser.add_argument("--down_module", default="down_proj", help="Name of the FFN's output projection.")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--trust_remote_code", action="store_true", help="Run the model repository's own code.")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.suffix.lower() != ".png" or not output.parent.is_dir():
        raise UsageError(f"--output {output} must be a .png file in an existing folder")
    if args.examples < 1 or args.samples < 1 or args.noise_scale <= 0 or args.batch_size < 1:
        raise UsageError("--examples, --samples and --batch_size must be at least 1, --noise_scale positive")
    quiet_weight_loading()
    rows = load_rows(args.forget)
    data_format = DataFormat(question_key=args.question_key, answer_key=args.answer_key)
    if not {data_format.question_key, data_format.answer_key} <= set(rows.column_names):
        raise UsageError(f"--forget {args.forget} has columns [{', '.join(rows.column_names)}]; tracing needs question-answer "
                         f"rows: '{data_format.question_key}' and '{data_format.answer_key}' (set --question_key/--answer_key), "
                         "or TRL's 'prompt'/'completion' or 'messages'")
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    model = load_model(args.model, trust_remote_code=args.trust_remote_code)
    ffn = FFNLayers(model, args.layers_module, args.mlp_module, args.down_module)
    examples = list(tokenize_rows(rows.select(range(min(args.examples, len(rows)))), tokenizer, data_format, "forget"))
    result = trace(model, ffn, examples, tokenizer.pad_token_id, args.window, args.batch_size, noise_scale=args.noise_scale,
                   samples=args.samples, tokens=args.tokens, tokenizer=tokenizer)
    print(f"answer score: clean {float(result.clean.mean()):.4f}, {args.tokens} corrupted {float(result.corrupted.mean()):.4f} "
          f"({len(examples)} examples, noise σ = {result.noise_std:.4g})")
    print("| layer | mean indirect effect | chosen |\n|---|---|---|")
    for layer, effect in enumerate(result.mean_effects):
        print(f"| {layer} | {effect:+.4f} | {'✓' if layer in result.window else ''} |")
    plot_trace(result, output, f"Causal tracing of {args.model}")
    print(f"hubunlearn: layers {result.window} carry the forget set most; heat map saved to {output}")
    return 0


def _add_bench_muse(actions) -> None:
    muse = actions.add_parser("muse", help="MUSE's scalability (scal) or sustainability (sust) criterion: unlearn forget_1..4, "
                                           "measure after each; table and plot. Unlearn flags after --.",
                              description="MUSE's scalability or sustainability criterion: every step is `hubunlearn unlearn "
                                          "--config RECIPE` on a fold, then the `eval --benchmark muse` numbers. `hubunlearn unlearn` "
                                          "flags after -- override the recipe for every step, e.g. -- --learning_rate 1e-5 --max_steps 20.")
    muse.add_argument("--criterion", required=True, help="scal (forget sets of growing size, each from the target) or sust "
                                                         "(sequential requests, each from the previous step's model).")
    muse.add_argument("--corpus", default="news", help="news (default) or books.")
    muse.add_argument("--output_dir", required=True, help="Folder for results.json, table.md, plot.png and each step's eval.")
    muse.add_argument("--config", help="Unlearning recipe (a path or a trainers/ name; default npo-muse-CORPUS).")
    muse.add_argument("--model", help="Model to unlearn from (default: the recipe's model_name_or_path).")
    muse.add_argument("--data", help="Folder in MUSE's layout, or a Hub dataset id (default muse-bench/MUSE-News or -Books).")
    muse.add_argument("--folds", type=int, default=4, help="Unlearn forget_1..forget_N (default 4, MUSE's).")
    muse.add_argument("--metrics", type=_csv, default=("verbmem_f", "knowmem_f", "knowmem_r", "privleak"),
                      help="MUSE metrics measured after each step (default all four).")
    muse.add_argument("--reference", help="Retrained reference model for PrivLeak (default MUSE's published AUC).")
    muse.add_argument("--reference_stats", help="per_example.json of a --benchmark muse eval of the reference.")
    muse.add_argument("--max_examples", type=int, help="Evaluate the first N rows of each MUSE set (quick runs).")
    muse.add_argument("--batch_size", type=int, default=32, help="Eval batch size.")
    muse.add_argument("--device", default="auto", help="Where the evals compute: auto, cpu, cuda[:N].")
    muse.add_argument("--readme", help="A README whose table (between the muse CRITERION table markers) is rewritten.")
    muse.add_argument("--overwrite_output_dir", action="store_true", help="Replace a non-empty --output_dir.")


def _bench_muse(args, unlearn_args: list[str]) -> int:
    from .muse_bench import MuseBenchConfig, run_muse_bench, table

    config = MuseBenchConfig(criterion=args.criterion, output_dir=args.output_dir, corpus=args.corpus, config=args.config,
                             model=args.model, data=args.data, folds=args.folds, unlearn_args=tuple(unlearn_args),
                             metrics=args.metrics, reference=args.reference, reference_stats=args.reference_stats,
                             max_examples=args.max_examples, batch_size=args.batch_size, device=args.device,
                             overwrite_output_dir=args.overwrite_output_dir, readme=args.readme)
    results = run_muse_bench(config)
    print(table(results))
    if args.readme:
        print(f"hubunlearn: rewrote the muse {args.criterion} table in {args.readme}")
    print(f"hubunlearn: results.json, table.md and plot.png in {args.output_dir}")
    return 0


def _bench_run(args) -> int:
    from pathlib import Path

    from .bench import BENCH_BEGIN, BENCH_END, BenchConfig, run_benchmark, table
    from .benchmarking import replace_between

    readme = Path(args.readme) if args.readme else None
    if readme is not None and BENCH_BEGIN not in (readme.read_text() if readme.is_file() else ""):
        raise UsageError(f"--readme {readme} has no benchmark table markers ({BENCH_BEGIN} ... {BENCH_END})")
    build = {key: value for key, value in (("num_authors", args.authors), ("hidden_size", args.hidden_size),
                                           ("num_layers", args.num_layers), ("epochs", args.epochs)) if value is not None}
    config = BenchConfig(methods=args.methods, split=args.split, steps=args.steps, batch_size=args.batch_size, tofu_mini=args.tofu_mini,
                         tau=args.tau or None, data=args.data, results_dir=args.results_dir, build=build,
                         max_eval_examples=args.max_eval_examples, scaling=not args.no_scaling, fresh=args.fresh,
                         tune_trials=args.tune_trials, tune_eval_examples=args.tune_eval_examples, shared=not args.no_shared,
                         reuse_searches=args.reuse_searches)
    results = run_benchmark(config)
    print(table(results))
    if readme is not None:
        replace_between(readme, BENCH_BEGIN, BENCH_END, table(results))
        print(f"hubunlearn: rewrote the benchmark table in {readme}")
    print(f"hubunlearn: results in {args.results_dir}")
    return 0


def _space(argv: list[str]) -> int:
    from .space import check_artifact

    parser = _Parser(prog="hubunlearn space", description=COMMANDS["space"])
    parser.add_argument("--unlearned", required=True, help="The unlearned artifact: a folder or a Hub repo id.")
    parser.add_argument("--original", help="The original model (default: the base model named in unlearning.json).")
    parser.add_argument("--port", type=int, default=7860, help="Local port (default 7860).")
    parser.add_argument("--deploy", metavar="ORG/NAME", help="Create or update this Hub Space instead of running locally.")
    parser.add_argument("--hardware", default="cpu-basic", help="Suggested Space hardware (e.g. cpu-basic, t4-small, zero-a10g).")
    parser.add_argument("--private", action="store_true", help="Create the Space as private.")
    parser.add_argument("--device", default="auto", help="Where the local app's models compute: auto (default: the GPU when there is one), cpu, cuda or cuda:N.")
    args = parser.parse_args(argv)
    check_artifact(args.unlearned)
    if args.deploy:
        from .space import deploy

        print(f"hubunlearn: deployed the Space {args.deploy}: {deploy(args.unlearned, args.deploy, args.original, args.hardware, args.private)}")
        return 0
    from .space import SideBySide, build_demo, check_port

    check_port(args.port)
    quiet_weight_loading()
    build_demo(SideBySide.load(args.unlearned, args.original, args.device)).launch(server_port=args.port)
    return 0


def _tune(argv: list[str]) -> int:
    from .tune import OBJECTIVES, TuneConfig, require_optuna, run_tune
    from .tune_report import comparison_table

    parser = _Parser(prog="hubunlearn tune", description=COMMANDS["tune"],
                     epilog="Any other flag is a `hubunlearn unlearn` flag (model, data, fixed hyperparameters) applied to every trial.")
    parser.add_argument("--method", required=True, help="The method to tune (see hubunlearn unlearn --help), a comma-separated list, or all.")
    parser.add_argument("--config", help="A recipe YAML (path or name) every trial starts from; the searched parameters override it.")
    parser.add_argument("--trials", type=int, default=20, help="Trials to run (per method; added to a resumed study). Default 20.")
    parser.add_argument("--utility_budget", type=float, default=0.9, help="Keep TOFU model utility >= this share (0 < τ <= 1) of the original's. Default 0.9.")
    parser.add_argument("--objective", default="forget_quality", help=f"What to optimise: {', '.join(OBJECTIVES)} (default forget_quality).")
    parser.add_argument("--output", required=True, help="Folder of the trials table, plots, best.yaml (and study.db).")
    parser.add_argument("--study", help="SQLite file of the Optuna study (default OUTPUT/study.db); an existing one of the same search resumes.")
    parser.add_argument("--space", help="Parameters to search, optionally re-ranged: NAME[=LOW:HIGH or A|B],... (default: the method's whole space).")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the sampler and every trial's training (default 0).")
    parser.add_argument("--budget_check_steps", type=int, default=5, help="Check the retain probe every N steps from half a trial's steps on; prune a trial below the budget (0: never).")
    parser.add_argument("--timeout", type=float, help="Stop starting new trials after this many seconds (per method).")
    parser.add_argument("--save_best", metavar="DIR", help="Rerun the best trial (same seed) and save it as an artifact whose card records the search.")
    parser.add_argument("--data", help="TOFU-layout folder for the evaluation (default: the Hub's locuslab/TOFU).")
    parser.add_argument("--forget_split", default="forget10", help="TOFU forget split of the evaluation: forget01, forget05 or forget10.")
    parser.add_argument("--reference", help="Model trained without the forget set (forget quality); its statistics are cached.")
    parser.add_argument("--reference_stats", help="per_example.json of an earlier eval, used as the reference.")
    parser.add_argument("--max_eval_examples", type=int, help="Evaluate the first N rows of each set.")
    parser.add_argument("--eval_batch_size", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    args, unlearn_args = parser.parse_known_args(argv)
    require_optuna()
    config = TuneConfig(method=args.method, output=args.output, trials=args.trials, utility_budget=args.utility_budget,
                        objective=args.objective, recipe=args.config, unlearn_args=unlearn_args, space=args.space, study=args.study,
                        seed=args.seed, budget_check_steps=args.budget_check_steps, timeout=args.timeout, save_best=args.save_best,
                        data=args.data, forget_split=args.forget_split, reference=args.reference, reference_stats=args.reference_stats,
                        max_eval_examples=args.max_eval_examples, eval_batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens)
    quiet_weight_loading()
    try:
        result = run_tune(config)
    except UsageError as error:  # a misspelled flag reaches the unlearn parser: name tune's flag when it is closer
        import difflib

        words = str(error).split()
        if not str(error).startswith("unrecognized argument"):
            raise
        flag, theirs = words[2].rstrip(":"), words[6].rstrip("?") if words[3:6] == ["did", "you", "mean"] else ""
        ours = did_you_mean(flag, parser)[len(": did you mean "):-1]
        if ours and difflib.SequenceMatcher(None, flag, ours).ratio() > difflib.SequenceMatcher(None, flag, theirs).ratio():
            raise UsageError(f"unrecognized argument {flag}: did you mean {ours}? (see hubunlearn tune --help)") from None
        raise
    for method, reason in result.skipped.items():
        print(f"hubunlearn: skipped {method}: {reason}")
    for method, files in result.files.items():
        best = files.get("best")
        print(f"hubunlearn: {method}: trials in {files['json']} and {files['csv'].name}, plots {files['pareto'].name} and "
              f"{files['importance'].name}; " + (f"best setting in {best}" if best else "no trial kept model utility within the budget"))
    if result.comparison:
        print(comparison_table(result.comparison, config.objective))
    if result.saved:
        print(f"hubunlearn: saved the best trial's artifact to {result.saved}")
    return 0


def _quickstart(argv: list[str]) -> int:
    from .quickstart import format_report, run_quickstart

    parser = _Parser(prog="hubunlearn quickstart", description=COMMANDS["quickstart"])
    parser.add_argument("--output_dir", default="quickstart-output", help="Where the adapter and unlearning.json go.")
    args = parser.parse_args(argv)
    quiet_weight_loading()
    print(format_report(run_quickstart(args.output_dir)))
    return 0


HANDLERS = {"unlearn": _unlearn, "eval": _eval, "push": _push, "bench": _bench, "trace": _trace, "space": _space, "tune": _tune,
            "quickstart": _quickstart}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="hubunlearn",
        description="Make causal language models forget, measure it, and publish the result on the Hugging Face Hub.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<12}{text}" for name, text in COMMANDS.items())
        + "\n\nRun 'hubunlearn COMMAND --help' for a command's options, 'hubunlearn --version' for the version.",
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    if argv[:1] == ["--version"]:
        from . import __version__

        print(f"hubunlearn {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"hubunlearn: error: unknown command '{argv[0]}': choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from .artifacts import sigterm_unwinds

    with command_messages(), sigterm_unwinds():  # errors name this command's flags; SIGTERM cleans up like Ctrl-C
        try:
            with command_output():
                return HANDLERS[argv[0]](argv[1:])
        except HubUnlearnError as error:
            print(f"hubunlearn: error: {error}", file=sys.stderr)
            return error.exit_code
        except KeyboardInterrupt:
            print("hubunlearn: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
