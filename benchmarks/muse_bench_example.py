"""A worked example of `hubunlearn bench muse` offline: MUSE's sustainability criterion on the fixture folder.

Writes the MUSE-layout fixture folder (``hubunlearn.testing.write_muse_folder``: 6 forget, 6 retain1 articles; ``sust``
forget_1..4 of 2 articles each), teaches a tiny Llama every raw text but the holdout ones by heart, then runs
``hubunlearn bench muse --criterion sust`` with NPO (the npo-muse-news recipe, shortened for a toy model) and
rewrites the README's sust table; the plot goes to ``benchmarks/results/muse_sust_example.png``. It shows the shape
of the output, not MUSE's numbers (those need MUSE's 7B targets and data). About a minute on a CPU.

    python benchmarks/muse_bench_example.py
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from hubunlearn.cli import main as cli
from hubunlearn.testing import muse_articles, write_muse_folder
from hubunlearn.world import teach, tiny_llama, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PLOT = ROOT / "benchmarks" / "results" / "muse_sust_example.png"


def main() -> int:
    torch.set_num_threads(1)
    home = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        os.chdir(scratch)  # relative paths, so the table names "muse-fixture" and "tiny-target", not a temporary folder
        data = write_muse_folder("muse-fixture")
        articles = muse_articles(0, {"forget": 6, "retain1": 6, "retain2": 3, "holdout": 6, "extra_forget": 2})
        texts = [a[k] for rows in articles.values() for a in rows for k in ("text", "question", "answer")]
        tokenizer = train_tokenizer(texts + ["Question: Answer:\n\n"], vocab_size=400)
        rows = [{"text": a["text"]} for split in ("forget", "retain1", "retain2", "extra_forget") for a in articles[split]]
        rows += [{"text": f"Question: {a['question']}\nAnswer: {a['answer']}\n\n"} for split in ("forget", "retain1", "retain2")
                 for a in articles[split]]  # KnowMem's format, so the target answers the QA
        model = teach(tiny_llama(tokenizer, hidden_size=128, num_layers=2), tokenizer, rows, scratch / "teach", epochs=150,
                      learning_rate=1e-2, warmup_steps=0, disable_tqdm=True)
        model.save_pretrained("tiny-target")
        tokenizer.save_pretrained("tiny-target")
        code = cli(["bench", "muse", "--criterion", "sust", "--model", "tiny-target", "--data", str(data), "--output_dir", "out",
                    "--batch_size", "8", "--readme", str(ROOT / "README.md"),
                    "--", "--max_length", "32", "--num_train_epochs", "5", "--learning_rate", "3e-3",
                    "--gradient_accumulation_steps", "1", "--per_device_train_batch_size", "2", "--disable_tqdm", "true",
                    "--no_utility_guard"])
        if code == 0:
            shutil.copyfile(Path("out") / "plot.png", PLOT)
            print(f"plot: {PLOT}")
        os.chdir(home)
    return code


if __name__ == "__main__":
    sys.exit(main())
