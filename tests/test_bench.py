"""`hubunlearn bench run`: the runner on a tiny two-method configuration, its bad input, and the README table."""

import json
import math

import pytest

from hubunlearn.bench import BENCH_BEGIN, BENCH_END, SCHEMA, BenchConfig, growth, label_offsets, results_path, table
from hubunlearn.errors import UsageError

from .conftest import REPO, TOFU

TINY = {"num_authors": 2, "hidden_size": 64, "num_layers": 1, "epochs": 2}


def test_runner_writes_valid_json_and_the_plot_and_never_mixes_or_drops_runs(run_cli, tmp_path):
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    stale = results_path(results_dir, "cpu")
    stale.write_text(json.dumps({"schema": SCHEMA - 1, "runs": [{"method": "ga", "tau": None}]}))
    common = ["--split", "forget01", "--authors", "2", "--hidden_size", "64", "--num_layers", "1", "--epochs", "2",
              "--steps", "3", "--max_eval_examples", "6", "--no_scaling", "--data", TOFU, "--results_dir", results_dir]
    code, _, err = run_cli("bench", "run", "--methods", "graddiff,kuda", "--tau", "0.9", *common)
    assert code == 2 and "holds an older benchmark (schema" in err and "--fresh to replace" in err.strip().splitlines()[-1]
    assert json.loads(stale.read_text())["runs"] == [{"method": "ga", "tau": None}]  # refused, not dropped
    code, out, err = run_cli("bench", "run", "--methods", "graddiff,kuda", "--tau", "0.9", "--fresh", *common)
    assert code == 0, err
    results = json.loads(stale.read_text())
    assert results["schema"] == SCHEMA and results["machine"]["device"] == "cpu" and results["machine"]["cores"] >= 1
    runs = {(r["method"], r["tau"]) for r in results["runs"]}
    assert runs == {("graddiff", None), ("graddiff", 0.9), ("kuda", None), ("kuda", 0.9)}  # the stale "ga" run is gone
    for run in results["runs"]:
        assert 0 <= run["forget_quality"] <= 1 and 0 <= run["model_utility"] <= 1
        assert run["steps"] == 3 and run["step_seconds"] > 0 and run["peak_memory_bytes"] > 0 and run["artifact_bytes"] > 1000
        assert 0 <= run["forget_extraction_strength"] <= 1 and 0 <= run["retain_extraction_strength"] <= 1
        assert run["code"] == results["runs"][0]["code"] and "commit" in run["code"]  # the code measured, one version
    assert "Measured at " in table(results) and "versions of the code" not in table(results)
    assert results["evaluation"]["seconds_per_100"] > 0
    assert (results_dir / "pareto_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert table(results) in out

    # the same settings: a later run adds its methods to the file instead of starting over
    code, _, err = run_cli("bench", "run", "--methods", "eco", "--tau", "0.9", *common)
    assert code == 0, err
    merged = json.loads(stale.read_text())
    assert [(r["method"], r["tau"]) for r in merged["runs"]] == [("graddiff", None), ("graddiff", 0.9), ("kuda", None),
                                                                  ("kuda", 0.9), ("eco", None)]
    eco = merged["runs"][-1]
    assert eco["step_seconds"] is None and eco["prefill_overhead"]["flagged"] > 0 and "no steps (made in" in table(merged)
    older = {**merged, "runs": [*merged["runs"][:-1], {**eco, "code": {"commit": "0000000", "uncommitted": {}}}]}
    assert "measured at 2 versions of the code" in table(older) and "commit 0000000" in table(older)

    # other settings: refused before any work, naming what differs, and the file keeps every run
    code, _, err = run_cli("bench", "run", "--methods", "ga", "--tau", "0.5", *common)
    assert code == 2 and "tau 0.9 there, 0.5 here" in err.strip().splitlines()[-1], err
    assert json.loads(stale.read_text()) == merged


@pytest.mark.parametrize("argv, message", [
    (["--methods", "GradDiff,forgetall"], "unknown method 'forgetall': choose one of ga, graddiff"),
    (["--split", "forget20"], "unknown forget split 'forget20'"),
    (["--steps", "0"], "--steps and --batch_size must be at least 1"),
    (["--tau", "1.5"], "--tau must be in (0, 1]"),
    (["--tune_trials", "-1"], "--tune_trials must be at least 0"),
    (["--tune_trials", "2", "--tau", "0"], "--tau 0 turns the utility budget off, and the tuned rows search within one"),
    (["--tune_trials", "2", "--methods", "eco"], "ECO trains no weights, so it has no tuned row"),
    (["--tofu_mini", "/no/such/build"], "--tofu_mini is a built TOFU-mini, with its own data: leave out --data"),
    (["--no_shared"], "--no_shared leaves nothing to measure: add --tune_trials N"),
    (["--reuse_searches"], "--reuse_searches re-measures tuned rows: add --tune_trials N"),
    (["--results_dir", "/no/such/folder"], "results folder /no/such/folder does not exist"),
    (["--readme", "/no/such/README.md"], "has no benchmark table markers"),
])
def test_bench_run_bad_input(run_cli, argv, message):
    code, _, err = run_cli("bench", "run", "--data", TOFU, *argv)
    assert code == 2 and message in err.strip().splitlines()[-1], err


def test_growth_reads_slopes():
    assert growth([1, 2, 4], [3, 6, 12]) == {"slope": 1.0, "reading": "about linear"}
    assert growth([1, 2, 4], [5, 5, 5])["reading"] == "about constant"
    assert growth([1, 10, 100], [1, 1000, 1e6])["reading"] == "superlinear"
    assert math.isnan(growth([1], [1])["slope"])
    with pytest.raises(UsageError, match="unknown method"):
        BenchConfig(methods=("nope",))


def test_readme_table_is_generated_from_the_committed_json():
    path = results_path(REPO / "benchmarks" / "results", "cpu")
    results = json.loads(path.read_text())
    assert results["schema"] == SCHEMA
    readme = (REPO / "README.md").read_text()
    assert f"{BENCH_BEGIN}\n{table(results)}\n{BENCH_END}" in readme
    assert (REPO / "benchmarks" / "results" / "pareto_cpu.png").is_file()


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.parametrize("points", [
    [(500.0, 300.0)] * 2 + [(503.0, 301.0), (498.0, 296.0), (510.0, 305.0), (505.0, 290.0), (499.0, 310.0)],  # the τ squares
    [(100.0 + 7 * i, 200.0 + 3 * (i % 3)) for i in range(9)] + [(790.0, 50.0), (795.0, 52.0)],  # a row, two at the right edge
])
def test_labels_never_overlap_each_other_or_a_point(points):
    widths = [40.0 + 10 * (i % 3) for i in range(len(points))]
    offsets = label_offsets(points, widths, height=12, gap=9, right_edge=800)
    boxes = [(x + dx, y + dy - 6, w) for (x, y), (dx, dy), w in zip(points, offsets, widths)]
    for i, (left, bottom, width) in enumerate(boxes):
        assert left + width <= 800 + 1e-6
        for other_left, other_bottom, other_width in boxes[i + 1:]:
            assert left >= other_left + other_width or other_left >= left + width or abs(bottom - other_bottom) >= 12 - 1e-6
        for x, y in points:
            assert left >= x + 9 or x - 9 >= left + width or bottom >= y + 9 - 1e-6 or y - 9 >= bottom + 12 - 1e-6


def test_bench_plot_redraws_from_the_json_alone(run_cli, tmp_path):
    committed = results_path(REPO / "benchmarks" / "results", "cpu")
    (tmp_path / committed.name).write_text(committed.read_text())
    code, out, err = run_cli("bench", "plot", "--results_dir", tmp_path)
    assert code == 0, err
    assert out.strip() == f"hubunlearn: redrew {tmp_path / 'pareto_cpu.png'}" and png_size(tmp_path / "pareto_cpu.png")[0] > 800
    code, _, err = run_cli("bench", "plot", "--results_dir", tmp_path, "--device", "cuda")
    assert code == 2 and err.count("\n") == 1 and "no results at" in err and "hubunlearn bench run" in err


def test_the_trace_title_fits_and_names_the_token_rule(tmp_path):
    import torch

    from hubunlearn.kuda.tracing import TraceResult, plot_trace, trace_title

    for rule, words in (("prompt", "every prompt token noised"), ("subject", "restored at each name's last token")):
        result = TraceResult(torch.rand(8, 4), torch.ones(8), torch.zeros(8), 0.1, [1, 2], rule)
        title = trace_title("Causal tracing of /a/rather/long/local/path/to/some-unlearned-checkpoint-folder's FFN layers", result, 60)
        assert words in title.replace("\n", " ") and "chosen layers [1, 2]" in title.replace("\n", " ")
        assert max(len(line) for line in title.splitlines()) <= 60
        path = plot_trace(result, tmp_path / f"{rule}.png", "Causal tracing of /a/rather/long/local/path/to/some-unlearned-checkpoint-folder's FFN layers")
        # 5.5 inches at 100 dpi, plus bbox_inches="tight"'s 0.1-inch pads: a title wider than the figure would widen it
        assert png_size(path)[0] <= 5.5 * 100 + 2 * 10


def test_a_terminated_run_stops_its_child(tmp_path):
    """SIGTERM to a bench process (a scheduler's stop, `kill`) ends the spawned child that measures a run, too."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script, pid_file = tmp_path / "run.py", tmp_path / "child.pid"
    script.write_text(
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "def sleeper(path):\n"
        "    Path(path).write_text(str(os.getpid()))\n"
        "    time.sleep(120)\n"
        "if __name__ == '__main__':\n"
        "    from hubunlearn.bench import _in_child\n"
        "    _in_child(sleeper, sys.argv[1])\n")
    parent = subprocess.Popen([sys.executable, str(script), str(pid_file)])
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        child = int(pid_file.read_text())
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the child outlived its terminated parent")
    finally:
        parent.kill()


def test_the_tuned_table_says_when_no_trial_kept_the_budget_and_how_far_each_row_is_from_eco():
    from hubunlearn.bench import distance_to_eco, tuned_table

    eco = {"method": "eco", "tau": None, "forget_quality": 0.5, "model_utility": 0.9}
    search = {"trials": 6, "pruned": 2, "within_budget": 0, "search_seconds": 90.0, "eval_examples": 50, "utility_budget": 0.9,
              "params": None}
    results = {"original": {"model_utility": 0.92}, "runs": [
        {"method": "npo", "tau": None, "forget_quality": None, "model_utility": None, "tuned": search},
        {"method": "graddiff", "tau": None, "forget_quality": 5e-4, "model_utility": 0.91,
         "tuned": {**search, "within_budget": 3, "params": {"learning_rate": 3e-5, "max_steps": 40}}}, eco]}
    text = tuned_table(results)
    assert "| npo | 6 (2, 0) | 1.5 min | no trial within the budget |" in text
    assert "| graddiff | 6 (2, 3) | 1.5 min | lr 3e-05, steps 40 | 0.0005 | 0.910 (0.99×) | 3.0 orders below (at ≥ ECO's utility) | – |" in text
    held = {"rows": 50, "searched": {"forget_quality": 4e-3, "original_forget_quality": 2e-5, "utility_kept": 0.991},
            "held_out": {"forget_quality": 2.5e-4, "utility_kept": None}}
    assert "| 0.004 (original 2e-05), 0.99× → 0.00025, – (50 rows each) |" in tuned_table({**results, "runs": [{**results["runs"][1], "held_out": held}]})
    edited = {**results["runs"][1], "tuned": search}  # a row with numbers but no setting (a hand-edited file) says so
    assert "| graddiff | 6 (2, 0) | 1.5 min | no trial within the budget |" in tuned_table({**results, "runs": [edited]})
    assert distance_to_eco({"forget_quality": 0.8, "model_utility": 0.5}, eco) == "0.2 orders above (at lower utility)"
    assert distance_to_eco({"forget_quality": 0.8, "model_utility": 0.5}, {**eco, "forget_quality": None}) == "–"
    assert tuned_table({"runs": [eco]}) == ""
    below = {**results["runs"][1], "model_utility": 0.8}  # measured on every row, it fell below the budget its search kept
    assert "0.800 (0.87× ⚠)" in tuned_table({**results, "runs": [below, eco]})
    assert "the original's;" in tuned_table({"original": {"model_utility": None}, "runs": [below]})


def test_a_results_file_with_no_point_still_plots(tmp_path):
    from hubunlearn.bench import pareto_plot

    results = {"settings": {"steps": 50, "tau": 0.9}, "tofu_mini": {"settings": {"forget_split": "forget10"}},
               "runs": [{"method": "ga", "tau": None, "forget_quality": None, "model_utility": None, "tuned": {"trials": 3}}]}
    assert pareto_plot(results, tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tuned_rows_refuse_an_original_without_utility_before_any_run(run_cli, tmp_path):
    # two epochs teach the tiny TOFU-mini no answer it can generate: model utility 0, no share of it to keep
    code, _, err = run_cli("bench", "run", "--methods", "npo", "--tune_trials", "2", "--no_shared", "--split", "forget01",
                           "--authors", "2", "--hidden_size", "64", "--num_layers", "1", "--epochs", "2", "--max_eval_examples", "6",
                           "--no_scaling", "--data", TOFU, "--results_dir", tmp_path)
    assert code == 2 and "the tuned rows keep a share of the original's model utility, which is 0" in err.strip().splitlines()[-1], err
    assert list(tmp_path.iterdir()) == []
