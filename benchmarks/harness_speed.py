"""Eval time per 100 WMDP-style questions on a tiny model: hubunlearn's path (`eval --benchmark wmdp`'s scoring,
`hubunlearn.harness.run_tasks` on the loaded model) against a plain `lm_eval.simple_evaluate` on an HFLM of the same
model. Both run the harness's own task on local data (100 synthetic four-choice questions in WMDP's template);
medians of the repeats, CPU seconds (process time: steady on a shared machine) and wall seconds.

    python benchmarks/harness_speed.py --model FOLDER [--questions 100] [--repeats 3]
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()

    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from hubunlearn.evaluate import load_for_eval
    from hubunlearn.harness import run_tasks

    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="harness-speed-"))
    rows = [{"question": f"Which agent causes outbreak number {i} in the northern district?",
             "choices": [f"virus strain {i}", "a bacterium", "a fungus", "a prion"], "answer": i % 4} for i in range(args.questions)]
    (folder / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = (Path(__file__).resolve().parents[1] / "tests" / "test_harness.py").read_text()
    yaml = template.split('TASK_YAML = """', 1)[1].split('"""', 1)[0].replace("{{", "{").replace("}}", "}")
    (folder / "wmdp_bio.yaml").write_text(yaml.replace("{name}", "wmdp_bio").replace("{data}", str(folder / "q.jsonl")))
    model, tokenizer = load_for_eval(args.model, device="cpu")
    manager = TaskManager(include_path=str(folder), include_defaults=False)

    def ours():
        return run_tasks(model, tokenizer, ("wmdp_bio",), (str(folder),), batch_size=args.batch_size)["tasks"]["wmdp_bio"]["acc"]

    def plain():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
        return lm_eval.simple_evaluate(model=lm, tasks=["wmdp_bio"], task_manager=manager, log_samples=False)["results"]["wmdp_bio"]["acc,none"]

    times = {"hubunlearn": [], "simple_evaluate": []}
    accs = {}
    ours(), plain()  # warm-up: dataset cache, imports
    for _ in range(args.repeats):
        for name, run in (("hubunlearn", ours), ("simple_evaluate", plain)):
            wall, cpu = time.perf_counter(), time.process_time()
            accs[name] = run()
            times[name].append((time.process_time() - cpu, time.perf_counter() - wall))
    scale = 100 / args.questions
    for name, values in times.items():
        cpu = statistics.median(v[0] for v in values) * scale
        wall = statistics.median(v[1] for v in values) * scale
        print(f"{name:<16} acc {accs[name]:.4f}  {cpu:.2f} CPU s / 100 questions  {wall:.2f} wall s / 100 questions")
    print(f"torch {torch.__version__}, lm_eval {lm_eval.__version__}, 1 torch thread, batch {args.batch_size}")


if __name__ == "__main__":
    main()
