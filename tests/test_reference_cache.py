"""`hubunlearn eval --reference`: cached reference statistics are reused only for the same weights, rows and settings,
say where they came from, and survive concurrent writers and damaged cache files (issue 15)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from huggingface_hub import HfApi

from .conftest import HUB_TOKEN

ARGS = ("--benchmark", "world", "--metrics", "truth_ratio,forget_quality", "--max_examples", "8")


@pytest.fixture(autouse=True)
def cold_cache(tmp_path, monkeypatch):
    """Each test starts from an empty cache: what it finds there is what it wrote (other xdist workers share the
    session's cache and may have cached the same reference under the same settings)."""
    monkeypatch.setenv("HUBUNLEARN_CACHE", str(tmp_path / "cache"))


def evaluate(run_cli, model, output, *args):
    code, _, err = run_cli("eval", "--model", model, *ARGS, "--output_dir", output, *args)
    assert code == 0, err
    return json.loads((output / "summary.json").read_text()), err


def quality(summary):
    return summary["aggregates"]["forget_quality"]["value"]


def test_a_reference_folder_replaced_by_other_weights_is_evaluated_anew(run_cli, world_model_dir, world_reference_dir, tmp_path):
    # The case: --reference refdir (retain-only), then refdir replaced by a copy of the evaluated model.
    refdir = tmp_path / "refdir"
    shutil.copytree(world_reference_dir, refdir)
    first, err = evaluate(run_cli, world_model_dir, tmp_path / "e1", "--reference", refdir)
    source = first["reference_source"]
    assert source["reference"] == str(refdir) and len(source["fingerprint"]) == 64 and source["cached"] is False
    assert f"computed the reference statistics of {refdir} (weights sha256 {source['fingerprint'][:16]}" in err
    assert quality(first) < 0.5

    shutil.rmtree(refdir)
    shutil.copytree(world_model_dir, refdir)
    second, err = evaluate(run_cli, world_model_dir, tmp_path / "e2", "--reference", refdir)
    assert "reusing" not in err and second["reference_source"]["cached"] is False
    assert second["reference_source"]["fingerprint"] != source["fingerprint"]
    assert quality(second) == pytest.approx(1.0)  # the model against itself

    # The same weights under another path: content-keyed, so the first run's statistics are reused, and said so.
    moved = tmp_path / "elsewhere"
    shutil.copytree(world_reference_dir, moved)
    third, err = evaluate(run_cli, world_model_dir, tmp_path / "e3", "--reference", moved)
    assert f"reusing the reference statistics of {moved} (weights sha256 {source['fingerprint'][:16]}…, cached statistics)" in err
    assert third["reference_source"] == {**source, "reference": str(moved), "cached": True}
    assert quality(third) == quality(first)
    assert f"{'reference':<24}{moved} (weights sha256" in run_cli("eval", "--model", world_model_dir, *ARGS, "--reference", moved,
                                                               "--output_dir", tmp_path / "e4")[1]


@pytest.mark.parametrize("change", [["--max_new_tokens", "8"], ["--metrics", "truth_ratio,rouge,forget_quality"], ["--max_examples", "6"]],
                         ids=["max_new_tokens", "metrics", "max_examples"])
def test_other_settings_never_reuse_an_entry(run_cli, world_model_dir, world_reference_dir, tmp_path, change):
    evaluate(run_cli, world_model_dir, tmp_path / "e1", "--reference", world_reference_dir)
    changed, err = evaluate(run_cli, world_model_dir, tmp_path / "e2", "--reference", world_reference_dir, *change)
    assert "reusing" not in err and changed["reference_source"]["cached"] is False
    again, err = evaluate(run_cli, world_model_dir, tmp_path / "e3", "--reference", world_reference_dir, *change)
    assert "reusing" in err and again["reference_source"]["cached"] is True and again["aggregates"] == changed["aggregates"]


def write_tofu_layout(folder, forget, retain):
    folder.mkdir(exist_ok=True)
    for name, rows in (("forget01_perturbed", forget), ("retain_perturbed", retain), ("real_authors_perturbed", retain),
                       ("world_facts_perturbed", retain)):
        (folder / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_other_rows_under_the_same_data_path_never_reuse_an_entry(run_cli, world_model_dir, world_reference_dir, world, tmp_path):
    data = tmp_path / "tofu-like"
    forget, retain = world.rows("forget")[:6], world.rows("retain")[:4]
    write_tofu_layout(data, forget, retain)
    args = ("--data", data, "--forget_split", "forget01", "--metrics", "probability,truth_ratio,forget_quality", "--reference", world_reference_dir)
    code, _, err = run_cli("eval", "--model", world_model_dir, *args, "--output_dir", tmp_path / "e1")
    assert code == 0, err
    # Same questions, same path; the answers are now the first perturbed (wrong) ones.
    write_tofu_layout(data, [{**r, "answer": r["perturbed_answer"][0]} for r in forget], retain)
    code, _, err = run_cli("eval", "--model", world_model_dir, *args, "--output_dir", tmp_path / "e2")
    assert code == 0, err
    assert "reusing" not in err
    first, second = (json.loads((tmp_path / e / "summary.json").read_text()) for e in ("e1", "e2"))
    assert second["reference_source"]["cached"] is False
    assert second["reference"]["forget"]["probability"] != first["reference"]["forget"]["probability"]


def _edit_entry(change):
    def damage(text):
        entry = json.loads(text)
        change(entry)
        return json.dumps(entry)
    return damage


@pytest.mark.parametrize("damage", [
    lambda text: text[: len(text) // 2], lambda text: "{}", lambda text: "",
    _edit_entry(lambda e: e.update(per_example={})),  # valid JSON, the right key, no statistics
    _edit_entry(lambda e: e["per_example"].update(forget=[{"x": 1}])),  # rows of nothing
    _edit_entry(lambda e: e["per_example"]["forget"][0].update(truth_ratio=0.123)),  # a number edited by hand
], ids=["truncated", "no-entry", "empty", "no-statistics", "foreign-rows", "edited-number"])
def test_a_damaged_cache_entry_is_recomputed(run_cli, world_model_dir, world_reference_dir, tmp_path, damage):
    first, _ = evaluate(run_cli, world_model_dir, tmp_path / "e1", "--reference", world_reference_dir)
    entry = first["reference_source"]["cache_file"]
    with open(entry) as file:
        text = file.read()
    with open(entry, "w") as file:
        file.write(damage(text))
    second, err = evaluate(run_cli, world_model_dir, tmp_path / "e2", "--reference", world_reference_dir)
    assert ("is unreadable" in err or "is damaged" in err) and "reusing" not in err and second["reference_source"]["cached"] is False
    assert second["aggregates"] == first["aggregates"]
    with open(entry) as file:
        assert json.load(file)["reference_source"]["fingerprint"] == first["reference_source"]["fingerprint"]  # rewritten whole


def test_reference_stats_file_is_named_with_its_hash(run_cli, world_model_dir, tmp_path):
    evaluate(run_cli, world_model_dir, tmp_path / "e1")
    stats = tmp_path / "e1" / "per_example.json"
    summary, _ = evaluate(run_cli, world_model_dir, tmp_path / "e2", "--reference_stats", stats)
    assert summary["reference_source"] == {"reference_stats": str(stats), "sha256": hashlib.sha256(stats.read_bytes()).hexdigest()}
    for content, message in (('{"forget": [', "is not JSON"), ("[]", "holds no statistics of these forget questions"),
                             ('{"forget": [{"x": 1}]}', "holds no statistics of these forget questions")):
        broken = tmp_path / "broken.json"
        broken.write_text(content)
        code, _, err = run_cli("eval", "--model", world_model_dir, *ARGS, "--reference_stats", broken, "--output_dir", tmp_path / "e3")
        assert code == 2 and f"--reference_stats {broken} {message}" in err.strip().splitlines()[-1] and "Traceback" not in err, err


def test_a_hub_reference_is_pinned_by_its_commit(run_cli, world_model_dir, world_reference_dir, hub_token, tmp_path):
    api, repo = HfApi(token=HUB_TOKEN), "tester/world-reference"
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(folder_path=str(world_reference_dir), repo_id=repo)
    first, _ = evaluate(run_cli, world_model_dir, tmp_path / "e1", "--reference", repo)
    assert first["reference_source"]["commit"] == api.model_info(repo).sha and quality(first) < 0.5
    api.upload_folder(folder_path=str(world_model_dir), repo_id=repo, ignore_patterns=["README.md"])  # new weights, same id
    second, err = evaluate(run_cli, world_model_dir, tmp_path / "e2", "--reference", repo)
    assert "reusing" not in err and second["reference_source"]["commit"] == api.model_info(repo).sha != first["reference_source"]["commit"]
    assert quality(second) == pytest.approx(1.0)


def test_two_concurrent_evals_against_one_reference_both_get_it_right(world_model_dir, world_reference_dir, tmp_path, run_cli, monkeypatch):
    cache = tmp_path / "cache"  # cold: both processes compute the reference and write the same entry at once
    env = {**os.environ, "HUBUNLEARN_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "hubunlearn.cli", "eval", "--model", str(world_model_dir), *ARGS,
               "--reference", str(world_reference_dir), "--output_dir"]
    runs = [subprocess.Popen([*command, str(tmp_path / f"e{i}")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]
    for run in runs:
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err
    summaries = [json.loads((tmp_path / f"e{i}" / "summary.json").read_text()) for i in range(2)]
    entries = list((cache / "reference-stats").iterdir())
    assert [e.name for e in entries if e.name.startswith(".")] == []  # no temporary file left behind
    assert len(entries) == 1 and json.loads(entries[0].read_text())["reference_source"]["fingerprint"] == summaries[0]["reference_source"]["fingerprint"]
    monkeypatch.setenv("HUBUNLEARN_CACHE", str(cache))
    single, err = evaluate(run_cli, world_model_dir, tmp_path / "single", "--reference", world_reference_dir)
    assert "reusing" in err
    assert summaries[0]["aggregates"] == summaries[1]["aggregates"] == single["aggregates"]
    assert summaries[0]["reference"] == summaries[1]["reference"] == single["reference"]


def test_the_fingerprint_covers_the_weights_and_the_base_an_adapter_loads(world_model_dir, world_reference_dir, tmp_path):
    from hubunlearn.evaluate import model_identity
    from hubunlearn.quickstart import cache_root

    base = tmp_path / "base"
    shutil.copytree(world_reference_dir, base)
    time.sleep(2.1)  # files changed in the last 2 s are hashed but not remembered: let these be remembered
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base), "peft_type": "LORA"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    fingerprint = model_identity(str(adapter))["fingerprint"]
    remembered = json.loads((cache_root() / "file-hashes.json").read_text())
    assert any(key.startswith(f"{next(base.glob('*.safetensors')).resolve()}|") for key in remembered)
    (adapter / "README.md").write_text("# an edited card\n")  # describes the model, changes nothing it computes
    assert model_identity(str(adapter))["fingerprint"] == fingerprint
    weights = next(base.glob("*.safetensors"))
    before = weights.stat()
    weights.write_bytes((world_model_dir / weights.name).read_bytes())  # the base under the adapter changed, in place,
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size, same mtime: the remembered hash must not serve
    assert weights.stat().st_size == before.st_size
    assert model_identity(str(adapter))["fingerprint"] != fingerprint
    assert model_identity(str(base)) != model_identity(str(world_reference_dir))

