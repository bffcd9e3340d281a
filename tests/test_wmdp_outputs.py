"""What `hubunlearn eval --benchmark wmdp` writes: every question's harness result in per_example.json, and a record
without TOFU's forget split."""

import json
import shutil

import pytest

pytest.importorskip("lm_eval")  # the optional extra: `pip install 'hubunlearn[lm-eval]'`

from .test_harness import QUESTIONS, accuracy, predictions, tasks, tiny  # noqa: F401,E402  (module fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_wmdp_per_example_holds_each_question_and_the_record_no_forget_split(run_cli, tiny, tasks, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hubunlearn.artifacts import RECORD_NAME

    artifact = tmp_path / "artifact"
    shutil.copytree(tiny, artifact)
    (artifact / RECORD_NAME).write_text(json.dumps({"method": "rmu", "artifact": "full", "base_model": {"name_or_path": "tiny"},
                                                    "data": {}, "hyperparameters": {}}))
    code, _, err = run_cli("eval", "--model", tiny, "--benchmark", "wmdp", "--wmdp_tasks", "wmdp_bio", "--lm_eval_include", tasks,
                           "--output_dir", tmp_path / "out", "--batch_size", 4, "--record_to", artifact)
    assert code == 0, err
    per_example = json.loads((tmp_path / "out" / "per_example.json").read_text())
    rows = per_example["wmdp_bio"]
    assert [r["doc_id"] for r in rows] == list(range(8)) and [r["doc"]["question"] for r in rows] == [q["question"] for q in QUESTIONS]
    assert all(len(r["responses"]) == 4 for r in rows)  # the log-likelihood of each choice
    predicted = predictions(AutoModelForCausalLM.from_pretrained(tiny).eval(), AutoTokenizer.from_pretrained(tiny))
    assert [max(range(4), key=r["responses"].__getitem__) for r in rows] == predicted  # the letter the model prefers
    assert [r["acc"] for r in rows] == [float(p == q["answer"]) for p, q in zip(predicted, QUESTIONS)]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["lm_eval"]["tasks"]["wmdp_bio"]["acc"] == accuracy(predicted) and "per_example" not in summary["lm_eval"]
    evaluation = json.loads((artifact / RECORD_NAME).read_text())["evaluation"]
    assert evaluation["benchmark"] == "wmdp" and "forget_split" not in evaluation
