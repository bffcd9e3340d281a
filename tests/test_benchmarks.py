"""The README's benchmark table is generated from the committed results, never typed by hand."""

import importlib.util
import json

from .conftest import REPO


def load_benchmark():
    spec = importlib.util.spec_from_file_location("methods_world", REPO / "benchmarks" / "methods_world.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_matches_the_committed_results(tmp_path):
    bench = load_benchmark()
    results = json.loads(bench.RESULTS.read_text())
    assert results["schema"] == bench.SCHEMA and {r["method"] for r in results["runs"]} >= {"ga", "graddiff", "kl", "npo", "simnpo", "ihl"}
    readme = (REPO / "README.md").read_text()
    assert f"{bench.BEGIN}\n{bench.table(results)}\n{bench.END}" in readme
    copy = tmp_path / "README.md"
    copy.write_text(readme.replace("| ihl | lora |", "| ihl | LORA |"))
    bench.write_table(results, copy)
    assert copy.read_text() == readme
