"""The trainers run unchanged under `accelerate launch`: two CPU processes, distinct samples, one artifact.

accelerate 1.x runs `--cpu` scripts in a single process (its multi-CPU path needs mpirun), so two CPU
processes come from its torch.distributed launcher with ACCELERATE_USE_CPU=true, which makes the
Trainer's PartialState pick the gloo backend on CPU.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from hubunlearn.testing import free_port

from .conftest import REPO


def launch(world_model_dir, output, records, mode="full", script="ddp_unlearn.py") -> list[dict]:
    """Run tests/scripts/``script`` on two CPU processes; return what each rank recorded."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    records.mkdir()
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(REPO / "tests" / "scripts" / script), str(world_model_dir), str(output), str(records), mode]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((records / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_processes_draw_different_samples_and_save_one_artifact(world_model_dir, forget_rows, mean_answer_probability, tmp_path):
    output = tmp_path / "ddp"
    ranks = launch(world_model_dir, output, tmp_path / "records")
    assert all(r["world_size"] == 2 for r in ranks)
    steps = [ranks[r]["drawn"] for r in (0, 1)]
    assert len(steps[0]) == len(steps[1]) == 6  # 20 forget rows, 2 ranks x 5 per step, 3 epochs
    for epoch in range(3):
        span = slice(2 * epoch, 2 * epoch + 2)
        forget = [[i for d in steps[r][span] for i in d["forget"]] for r in (0, 1)]
        retain = [[i for d in steps[r][span] for i in d["retain"]] for r in (0, 1)]
        assert sorted(forget[0] + forget[1]) == list(range(20))  # the ranks share the forget set out
        assert len(set(retain[0] + retain[1])) == 20, "two forget examples drew the same retain example"
    assert [d["retain"] for d in steps[0][:2]] != [d["retain"] for d in steps[0][2:4]]  # partners move on between epochs

    record = json.loads((output / "unlearning.json").read_text())
    assert record["hardware"]["num_processes"] == 2 and record["method"] == "GradDiff"
    assert not list(tmp_path.glob(".ddp.partial-*"))
    unlearned = AutoModelForCausalLM.from_pretrained(output)
    assert mean_answer_probability(unlearned, forget_rows) < 0.8 * mean_answer_probability(AutoModelForCausalLM.from_pretrained(world_model_dir), forget_rows)


def test_fila_and_the_utility_budget_under_two_processes(world_model_dir, forget_rows, retain_rows, mean_answer_probability, tmp_path):
    from peft import PeftModel

    output = tmp_path / "ddp-fila"
    ranks = launch(world_model_dir, output, tmp_path / "records", mode="fila")
    assert ranks[0]["initial_adapter_sum"] == ranks[1]["initial_adapter_sum"] != 0  # the same FILA init on both ranks
    record = json.loads((output / "unlearning.json").read_text())
    assert record["hardware"]["num_processes"] == 2 and record["hyperparameters"]["lora_init"] == "fila"
    assert record["calibration"]["value"] >= 0.9 * record["calibration"]["original"]
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world_model_dir), output)
    original = AutoModelForCausalLM.from_pretrained(world_model_dir)
    assert mean_answer_probability(loaded, forget_rows) < mean_answer_probability(original, forget_rows) - 0.05


def test_kuda_under_two_processes_with_checkpointing_traces_the_same_layers_and_edits_only_them(
        world_model_dir, forget_rows, retain_rows, mean_answer_probability, tmp_path):
    from safetensors.torch import load_file

    output = tmp_path / "ddp-kuda"
    ranks = launch(world_model_dir, output, tmp_path / "records", mode="kuda")
    assert ranks[0]["layers"] == ranks[1]["layers"] and ranks[0]["kept"] == ranks[1]["kept"]  # same trace and projector
    assert ranks[0]["engine"] == {"engine": "ddp", "activation_checkpointing": True}
    record = json.loads((output / "unlearning.json").read_text())
    assert record["hardware"]["num_processes"] == 2 and record["kuda"]["layers"] == ranks[0]["layers"]
    original, edited = load_file(str(world_model_dir / "model.safetensors")), load_file(str(output / "model.safetensors"))
    changed = sorted(name for name in original if not (original[name] == edited[name]).all())
    assert changed == [f"model.layers.{i}.mlp.down_proj.weight" for i in ranks[0]["layers"]]
    unlearned, base = AutoModelForCausalLM.from_pretrained(output), AutoModelForCausalLM.from_pretrained(world_model_dir)
    assert mean_answer_probability(unlearned, forget_rows) < mean_answer_probability(base, forget_rows) - 0.2
    assert mean_answer_probability(unlearned, retain_rows) > mean_answer_probability(base, retain_rows) - 0.05


def test_pdu_dual_variable_is_the_same_on_every_process(world_model_dir, tmp_path):
    """Each rank sees its own retain batch, but λ steps on the retain NLL averaged over both: the same λ everywhere."""
    ranks = launch(world_model_dir, tmp_path / "pdu", tmp_path / "records", mode="pdu")
    steps = [r["steps"] for r in ranks]
    assert len(steps[0]) == len(steps[1]) == 3 and ranks[0]["final"] == ranks[1]["final"]
    assert any(a["retain_nll"] != b["retain_nll"] for a, b in zip(*steps))  # different batches, different local NLLs
    multiplier = 1.0
    for a, b in zip(*steps):
        assert a["multiplier"] == b["multiplier"] == pytest.approx(multiplier, rel=1e-5)
        multiplier = max(0.0, multiplier + 10.0 * ((a["retain_nll"] + b["retain_nll"]) / 2 - 0.01))
    assert ranks[0]["final"] == pytest.approx(multiplier, rel=1e-5) and multiplier != 1.0
