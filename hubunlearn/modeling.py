"""Loading models and tokenizers by Hub id or local folder, with errors that say what to do."""

from __future__ import annotations

import logging
import os

from .errors import UsageError

logger = logging.getLogger(__name__)


def _not_found(name_or_path: str, error: Exception) -> UsageError:
    if os.path.isdir(name_or_path):
        return UsageError(f"cannot load a model from {name_or_path}: {str(error).splitlines()[0]}")
    return UsageError(
        f"model '{name_or_path}' not found: give an existing local folder or a Hub model id "
        "(check the spelling, the revision asked for, and HF_TOKEN for private repositories)"
    )


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of a model, with a pad token (the eos token when it has none, and a warning saying so)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise _not_found(name_or_path, error) from error
    return ensure_pad_token(tokenizer)


def ensure_pad_token(tokenizer):
    """Give a tokenizer without a pad token its eos token for padding, and say so."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UsageError("the tokenizer has neither a pad nor an eos token: add a pad token to it before unlearning")
        tokenizer.pad_token = tokenizer.eos_token
        logger.warning("the tokenizer has no pad token; padding with its eos token %r", tokenizer.eos_token)
    return tokenizer


def load_model(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False, dtype: str = "auto"):
    """A causal LM from a Hub id or local folder (safetensors weights; remote code only when asked)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype, use_safetensors=True
        )
    except (OSError, ValueError) as error:
        raise _not_found(name_or_path, error) from error


def hub_facts(name_or_path: str, revision: str | None = None) -> dict:
    """What an artifact records about its base model on the Hub: the commit ``revision`` points to and the
    license on its card. Best effort, never fails a run: local folders give nothing, an unreachable or gated
    repository gives back the requested ``revision``."""
    if not name_or_path or os.path.isdir(name_or_path):
        return {"revision": revision, "license": None}
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(name_or_path, revision=revision)
    except Exception:  # offline, gated, unknown: the record keeps what the user asked for
        return {"revision": revision, "license": None}
    license = (info.card_data or {}).get("license") if info.card_data is not None else None
    return {"revision": info.sha or revision, "license": license}


def base_model_view(peft_model):
    """The base model under a PEFT adapter as a plain ``transformers`` model with no adapter, sharing the adapter
    model's base tensors (no copy: the extra memory is the module objects and the non-persistent buffers).

    ``peft_model.disable_adapter()`` switches the adapter off for every caller at once; this view lets one thread
    ask the original while another asks the adapted model. Raises ``ValueError`` for an adapter that replaces
    base modules (anything other than LoRA-style layers over ``base_layer``).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    base = peft_model.get_base_model()
    state = {}
    for name, tensor in base.state_dict(keep_vars=True).items():
        if ".modules_to_save." in name or "lora_" in name:
            continue
        state[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor
    with init_empty_weights():  # parameters on the meta device, buffers (e.g. rotary inv_freq) real
        view = AutoModelForCausalLM.from_config(base.config, dtype=base.dtype)
    view.load_state_dict(state, strict=True, assign=True)
    view.generation_config = base.generation_config
    return view.to(base.device).eval()


DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(device: str | None = "auto"):
    """The ``torch.device`` a ``--device`` value names: ``auto`` (or None) is the machine's accelerator when one is
    available (a CUDA GPU, else ``torch.accelerator``'s: MPS, XPU, ...) and the CPU otherwise; ``cpu``; ``cuda`` or
    ``cuda:N``. Raises :class:`UsageError` (one line) for any other value, for ``cuda`` on a machine whose torch sees
    no CUDA GPU, and for a GPU index that does not exist."""
    import torch

    name = (device or "auto").strip().lower()
    if name == "auto":  # CUDA asked first: ZeroGPU's ``spaces`` package makes torch.cuda report its GPU
        if torch.cuda.is_available():
            return torch.device("cuda")
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        return torch.device(accelerator.type) if accelerator else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise UsageError(f"unknown --device '{device}': choose {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA GPU is available here (torch {torch.__version__} sees none): "
                         "use --device cpu or auto")
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        raise UsageError(f"--device {device}: this machine has {count} CUDA GPU(s) (cuda:0 to cuda:{count - 1}): choose one of them")
    return torch.device("cuda", int(index)) if index else torch.device("cuda")


def place(model, device: str | None = "auto"):
    """``model`` moved to :func:`resolve_device`'s device (a PEFT model with its adapter; an ECO bundle with its base
    model: its prompt classifier stays where it computes, on the CPU); a model already spread over devices by
    ``device_map`` (``hf_device_map``) stays where it is. Returns the model."""
    if getattr(model, "hf_device_map", None) or getattr(getattr(model, "model", None), "hf_device_map", None):
        return model
    return model.to(resolve_device(device))


def model_device(model):
    """The device a model computes on: its first parameter's (what the metrics move their batches to)."""
    return next(model.parameters()).device
