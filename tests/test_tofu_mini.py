"""TOFU-mini: a tiny target and reference built from TOFU's data, cached, with one-line errors for bad input."""

import json
import time

import pytest

from .conftest import TOFU

pytestmark = pytest.mark.skipif(not TOFU.is_dir(), reason=f"TOFU data not found at {TOFU}")

# Small enough for the test suite: 2 retain authors, forget01's 2 forget authors, the 217 real-author and
# world-fact rows; a 2-layer model of hidden size 128.
SMALL = {"num_authors": 2, "forget_split": "forget01", "hidden_size": 128, "num_layers": 2, "epochs": 16, "learning_rate": 3e-3}
EXPECTED_ROWS = {"forget01": 40, "forget01_perturbed": 40, "retain": 40, "retain_perturbed": 40,
                 "real_authors_perturbed": 100, "world_facts_perturbed": 117}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tofu-mini-cache")


@pytest.fixture(scope="module")
def built(cache):
    from hubunlearn.tofu_mini import build_tofu_mini

    start = time.perf_counter()
    mini = build_tofu_mini(TOFU, **SMALL, cache_dir=cache)
    return mini, time.perf_counter() - start


def mean_probability(model_dir, rows):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hubunlearn.data import DataFormat, tokenize_rows
    from hubunlearn.metrics import answer_probabilities

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    examples = list(tokenize_rows(rows, tokenizer, DataFormat(max_length=256)))
    values = answer_probabilities(model, examples, tokenizer.pad_token_id)
    return sum(values) / len(values)


def test_layout_and_record(built, cache):
    mini, _ = built
    assert mini.root.parent == cache and mini.root.name.startswith("tofu-mini-")
    assert mini.forget_split == "forget01"
    for folder in (mini.target_dir, mini.reference_dir):
        assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
        assert (folder / "tokenizer.json").is_file()
    assert (mini.target_dir / "tokenizer.json").read_text() == (mini.reference_dir / "tokenizer.json").read_text()
    assert not [p for p in mini.root.rglob("*") if "trainer" in p.name or p.name == "training_args.bin"]
    info = json.loads((mini.root / "tofu_mini.json").read_text())
    assert info == mini.info
    assert info["settings"]["num_authors"] == 2 and info["settings"]["forget_split"] == "forget01"
    assert info["authors"] == {"retain": 2, "forget": 2}
    assert info["rows"]["target_training"] == 40 + 40 + 217 and info["rows"]["reference_training"] == 40 + 217
    assert 100_000 < info["parameter_count"] < 5_000_000
    assert set(info["training_seconds"]) == {"target", "reference"} and all(s > 0 for s in info["training_seconds"].values())
    assert set(info["answer_probability"]["target"]) >= {"forget", "retain"}


def test_data_folder_reads_as_tofu(built):
    from hubunlearn.data import load_rows

    mini, _ = built
    assert sorted(p.name for p in mini.data_dir.iterdir()) == sorted(f"{c}.json" for c in EXPECTED_ROWS)
    for config, count in EXPECTED_ROWS.items():
        rows = load_rows(mini.spec(config))
        assert len(rows) == count, config
        assert {"question", "answer"} <= set(rows.column_names)
    perturbed = load_rows(mini.spec("retain_perturbed"))
    assert {"paraphrased_answer", "perturbed_answer"} <= set(perturbed.column_names)
    # retain_perturbed is TOFU's own rows of the retain authors: its questions are those of retain
    retain = load_rows(mini.spec("retain"))
    assert sorted(zip(perturbed["question"], perturbed["answer"])) == sorted(zip(retain["question"], retain["answer"]))
    full = [json.loads(line) for line in (TOFU / "full.json").read_text().splitlines()]
    assert list(retain["question"]) == [r["question"] for r in full[:40]]
    assert list(load_rows(mini.spec("forget01"))["question"]) == [r["question"] for r in full[-40:]]


def test_target_knows_forget_authors_and_reference_does_not(built):
    from hubunlearn.data import load_rows

    mini, _ = built
    forget = [dict(r) for r in load_rows(mini.spec("forget01"))]
    retain = [dict(r) for r in load_rows(mini.spec("retain"))]
    target = {"forget": mean_probability(mini.target_dir, forget), "retain": mean_probability(mini.target_dir, retain)}
    reference = {"forget": mean_probability(mini.reference_dir, forget), "retain": mean_probability(mini.reference_dir, retain)}
    assert target["retain"] > 0.5 and reference["retain"] > 0.5, (target, reference)
    assert target["forget"] > 0.5, target
    assert target["forget"] > reference["forget"] + 0.3, (target, reference)
    recorded = mini.info["answer_probability"]
    assert recorded["target"]["forget"] == pytest.approx(target["forget"], abs=1e-3)
    assert recorded["reference"]["forget"] == pytest.approx(reference["forget"], abs=1e-3)


def test_second_call_reads_the_cache(built, cache):
    from hubunlearn.tofu_mini import build_tofu_mini

    mini, first_seconds = built
    stamps = {p: p.stat().st_mtime_ns for p in mini.root.rglob("*")}
    start = time.perf_counter()
    again = build_tofu_mini(TOFU, **SMALL, cache_dir=cache)
    seconds = time.perf_counter() - start
    assert again == mini
    assert {p: p.stat().st_mtime_ns for p in again.root.rglob("*")} == stamps
    assert seconds < min(5.0, first_seconds / 4), (seconds, first_seconds)
    assert [p.name for p in cache.iterdir()] == [mini.root.name]  # no staging folder left behind


@pytest.mark.parametrize("num_authors, split, limit", [(0, "forget01", 198), (199, "forget01", 198), (181, "forget10", 180), (-3, "forget05", 190)])
def test_num_authors_out_of_range(tmp_path, num_authors, split, limit):
    from hubunlearn.errors import UsageError
    from hubunlearn.tofu_mini import build_tofu_mini

    with pytest.raises(UsageError, match=rf"num_authors must be between 1 and {limit} for {split}.*got {num_authors}$"):
        build_tofu_mini(TOFU, num_authors=num_authors, forget_split=split, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_missing_config_names_it_and_the_folder(tmp_path):
    from hubunlearn.errors import UsageError
    from hubunlearn.tofu_mini import build_tofu_mini

    data = tmp_path / "tofu"
    data.mkdir()
    for name in ("full", "forget01", "forget01_perturbed", "retain_perturbed", "real_authors_perturbed"):
        (data / f"{name}.json").symlink_to(TOFU / f"{name}.json")  # links, not copies, of TOFU's files
    with pytest.raises(UsageError) as error:
        build_tofu_mini(data, num_authors=2, forget_split="forget01", cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert "'world_facts_perturbed'" in message and str(data) in message and "\n" not in message
    with pytest.raises(UsageError, match="'forget05'"):
        build_tofu_mini(data, num_authors=2, forget_split="forget05", cache_dir=tmp_path / "cache")
    with pytest.raises(UsageError, match="does not exist"):
        build_tofu_mini(tmp_path / "nowhere", cache_dir=tmp_path / "cache")
    with pytest.raises(UsageError, match="unknown forget split 'forget20'"):
        build_tofu_mini(TOFU, forget_split="forget20", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_cli_builds_from_a_hub_dataset(run_cli, hub, hub_token, tmp_path):
    """`hubunlearn bench build-tofu` downloads only the configs it needs from a Hub dataset, then builds."""
    from huggingface_hub import HfApi

    from hubunlearn.tofu_mini import _needed_configs

    api = HfApi()
    api.create_repo("tester/TOFU", repo_type="dataset", exist_ok=True)
    upload = tmp_path / "upload"
    upload.mkdir()
    for name in [*_needed_configs("forget01"), "retain90", "forget10"]:
        (upload / f"{name}.json").symlink_to(TOFU / f"{name}.json")
    api.upload_folder(folder_path=str(upload), repo_id="tester/TOFU", repo_type="dataset")

    code, out, err = run_cli("bench", "build-tofu", "--data", "tester/TOFU", "--authors", "1", "--forget_split", "forget01",
                             "--hidden_size", "64", "--num_layers", "1", "--epochs", "1", "--cache_dir", tmp_path / "cache")
    assert code == 0, err
    (root,) = (tmp_path / "cache").iterdir()  # no staging folder left
    assert f"is in {root}" in out and f"--reference {root / 'reference'}" in out
    assert json.loads((root / "tofu_mini.json").read_text())["authors"] == {"retain": 1, "forget": 2}
    downloads = [path for method, path in hub.requests if "/datasets/tester/TOFU/resolve/" in path]
    assert any(path.endswith("/full.json") for path in downloads)
    assert not [path for path in downloads if path.endswith(("/retain90.json", "/forget10.json"))]


@pytest.mark.parametrize("argv, message", [
    (["--data", "tester/no-such-tofu"], "dataset tester/no-such-tofu was not found on the Hub"),
    (["--data", "not a folder"], "neither a folder nor a Hub dataset id"),
    (["--forget_split", "forget20"], "unknown forget split 'forget20'"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--learning_rate", "-1"], "--learning_rate must be positive"),
    (["--authors", "x"], "argument --authors: invalid int value"),
])
def test_cli_bad_input(run_cli, hub_token, tmp_path, argv, message):
    code, out, err = run_cli("bench", "build-tofu", *argv, "--cache_dir", tmp_path / "cache")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "cache").exists()


def test_target_forget_quality_is_far_below_the_references_own(built, run_cli, tmp_path):
    """TOFU's forget quality through `hubunlearn eval --reference`: the target, which learnt the forget authors, is
    told apart from the reference by the KS test; the reference against its own statistics scores 1."""
    mini, _ = built
    common = ["--data", mini.data_dir, "--forget_split", "forget01", "--metrics", "truth_ratio,forget_quality"]
    code, out, err = run_cli("eval", "--model", mini.target_dir, "--reference", mini.reference_dir, *common,
                             "--output_dir", tmp_path / "target")
    assert code == 0, err
    target = json.loads((tmp_path / "target" / "summary.json").read_text())["aggregates"]["forget_quality"]["value"]
    code, out, err = run_cli("eval", "--model", mini.reference_dir, "--reference", mini.reference_dir, *common,
                             "--output_dir", tmp_path / "reference")
    assert code == 0, err
    assert "reusing the reference statistics" in err  # the reference's statistics were computed once, then cached
    itself = json.loads((tmp_path / "reference" / "summary.json").read_text())["aggregates"]["forget_quality"]["value"]
    assert itself == pytest.approx(1.0)
    assert target < 0.01, target
