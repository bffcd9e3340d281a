"""Run by `accelerate launch` in tests: GradDiff on the built-in world with evaluation during training and --keep_best,
recording on each rank how many evaluation passes it ran, what it logged and the weights it ended with."""

import json
import sys
from pathlib import Path

import hubunlearn.evaluate
from hubunlearn.trainers import GradDiffConfig, GradDiffTrainer
from hubunlearn.world import World

passes = 0
evaluate_sets = hubunlearn.evaluate.evaluate_sets


def counted(*args, **kwargs):
    """eval's own function, counted: the reference's statistics and each evaluation are one pass each."""
    global passes
    passes += 1
    return evaluate_sets(*args, **kwargs)


def main(model_dir: str, output_dir: str, record_dir: str) -> None:
    hubunlearn.evaluate.evaluate_sets = counted
    world = World.make(num_forget=4)  # 20 forget rows: 2 ranks x 5 per step
    args = GradDiffConfig(output_dir=output_dir, learning_rate=1.5e-3, max_steps=2, per_device_train_batch_size=5,
                          lr_scheduler_type="constant", seed=1, disable_tqdm=True, report_to="none", eval_forget_quality_every=2,
                          eval_reference=model_dir, eval_examples=4, keep_best="forget_probability", utility_budget=0.5,
                          utility_metric="probability", utility_probe_size=4)
    trainer = GradDiffTrainer(model=model_dir, args=args, forget_dataset=world.rows("forget"), retain_dataset=world.rows("retain"))
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    weights = sum(float(p.double().sum()) for p in model.parameters())
    trainer.save_model()
    Path(record_dir, f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(
        {"world_size": trainer.accelerator.num_processes, "passes": passes, "weights": weights,
         "logged": [h for h in trainer.state.log_history if "eval_forget_quality" in h],
         "kept": trainer.record_extras["evaluation_during_training"]["keep_best"]}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
