"""KUDA and RMU: causal tracing, the null-space projection, the deviation losses, the CLI and its bad input."""

import json

import pytest
import torch

from hubunlearn.data import DataFormat, pad_examples, tokenize_rows
from hubunlearn.errors import UsageError
from hubunlearn.kuda.layers import FFNLayers
from hubunlearn.kuda.projection import NullSpaceProjection, null_space_projector, relative_output_change, subspace_energy
from hubunlearn.kuda.tracing import best_window, trace
from hubunlearn.trainers import losses


@pytest.mark.parametrize("planted, tokens", [(1, "prompt"), (2, "prompt"), (1, "subject"), (2, "subject")])
def test_tracing_finds_the_layer_that_holds_a_planted_association(planted, tokens, tokenizer, forget_rows):
    """A random 4-layer model where only layer ``planted``'s FFN (with the embeddings and the output head) learns the
    facts: every other FFN is random, so the association can only live in that one."""
    from hubunlearn.world import tiny_llama

    model = tiny_llama(tokenizer, hidden_size=64, num_layers=4, seed=0)
    ffn = FFNLayers(model)
    model.requires_grad_(False)
    for module in (ffn.mlps[planted], model.lm_head, model.get_input_embeddings()):
        module.requires_grad_(True)
    examples = list(tokenize_rows(forget_rows, tokenizer, DataFormat(max_length=128)))
    batch = pad_examples(examples, tokenizer.pad_token_id)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(150):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    result = trace(model, ffn, examples, tokenizer.pad_token_id, window=1, tokens=tokens, tokenizer=tokenizer)
    assert float(result.clean.mean()) > 0.9 > float(result.corrupted.mean())  # the noise hides the subject
    effects = result.mean_effects
    assert result.window == [planted]
    assert effects[planted] > 0.1 and all(e < effects[planted] / 5 for i, e in enumerate(effects) if i != planted)


def test_best_window_and_its_bad_input():
    assert best_window([0.1, 0.5, 0.4, 0.0], 2) == [1, 2]
    assert best_window([0.3, 0.0, 0.2, 0.2], 1) == [0]
    with pytest.raises(UsageError, match="window 5 does not fit the model's 4 layers: choose 1..4"):
        best_window([0.0] * 4, 5)


def test_null_space_projection_makes_updates_vanish_on_retain_keys():
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(6, 32, generator=generator)  # retain keys live (mostly) in a 6-dimensional subspace
    keys = torch.randn(500, 6, generator=generator) @ basis + 1e-3 * torch.randn(500, 32, generator=generator)
    projector = null_space_projector(keys, threshold=1e-2)
    assert int(round(float(projector.trace()))) == 32 - 6 and torch.allclose(projector @ projector, projector, atol=1e-5)
    layer = torch.nn.Linear(32, 16, bias=False)
    weight = layer.weight
    with torch.no_grad():
        weight.copy_(torch.randn(16, 32, generator=generator))
    projection = NullSpaceProjection([layer], [projector])
    with torch.no_grad():
        weight += torch.randn(16, 32, generator=generator)  # an unconstrained optimiser step
    assert relative_output_change(projection.originals[0], weight, keys) > 0.5
    projection.project()
    held_out = torch.randn(100, 6, generator=generator) @ basis
    assert relative_output_change(projection.originals[0], weight, held_out) < 1e-4  # ΔW·k ≈ 0
    assert (weight - projection.originals[0]).norm() > 1  # the update survived outside the subspace
    assert subspace_energy(held_out, projector) < 1e-6  # retain keys have no energy where updates may go
    assert subspace_energy(torch.randn(2000, 32, generator=generator), projector) == pytest.approx(26 / 32, abs=0.05)
    with pytest.raises(UsageError, match="null_space_threshold"):
        null_space_projector(torch.randn(100, 4, generator=generator), threshold=1e-9)


def test_representation_losses_by_hand():
    original = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    mask = torch.tensor([[True, False]])
    same = losses.representation_deviation_loss(original.clone().requires_grad_(), original, mask, inverse_temperature=2.0)
    assert same.item() == pytest.approx(torch.nn.functional.softplus(torch.tensor(2.0)).item() / 2)
    hidden = original.clone().requires_grad_()
    losses.representation_deviation_loss(hidden, original, mask, 2.0).backward()
    assert hidden.grad[0, 0, 0] > 0 and hidden.grad[0, 1].abs().sum() == 0  # pushes the masked token away, at h = h⁰ too
    opposite = losses.representation_deviation_loss(-original, original, mask, 2.0)
    assert opposite.item() < 0.1 * same.item()
    assert losses.representation_mse_loss(torch.tensor([[[3.0, 0.0], [9.0, 9.0]]]), original, mask).item() == pytest.approx(2.0)
    assert losses.answer_positions(torch.tensor([[-100, -100, 5, 6, -100]])).tolist() == [[False, True, True, False, False]]


def test_token_positions_answer_prompt_subject_and_its_last_token(tokenizer):
    from hubunlearn.kuda.positions import span_ends, token_positions

    rows = [{"question": "where was Jon Hale born?", "answer": "in Oslo"}, {"question": "where was he born?", "answer": "in Oslo"}]
    batch = pad_examples(list(tokenize_rows(rows, tokenizer, DataFormat(max_length=64))), tokenizer.pad_token_id)
    prompt = (batch["labels"] == -100) & batch["attention_mask"].bool()
    assert torch.equal(token_positions(batch, "prompt", tokenizer), prompt)
    assert torch.equal(token_positions(batch, "answer", tokenizer), losses.answer_positions(batch["labels"]))
    subject = token_positions(batch, "subject", tokenizer)
    assert tokenizer.decode(batch["input_ids"][0][subject[0]]).split() == ["Jon", "Hale"]
    assert torch.equal(subject[1], prompt[1])  # no name in the question: all of it
    ends = span_ends(subject)
    assert ends.sum(-1).tolist() == [1, 1]  # one run each: "Jon Hale", and the fallback's whole question
    assert [i.nonzero().max().item() for i in ends] == [i.nonzero().max().item() for i in subject]


def _data(world, folder):
    folder.mkdir()
    for name in ("forget", "retain"):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in world.rows(name)))
    return folder / "forget.jsonl", folder / "retain.jsonl"


def test_unlearn_method_kuda_edits_only_the_traced_layers_and_keeps_retain_outputs(run_cli, world_model_dir, world, tokenizer,
                                                                                 mean_answer_probability, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    forget, retain = _data(world, tmp_path / "data")
    runs = {}
    for name, extra in (("projected", []), ("ablation", ["--no_null_space"])):
        output = tmp_path / name
        code, out, err = run_cli("unlearn", "--method", "kuda", "--model_name_or_path", world_model_dir, "--forget", forget,
                                 "--retain", retain, "--max_steps", "16", "--per_device_train_batch_size", "8",
                                 "--learning_rate", "1e-2", "--no_utility_guard", "--output_dir", output, *extra)  # raw runs
        assert code == 0, err
        runs[name] = output
    record = json.loads((runs["projected"] / "unlearning.json").read_text())
    layers = record["kuda"]["layers"]
    assert record["method"] == "KUDA" and record["kuda"]["chosen_by"] == "causal tracing" and len(layers) == 1
    assert record["kuda"]["trace"]["clean_score"] > record["kuda"]["trace"]["corrupted_score"]
    assert (runs["projected"] / "causal_trace.png").stat().st_size > 1000 and record["plots"] == ["causal_trace.png"]
    card = (runs["projected"] / "README.md").read_text()
    assert "causal_trace.png" in card and f"FFN layers {layers}" in card and "forget set's answer tokens" in card
    forget_share = record["kuda"]["projection"]["forget_energy_kept"][0]
    assert f"forget keys keep {forget_share:.1%} of their energy" in card

    original = load_file(str(world_model_dir / "model.safetensors"))
    edited = load_file(str(runs["projected"] / "model.safetensors"))
    changed = sorted(name for name in original if not torch.equal(original[name], edited[name]))
    assert changed == [f"model.layers.{i}.mlp.down_proj.weight" for i in layers]

    models = {name: AutoModelForCausalLM.from_pretrained(folder) for name, folder in runs.items()}
    before = mean_answer_probability(AutoModelForCausalLM.from_pretrained(world_model_dir), world.rows("forget"))
    assert mean_answer_probability(models["projected"], world.rows("forget")) < before - 0.3  # it forgot
    assert mean_answer_probability(models["projected"], world.rows("retain")) > 0.97  # the retain set held

    # the edited layers' outputs on retain keys move much less with the projection than without it (how little is a
    # trade-off with forgetting set by --null_space_threshold: benchmarks/kuda_tofu_mini.py measures it)
    ffn = FFNLayers(models["projected"])
    examples = list(tokenize_rows(world.rows("retain"), tokenizer, DataFormat(max_length=128)))
    from hubunlearn.kuda.projection import collect_keys

    base = AutoModelForCausalLM.from_pretrained(world_model_dir)
    keys = collect_keys(base, [FFNLayers(base).downs[i] for i in layers], [pad_examples(examples, tokenizer.pad_token_id)])
    change = {name: relative_output_change(FFNLayers(base).downs[layers[0]].weight, FFNLayers(m).downs[layers[0]].weight, keys[0])
              for name, m in models.items()}
    assert change["projected"] < change["ablation"] / 2.5, change
    assert ffn.downs[layers[0]].weight.shape[1] == keys[0].shape[1]


def test_trace_command_prints_the_table_and_saves_the_heat_map(run_cli, world_model_dir, world, tmp_path):
    forget, _ = _data(world, tmp_path / "data")
    code, out, err = run_cli("trace", "--model", world_model_dir, "--forget", forget, "--window", "2", "--examples", "8",
                             "--output", tmp_path / "trace.png")
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 4 and sum("✓" in row for row in rows) == 2
    assert (tmp_path / "trace.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, err = run_cli("trace", "--model", world_model_dir, "--forget", forget, "--examples", "8", "--tokens", "subject",
                             "--output", tmp_path / "subject.png")
    assert code == 0 and "subject corrupted" in out and (tmp_path / "subject.png").exists(), err
    code, _, err = run_cli("trace", "--model", world_model_dir, "--forget", forget, "--tokens", "names", "--output", tmp_path / "t3.png")
    assert code == 2 and "invalid choice: 'names'" in err
    code, _, err = run_cli("trace", "--model", world_model_dir, "--forget", forget, "--window", "9", "--output", tmp_path / "t2.png")
    assert code == 2 and "--window 9 does not fit the model's 4 layers" in err and not (tmp_path / "t2.png").exists()


@pytest.mark.parametrize("method, extra, message", [
    ("kuda", ["--window", "7"], "--window 7 does not fit the model's 4 layers: choose 1..4"),
    ("kuda", ["--layers", "2,9"], "layers [2, 9] are not within the model's 4 layers"),
    ("kuda", ["--mlp_module", "ffn"], "no FFN 'ffn.down_proj' in LlamaForCausalLM's decoder layers"),
    ("kuda", ["--down_module", "w2"], "set --mlp_module and --down_module"),
    ("kuda", ["--layers_module", "model.blocks"], "set --layers_module"),
    ("kuda", ["--retain", "EMPTY"], "the retain set is empty"),
    ("kuda", ["--retain_loss", "none", "--retain", None], "needs retain keys: pass --retain SPEC (or --no_null_space)"),
    ("kuda", ["--use_lora"], "KUDA trains chosen FFN weights directly: drop --use_lora"),
    ("kuda", ["--layers", "1,x"], "--layers '1,x' is not a comma-separated list of layer numbers"),
    ("kuda", ["--deviation_tokens", "names"], "invalid choice: 'names' (choose from 'answer', 'subject', 'prompt')"),
    ("kuda", ["--trace_tokens", "answer"], "invalid choice: 'answer' (choose from 'prompt', 'subject')"),
    ("rmu", ["--layer", "1", "--trainable_layers", "1,2"], "must not lie above the steered --layer 1"),
    ("rmu", ["--trainable_layers", "0,7"], "layers [0, 7] are not within the model's 4 layers (0..3): fix --trainable_layers"),
    ("rmu", ["--retain_loss", "cosine"], "invalid choice: 'cosine' (choose from 'representation', 'nll', 'kl', 'none')"),
])
def test_representation_methods_bad_input(run_cli, world_model_dir, world, tmp_path, method, extra, message):
    forget, retain = _data(world, tmp_path / "data")
    (tmp_path / "data" / "empty.jsonl").write_text("")
    flags = {"--method": method, "--model_name_or_path": world_model_dir, "--forget": forget, "--retain": retain,
             "--output_dir": tmp_path / "never", "--max_steps": "1"}
    extra = [str(tmp_path / "data" / "empty.jsonl") if part == "EMPTY" else part for part in extra]
    if None in extra:
        flags.pop(extra[extra.index(None) - 1])
        extra = [part for i, part in enumerate(extra) if part is not None and (i + 1 >= len(extra) or extra[i + 1] is not None)]
    args = [str(part) for pair in flags.items() for part in pair] + [str(part) for part in extra]
    code, _, err = run_cli("unlearn", *args)
    assert code == 2 and message in err.strip().splitlines()[-1], err
    assert not (tmp_path / "never").exists()


def test_kuda_without_a_retain_loss_still_projects_onto_the_retain_keys(model, tokenizer, forget_rows, retain_rows, tmp_path):
    from hubunlearn.trainers import KUDAConfig, KUDATrainer

    args = KUDAConfig(output_dir=str(tmp_path / "out"), retain_loss="none", layers="1", use_cpu=True, report_to="none")
    trainer = KUDATrainer(model=model, args=args, forget_dataset=forget_rows, retain_dataset=retain_rows, processing_class=tokenizer)
    assert trainer.layers == [1] and trainer.trace_result is None and trainer.projection is not None
    assert 0 < trainer.projection.kept_dimensions[0] < model.config.intermediate_size
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable == ["model.layers.1.mlp.down_proj.weight"]


def test_kuda_reports_how_much_of_the_forget_keys_the_projection_can_move(model, tokenizer, forget_rows, retain_rows, caplog, tmp_path):
    """The record has each layer's energy shares: the world's forget subjects keep several times the held-out retain
    keys' share; "forgetting" the retain set's own answers leaves the projection nothing to forget with, and says so."""
    from hubunlearn.trainers import KUDAConfig, KUDATrainer

    def projection_record(forget, tokens):
        args = KUDAConfig(output_dir=str(tmp_path), layers="1,2", deviation_tokens=tokens, use_cpu=True, report_to="none")
        trainer = KUDATrainer(model=model, args=args, forget_dataset=forget, retain_dataset=retain_rows, processing_class=tokenizer)
        return trainer.record_extras["kuda"]["projection"]

    with caplog.at_level("WARNING", logger="hubunlearn"):
        distinct = projection_record(forget_rows, "subject")
    assert len(distinct["forget_energy_kept"]) == len(distinct["held_out_retain_energy_kept"]) == 2
    assert all(0 <= v <= 1 for v in distinct["forget_energy_kept"] + distinct["held_out_retain_energy_kept"])
    assert min(f / r for f, r in zip(distinct["forget_energy_kept"], distinct["held_out_retain_energy_kept"])) > 2, distinct
    assert "about as much" not in caplog.text
    with caplog.at_level("WARNING", logger="hubunlearn"):
        same = projection_record(retain_rows, "answer")
    assert max(same["forget_energy_kept"]) < 2 * max(same["held_out_retain_energy_kept"])
    assert "will move retained outputs about as much as forgotten ones" in caplog.text
