"""Representation methods: KUDA and RMU edit a few FFN layers so that the forget set's internal representations
move, while the retain set's stay where they were (frozen-original targets, or retain NLL)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..data import holdout_split, pad_examples
from ..errors import UsageError
from ..kuda.layers import FFNLayers
from ..kuda.positions import TOKEN_RULES, token_positions
from ..kuda.projection import NullSpaceProjection, collect_keys, null_space_projector, relative_output_change, subspace_energy
from ..kuda.tracing import TRACE_RULES, plot_trace, trace
from ..search_spaces import MAX_STEPS, RETAIN_WEIGHT, Float
from . import engines, losses
from .base import RETAIN_LOSSES, UnlearnConfig, UnlearnTrainer

logger = logging.getLogger(__name__)
REPRESENTATION_RETAIN_LOSSES = ("representation", *RETAIN_LOSSES)
# Default learning rate as a share of the trained weights' RMS, per method: chosen on the quickstart's world model (KUDA's
# bounded deviation loss needs larger steps than RMU's steering), checked on four other models in benchmarks/defaults_shapes.py.
RELATIVE_STEP = {"KUDA": 0.3, "RMU": 0.1}
HELD_OUT_FRACTION = 0.2  # of the retain rows, kept out of the projection to measure what it protects
TRACE_PLOT = "causal_trace.png"


@dataclass
class RepresentationConfig(UnlearnConfig):
    """Where the FFN layers are, and the retain term (the frozen original's representations by default)."""

    retain_losses: ClassVar[tuple[str, ...]] = REPRESENTATION_RETAIN_LOSSES
    retain_loss: str = field(default="representation", metadata={
        "help": "Retain term: 'representation' (keep the frozen original's activations on retain tokens), 'nll', 'kl' or 'none'.",
        "choices": list(REPRESENTATION_RETAIN_LOSSES)})
    layers_module: str | None = field(default=None, metadata={"help": "Path of the decoder layers' ModuleList (default: found by length)."})
    mlp_module: str = field(default="mlp", metadata={"help": "Name of the FFN block inside a decoder layer."})
    down_module: str = field(default="down_proj", metadata={"help": "Name of the FFN's output projection inside the FFN block."})
    learning_rate: float = field(default=0.0, metadata={
        "help": "Initial AdamW learning rate; 0 (default): --relative_step × the RMS of the weights that train, so the step "
                "fits the model's scale (AdamW moves each weight by about the learning rate per step)."})
    relative_step: float = field(default=0.0, metadata={
        "help": "With --learning_rate 0: the learning rate as a share of the trained weights' RMS (0: the method's own, "
                f"{', '.join(f'{k} {v:g}' for k, v in RELATIVE_STEP.items())})."})

    def __post_init__(self):
        super().__post_init__()
        if self.learning_rate < 0 or self.relative_step < 0:
            raise UsageError("--learning_rate and --relative_step must be at least 0 (0: automatic)")


def parse_layers(text: str | None, option: str) -> list[int] | None:
    """``"1,2"`` as ``[1, 2]`` (None stays None)."""
    if text is None:
        return None
    try:
        return [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{option} '{text}' is not a comma-separated list of layer numbers") from None


class RepresentationTrainer(UnlearnTrainer):
    """Shared by KUDA and RMU: freezes all but the parameters a method trains, reads activations through hooks."""

    uses_reference = True  # the frozen original's activations are the targets

    def __init__(self, *args, peft_config=None, **kwargs):
        if peft_config is not None:
            raise UsageError(f"{self._name} trains chosen FFN weights directly: drop --use_lora")
        super().__init__(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        self.ffn = FFNLayers(model, self.args.layers_module, self.args.mlp_module, self.args.down_module)
        self.reference_ffn = FFNLayers(self.accelerator.unwrap_model(self.ref_model), self.args.layers_module,
                                       self.args.mlp_module, self.args.down_module)

    def freeze_all_but(self, parameters: list[torch.nn.Parameter]) -> None:
        """Train only ``parameters``; with ``--learning_rate 0`` set the learning rate from their scale."""
        self.accelerator.unwrap_model(self.model).requires_grad_(False)
        for parameter in parameters:
            parameter.requires_grad_(True)
        if self.args.learning_rate == 0:
            step = self.args.relative_step or RELATIVE_STEP[self._name]
            rms = float(torch.cat([p.detach().float().flatten() for p in parameters]).pow(2).mean().sqrt())
            self.args.learning_rate = step * rms
            self.record_extras["learning_rate"] = {"value": self.args.learning_rate, "chosen_by": "relative_step × weight RMS",
                                                   "relative_step": step, "weight_rms": rms}
            logger.info("%s: learning rate %.3g (%g × the trained weights' RMS %.3g)", self._name, self.args.learning_rate, step, rms)

    def activations(self, model, modules: list[torch.nn.Module], batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        with FFNLayers.capture(modules) as captured:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return [captured[i] for i in range(len(modules))]

    def watched(self, ffn: FFNLayers) -> list[torch.nn.Module]:
        """The modules whose outputs the losses compare."""
        raise NotImplementedError

    def paired_activations(self, model, batch: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The watched modules' outputs on ``batch``: the model's, and the frozen original's (no gradient)."""
        current = self.activations(model, self.watched(self.ffn), batch)
        with torch.no_grad():
            original = self.activations(self.ref_model, self.watched(self.reference_ffn), batch)
        return current, original

    def retain_term(self, model, retain: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.args.retain_loss != "representation":
            return super().retain_term(model, retain)
        current, original = self.paired_activations(model, retain)
        mask = retain["attention_mask"].bool()
        return sum(losses.representation_mse_loss(h, h0, mask) for h, h0 in zip(current, original)) / len(current)


@dataclass
class KUDAConfig(RepresentationConfig):
    """Causal tracing, deviation objective and null-space projection settings of KUDA."""

    search_space: ClassVar[dict] = {"relative_step": Float(0.03, 1.0, log=True), "max_steps": MAX_STEPS, "retain_weight": RETAIN_WEIGHT, "inverse_temperature": Float(1.0, 20.0, log=True)}  # what `hubunlearn tune` searches

    layers: str | None = field(default=None, metadata={"help": "Comma-separated FFN layers to edit; skips causal tracing."})
    window: int = field(default=0, metadata={
        "help": "Contiguous layers causal tracing picks (the window with the largest summed effect); 0 (default): one per 8 "
                "layers of the model, at least 1."})
    trace_examples: int = field(default=32, metadata={"help": "Forget examples causal tracing averages over."})
    noise_scale: float = field(default=3.0, metadata={"help": "Causal tracing's prompt noise, in standard deviations of the embeddings."})
    trace_samples: int = field(default=3, metadata={"help": "Noise draws per example in causal tracing."})
    trace_tokens: str = field(default="prompt", metadata={
        "help": "Causal tracing noises the whole 'prompt' and restores FFN outputs everywhere, or noises the 'subject' "
                "(name-like tokens) and restores at the last token of each name, as ROME does.", "choices": list(TRACE_RULES)})
    inverse_temperature: float = field(default=5.0, metadata={"help": "β of the deviation loss (1/β)·softplus(β·⟨h, h⁰⟩/‖h⁰‖²)."})
    deviation_tokens: str = field(default="answer", metadata={
        "help": "Forget tokens whose FFN outputs are deviated: 'answer' (where the answer is read off), 'subject' "
                "(the question's name-like tokens) or 'prompt' (all the question's tokens).", "choices": list(TOKEN_RULES)})
    null_space: bool = field(default=True, metadata={"help": "Project updates onto the retain keys' relaxed null space (--no_null_space: ablation)."})
    null_space_threshold: float = field(default=1e-2, metadata={"help": "Keep eigen-directions of the retain keys with eigenvalue <= this × the largest."})
    retain_keys: int = field(default=4096, metadata={"help": "Retain tokens sampled per layer for the projection."})

    def __post_init__(self):
        super().__post_init__()
        if self.window < 0 or self.trace_examples < 1 or self.trace_samples < 1 or self.retain_keys < 1:
            raise UsageError("--trace_examples, --trace_samples and --retain_keys must be at least 1, --window at least 0 (automatic)")
        if self.inverse_temperature <= 0 or self.noise_scale <= 0 or not 0 < self.null_space_threshold < 1:
            raise UsageError("--inverse_temperature and --noise_scale must be positive, --null_space_threshold in (0, 1)")
        for name, choices in (("deviation_tokens", TOKEN_RULES), ("trace_tokens", TRACE_RULES)):
            if getattr(self, name) not in choices:
                raise UsageError(f"unknown --{name} '{getattr(self, name)}'; choose one of: {', '.join(choices)}")



class KUDATrainer(RepresentationTrainer):
    """KUDA, knowledge unlearning by deviating representation (Fang et al., arXiv 2602.19275): causal tracing picks
    the FFN layers that carry the forget set, training turns those layers' outputs on forget tokens away from the
    frozen original's, and every update is projected onto the retain keys' relaxed null space, so that retained
    knowledge's outputs barely move. Only the chosen layers' FFN output projections train."""

    _name = "KUDA"
    _paper = {"id": "2602.19275", "title": "Knowledge Unlearning by Deviating representAtion (KUDA) for LLMs",
              "authors": "Ce Fang and Zhikun Zhang and Min Chen and Qing Liu and Lu Zhou and Zhe Liu and Yunjun Gao", "year": 2026}
    config_class = KUDAConfig
    keeps_retain_rows = True  # the retain rows give the projection its keys, whatever retain_loss says

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config, model = self.args, self.accelerator.unwrap_model(self.model)
        engines.check_hooked_modules(config, model, self.ffn.mlps, self._name)  # before tracing: its FFN outputs are hooked
        self.trace_result = None
        layers = parse_layers(config.layers, "--layers")
        if layers is None:
            examples = [self.pairs.forget[i] for i in range(min(config.trace_examples, len(self.pairs.forget)))]
            window = config.window or max(1, round(len(self.ffn) / 8))
            self.trace_result = trace(model, self.ffn, examples, self.processing_class.pad_token_id, window,
                                      batch_size=config.per_device_train_batch_size, noise_scale=config.noise_scale,
                                      samples=config.trace_samples, seed=config.seed, tokens=config.trace_tokens,
                                      tokenizer=self.processing_class)
            layers = self.trace_result.window
        self.layers = self.ffn.check_window(layers)
        self.freeze_all_but([self.ffn.downs[i].weight for i in self.layers])
        model.train()
        record = {"layers": self.layers, "chosen_by": "causal tracing" if self.trace_result else "--layers",
                  "deviation_tokens": config.deviation_tokens}
        if self.trace_result is not None:
            record["trace"] = self.trace_result.as_record()
            self.record_extras["plots"] = [TRACE_PLOT]
        self.projection = None
        if config.null_space:
            if self._probe_examples is None:
                raise UsageError("KUDA's null-space projection needs retain keys: pass --retain SPEC (or --no_null_space)")
            downs = [self.ffn.downs[i] for i in self.layers]
            retain = [self._probe_examples[i] for i in range(len(self._probe_examples))]
            fit, held_out = holdout_split(retain, HELD_OUT_FRACTION, config.seed) if len(retain) >= 5 else (retain, [])
            keys = collect_keys(model, downs, self._batches(fit), config.retain_keys, config.seed)
            projectors = [null_space_projector(k, config.null_space_threshold) for k in keys]
            self.projection = NullSpaceProjection(downs, projectors)
            self.add_callback(self.projection)
            record["projection"] = {"threshold": config.null_space_threshold, "retain_keys": [len(k) for k in keys],
                                    "kept_dimensions": self.projection.kept_dimensions,
                                    "input_dimensions": [k.shape[1] for k in keys]}
            if held_out:
                record["projection"].update(self._energy_kept(model, downs, projectors, held_out))
        self.record_extras["kuda"] = record
        logger.info("KUDA: editing FFN layers %s (%s)", self.layers, record["chosen_by"])

    def _batches(self, examples, positions: bool = False):
        """Padded batches of ``examples``; with ``positions``, each carries the deviated tokens' mask."""
        size = self.args.per_device_train_batch_size
        for start in range(0, len(examples), size):
            batch = pad_examples([examples[i] for i in range(start, min(start + size, len(examples)))], self.processing_class.pad_token_id)
            if positions:
                batch["positions"] = token_positions(batch, self.args.deviation_tokens, self.processing_class)
            yield batch

    def _energy_kept(self, model, downs, projectors, held_out: list) -> dict[str, list[float]]:
        """How much of the forget keys' (at the deviated tokens) and of held-out retain keys' energy lies in the null
        space, i.e. what projected updates can move. Forget keys with no more of it than retain keys cannot be moved
        without moving retained outputs as much: that gets a warning."""
        size, seed = self.args.retain_keys, self.args.seed
        forget = collect_keys(model, downs, self._batches(self.pairs.forget, positions=True), size, seed)
        retain = collect_keys(model, downs, self._batches(held_out), size, seed)
        energy = {"forget_energy_kept": [subspace_energy(k, p) for k, p in zip(forget, projectors)],
                  "held_out_retain_energy_kept": [subspace_energy(k, p) for k, p in zip(retain, projectors)]}
        for layer, f, r in zip(self.layers, *energy.values()):
            logger.info("KUDA layer %d: forget keys keep %.2f%% of their energy in the null space, held-out retain keys %.2f%%",
                        layer, 100 * f, 100 * r)
        if all(f < 2 * r for f, r in zip(*energy.values())):
            logger.warning("forget keys keep less than twice the held-out retain keys' share of energy in the null space: the "
                           "projection will move retained outputs about as much as forgotten ones; check the retain set, "
                           "try --deviation_tokens subject, or --no_null_space")
        return energy

    def watched(self, ffn: FFNLayers) -> list[torch.nn.Module]:
        return [ffn.mlps[i] for i in self.layers]

    def forget_loss(self, model, forget):
        current, original = self.paired_activations(model, forget)
        mask = token_positions(forget, self.args.deviation_tokens, self.processing_class)
        return sum(losses.representation_deviation_loss(h, h0, mask, self.args.inverse_temperature)
                   for h, h0 in zip(current, original)) / len(current)

    def retain_output_change(self, keys: list[torch.Tensor]) -> list[float]:
        """``‖ΔW·k‖ / ‖W₀·k‖`` of each edited layer on ``keys`` (e.g. held-out retain keys), against the original."""
        pairs = [(self.reference_ffn.downs[i].weight, self.ffn.downs[i].weight) for i in self.layers]
        with engines.gathered([w for pair in pairs for w in pair]):  # whole weights under FSDP2 and ZeRO-3
            return [relative_output_change(engines.full_value(w0), engines.full_value(w), k) for (w0, w), k in zip(pairs, keys)]

    def save_weights(self, folder: str) -> None:
        super().save_weights(folder)
        if self.trace_result is not None and self.args.should_save:
            plot_trace(self.trace_result, f"{folder}/{TRACE_PLOT}", f"Causal tracing of {self.base_model_id}'s FFN layers")


@dataclass
class RMUConfig(RepresentationConfig):
    """Steered layer, trained layers and coefficients of RMU."""

    search_space: ClassVar[dict] = {"relative_step": Float(0.01, 0.5, log=True), "max_steps": MAX_STEPS, "retain_weight": Float(1.0, 100.0, log=True)}  # what `hubunlearn tune` searches

    layer: int | None = field(default=None, metadata={"help": "Layer whose output is steered (default: a third of the way up)."})
    trainable_layers: str | None = field(default=None, metadata={"help": "Comma-separated layers whose FFN weights train (default: the steered layer and the two below)."})
    steering_coefficient: float = field(default=0.0, metadata={
        "help": "Norm c of the control vector c·u; 0: 4 × the original's mean activation norm at the layer on forget tokens."})
    retain_weight: float = field(default=10.0, metadata={"help": "Weight α of the retain term."})

    def __post_init__(self):
        super().__post_init__()
        if self.steering_coefficient < 0:
            raise UsageError("--steering_coefficient must be positive (or 0 for the automatic value)")


class RMUTrainer(RepresentationTrainer):
    """RMU, Representation Misdirection for Unlearning (Li et al., "The WMDP Benchmark", arXiv 2403.03218): one
    layer's activations on forget tokens are steered to a fixed random direction scaled by a coefficient, while its
    activations on retain tokens are kept at the frozen original's; only a few layers' FFN weights train."""

    _name = "RMU"
    _paper = {"id": "2403.03218", "title": "The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning",
              "authors": "Nathaniel Li and Alexander Pan and Anjali Gopal and others", "year": 2024}
    config_class = RMUConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config, model = self.args, self.accelerator.unwrap_model(self.model)
        self.layer = config.layer if config.layer is not None else len(self.ffn) // 3
        trainable = parse_layers(config.trainable_layers, "--trainable_layers") or list(range(max(0, self.layer - 2), self.layer + 1))
        self.ffn.check_window([self.layer], "--layer")
        self.trainable_layers = self.ffn.check_window(trainable, "--trainable_layers")
        engines.check_hooked_modules(config, model, self.watched(self.ffn), self._name)
        if max(self.trainable_layers) > self.layer:
            raise UsageError(f"--trainable_layers {self.trainable_layers} must not lie above the steered --layer {self.layer}: "
                             "later layers cannot change its activations")
        self.freeze_all_but([p for i in self.trainable_layers for p in self.ffn.mlps[i].parameters()])
        model.train()
        generator = torch.Generator().manual_seed(config.seed)
        direction = torch.rand(model.config.hidden_size, generator=generator)
        coefficient = config.steering_coefficient or 4.0 * self._mean_forget_norm()
        self.control = (coefficient * direction / direction.norm()).to(self.args.device)
        self.record_extras["rmu"] = {"layer": self.layer, "trainable_layers": self.trainable_layers,
                                     "steering_coefficient": coefficient}

    @torch.no_grad()
    def _mean_forget_norm(self) -> float:
        examples = [self.pairs.forget[i] for i in range(min(32, len(self.pairs.forget)))]
        batch = {k: v.to(self.args.device) for k, v in pad_examples(examples, self.processing_class.pad_token_id).items()}
        hidden = self.activations(self.ref_model, self.watched(self.reference_ffn), batch)[0]
        return float(hidden.norm(dim=-1)[batch["attention_mask"].bool()].mean())

    def watched(self, ffn: FFNLayers) -> list[torch.nn.Module]:
        return [ffn.layers[self.layer]]

    def forget_loss(self, model, forget):
        hidden = self.activations(model, self.watched(self.ffn), forget)[0]
        return losses.representation_mse_loss(hidden, self.control, forget["attention_mask"].bool())
