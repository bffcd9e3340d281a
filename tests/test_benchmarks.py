"""The README's benchmark tables are generated from the committed results, never typed by hand."""

import importlib.util
import json
import sys

import pytest

from hubunlearn.benchmarking import replace_between

from .conftest import REPO, TOFU


def load_benchmark(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["methods_world", "tofu_mini_eval", "eco_tofu_mini", "eco_heldout", "fila_controls", "kuda_tofu_mini", "parity_graddiff", "eval_speed", "scale", "eval_cost"])
def test_readme_table_matches_the_committed_results(name, tmp_path):
    bench = load_benchmark(name)
    results = json.loads(bench.RESULTS.read_text())
    assert results["schema"] == bench.SCHEMA and {"cores", "torch", "device"} <= set(results["machine"])
    readme = (REPO / "README.md").read_text()
    generated = f"{bench.BEGIN}\n{bench.table(results)}\n{bench.END}"
    assert generated in readme
    copy = tmp_path / "README.md"
    copy.write_text(readme.replace(generated, f"{bench.BEGIN}\nstale\n{bench.END}"))
    replace_between(copy, bench.BEGIN, bench.END, bench.table(results))
    assert copy.read_text() == readme


def test_methods_table_covers_every_method():
    from hubunlearn.trainers import METHODS

    results = json.loads(load_benchmark("methods_world").RESULTS.read_text())
    assert {r["method"] for r in results["runs"]} == set(METHODS)


@pytest.mark.skipif(not TOFU.is_dir(), reason=f"TOFU data not found at {TOFU}")
def test_gpu_check_runs_end_to_end_on_a_cpu_with_its_tiny_configuration(tmp_path):
    """benchmarks/gpu_check.py --tiny, in process: TOFU-mini built, method runs, ECO, an eval, the Space's generation.
    To stay a few seconds it runs two methods' runs (NPO: a reference and LoRA; KUDA: hooks and causal tracing),
    each full and LoRA, with and without gradient checkpointing; `python benchmarks/gpu_check.py --tiny --output
    PATH` runs them all (about a minute)."""
    check = load_benchmark("gpu_check")
    results = check.run_checks(check.TINY, TOFU, "tiny", work=tmp_path / "work", methods=("npo", "kuda"))
    status = {c["name"]: c["status"] for c in results["checks"]}
    assert {name: c["error"] for name, c in ((c["name"], c) for c in results["checks"]) if c["status"] == "failed"} == {}
    assert {name for name, s in status.items() if s == "skipped"} == {
        "kuda lora", "kuda lora +gc", "2 GPUs ddp npo", "2 GPUs fsdp npo", "2 GPUs fsdp kuda"}  # no LoRA mode; one GPU at most
    assert {name for name, s in status.items() if s == "ok"} == {
        "build TOFU-mini", "npo full", "npo full +gc", "npo lora", "npo lora +gc", "kuda full", "kuda full +gc", "eco",
        "eval (npo full vs reference)", "eval (eco bundle)", "space generation (full)", "space generation (lora)", "space generation (eco)"}
    assert results["counts"] == {"ok": 13, "failed": 0, "skipped": 5}
    assert all(c["seconds"] >= 0 and c["peak_memory_mib"] > 0 for c in results["checks"])
    runs = {c["name"]: c for c in results["checks"]}
    assert runs["npo full"]["steps"] == check.TINY.steps and runs["npo lora +gc"]["tensors_moved"] > 0
    assert set(runs["space generation (lora)"]["answers"]) == {"original", "unlearned"}
    from hubunlearn.modeling import resolve_device

    here = resolve_device("auto").type  # eval and Space place their models here by default (the GPU on a GPU machine)
    assert runs["eval (npo full vs reference)"]["device"].split(":")[0] == runs["eval (eco bundle)"]["device"].split(":")[0] == here
    assert {d.split(":")[0] for kind in ("full", "lora", "eco") for d in runs[f"space generation ({kind})"]["devices"].values()} == {here}
    assert "table" not in results and "npo lora +gc" in check.table(results)
    json.dumps(results)


def test_a_failing_gpu_check_is_recorded_and_the_next_one_still_runs():
    check = load_benchmark("gpu_check")
    checks = []
    check.run_check("broken", lambda: 1 / 0, checks)
    check.run_check("not here", lambda: (_ for _ in ()).throw(check.Skip("needs two GPUs, found 0")), checks)
    check.run_check("fine", lambda: {"steps": 2}, checks)
    assert [(c["status"], c.get("error") or c.get("reason")) for c in checks] == [
        ("failed", "ZeroDivisionError: division by zero"), ("skipped", "needs two GPUs, found 0"), ("ok", None)]
    assert checks[2]["steps"] == 2
