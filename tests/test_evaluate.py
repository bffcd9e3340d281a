"""`hubunlearn eval` end to end on the built-in world: files, metrics, the reference workflow, attacks, bad input."""

import json

import pytest

from hubunlearn.evaluate import METRICS

ALL_SET_METRICS = "probability,truth_ratio,rouge,exact_memorization,extraction_strength,extraction_strength_tf"
NO_GPU = pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without a CUDA GPU")


def read(folder):
    return json.loads((folder / "summary.json").read_text()), json.loads((folder / "per_example.json").read_text())


def test_eval_writes_both_files_with_every_requested_metric(run_cli, world_model_dir, tmp_path):
    output = tmp_path / "eval"
    code, out, err = run_cli("eval", "--model", world_model_dir, "--benchmark", "world", "--metrics", ALL_SET_METRICS + ",forget_quality",
                             "--output_dir", output)
    assert code == 0, err
    summary, per_example = read(output)
    assert set(per_example) == {"forget", "retain"} and len(per_example["forget"]) == 15
    for name, results in per_example.items():
        for key in ("question", "answer", "generation", "probability", "truth_ratio", "rouge_recall", "rouge_f1",
                    "exact_memorization", "extraction_strength", "extraction_strength_tf"):
            assert all(key in r for r in results), (name, key)
        for key in ("probability", "truth_ratio", "rouge_recall", "exact_memorization", "extraction_strength"):
            assert key in summary["sets"][name]
    assert summary["sets"]["forget"]["probability"] > 0.9 and summary["sets"]["forget"]["extraction_strength"] > 0.9
    quality = summary["aggregates"]["forget_quality"]
    assert quality["value"] is None and "--reference" in quality["unavailable"]  # never reported as 0
    assert "unavailable: no reference model" in out and "truth_ratio" in out


def test_reference_workflow_and_forget_quality(run_cli, world_model_dir, world_reference_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HUBUNLEARN_CACHE", str(tmp_path / "cache"))  # cold: other tests (other xdist workers) fill the shared one
    code, _, err = run_cli("eval", "--model", world_model_dir, "--benchmark", "world", "--reference", world_reference_dir,
                           "--metrics", "probability,truth_ratio,extraction_strength,forget_quality", "--output_dir", tmp_path / "target")
    assert code == 0, err
    target, _ = read(tmp_path / "target")
    assert "reusing" not in err
    # The reference knows the retain people and not the forget people: higher probability and ES on its own set.
    reference_sets = target["reference"]
    assert reference_sets["retain"]["probability"] > 0.9 > 0.5 > reference_sets["forget"]["probability"]
    assert reference_sets["retain"]["extraction_strength"] > reference_sets["forget"]["extraction_strength"]

    code, _, err = run_cli("eval", "--model", world_reference_dir, "--benchmark", "world", "--reference_stats", tmp_path / "target" / "per_example.json",
                           "--metrics", "probability,truth_ratio,forget_quality", "--output_dir", tmp_path / "self")
    assert code == 0, err
    # The target's own per-example file served as a reference: compare the reference against the target, and itself.
    against_target = read(tmp_path / "self")[0]["aggregates"]["forget_quality"]["value"]
    code, _, err = run_cli("eval", "--model", world_reference_dir, "--benchmark", "world", "--reference_stats",
                           tmp_path / "self" / "per_example.json", "--metrics", "probability,truth_ratio,forget_quality", "--output_dir", tmp_path / "ref")
    assert code == 0, err
    against_itself = read(tmp_path / "ref")[0]["aggregates"]["forget_quality"]["value"]
    # The world's paraphrased answers were never taught, which blurs truth ratios: the gap is smaller than on TOFU.
    assert against_itself == pytest.approx(1.0)
    assert target["aggregates"]["forget_quality"]["value"] == pytest.approx(against_target)
    assert against_target < against_itself / 2

    # A second run with the same reference reuses the cached statistics.
    code, _, err = run_cli("eval", "--model", world_model_dir, "--benchmark", "world", "--reference", world_reference_dir,
                           "--metrics", "probability,truth_ratio,extraction_strength,forget_quality", "--output_dir", tmp_path / "again")
    assert code == 0 and "reusing the reference statistics" in err
    assert read(tmp_path / "again")[0]["aggregates"] == target["aggregates"]


def test_attacks_report_what_comes_back(run_cli, world_model_dir, tmp_path):
    code, out, err = run_cli("eval", "--model", world_model_dir, "--benchmark", "world", "--metrics", "probability",
                             "--attack", "relearn,paraphrase,prefix", "--relearn_learning_rate", "1e-3", "--output_dir", tmp_path / "e")
    assert code == 0, err
    attacks = read(tmp_path / "e")[0]["attacks"]
    assert set(attacks) == {"relearn", "paraphrase", "prefix"}
    for result in attacks.values():
        assert set(result["recovered"]) == {"probability", "rouge_recall"}
        assert result["recovered"]["probability"] == pytest.approx(result["attacked"]["probability"] - result["clean"]["probability"])
    assert attacks["paraphrase"]["examples"] == 15 and attacks["relearn"]["measured_on"] == 8


def test_privleak_is_reported_in_percent_with_muses_sign(run_cli, world_model_dir, world_reference_dir, world, tmp_path):
    # Holdout: the forget questions with answers nobody was taught. The taught model unlearned nothing.
    holdout = tmp_path / "holdout.jsonl"
    holdout.write_text("".join(json.dumps({"question": r["question"], "answer": r["perturbed_answer"][0]}) + "\n" for r in world.rows("forget")))
    code, out, err = run_cli("eval", "--model", world_model_dir, "--benchmark", "world", "--metrics", "mia", "--holdout", holdout,
                             "--reference", world_reference_dir, "--max_examples", "8", "--output_dir", tmp_path / "e")
    assert code == 0, err
    summary, _ = read(tmp_path / "e")
    mia = summary["aggregates"]["mia"]
    # The printed table rounds: AUCs to 3 decimals, privleak in percent to 1 (it was raw JSON).
    assert "{" not in out and f"mia auc                 loss {mia['auc']['loss']:.3f}, zlib {mia['auc']['zlib']:.3f}" in out
    assert f"privleak (%)            loss {mia['privleak']['loss']:.1f}" in out
    assert set(mia["privleak"]) == {"loss", "zlib", "min_k", "min_k_plus_plus"}
    for attack, value in mia["privleak"].items():  # MUSE's AUC is 1 - ours
        reference_auc = mia["reference_auc"][attack]
        assert value == pytest.approx(100 * ((1 - mia["auc"][attack]) - (1 - reference_auc)) / (1 - reference_auc))
    assert mia["auc"]["loss"] == 1.0 and mia["privleak"]["loss"] == pytest.approx(-100.0)  # OpenUnlearning: -100
    assert "in percent" in mia["privleak_convention"] and summary["conventions"]["privleak"] == mia["privleak_convention"]
    assert set(summary["conventions"]) == {"extraction_strength", "exact_memorization", "truth_ratio", "min_k", "mia_auc", "privleak"}


def test_recording_into_an_artifact_updates_its_record_and_card(run_cli, world_model_dir, world_reference_dir, tmp_path):
    from hubunlearn.quickstart import run_quickstart

    artifact = tmp_path / "artifact"
    run_quickstart(artifact)
    code, out, err = run_cli("eval", "--model", world_model_dir, "--adapter", artifact, "--benchmark", "world", "--metrics",
                             "probability,rouge,truth_ratio,forget_quality", "--reference", world_reference_dir,
                             "--output_dir", tmp_path / "e", "--record_to", artifact)
    assert code == 0, err
    record = json.loads((artifact / "unlearning.json").read_text())
    assert record["metrics"]["forget"]["after"]["rouge_recall"] < 0.5 and "rouge_recall" in record["metrics"]["retain"]["after"]
    card = (artifact / "README.md").read_text()
    assert "| forget | rouge recall |" in card
    # Where the reference column came from, and the conventions, are on the card too.
    source = read(tmp_path / "e")[0]["reference_source"]
    assert record["evaluation"]["reference_source"] == source
    assert f"Reference statistics: {world_reference_dir} (weights sha256 {source['fingerprint'][:16]}…" in card
    assert "privleak: MUSE" in card and "extraction strength: eos left out" in card


@pytest.mark.parametrize("args, message", [
    (["--benchmark", "tofu", "--forget_split", "forget42"], "unknown split 'forget42': choose one of forget01, forget05, forget10"),
    (["--metrics", "probability,bleu"], f"unknown metric(s) bleu: choose from {', '.join(METRICS)}"),
    (["--attack", "bribe"], "unknown attack(s) bribe"),
    (["--benchmark", "mmlu"], "unknown benchmark 'mmlu'"),
    (["--reference_stats", "/no/such.json"], "--reference_stats /no/such.json does not exist"),
    (["--max_examples", "many"], "invalid int value: 'many'"),
    (["--max_examples", "0"], "--max_examples must be at least 1 (got 0)"),
    (["--max_examples", "-1"], "--max_examples must be at least 1 (got -1)"),
    (["--reference", "{tmp}", "--reference_stats", "{tmp}/per_example.json"], "give the reference once"),
    (["--stage", "beforee"], "argument --stage: invalid choice: 'beforee'"),
    (["--record_to", "{tmp}/not-an-artifact"], "has no unlearning.json: it is not a hubunlearn artifact"),
    (["--device", "tpu"], "unknown --device 'tpu': choose auto, cpu, cuda or cuda:N"),
    pytest.param(["--device", "cuda"], "--device cuda: no CUDA GPU is available here", marks=NO_GPU),
    pytest.param(["--device", "cuda:1"], "--device cuda:1: no CUDA GPU is available here", marks=NO_GPU),
])
def test_bad_eval_input(run_cli, world_model_dir, tmp_path, args, message):
    code, _, err = run_cli("eval", "--model", world_model_dir, "--benchmark", "world", "--output_dir", tmp_path / "e",
                           *[a.format(tmp=tmp_path) for a in args])
    assert code == 2 and message in err.strip().splitlines()[-1], err
    assert not (tmp_path / "e").exists()
    assert "computed the reference" not in err and "generating" not in err  # refused before any evaluation


def test_mismatched_tokenizer_and_missing_perturbed_answers(run_cli, world_model_dir, world, tmp_path, caplog):
    import shutil

    from hubunlearn.world import train_tokenizer

    mismatched = tmp_path / "mismatched"
    shutil.copytree(world_model_dir, mismatched)
    train_tokenizer(world.corpus() + [f"extra{i} word{i * 7}" for i in range(3000)], vocab_size=2048).save_pretrained(mismatched)
    code, _, err = run_cli("eval", "--model", mismatched, "--benchmark", "world", "--output_dir", tmp_path / "e1")
    assert code == 2 and "does not match the model" in err

    data = tmp_path / "tofu-like"
    data.mkdir()
    rows = [{"question": r["question"], "answer": r["answer"]} for r in world.rows("forget")]
    for name in ("forget01_perturbed", "retain_perturbed", "real_authors_perturbed", "world_facts_perturbed"):
        (data / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run_cli("eval", "--model", world_model_dir, "--data", data, "--forget_split", "forget01",
                           "--metrics", "probability,truth_ratio,model_utility", "--output_dir", tmp_path / "e2")
    assert code == 0, err
    assert "has no paraphrased and perturbed answers: its truth ratio is skipped" in err
    summary, _ = read(tmp_path / "e2")
    assert "truth_ratio" not in summary["sets"]["forget"] and summary["aggregates"]["model_utility"]["value"] is None


def test_privleak_that_cannot_be_computed_says_why():
    from hubunlearn.evaluate import _mia_summary

    def rows(*scores):
        return [{"mia": {"loss": s}} for s in scores]

    separable = {"forget": rows(1.0, 0.9), "holdout": rows(0.1, 0.2)}
    summary = _mia_summary(separable, separable)  # the reference tells them apart perfectly: 1 - AUC = 0
    assert summary["privleak"] == {"loss": None} and "AUC 1" in summary["privleak_unavailable"]
    assert "no reference" in _mia_summary(separable, None)["privleak_unavailable"]
    mixed = {"forget": rows(1.0, 0.1), "holdout": rows(0.9, 0.2)}
    assert _mia_summary(separable, mixed)["privleak"]["loss"] == pytest.approx(-100.0) and "privleak_unavailable" not in _mia_summary(separable, mixed)


def test_eval_loads_a_hub_model_at_the_revision_asked_and_records_it(run_cli, hub_token, world_model_dir, world_reference_dir, tmp_path):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("tester/eval-revisions", exist_ok=True)
    taught = api.upload_folder(folder_path=str(world_model_dir), repo_id="tester/eval-revisions", ignore_patterns=["README.md"]).oid
    api.upload_folder(folder_path=str(world_reference_dir), repo_id="tester/eval-revisions")  # main: the reference's weights
    probability = {}
    for revision in (taught, None):
        output = tmp_path / (revision or "main")
        code, _, err = run_cli("eval", "--model", "tester/eval-revisions", *(["--revision", revision] if revision else []),
                               "--benchmark", "world", "--metrics", "probability", "--max_examples", "4", "--output_dir", output)
        assert code == 0, err
        summary, _ = read(output)
        assert summary["config"]["revision"] == revision
        probability[revision] = summary["sets"]["forget"]["probability"]
    assert probability[taught] > 0.9 > 0.5 > probability[None]  # the taught model knows the forget people; main's does not


def test_eval_logs_each_line_once_without_library_noise(world_model_dir, world_reference_dir, tmp_path):
    """A real `hubunlearn eval` process: hubunlearn's lines once (ROUGE's absl logging used to install a root handler
    that printed each again as INFO:hubunlearn...), and none of the warnings the libraries raise about their own calls."""
    import subprocess
    import sys

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"  # an untrained LoRA adapter: loading it is what matters here
    get_peft_model(AutoModelForCausalLM.from_pretrained(world_model_dir),
                   LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(adapter)
    result = subprocess.run([sys.executable, "-m", "hubunlearn.cli", "eval", "--model", world_model_dir, "--adapter", adapter,
                             "--benchmark", "world", "--metrics", "probability,rouge", "--reference", world_reference_dir,
                             "--attack", "relearn", "--relearn_steps", "1", "--max_examples", "2", "--output_dir", tmp_path / "e"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.strip() for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("hubunlearn: ")]
    assert any("the reference statistics of" in line for line in ours), result.stderr
    assert len(ours) == len(set(ours)) and not any(":hubunlearn." in line for line in lines), result.stderr
    for noise in ("is_gradient_checkpointing", "pin_memory", "Loading weights", "Warning:"):
        assert noise not in result.stderr, result.stderr
    assert "train_runtime" not in result.stdout + result.stderr  # the relearn attack's Trainer prints no dict


def test_python_users_see_hubunlearn_lines_once_with_or_without_a_logging_setup():
    import subprocess
    import sys

    script = ("import logging, hubunlearn\nfrom hubunlearn.metrics.tofu import rouge_l\n"
              "rouge_l(['a b c'], ['a b d'])\nlog = logging.getLogger('hubunlearn.controls')\nlog.info('alpha = 0.5')\n"
              "logging.basicConfig(format='app %(levelname)s %(message)s', level=logging.INFO)\nlog.info('sigma = 2')\n"
              "logging.getLogger('hubunlearn').setLevel(logging.WARNING)\nlog.info('quiet')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert result.stderr == "hubunlearn: info: alpha = 0.5\napp INFO sigma = 2\n"


def _same(batched, alone, where=""):
    """Equal structures: identical strings and ints, floats to 1e-5 (relative for large ones such as truth ratios).
    Min-k%++ gets 1e-3: it divides by each position's σ, near 0 for a near-uniform (untrained) model, which
    magnifies the logits' float rounding (a padded batch rounds differently from a batch of one)."""
    if isinstance(batched, dict):
        assert set(batched) == set(alone), where
        for key in batched:
            _same(batched[key], alone[key], f"{where}/{key}")
    elif isinstance(batched, list):
        assert len(batched) == len(alone), where
        for i, (b, a) in enumerate(zip(batched, alone)):
            _same(b, a, f"{where}[{i}]")
    elif isinstance(batched, float):
        tolerance = 1e-3 if where.endswith("min_k_plus_plus") else 1e-5
        assert batched == pytest.approx(alone, rel=tolerance, abs=tolerance), where
    else:
        assert batched == alone, where


@pytest.mark.parametrize("taught", [True, False], ids=["world model", "untrained h32-l2"])
def test_batched_eval_equals_one_example_at_a_time(taught, world_model_dir, tokenizer, world):
    """The length-sorted, pooled, batched eval gives every row the numbers and the generation it gets alone."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    from hubunlearn.evaluate import EvalConfig, evaluate_sets
    from hubunlearn.world import tiny_llama

    model = (AutoModelForCausalLM.from_pretrained(world_model_dir) if taught else tiny_llama(tokenizer, hidden_size=32, num_layers=2, seed=1)).eval()
    forget, retain = world.rows("forget")[:4], world.rows("retain")[:5]
    no_paraphrase = [{k: v for k, v in r.items() if k != "paraphrased_answer"} for r in retain[:1]]
    no_perturbed = [{"question": r["question"], "answer": r["answer"] + " Indeed, and more words."} for r in retain[1:2]]
    too_long = {"question": "word " * 200, "answer": "x", "perturbed_answer": ["y"]}
    sets = {"forget": forget, "retain": [*retain[2:], too_long, *no_paraphrase, *no_perturbed]}
    config = EvalConfig(model="m", benchmark="world", metrics=("probability", "truth_ratio", "rouge", "exact_memorization",
                                                              "extraction_strength_tf", "mia"), max_new_tokens=12, batch_size=64)
    config.data_format = replace(config.data_format, max_length=128)
    batched = evaluate_sets(model, tokenizer, sets, config)
    alone_config = replace(config, batch_size=1)
    alone = {name: [evaluate_sets(model, tokenizer, {name: [row]}, alone_config)[name][0] for row in rows] for name, rows in sets.items()}
    _same(batched, alone)
    assert batched["retain"][3]["probability"] is None and "generation" not in batched["retain"][3]  # the too-long prompt
    assert all(r["generation"] for name in batched for r in batched[name] if "generation" in r)
    if taught:  # the taught model answers its forget rows: generations are real answers, stopped at eos
        assert sum(r["rouge_recall"] > 0.9 for r in batched["forget"]) >= 3

    # The shared-prompt pass (each question once, its answers on its KV cache) against plain full passes, one at a time.
    from hubunlearn.metrics.stats import token_stats
    from hubunlearn.metrics.tofu import qa_examples

    pool = [e for row in qa_examples(tokenizer, forget + retain, config.data_format) for e in row.examples]
    shared = token_stats(model, pool, tokenizer.pad_token_id, batch_size=16)
    plain = [token_stats(model, [e], tokenizer.pad_token_id, batch_size=1, share_prompts=False)[0] for e in pool]
    _same([vars(s) for s in shared], [vars(s) for s in plain])
    assert len({tuple(e["input_ids"][: e["prompt_length"]]) for e in pool}) == len(forget + retain) < len(pool)  # prompts were shared


def test_token_stats_without_a_selectable_cache_take_the_plain_path(tokenizer, world):
    """A model that returns no KV cache still gets every example scored, the plain way (same numbers)."""
    import torch

    from hubunlearn.data import DataFormat
    from hubunlearn.metrics.stats import token_stats
    from hubunlearn.metrics.tofu import qa_examples
    from hubunlearn.world import tiny_llama

    class NoCache(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            output = self.inner(**kwargs)
            output["cache"] = output["past_key_values"] = None
            return output

    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2, seed=2).eval()
    pool = [e for row in qa_examples(tokenizer, world.rows("forget")[:3], DataFormat(max_length=128)) for e in row.examples]
    fallback = token_stats(NoCache(model), pool, tokenizer.pad_token_id, batch_size=8)
    plain = token_stats(model, pool, tokenizer.pad_token_id, batch_size=8, share_prompts=False)
    assert all(s is not None for s in fallback)
    _same([vars(s) for s in fallback], [vars(s) for s in plain])


def test_device_choice():
    """auto is the accelerator when there is one and the CPU otherwise; cpu is the CPU; cuda needs a CUDA GPU; anything
    else is refused with one line naming the choices."""
    import torch

    from hubunlearn.errors import UsageError
    from hubunlearn.modeling import resolve_device

    accelerator = "cuda" if torch.cuda.is_available() else \
        torch.accelerator.current_accelerator().type if torch.accelerator.is_available() else "cpu"
    assert resolve_device("auto").type == resolve_device(None).type == accelerator
    assert resolve_device("cpu") == resolve_device(" CPU ") == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "cuda:-1", "mps:0"):
        with pytest.raises(UsageError, match=f"unknown (--)?device '{bad}'"):  # Python callers read "device", the CLI "--device"
            resolve_device(bad)
    if torch.cuda.is_available():
        assert resolve_device("cuda:0") == torch.device("cuda", 0)
        with pytest.raises(UsageError, match="choose one of them"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        for asked in ("cuda", "cuda:0"):
            with pytest.raises(UsageError, match=f"(--)?device {asked}: no CUDA GPU is available here .*use (--)?device cpu or auto") as error:
                resolve_device(asked)
            assert "\n" not in str(error.value)


def test_eval_on_the_device_asked_gives_the_same_numbers(run_cli, world_model_dir, tmp_path):
    """`--device cpu` and the default `auto` evaluate where they say (summary.json records it) and, on the same
    device, give the same per-example numbers and generations; on a GPU machine auto computes there (to 1e-4)."""
    from hubunlearn.evaluate import load_for_eval
    from hubunlearn.modeling import model_device, resolve_device

    results = {}
    for device in ("cpu", "auto"):
        code, _, err = run_cli("eval", "--model", world_model_dir, "--benchmark", "world", "--max_examples", "4", "--max_new_tokens", "8",
                               "--metrics", "probability,truth_ratio,rouge,exact_memorization,extraction_strength,extraction_strength_tf,mia",
                               "--device", device, "--output_dir", tmp_path / device)
        assert code == 0, err
        results[device] = read(tmp_path / device)
        assert results[device][0]["config"]["device"] == device
    assert results["cpu"][0]["device"] == "cpu"
    assert results["auto"][0]["device"].split(":")[0] == resolve_device("auto").type
    cpu, auto = results["cpu"][1], results["auto"][1]
    assert cpu.keys() == auto.keys() and all(len(cpu[name]) == len(auto[name]) == 4 for name in cpu)
    for name in cpu:
        for row_cpu, row_auto in zip(cpu[name], auto[name]):
            for key, value in row_cpu.items():
                if isinstance(value, float):
                    assert row_auto[key] == pytest.approx(value, rel=1e-4, abs=1e-4), (name, key)
                elif key != "mia":
                    assert row_auto[key] == value, (name, key)
    assert model_device(load_for_eval(world_model_dir, device="cpu")[0]).type == "cpu"


def test_hub_retries_are_one_line_that_says_how_to_skip_the_wait(capfd, caplog):
    """huggingface_hub's own retry loop against a port where nothing listens: each failed try and each wait is a line
    of its own; under a command they fold into one hubunlearn warning naming the error, the URL and HF_HUB_OFFLINE."""
    import socket

    import httpx2
    from huggingface_hub.utils import http_backoff

    from hubunlearn.logs import FoldedHubRetries, command_output

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again below: connections are refused
    url = f"http://127.0.0.1:{port}/datasets/locuslab/TOFU/resolve/main/README.md"
    with command_output(), pytest.raises(httpx2.ConnectError):
        http_backoff("HEAD", url, max_retries=3, base_wait_time=0.01)
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hubunlearn: warning: the Hub did not answer (") and url in lines[0], lines
    assert "HF_HUB_OFFLINE=1" in lines[0]
    assert FoldedHubRetries.FAILED_TRY.match(f"HTTP Error 503 thrown while requesting GET {url}")["error"] == "HTTP Error 503"
    caplog.clear()
    with pytest.raises(httpx2.ConnectError):  # outside a command, the library's records are left as they are
        http_backoff("HEAD", url, max_retries=1, base_wait_time=0.01)
    assert [r.getMessage().split(" [")[0] for r in caplog.records if r.name == "huggingface_hub.utils._http"][1] == "Retrying in 0.01s"
