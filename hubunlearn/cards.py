"""The model card (README.md) written next to every artifact, from its ``unlearning.json`` record."""

from __future__ import annotations

from typing import Any

from huggingface_hub import ModelCard, ModelCardData

LOADING = {
    "lora": (
        "from peft import AutoPeftModelForCausalLM\n\n"
        'model = AutoPeftModelForCausalLM.from_pretrained("{repo}")'
    ),
    "full": (
        "from transformers import AutoModelForCausalLM\n\n"
        'model = AutoModelForCausalLM.from_pretrained("{repo}")'
    ),
}


def render_card(record: dict[str, Any], tags: list[str], repo_id: str = "PATH_OR_REPO_ID") -> ModelCard:
    """A card with Hub metadata (base model, relation, library, tags, datasets) and a short body."""
    kind = record["artifact"]
    base = record["base_model"]["name_or_path"]
    hub_datasets = sorted({d["id"] for d in record["data"].values() if d and d.get("id")})
    card_data = ModelCardData(
        base_model=base,
        base_model_relation="adapter" if kind == "lora" else "finetune",
        library_name="peft" if kind == "lora" else "transformers",
        tags=sorted(set(tags)),
        datasets=hub_datasets or None,
    )
    forget = record["data"]["forget"]
    hyperparameters = "\n".join(f"| `{k}` | `{v}` |" for k, v in record["hyperparameters"].items())
    paper = f" ({record['paper']})" if record.get("paper") else ""
    content = f"""---
{card_data.to_yaml()}
---

# {repo_id.split('/')[-1]}

`{base}` after unlearning with **{record['method']}**{paper}, made with [hubunlearn](https://github.com/hubunlearn/hubunlearn).

Forget set: {forget.get('id') or 'local data'} `{forget.get('config') or ''}` — {forget['num_rows']} rows,
sha256 `{forget['sha256'][:16]}…` (the forget data itself is not published).

## Load it

```python
{LOADING[kind].format(repo=repo_id)}
```

## Hyperparameters

| name | value |
|---|---|
{hyperparameters}

## Limitations

Gradient-based unlearning suppresses knowledge; a little fine-tuning on related data can bring it back.
"""
    return ModelCard(content)
