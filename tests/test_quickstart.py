"""The built-in example: offline, cached, and it visibly forgets the chosen people while keeping the rest."""

import json

from hubunlearn.quickstart import QuickstartSettings, world_model


def test_quickstart_forgets_and_keeps_and_reuses_its_cache(run_cli, world_model_dir, tmp_path):
    stamp = (world_model_dir / "model.safetensors").stat().st_mtime_ns
    output = tmp_path / "qs"
    code, out, err = run_cli("quickstart", "--output_dir", output)
    assert code == 0, err
    assert "teaching the tiny model" not in err  # warm: the taught model comes from the cache
    assert "forget people" in out and "retained people" in out and "before:" in out and "after:" in out

    record = json.loads((output / "unlearning.json").read_text())
    metrics = record["metrics"]
    assert record["example"] == "quickstart" and record["method"] == "IHL" and record["artifact"] == "lora"
    assert metrics["forget"]["before"]["answer_probability"] > 0.9 and metrics["forget"]["before"]["exact_recall"] > 0.9
    assert metrics["forget"]["after"]["answer_probability"] < 0.5 * metrics["forget"]["before"]["answer_probability"]
    assert metrics["forget"]["after"]["exact_recall"] < 0.5
    assert metrics["retain"]["after"]["answer_probability"] > 0.9 and metrics["retain"]["after"]["exact_recall"] > 0.8
    assert (output / "adapter_model.safetensors").is_file()
    assert len(record["examples"]["forget"]) == 3  # prompts the Space can offer

    # A second run reuses the taught model and replaces its own earlier result.
    assert world_model(QuickstartSettings()) == world_model_dir
    code, _, err = run_cli("quickstart", "--output_dir", output)
    assert code == 0, err
    assert (world_model_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_quickstart_will_not_overwrite_someone_elses_folder(run_cli, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    code, _, err = run_cli("quickstart", "--output_dir", tmp_path / "mine")
    assert code == 2 and "is not an earlier quickstart result" in err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["thesis.tex"]


def test_a_cold_start_says_it_is_teaching_the_world_and_a_warm_one_does_not(tmp_path, caplog):
    import logging

    settings = QuickstartSettings(num_people=10, num_forget=2, teach_epochs=1)  # a few steps: the message is what counts
    with caplog.at_level(logging.INFO, logger="hubunlearn"):
        folder = world_model(settings, cache=tmp_path)
    assert f"teaching the tiny model the world, first run only (it is cached in {tmp_path})" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hubunlearn"):
        assert world_model(settings, cache=tmp_path) == folder
    assert "teaching" not in caplog.text
