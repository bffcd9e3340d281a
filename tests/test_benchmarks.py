"""The README's benchmark tables are generated from the committed results, never typed by hand."""

import importlib.util
import json

import pytest

from hubunlearn.benchmarking import replace_between

from .conftest import REPO


def load_benchmark(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["methods_world", "tofu_mini_eval", "eco_tofu_mini", "eco_heldout", "fila_controls", "kuda_tofu_mini", "parity_graddiff"])
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
