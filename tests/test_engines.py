"""Engines: gradient checkpointing with every method (same losses and gradients as without it), the FSDP/DeepSpeed
refusals and reference preparation, and KUDA's projection on FSDP2-sharded weights. Tiny Llamas built from a config
and a tokenizer trained on the spot: no session fixture, a few seconds in all."""

import json
import logging

import pytest
import torch
from peft import LoraConfig
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from hubunlearn.benchmarking import REQUIRED_SETTINGS
from hubunlearn.errors import UsageError
from hubunlearn.trainers import METHODS, GradDiffConfig, GradDiffTrainer, engines
from hubunlearn.world import World, train_tokenizer

WORLD = World.make(num_people=6, num_forget=2)
SHAPES = {"h32x2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
          "h48x3-gqa": dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(WORLD.corpus(), vocab_size=300)


def tiny(tokenizer, shape="h32x2", cls=LlamaForCausalLM):
    config = LlamaConfig(vocab_size=len(tokenizer), intermediate_size=96, max_position_embeddings=128, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         **SHAPES[shape])
    torch.manual_seed(0)
    return cls(config)


class _Gradients(TrainerCallback):
    """Each step's gradients, read just before the optimiser uses them."""

    def __init__(self, trainer):
        self.trainer, self.steps = trainer, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.steps.append({n: p.grad.detach().clone() for n, p in self.trainer.model.named_parameters() if p.grad is not None})


def two_steps(tokenizer, tmp_path, method, lora=False, checkpointing=False, kwargs=None, shape="h32x2", **extra):
    """Train ``method`` two steps; returns the logged losses, each step's gradients, how often layer 0's attention
    ran (a recomputation runs it again) and the trainer."""
    cls = METHODS[method]
    args = cls.config_class(output_dir=str(tmp_path / f"{method}-{lora}-{checkpointing}"), max_steps=2, per_device_train_batch_size=2,
                            learning_rate=1e-3, gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs=kwargs,
                            report_to="none", disable_tqdm=True, use_cpu=True, logging_steps=1, seed=0,
                            **{**REQUIRED_SETTINGS.get(method, {}), **extra})
    peft = LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", task_type="CAUSAL_LM") if lora else None
    trainer = cls(model=tiny(tokenizer, shape), args=args, forget_dataset=WORLD.rows("forget"), retain_dataset=WORLD.rows("retain"),
                  processing_class=tokenizer, peft_config=peft)
    gradients = _Gradients(trainer)
    trainer.add_callback(gradients)
    calls = [0]
    attention = trainer.accelerator.unwrap_model(trainer.model).get_decoder().layers[0].self_attn
    attention.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    trainer.train()
    losses = [(h["forget_loss"], h.get("retain_loss")) for h in trainer.state.log_history if "forget_loss" in h]
    return losses, gradients.steps, calls[0], trainer


def assert_same_step(plain, checkpointed):
    (losses, steps, calls, _), (losses_c, steps_c, calls_c, trainer) = plain, checkpointed
    assert calls_c > calls, "checkpointing did not recompute the layers"
    assert trainer.record_extras["engine"] == {"engine": "single process", "activation_checkpointing": True}
    assert len(losses) == len(losses_c) == 2 and len(steps) == len(steps_c) == 2
    for (forget, retain), (forget_c, retain_c) in zip(losses, losses_c):
        assert forget_c == pytest.approx(forget, abs=1e-5) and (retain is None or retain_c == pytest.approx(retain, abs=1e-5))
    for step, step_c in zip(steps, steps_c):
        assert step.keys() == step_c.keys() and step
        for name in step:
            torch.testing.assert_close(step_c[name], step[name], atol=1e-5, rtol=1e-4, msg=name)


CASES = [(m, False) for m in METHODS] + [(m, True) for m in METHODS if m not in ("kuda", "rmu")]  # KUDA/RMU refuse LoRA


@pytest.mark.parametrize("method,lora", CASES, ids=[f"{m}-{'lora' if lora else 'full'}" for m, lora in CASES])
def test_checkpointing_gives_the_same_losses_and_gradients(tokenizer, tmp_path, method, lora):
    assert_same_step(two_steps(tokenizer, tmp_path, method, lora), two_steps(tokenizer, tmp_path, method, lora, checkpointing=True))


@pytest.mark.parametrize("method,lora", [("kuda", False), ("kl", True)])
def test_checkpointing_on_another_shape(tokenizer, tmp_path, method, lora):
    shape = "h48x3-gqa"
    assert_same_step(two_steps(tokenizer, tmp_path, method, lora, shape=shape),
                     two_steps(tokenizer, tmp_path, method, lora, checkpointing=True, shape=shape))


@pytest.mark.parametrize("method,lora", [("rmu", False), ("npo", True)])
def test_reentrant_checkpointing_where_it_can_work(tokenizer, tmp_path, method, lora):
    """LoRA behind frozen embeddings (transformers enables input gradients) and RMU's hook on a whole decoder layer."""
    assert_same_step(two_steps(tokenizer, tmp_path, method, lora),
                     two_steps(tokenizer, tmp_path, method, lora, checkpointing=True, kwargs={"use_reentrant": True}))


def test_fila_fisher_pass_and_training_under_checkpointing(tokenizer, tmp_path):
    assert_same_step(two_steps(tokenizer, tmp_path, "graddiff", lora=True, lora_init="fila"),
                     two_steps(tokenizer, tmp_path, "graddiff", lora=True, checkpointing=True, lora_init="fila"))


def test_kuda_refuses_reentrant_checkpointing(tokenizer, tmp_path):
    with pytest.raises(UsageError, match="KUDA reads activations inside the checkpointed decoder layers.*drop use_reentrant"):
        two_steps(tokenizer, tmp_path, "kuda", checkpointing=True, kwargs={"use_reentrant": True})


class NoCheckpointingLlama(LlamaForCausalLM):
    supports_gradient_checkpointing = False


def test_a_model_that_cannot_checkpoint_is_named(tokenizer, tmp_path):
    args = GradDiffConfig(output_dir=str(tmp_path / "out"), gradient_checkpointing=True, use_cpu=True, report_to="none")
    with pytest.raises(UsageError, match=r"^activation_checkpointing \(gradient_checkpointing\): NoCheckpointingLlama does not support"):
        GradDiffTrainer(model=tiny(tokenizer, cls=NoCheckpointingLlama), args=args, forget_dataset=WORLD.rows("forget"),
                        retain_dataset=WORLD.rows("retain"), processing_class=tokenizer)


def test_checkpointing_options_must_be_a_json_object(tokenizer, tmp_path):
    for given in ("notjson", "[1, 2]"):
        args = GradDiffConfig(output_dir=str(tmp_path / "out"), gradient_checkpointing=True, gradient_checkpointing_kwargs=given,
                              use_cpu=True, report_to="none")
        with pytest.raises(UsageError, match=r"checkpointing_kwargs\) must be a JSON object"):
            engines.check(tiny(tokenizer), args, "GradDiff")
    args = GradDiffConfig(output_dir=str(tmp_path / "out"), gradient_checkpointing=True,
                          gradient_checkpointing_kwargs='{"use_reentrant": true}', use_cpu=True, report_to="none")
    engines.check(tiny(tokenizer), args, "GradDiff")
    assert engines.reentrant(args)  # parsed, so the reentrant refusals see it


def test_fsdp_in_one_process_says_to_launch_several(tokenizer, tmp_path):
    fsdp = {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "state_dict_type": "FULL_STATE_DICT"}
    args = GradDiffConfig(output_dir=str(tmp_path / "out"), fsdp="full_shard", fsdp_config=fsdp, use_cpu=True, report_to="none")
    with pytest.raises(UsageError, match="fsdp shards the model over several processes: run under `accelerate launch`"):
        GradDiffTrainer(model=tiny(tokenizer), args=args, forget_dataset=WORLD.rows("forget"), retain_dataset=WORLD.rows("retain"),
                        processing_class=tokenizer)
    assert not (tmp_path / "out").exists()


# ---- FSDP and DeepSpeed: what can run on a CPU -------------------------------------------------------------------


def test_sharded_runs_refuse_what_cannot_work(tokenizer, tmp_path):
    fsdp = {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "state_dict_type": "SHARDED_STATE_DICT"}
    args = GradDiffConfig(output_dir=str(tmp_path / "out"), fsdp="full_shard", fsdp_config=fsdp, use_cpu=True, report_to="none")
    with pytest.raises(UsageError, match="GradDiff under FSDP saves a full checkpoint: set fsdp_config state_dict_type .* to FULL_STATE_DICT"):
        GradDiffTrainer(model=tiny(tokenizer), args=args, forget_dataset=WORLD.rows("forget"), retain_dataset=WORLD.rows("retain"),
                        processing_class=tokenizer)
    launched = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}  # accelerate launch --use_fsdp --fsdp_version 2
    with pytest.MonkeyPatch.context() as env:
        for key, value in launched.items():
            env.setenv(key, value)
        plain = GradDiffConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
        with pytest.raises(UsageError, match="fsdp_state_dict_type\\) to FULL_STATE_DICT, not SHARDED_STATE_DICT"):
            engines.check(tiny(tokenizer), plain, "NPO")  # accelerate's default for FSDP2 would save no weights
        env.setenv("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT")
        engines.check(tiny(tokenizer), plain, "NPO")
    budget = GradDiffConfig(output_dir=str(tmp_path / "out"), utility_budget=0.9, use_cpu=True, report_to="none")
    with pytest.raises(UsageError, match="utility_budget .* needs full weights in one process, which FSDP shards"):
        engines.check_sharded(budget, "GradDiff", "fsdp", fsdp_plugin_args={"state_dict_type": "FULL_STATE_DICT"})
    zero3 = {"zero_optimization": {"stage": 3}}
    with pytest.raises(UsageError, match="stage3_gather_16bit_weights_on_model_save to true"):
        engines.check_sharded(budget, "NPO", "deepspeed", zero3)
    zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    with pytest.raises(UsageError, match="which ZeRO-3 shards: run it with ZeRO stage 2"):
        engines.check_sharded(budget, "NPO", "deepspeed", zero3)
    engines.check_sharded(budget, "NPO", "deepspeed", {"zero_optimization": {"stage": 2}})  # full weights on every process
    plain = GradDiffConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    engines.check_sharded(plain, "NPO", "deepspeed", zero3)


def test_the_reference_is_prepared_by_trls_helpers(tokenizer):
    from accelerate import Accelerator, DistributedType
    from trl.models import prepare_deepspeed, prepare_fsdp

    assert engines.reference_preparer(DistributedType.DEEPSPEED) is prepare_deepspeed
    assert engines.reference_preparer(DistributedType.FSDP) is prepare_fsdp
    model = tiny(tokenizer)
    assert engines.prepare_reference(model, Accelerator(cpu=True)) is model  # one process, no engine: nothing to wrap


def test_a_model_already_partitioned_by_zero3_is_refused(tokenizer):
    model = tiny(tokenizer)
    next(model.parameters()).ds_id = 0  # what deepspeed.zero.Init leaves on every parameter
    with pytest.raises(UsageError, match="already partitioned by ZeRO-3.*load the model before creating the config"):
        engines.check_partitioned(model, "NPO")


def test_kuda_projection_and_hooks_on_fsdp2_sharded_weights(tokenizer, tmp_path):
    """FSDP2 replaces every parameter by a sharded DTensor when training starts: the projection must follow the
    layer's live weight (a kept reference to the old parameter would project a dead tensor), and FFN hooks must
    still see the whole activations. One process (gloo), torch's own fully_shard: accelerate keeps FSDP off CPUs."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from hubunlearn.kuda import FFNLayers, NullSpaceProjection, null_space_projector

    model = tiny(tokenizer)
    ffn = FFNLayers(model)
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(8, 96, generator=generator)
    projector = null_space_projector(torch.randn(400, 8, generator=generator) @ basis, threshold=1e-3)
    projection = NullSpaceProjection([ffn.downs[1]], [projector])
    ids = torch.randint(5, len(tokenizer), (2, 12), generator=generator)
    with FFNLayers.capture(ffn.mlps) as before:
        model(input_ids=ids)
    before = dict(before)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for layer in ffn.layers:
            fully_shard(layer)
        fully_shard(model)
        assert isinstance(ffn.downs[1].weight, DTensor)  # a new parameter object
        with FFNLayers.capture(ffn.mlps) as captured:
            loss = model(input_ids=ids, labels=ids).loss
        for i in range(len(ffn)):
            torch.testing.assert_close(captured[i], before[i])
        loss.backward()
        torch.optim.SGD(model.parameters(), lr=1.0).step()
        moved = engines.full_value(ffn.downs[1].weight) - projection.originals[0]
        assert (moved @ basis.T).norm() > 1e-3  # the unprojected step moves outputs on the retain keys
        projection.project()
        moved = engines.full_value(ffn.downs[1].weight) - projection.originals[0]
        assert (moved @ basis.T).norm() < 1e-4 * basis.norm() and moved.norm() > 1e-3
    finally:
        dist.destroy_process_group()


def test_deepspeed_argument_is_checked_before_deepspeed_is_needed(tmp_path):
    from hubunlearn.unlearn import parse_unlearn_args

    broken = tmp_path / "ds.json"
    broken.write_text("{not json")
    base = ["--method", "npo", "--model_name_or_path", "m", "--forget", "f.jsonl", "--output_dir", str(tmp_path / "out")]
    for value, said in ((str(tmp_path / "missing.json"), "is neither a file nor a JSON object"), (str(broken), "is not a JSON object")):
        with pytest.raises(UsageError, match=f"deepspeed .* {said}: give the path of a DeepSpeed JSON config"):
            parse_unlearn_args([*base, "--deepspeed", value])
    good = tmp_path / "zero2.json"
    good.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    try:
        import deepspeed  # noqa: F401
    except ImportError:  # this machine: a valid config reaches the missing-package line
        with pytest.raises(UsageError, match="deepspeed needs the DeepSpeed package"):
            parse_unlearn_args([*base, "--deepspeed", str(good)])


def test_eco_refuses_checkpointing_it_would_never_use(tokenizer, tmp_path):
    from hubunlearn.trainers import ECOConfig, ECOTrainer

    args = ECOConfig(output_dir=str(tmp_path / "out"), gradient_checkpointing=True, use_cpu=True, report_to="none")
    with pytest.raises(UsageError, match=r"ECO does not train the model's weights: drop activation_checkpointing \(gradient_checkpointing\)"):
        ECOTrainer(model=tiny(tokenizer), args=args, forget_dataset=WORLD.rows("forget"), retain_dataset=WORLD.rows("retain"),
                   processing_class=tokenizer)
    assert not (tmp_path / "out").exists()
