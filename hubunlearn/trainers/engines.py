"""The engines a run trains under: activation (gradient) checkpointing, FSDP and DeepSpeed ZeRO.

Which engine runs is the Trainer's business: ``--gradient_checkpointing`` (``--activation_checkpointing``) and its
``--gradient_checkpointing_kwargs``, ``--fsdp``/``--fsdp_config``, ``--deepspeed``, or an ``accelerate launch``
config. This module adds what unlearning needs on top, and nothing the libraries already do:

* refusals before any work, as one line that says what to change: a model class that cannot checkpoint;
  reentrant checkpointing under a method that reads activations inside the checkpointed layers (KUDA: the
  reentrant variant runs them without gradients); an artifact the engine would not gather into a full checkpoint;
  the controls that rewrite full weights in memory (utility-budget mixing, FILA's conversion) on sharded weights;
* the frozen reference prepared the way the engine needs, with TRL's helpers (``prepare_deepspeed`` shards it under
  ZeRO-3 and keeps a plain copy per device below; ``prepare_fsdp`` shards it like the policy), as TRL's own trainers do;
* full values of weights that are sharded during training (FSDP2's ``DTensor`` parameters, ZeRO-3 partitions), for
  the code that reads or rewrites them whole (KUDA's null-space projection).

Transformers' own checkpointing already covers the other traps: it is non-reentrant unless told otherwise, enables
input gradients (so a LoRA adapter or a few trained FFN weights behind frozen embeddings get gradients), checkpoints
each decoder layer's ``forward`` (hooks on the layer itself stay outside the recomputation), and skips checkpointing
in eval mode and without gradients (the frozen reference, the adapter-off base, FILA's eval-mode Fisher pass).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Any

import torch

from ..errors import UsageError

# What a sharded engine cannot do with our controls, and what to use instead.
NOT_SHARDED = {
    "utility_budget": "--utility_budget (mixing with the original rewrites the full weights in memory)",
    "fila": "--lora_init fila (its conversion to a standard adapter saves and reloads the adapter in one process)",
}


def uses_checkpointing(args) -> bool:
    return bool(getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False))


def reentrant(args) -> bool:
    """Whether the run checkpoints with the reentrant variant (only when ``use_reentrant`` is given as true)."""
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or getattr(args, "gradient_checkpointing_kwargs", None) or {}
    return uses_checkpointing(args) and bool(kwargs.get("use_reentrant", False))


def check_checkpointing(model, args) -> None:
    """``--activation_checkpointing`` (``--gradient_checkpointing``) on a model class that cannot checkpoint, or with
    options that are not a JSON object: one line (transformers would raise only when training starts, after the
    reference copy and the statistics pass)."""
    for name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):
        value = getattr(args, name, None)
        if isinstance(value, str):
            try:
                setattr(args, name, json.loads(value))
            except ValueError:
                pass
            if not isinstance(getattr(args, name), dict):
                raise UsageError("--activation_checkpointing_kwargs (--gradient_checkpointing_kwargs) must be a JSON object, "
                                 f"e.g. '{{\"use_reentrant\": false}}'; got {value!r}")
    if uses_checkpointing(args) and not getattr(model, "supports_gradient_checkpointing", False):
        raise UsageError(f"--activation_checkpointing (--gradient_checkpointing): {type(model).__name__} does not support "
                         "activation checkpointing (supports_gradient_checkpointing is False); drop the flag")


def check_distributed(args, engine: str | None) -> None:
    """FSDP (``--fsdp``) shards over processes: in a single process transformers stops with a traceback once the
    Trainer is built; say so first."""
    from transformers.training_args import ParallelMode

    if engine == "fsdp" and getattr(args, "fsdp", None) and args.parallel_mode != ParallelMode.DISTRIBUTED:
        raise UsageError("--fsdp shards the model over several processes: run under `accelerate launch` (or torchrun) "
                         "with two or more processes, or drop --fsdp")


def check_hooked_modules(args, model, modules: list[torch.nn.Module], method: str) -> None:
    """Reentrant checkpointing runs a checkpointed layer's forward without gradients, so an activation captured
    inside it by a hook (KUDA's FFN outputs) has none: refused. Hooks on a decoder layer itself are outside the
    checkpoint (transformers checkpoints the layer's ``forward``), so RMU's layer outputs keep their gradients."""
    if not reentrant(args):
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    inside = {id(sub) for layer in model.modules() if isinstance(layer, GradientCheckpointingLayer)
              for sub in layer.modules() if sub is not layer}
    if any(id(module) in inside for module in modules):
        raise UsageError(f"{method} reads activations inside the checkpointed decoder layers, which reentrant checkpointing "
                         "computes without gradients: drop use_reentrant from --gradient_checkpointing_kwargs (the default "
                         "is non-reentrant)")


# ---- FSDP and DeepSpeed ----------------------------------------------------------------------------------------


def sharding(args) -> str | None:
    """``"fsdp"`` or ``"deepspeed"`` when the run's arguments (or ``accelerate launch``'s environment) ask for one,
    else None; readable before the Trainer exists."""
    if getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return None


def zero_stage(deepspeed_config: dict | None) -> int:
    return int(((deepspeed_config or {}).get("zero_optimization") or {}).get("stage", 0))


def check_deepspeed_config(config: dict, method: str) -> None:
    """ZeRO-3 saves a full checkpoint only when told to gather the 16-bit weights at save time; without it the
    Trainer writes DeepSpeed's own checkpoint, which ``from_pretrained`` cannot load."""
    if zero_stage(config) == 3 and not (config.get("zero_optimization") or {}).get("stage3_gather_16bit_weights_on_model_save"):
        raise UsageError(f"{method} under DeepSpeed ZeRO-3 saves a full checkpoint: set zero_optimization."
                         "stage3_gather_16bit_weights_on_model_save to true in the DeepSpeed config")


def fsdp_state_dict_type(fsdp_plugin_args: dict | None) -> str:
    """The state dict type FSDP will save: from ``--fsdp_config`` (transformers' default FULL_STATE_DICT), else from
    ``accelerate launch``'s environment, where accelerate defaults FSDP2 to SHARDED_STATE_DICT."""
    if fsdp_plugin_args is not None:
        return str(fsdp_plugin_args.get("state_dict_type", "FULL_STATE_DICT"))
    version = os.environ.get("FSDP_VERSION", "1")
    return os.environ.get("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT" if version == "1" else "SHARDED_STATE_DICT")


def check_fsdp_config(fsdp_plugin_args: dict | None, method: str) -> None:
    """Only a FULL_STATE_DICT is gathered into an artifact that ``from_pretrained`` loads (the Trainer saves no
    weights at all for a SHARDED_STATE_DICT)."""
    kind = fsdp_state_dict_type(fsdp_plugin_args)
    if "FULL_STATE_DICT" not in kind:
        raise UsageError(f"{method} under FSDP saves a full checkpoint: set fsdp_config state_dict_type (an accelerate "
                         f"config's fsdp_state_dict_type) to FULL_STATE_DICT, not {kind}")


def check_sharded(args, method: str, engine: str | None, deepspeed_config: dict | None = None,
                  fsdp_plugin_args: dict | None = None) -> None:
    """What an FSDP or DeepSpeed run must not ask for (``engine`` as :func:`sharding` names it); ZeRO stages 0-2
    keep full weights on every process, so only their saving rules apply."""
    if engine is None:
        return
    if engine == "deepspeed":
        check_deepspeed_config(deepspeed_config or {}, method)
        if zero_stage(deepspeed_config) < 3:
            return
    else:
        check_fsdp_config(fsdp_plugin_args, method)
    asked = [what for key, what in NOT_SHARDED.items()
             if (key == "utility_budget" and args.utility_budget is not None) or (key == "fila" and args.lora_init == "fila")]
    if asked:
        name = "ZeRO-3" if engine == "deepspeed" else "FSDP"
        raise UsageError(f"{asked[0]} needs full weights in one process, which {name} shards: run it with ZeRO stage 2 or "
                         "plain data parallelism, or drop it")


def deepspeed_config(args) -> dict | None:
    """The run's DeepSpeed config as a dict (from ``--deepspeed`` or ``accelerate launch``'s plugin), else None."""
    hf_config = getattr(args, "hf_deepspeed_config", None)
    if hf_config is not None:
        return hf_config.config
    plugin = getattr(args, "deepspeed_plugin", None)
    return plugin.deepspeed_config if plugin is not None else None


def shards_weights(args) -> bool:
    """Whether the run's weights are sharded during training (FSDP, DeepSpeed ZeRO-3)."""
    engine = sharding(args)
    return engine == "fsdp" or (engine == "deepspeed" and zero_stage(deepspeed_config(args)) == 3)


@contextmanager
def whole_weights_at_load():
    """``from_pretrained`` inside the block loads whole weights even after a ZeRO-3 config was created (not
    partitioned under ``deepspeed.zero.Init``), so the original can be measured, copied as the reference and
    traced before training; DeepSpeed partitions them when training starts. Transformers' own switch: the
    DeepSpeed config it consults is unset for the block."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref() if hf_deepspeed._hf_deepspeed_config_weak_ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if saved is not None:
            hf_deepspeed.set_hf_deepspeed_config(saved)


def check(model, args, method: str) -> None:
    """Everything this module refuses, before the trainer does any work (see the module docstring)."""
    engine = sharding(args)
    check_checkpointing(model, args)
    check_sharded(args, method, engine, deepspeed_config(args), getattr(args, "fsdp_plugin_args", None))
    check_distributed(args, engine)
    check_partitioned(model, method)


def check_partitioned(model, method: str) -> None:
    """A model loaded after a ZeRO-3 config (``from_pretrained`` under ``deepspeed.zero.Init``) has empty weights
    until DeepSpeed starts: the original could be neither measured nor copied as the reference."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise UsageError(f"{method}: the model's weights are already partitioned by ZeRO-3 (it was loaded after the DeepSpeed "
                         "config was created): load the model before creating the config (hubunlearn unlearn does), so the "
                         "original is measured and copied as the reference before training shards it")


def reference_preparer(distributed_type):
    """How the frozen reference is prepared for ``distributed_type`` (an ``accelerate.DistributedType``): TRL's
    ``prepare_deepspeed`` (ZeRO-3: sharded like the policy; stages 0-2: one plain copy per process) and
    ``prepare_fsdp``, as TRL's trainers use them; otherwise the accelerator's evaluation-mode preparation."""
    from accelerate import DistributedType

    if distributed_type == DistributedType.DEEPSPEED:
        from trl.models import prepare_deepspeed

        return prepare_deepspeed
    if distributed_type == DistributedType.FSDP:
        from trl.models import prepare_fsdp

        return prepare_fsdp
    return lambda model, accelerator: accelerator.prepare_model(model, evaluation_mode=True)


def prepare_reference(model, accelerator):
    """The frozen reference ``model`` ready for the run's engine (see :func:`reference_preparer`)."""
    return reference_preparer(accelerator.distributed_type)(model, accelerator)


def describe(trainer) -> dict[str, Any]:
    """The engine of a run, for ``unlearning.json``: ``{"engine", "activation_checkpointing"}`` (+ the ZeRO stage)."""
    state = trainer.accelerator.state
    if getattr(trainer, "is_deepspeed_enabled", False):
        engine = {"engine": "deepspeed", "zero_stage": zero_stage(state.deepspeed_plugin.deepspeed_config)}
    elif getattr(trainer, "is_fsdp_enabled", False):
        engine = {"engine": f"fsdp{getattr(state.fsdp_plugin, 'fsdp_version', 1)}"}
    else:
        engine = {"engine": "ddp" if state.num_processes > 1 else "single process"}
    return {**engine, "activation_checkpointing": uses_checkpointing(trainer.args)}


# ---- full values of sharded weights ----------------------------------------------------------------------------


@contextmanager
def gathered(parameters: list[torch.nn.Parameter], modify: bool = False):
    """Inside the block, ZeRO-3-partitioned ``parameters`` hold their full values (DeepSpeed's
    ``GatheredParameters``; with ``modify``, what rank 0 writes is partitioned back). Other parameters, FSDP2's
    included (see :func:`full_value`), are left as they are."""
    partitioned = [p for p in parameters if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None):
        yield


def full_value(parameter: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter: FSDP2 shards it as a ``DTensor`` (all-gathered here), others are whole."""
    from torch.distributed.tensor import DTensor

    return parameter.full_tensor() if isinstance(parameter, DTensor) else parameter.data


@torch.no_grad()
def assign(parameter: torch.Tensor, value: torch.Tensor) -> None:
    """Write the whole ``value`` into ``parameter``; an FSDP2 ``DTensor`` keeps its own shard of it (every process
    computes the same ``value``, so no communication is needed)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(parameter, DTensor):
        parameter.copy_(distribute_tensor(value.to(parameter.dtype), parameter.device_mesh, parameter.placements, src_data_rank=None))
    else:
        parameter.copy_(value)
