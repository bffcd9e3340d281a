"""`hubunlearn eval --benchmark muse` and raw-text unlearning on a MUSE-layout fixture folder, through the CLI."""

import json
import math

import pytest

from hubunlearn.cli import main
from hubunlearn.testing import muse_articles, write_muse_folder
from hubunlearn.unlearn import parse_unlearn_args

from .conftest import REPO
from .test_cli import assert_one_error_line

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def muse_dir(tmp_path_factory):
    return write_muse_folder(tmp_path_factory.mktemp("muse") / "data")


@pytest.fixture(scope="module")
def muse_tokenizer():
    from hubunlearn.world import train_tokenizer

    texts = [row[k] for rows in muse_articles().values() for row in rows for k in ("text", "question", "answer")]
    return train_tokenizer(texts + ["Question: Answer:\n\n"], vocab_size=400)


@pytest.fixture(scope="module")
def muse_model(muse_tokenizer, tmp_path_factory):
    """A tiny Llama taught the raw forget, retain1 and retain2 texts by heart (never the holdout ones)."""
    from hubunlearn.world import teach, tiny_llama

    folder = tmp_path_factory.mktemp("muse-model")
    articles = muse_articles()
    rows = [{"text": a["text"]} for split in ("forget", "retain1", "retain2") for a in articles[split]]
    model = teach(tiny_llama(muse_tokenizer, hidden_size=32, num_layers=2), muse_tokenizer, rows, folder / "trainer", epochs=100,
                  learning_rate=1e-2, warmup_steps=0, disable_tqdm=True)
    model.save_pretrained(folder / "model")
    muse_tokenizer.save_pretrained(folder / "model")
    return folder / "model"


@pytest.fixture(scope="module")
def original_eval(muse_model, muse_dir, tmp_path_factory):
    """`hubunlearn eval --benchmark muse` of the taught model: (exit code, output folder)."""
    output = tmp_path_factory.mktemp("muse-eval") / "out"
    code = main(["eval", "--model", str(muse_model), "--benchmark", "muse", "--corpus", "news", "--data", str(muse_dir),
                 "--output_dir", str(output), "--batch_size", "4"])
    return code, output


def mean_log_prob(model_dir, texts):
    """Mean token log-prob of whole texts (every token after the first), one number over all of them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hubunlearn.metrics.stats import token_stats

    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    examples = [{"input_ids": ids, "labels": ids} for ids in (tokenizer(t)["input_ids"] for t in texts)]
    stats = token_stats(model, examples, tokenizer.pad_token_id, spread=False)
    return sum(sum(s.log_probs) for s in stats) / sum(s.num_tokens for s in stats)


def test_eval_muse_reports_memorisation_of_the_taught_forget_texts(original_eval):
    from hubunlearn.evaluate import format_summary

    code, output = original_eval
    assert code == 0
    summary, per_example = (json.loads((output / name).read_text()) for name in ("summary.json", "per_example.json"))
    assert set(summary["aggregates"]) == {"verbmem_f", "knowmem_f", "knowmem_r", "privleak"}
    assert summary["examples"] == {"verbmem_forget": 6, "knowmem_forget": 6, "knowmem_retain": 6, "privleak_forget": 6, "privleak_holdout": 6}
    # Taught by heart: continuations follow the forget texts, and every forget text is likelier than every holdout text
    assert summary["aggregates"]["verbmem_f"]["value"] > 0.2  # a 128-token continuation runs on past the short ground truth
    privleak = summary["aggregates"]["privleak"]
    assert privleak["auc"] == 0.0 and privleak["reference_auc"] == 0.4772 and privleak["value"] == pytest.approx(-100.0)
    assert "published" in summary["reference_source"] and "MUSE (Shi et al." in summary["conventions"]["privleak"]
    assert summary["data"]["splits"]["knowmem_retain"] == "knowmem@retain_qa" and summary["data"]["revision"] is None
    first = per_example["verbmem_forget"][0]
    assert first["reference"] == first["gt"]  # shorter than 128 tokens: nothing cut
    assert summary["sets"]["verbmem_forget"]["rouge_l_f1"] == pytest.approx(sum(r["rouge_l_f1"] for r in per_example["verbmem_forget"]) / 6)
    assert all("\n\n" not in r["generation"] and "Question:" not in r["generation"] for r in per_example["knowmem_forget"])
    assert all(r["min_k"] > h["min_k"] for r in per_example["privleak_forget"] for h in per_example["privleak_holdout"])
    table = format_summary(summary)
    assert "privleak (%)" in table and "-100.0" in table and "MUSE's published AUC" in table and "verbmem_f" in table


def test_the_older_revision_split_names_are_read_too(run_cli, muse_model, tmp_path):
    old = write_muse_folder(tmp_path / "old", retain_qa="retain2_qa")
    code, out, err = run_cli("eval", "--model", muse_model, "--benchmark", "muse", "--corpus", "news", "--data", old,
                             "--metrics", "knowmem_r", "--max_examples", "2", "--output_dir", tmp_path / "out")
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["data"]["splits"] == {"knowmem_retain": "knowmem@retain2_qa", "knowmem_retain_icl": "knowmem@retain2_qa_icl"}
    assert list(summary["aggregates"]) == ["knowmem_r"] and summary["examples"] == {"knowmem_retain": 2}
    assert "knowmem_r" in out


def test_a_reference_model_is_computed_once_cached_and_its_statistics_file_gives_the_same_auc(
        run_cli, muse_model, muse_tokenizer, muse_dir, tmp_path):
    from hubunlearn.muse import auc_of
    from hubunlearn.world import tiny_llama

    reference = tmp_path / "reference"  # never taught: it sees forget and holdout texts alike
    tiny_llama(muse_tokenizer, hidden_size=32, num_layers=2, seed=1).save_pretrained(reference)
    muse_tokenizer.save_pretrained(reference)
    base = ["eval", "--model", muse_model, "--benchmark", "muse", "--corpus", "news", "--data", muse_dir, "--metrics", "privleak"]
    code, _, err = run_cli("eval", "--model", reference, "--benchmark", "muse", "--corpus", "news", "--data", muse_dir,
                           "--metrics", "privleak", "--output_dir", tmp_path / "of-reference")
    assert code == 0, err
    expected = auc_of(json.loads((tmp_path / "of-reference" / "per_example.json").read_text()))
    assert 0 < expected < 1
    sources = []
    for run, extra in enumerate((["--reference", reference], ["--reference", reference],
                                 ["--reference_stats", tmp_path / "of-reference" / "per_example.json"])):
        code, out, err = run_cli(*base, *extra, "--output_dir", tmp_path / f"run{run}")
        assert code == 0, err
        summary = json.loads((tmp_path / f"run{run}" / "summary.json").read_text())
        privleak = summary["aggregates"]["privleak"]
        assert privleak["reference_auc"] == pytest.approx(expected)
        assert privleak["value"] == pytest.approx(100 * (privleak["auc"] - expected) / expected)
        sources.append(summary["reference_source"])
    assert [s.get("cached") for s in sources] == [False, True, None] and "sha256" in sources[2]
    assert "cached statistics" in out or "sha256" in out


def test_a_reference_that_separates_forget_from_holdout_perfectly_is_refused(run_cli, muse_model, muse_dir, tmp_path):
    output = tmp_path / "never"
    code, _, err = run_cli("eval", "--model", muse_model, "--benchmark", "muse", "--corpus", "news", "--data", muse_dir,
                           "--metrics", "privleak", "--reference", muse_model, "--output_dir", output)  # it memorised the forget texts
    assert code == 2
    assert_one_error_line(err, "the reference's privleak AUC is 0")
    assert "undefined" in err and not output.exists() and not list(tmp_path.glob(".never*"))


def test_raw_text_unlearning_from_the_muse_layout_lowers_the_forget_texts_then_eval_reports_it(
        run_cli, muse_model, muse_tokenizer, muse_dir, original_eval, tmp_path):
    from hubunlearn.data import DataFormat, load_rows, tokenize_rows

    articles = muse_articles()
    forget, retain = ([a["text"] for a in articles[split]] for split in ("forget", "retain1"))
    chunks = tokenize_rows(load_rows(f"{muse_dir}:raw@forget"), muse_tokenizer, DataFormat(max_length=32), "forget")
    lengths = [len(muse_tokenizer(text)["input_ids"]) for text in forget]
    assert max(lengths) > 32 and all(len(c) <= 32 for c in chunks["input_ids"])  # every text is cut into 32-token chunks
    assert len(chunks) == sum(n // 32 + (n % 32 >= 2) for n in lengths)  # a last chunk of one token is dropped
    artifact = tmp_path / "graddiff"
    code, _, err = run_cli("unlearn", "--method", "graddiff", "--model_name_or_path", muse_model, "--forget", f"{muse_dir}:raw@forget",
                           "--retain", f"{muse_dir}:raw@retain1", "--max_length", "32", "--num_train_epochs", "5",
                           "--learning_rate", "1e-3", "--per_device_train_batch_size", "6", "--output_dir", artifact,
                           "--disable_tqdm", "true", "--no_summary")
    assert code == 0, err
    record = json.loads((artifact / "unlearning.json").read_text())
    assert (record["data"]["forget"]["config"], record["data"]["forget"]["split"], record["data"]["forget"]["num_rows"]) == ("raw", "forget", 6)
    forget_drop = mean_log_prob(muse_model, forget) - mean_log_prob(artifact, forget)
    retain_drop = mean_log_prob(muse_model, retain) - mean_log_prob(artifact, retain)
    assert forget_drop > 0.1 and retain_drop < forget_drop / 3, (forget_drop, retain_drop)

    code, out, err = run_cli("eval", "--model", artifact, "--benchmark", "muse", "--corpus", "news", "--data", muse_dir,
                             "--output_dir", tmp_path / "eval", "--record_to", artifact)
    assert code == 0, err
    before = json.loads((original_eval[1] / "summary.json").read_text())
    after = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert after["sets"]["privleak_forget"]["min_k"] < before["sets"]["privleak_forget"]["min_k"] - 0.15
    assert after["aggregates"]["verbmem_f"]["value"] < before["aggregates"]["verbmem_f"]["value"]
    record = json.loads((artifact / "unlearning.json").read_text())
    assert set(record["metrics"]["muse"]["after"]) == {"verbmem_f", "knowmem_f", "knowmem_r", "privleak", "privleak_auc"}
    assert record["metrics"]["muse"]["after"]["verbmem_f"] == after["aggregates"]["verbmem_f"]["value"]
    assert record["metrics"]["muse"]["reference"] == {"privleak_auc": 0.4772} and record["evaluation"]["corpus"] == "news"
    card = (artifact / "README.md").read_text()
    assert "type: verbmem_f" in card and "type: privleak" in card and "MUSE's published AUC" in card
    assert not math.isnan(after["aggregates"]["privleak"]["value"])


@pytest.mark.parametrize("recipe", ["npo-muse-news", "npo-muse-books"])
def test_the_muse_recipes_unlearn_raw_text(run_cli, recipe, muse_model, muse_dir, tmp_path):
    arguments, config = parse_unlearn_args(["--config", recipe])
    corpus = recipe.split("-")[-1]
    assert arguments.method == "npo" and config.max_length == 2048 and config.beta == 0.1
    name = {"news": "News", "books": "Books"}[corpus]
    assert (arguments.forget, arguments.retain) == (f"muse-bench/MUSE-{name}:raw@forget", f"muse-bench/MUSE-{name}:raw@retain1")
    assert (REPO / "trainers" / f"{recipe}.yaml").is_file()
    code, _, err = run_cli("unlearn", "--config", recipe, "--model_name_or_path", muse_model, "--forget", f"{muse_dir}:raw@forget",
                           "--retain", f"{muse_dir}:raw@retain1", "--max_length", "32", "--max_steps", "1",
                           "--gradient_accumulation_steps", "1", "--output_dir", tmp_path / "out", "--disable_tqdm", "true", "--no_summary")
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "unlearning.json").read_text())
    assert record["method"].lower() == "npo" and record["hyperparameters"]["beta"] == 0.1


@pytest.mark.parametrize("change, message", [
    ({"--corpus": "poems"}, "unknown corpus 'poems': choose one of news, books"),
    ({"--corpus": None}, "--benchmark muse needs --corpus: choose one of news, books"),
    ({"--benchmark": "tofu"}, "--corpus applies to --benchmark muse only (this is --benchmark tofu)"),
    ({"--metrics": "verbmem_f,forget_quality"}, "forget_quality is a TOFU metric: --benchmark muse measures verbmem_f, knowmem_f"),
    ({"--metrics": "verbmem"}, "unknown metric(s) verbmem: --benchmark muse measures"),
    ({"--max_new_tokens": "16"}, "--max_new_tokens does not apply to --benchmark muse"),
    ({"--holdout": "x.jsonl"}, "--holdout does not apply to --benchmark muse"),
    ({"--data": None}, "cannot load muse-bench/MUSE-News:verbmem@forget from the Hub ("),  # the tests run offline
    ({"--data": "no/such/folder"}, "--data no/such/folder is neither a folder in the MUSE layout nor a Hub dataset id"),
    ({"--data": "{tmp}/empty"}, "the MUSE folder {tmp}/empty has no 'verbmem' config: expected a folder {tmp}/empty/verbmem"),
    ({"--data": "{tmp}/no-retain-qa", "--metrics": "knowmem_r"}, "has no split 'retain_qa' or 'retain2_qa' in its 'knowmem' config"),
    ({"--data": "{tmp}/columns", "--metrics": "privleak"}, "privleak@forget has no text column: MUSE's privleak rows hold text"),
    ({"--reference_stats": "{tmp}/tofu.json", "--metrics": "privleak"}, "holds no Min-K% statistics of these privleak texts"),
])
def test_bad_muse_input_is_one_line_exit_2_and_no_output_folder(run_cli, muse_dir, tmp_path, change, message):
    (tmp_path / "empty").mkdir()
    partial = write_muse_folder(tmp_path / "no-retain-qa")
    for split in ("retain_qa", "retain_qa_icl"):
        (partial / "knowmem" / f"{split}.json").unlink()
    columns = write_muse_folder(tmp_path / "columns")
    (columns / "privleak" / "forget.json").write_text(json.dumps([{"content": "a"}]))
    (tmp_path / "tofu.json").write_text(json.dumps({"forget": [{"question": "q", "answer": "a"}]}))
    output = tmp_path / "never"
    flags = {"--model": "unused-model", "--benchmark": "muse", "--corpus": "news", "--data": str(muse_dir), "--output_dir": output}
    flags.update({k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in change.items()})
    args = [part for flag, value in flags.items() if value is not None for part in (flag, value)]
    code, _, err = run_cli("eval", *args)
    assert code == 2
    assert_one_error_line(err, message.format(tmp=tmp_path))
    assert not output.exists() and not list(tmp_path.glob(".never*"))
