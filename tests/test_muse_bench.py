"""`hubunlearn bench muse`: MUSE's scalability and sustainability criteria on a MUSE-layout fixture folder, through the CLI."""

import json
import shutil
import struct

import pytest

from hubunlearn.muse_bench import BENCH_MARKERS
from hubunlearn.testing import muse_articles, write_muse_folder

from .test_cli import assert_one_error_line

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Three NPO steps per request at a high learning rate on a random tiny model: every text's likelihood falls by a
# clear margin, so where each step started from shows in the numbers.
UNLEARN = ["--", "--max_length", "32", "--max_steps", "3", "--learning_rate", "1e-2", "--gradient_accumulation_steps", "1",
           "--per_device_train_batch_size", "2", "--warmup_steps", "0", "--disable_tqdm", "true", "--no_utility_guard"]


@pytest.fixture(scope="module")
def muse_dir(tmp_path_factory):
    return write_muse_folder(tmp_path_factory.mktemp("muse-bench") / "data")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from hubunlearn.world import tiny_llama, train_tokenizer

    texts = [row[k] for rows in muse_articles().values() for row in rows for k in ("text", "question", "answer")]
    tokenizer = train_tokenizer(texts + ["Question: Answer:\n\n"], vocab_size=400)
    folder = tmp_path_factory.mktemp("muse-bench-model") / "model"
    tiny_llama(tokenizer, hidden_size=32, num_layers=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def bench(run_cli, model, data, output, criterion, *extra, unlearn=UNLEARN):
    return run_cli("bench", "muse", "--criterion", criterion, "--model", model, "--data", data, "--output_dir", output,
                   "--max_examples", "2", "--batch_size", "8", *extra, *unlearn)


def png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def forget_1_min_k(output, step):
    """Mean Min-K% of the first two privleak forget texts (with --max_examples 2: exactly sust@forget_1's texts)."""
    rows = json.loads((output / "steps" / str(step) / "per_example.json").read_text())["privleak_forget"]
    return sum(r["min_k"] for r in rows) / len(rows)


def test_scalability_unlearns_growing_forget_sets_each_from_the_target(run_cli, tiny_model, muse_dir, tmp_path):
    output = tmp_path / "scal"
    readme = tmp_path / "README.md"
    begin, end = BENCH_MARKERS["scal"]
    readme.write_text(f"# results\n{begin}\nold\n{end}\ntail\n")
    code, out, err = bench(run_cli, tiny_model, muse_dir, output, "scal", "--folds", "2", "--readme", readme)
    assert code == 0, err
    results = json.loads((output / "results.json").read_text())
    assert results["folds"]["rows"] == [2, 4]  # nested forget sets of growing size
    assert [(s["step"], s["forget"], s["forget_rows"], s["start"]) for s in results["steps"]] == [
        (0, None, 0, None), (1, "scal@forget_1", 2, "target"), (2, "scal@forget_2", 4, "target")]
    assert results["method"] == "npo" and results["recipe"].endswith("npo-muse-news.yaml")
    assert all(s["optimizer_steps"] == 3 for s in results["steps"][1:])
    assert set(results["metrics"]) == {"verbmem_f", "knowmem_f", "knowmem_r", "privleak"}
    for step in results["steps"]:
        summary = json.loads((output / "steps" / str(step["step"]) / "summary.json").read_text())
        assert step["metrics"] == {name: value["value"] for name, value in summary["aggregates"].items()}
    # Each step starts from the target: three steps from it lower forget_1 about as much the second time as the first
    target, first, second = (forget_1_min_k(output, k) for k in range(3))
    assert first < target - 0.3 and abs(second - first) < 0.3, (target, first, second)
    table = (output / "table.md").read_text()
    assert "| 2 | scal@forget_2 | 4 | target |" in table and "KnowMem on retain (utility) ↑" in table and "MUSE scalability" in table
    assert table.strip() in out and table.strip() in readme.read_text() and "old" not in readme.read_text()
    assert readme.read_text().endswith(f"{end}\ntail\n")
    width, height = png_size(output / "plot.png")
    assert (width, height) == (1100, 420)  # two panels: ROUGE metrics and PrivLeak
    assert not (output / "models").exists() and not list(tmp_path.glob(".scal*"))  # the step models are gone


def test_sustainability_chains_each_request_on_the_previous_model(run_cli, tiny_model, muse_dir, tmp_path):
    output = tmp_path / "sust"
    code, _, err = bench(run_cli, tiny_model, muse_dir, output, "sust", "--folds", "3", "--metrics", "knowmem_r,privleak")
    assert code == 0, err
    results = json.loads((output / "results.json").read_text())
    assert [(s["forget"], s["forget_rows"], s["start"]) for s in results["steps"]] == [
        (None, 0, None), ("sust@forget_1", 2, "target"), ("sust@forget_2", 2, "step 1"), ("sust@forget_3", 2, "step 2")]
    assert results["metrics"] == ["knowmem_r", "privleak"]
    # Step k starts from step k-1's model: forget_1's likelihood keeps falling (from the target it would come back up
    # to about step 1's level, as the scalability test shows)
    values = [forget_1_min_k(output, k) for k in range(4)]
    assert all(later < earlier - 0.3 for earlier, later in zip(values, values[1:])), values
    table = (output / "table.md").read_text()
    assert "| 3 | sust@forget_3 | 2 | step 2 |" in table and "VerbMem" not in table
    assert png_size(output / "plot.png") == (1100, 420)


@pytest.mark.parametrize("change, message", [
    ({"--criterion": "scale"}, "unknown criterion 'scale': choose one of scal (scalability), sust (sustainability)"),
    ({"--corpus": "poems"}, "unknown corpus 'poems': choose one of news, books"),
    ({"--data": "{tmp}/no-scal"}, "the MUSE folder {tmp}/no-scal has no 'scal' config: expected a folder {tmp}/no-scal/scal"),
    ({"--criterion": "sust", "--data": "{tmp}/no-fold"}, "cannot read {tmp}/no-fold:sust@forget_3 ("),
    ({"--data": None}, "cannot read muse-bench/MUSE-News:scal@forget_1 ("),  # the tests run offline
    ({"--corpus": "books", "--data": None}, "(offline: pass --data FOLDER holding a copy in MUSE's layout)"),
    ({"--folds": "5"}, "--folds must be in 1..4 (MUSE's scal config has forget_1..forget_4); got 5"),
    ({"--max_examples": "0"}, "--max_examples must be at least 1 (got 0)"),
    ({"--config": "no-such-recipe"}, "recipe 'no-such-recipe' not found"),
    ({"--metrics": "forget_quality"}, "forget_quality is a TOFU metric: --benchmark muse measures"),
    ({"--readme": "{tmp}/plain.md"}, "has no scal table markers"),
    ({"--output_dir": "{tmp}/taken"}, "output folder {tmp}/taken is not empty: choose another --output_dir or pass --overwrite_output_dir"),
    ({"unlearn": ["--", "--forget", "x.json"]}, "--forget after -- is set by the bench (the fold of --criterion)"),
    ({"unlearn": ["--", "--learnin_rate", "1"]}, "unrecognized argument --learnin_rate"),
    ({"unlearn": ["--", "--use_lora", "true"]}, "--use_lora adapters are not supported yet"),
])
def test_bad_bench_muse_input_is_one_line_exit_2_and_nothing_written(run_cli, tiny_model, muse_dir, tmp_path, change, message):
    shutil.rmtree(write_muse_folder(tmp_path / "no-scal") / "scal")
    (write_muse_folder(tmp_path / "no-fold") / "sust" / "forget_3.json").unlink()
    (tmp_path / "plain.md").write_text("# no markers\n")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    flags = {"--criterion": "scal", "--model": str(tiny_model), "--data": str(muse_dir), "--output_dir": str(tmp_path / "never")}
    unlearn = change.pop("unlearn", [])
    flags.update({k: v.format(tmp=tmp_path) if v else v for k, v in change.items()})
    code, _, err = run_cli("bench", "muse", *[part for flag, value in flags.items() if value for part in (flag, value)], *unlearn)
    assert code == 2
    assert_one_error_line(err, message.format(tmp=tmp_path))
    assert not (tmp_path / "never").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]


def test_unlearn_flags_after_dashes_belong_to_bench_muse_only(run_cli, tmp_path):
    code, _, err = run_cli("bench", "plot", "--results_dir", tmp_path, "--", "--learning_rate", "1")
    assert code == 2
    assert_one_error_line(err, "only `hubunlearn bench muse` takes unlearn flags after --; `bench plot` got --learning_rate 1")


def test_a_step_that_fails_mid_run_leaves_nothing_behind(run_cli, tiny_model, tmp_path):
    data = write_muse_folder(tmp_path / "data")
    (data / "sust" / "forget_2.json").write_text(json.dumps([{"text": ""}]))  # passes the checks, fails when step 2 trains
    output = tmp_path / "out"
    code, _, err = bench(run_cli, tiny_model, data, output, "sust", "--folds", "2", "--metrics", "knowmem_r",
                         unlearn=["--", "--max_length", "32", "--max_steps", "1", "--disable_tqdm", "true"])
    assert code == 2
    assert "[sust 1/2] measuring step 1's model" in err  # step 1 ran
    assert_one_error_line(err, "no usable forget example")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no output folder, no temporary one, no step model


def test_sigterm_mid_run_leaves_nothing_behind(tiny_model, muse_dir, tmp_path):
    """`kill` (SIGTERM) during a bench run: exit 143 and no output folder, staged or final (the CLI unwinds SIGTERM
    as it does Ctrl-C, so every staging folder's cleanup runs)."""
    import signal
    import subprocess
    import sys
    import time

    output = tmp_path / "out"
    unlearn = [a if a != "3" else "100000" for a in UNLEARN]  # a run that is still training when it is stopped
    run = subprocess.Popen([sys.executable, "-m", "hubunlearn.cli", "bench", "muse", "--criterion", "sust", "--model", str(tiny_model),
                            "--data", str(muse_dir), "--output_dir", str(output), "--max_examples", "2", *unlearn],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".out.partial-*")) and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.2)
        assert list(tmp_path.glob(".out.partial-*")), "the run never staged its output"
        time.sleep(2)  # well into the first request's training
        run.send_signal(signal.SIGTERM)
        try:
            code = run.wait(timeout=60)
        except subprocess.TimeoutExpired:
            run.kill()
            code = f"still running 60 s after SIGTERM; its stderr:\n{run.communicate()[1][-3000:]}"
        assert code == 128 + signal.SIGTERM
    finally:
        run.kill()
    assert list(tmp_path.iterdir()) == []
