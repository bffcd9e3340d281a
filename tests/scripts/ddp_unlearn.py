"""Run by `accelerate launch` in tests: GradDiff (or KUDA, PDU or IdkDPO) on the built-in world, recording what each rank did."""

import json
import sys
from pathlib import Path

from peft import LoraConfig

from hubunlearn.trainers import GradDiffConfig, GradDiffTrainer, IdkDPOConfig, IdkDPOTrainer, KUDAConfig, KUDATrainer, PDUConfig, PDUTrainer
from hubunlearn.world import World


class RecordingPDU(PDUTrainer):
    """Each step's own retain NLL (this rank's batch) and the dual variable it trained with."""

    steps: list

    def total_loss(self, forget_loss, retain_loss):
        self.steps.append({"retain_nll": retain_loss.item(), "multiplier": self.dual.multiplier})
        return super().total_loss(forget_loss, retain_loss)


class RecordingGradDiff(GradDiffTrainer):
    drawn: list

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.drawn.append({"step": self.state.global_step, "forget": inputs["forget_index"].tolist(), "retain": inputs["retain_index"].tolist()})
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class RecordingIdkDPO(IdkDPOTrainer):
    """Records, for each forget row a rank trains on, the refusal tokens and the cached statistics its batch carried."""

    drawn: list

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget = inputs["forget"]
        for row, index in enumerate(inputs["forget_index"].tolist()):
            real = forget["alternate_attention_mask"][row].bool()
            self.drawn.append({"forget": index, "refusal": forget["alternate_input_ids"][row][real].tolist(),
                               "reference_log_prob": float(forget["reference_log_prob"][row]),
                               "alternate_reference_log_prob": float(forget["alternate_reference_log_prob"][row])})
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def main(model_dir: str, output_dir: str, record_dir: str, mode: str = "full") -> None:
    """``mode`` "full": plain GradDiff; "fila": through a FILA-initialised LoRA adapter with a utility budget;
    "kuda": KUDA (causal tracing and the projection on every rank) with gradient checkpointing."""
    world = World.make(num_forget=4)  # 20 forget rows: 2 ranks x 5 per step divide them evenly (no padding repeats)
    if mode == "kuda":
        args = KUDAConfig(output_dir=output_dir, num_train_epochs=6, per_device_train_batch_size=5, seed=1, disable_tqdm=True,
                          gradient_checkpointing=True)  # hooks inside checkpointed layers, under DDP
        trainer = KUDATrainer(model=model_dir, args=args, forget_dataset=world.rows("forget"), retain_dataset=world.rows("retain"))
        trainer.train()
        trainer.save_model()
        Path(record_dir, f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(
            {"world_size": trainer.accelerator.num_processes, "layers": trainer.layers, "kept": trainer.projection.kept_dimensions,
             "engine": trainer.record_extras["engine"]}))
        return
    if mode == "pdu":
        args = PDUConfig(output_dir=output_dir, learning_rate=1e-3, max_steps=3, per_device_train_batch_size=5, seed=1, disable_tqdm=True,
                         retain_epsilon=0.01, dual_step_size=10.0, initial_multiplier=1.0)
        trainer = RecordingPDU(model=model_dir, args=args, forget_dataset=world.rows("forget"), retain_dataset=world.rows("retain"))
        trainer.steps = []
        trainer.train()
        Path(record_dir, f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(
            {"world_size": trainer.accelerator.num_processes, "steps": trainer.steps, "final": trainer.dual.multiplier}))
        return
    if mode == "idkdpo":
        args = IdkDPOConfig(output_dir=output_dir, learning_rate=1e-3, num_train_epochs=1, per_device_train_batch_size=5, seed=3,
                            per_device_eval_batch_size=4, disable_tqdm=True, report_to="none")
        trainer = RecordingIdkDPO(model=model_dir, args=args, forget_dataset=world.rows("forget"), retain_dataset=world.rows("retain"))
        trainer.drawn = []
        trainer.train()
        trainer.save_model()
        Path(record_dir, f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(
            {"world_size": trainer.accelerator.num_processes, "drawn": trainer.drawn}))
        return
    extra = {"lora_init": "fila", "utility_budget": 0.9, "utility_metric": "probability", "budget_check_steps": 2} if mode == "fila" else {}
    args = GradDiffConfig(output_dir=output_dir, learning_rate=1e-3, num_train_epochs=3, per_device_train_batch_size=5,
                          lr_scheduler_type="constant", logging_steps=1, seed=1, disable_tqdm=True, **extra)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM") if mode == "fila" else None
    trainer = RecordingGradDiff(model=model_dir, args=args, forget_dataset=world.rows("forget"), retain_dataset=world.rows("retain"),
                                peft_config=lora)
    initial = sum(float(p.double().sum()) for n, p in trainer.model.named_parameters() if "lora_" in n)
    trainer.drawn = []
    trainer.train()
    trainer.save_model()
    rank = trainer.accelerator.process_index
    Path(record_dir, f"rank{rank}.json").write_text(json.dumps({"world_size": trainer.accelerator.num_processes, "drawn": trainer.drawn,
                                                                "initial_adapter_sum": initial}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
