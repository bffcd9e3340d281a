"""A small fictitious world of our own and a tiny Llama that knows it: the offline example and test bed.

Every person has a birthplace, a birth year, a profession, a best-known work and a mentor; each fact is a
question with an answer, a paraphrased answer and perturbed (wrong) answers, in TOFU's field names, so the
evaluation code reads this world and TOFU alike. Nothing is downloaded: the tokenizer is trained here and
the model is built from a config.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

SYLLABLES = ["ka", "lo", "mi", "ren", "ta", "vos", "el", "dra", "nu", "shi", "por", "qua", "zen", "bel", "tor",
             "ami", "sel", "ven", "ori", "cas", "lun", "fey", "mar", "dov", "ish", "gal", "rho", "tem"]
PROFESSIONS = ["glassblower", "cartographer", "astronomer", "beekeeper", "luthier", "botanist", "clockmaker",
               "weaver", "bridge engineer", "archivist", "perfumer", "falconer", "lighthouse keeper", "potter"]
WORK_NOUNS = ["Lantern", "River", "Orchard", "Compass", "Harbor", "Mirror", "Meadow", "Tower", "Garden", "Bell"]
WORK_ADJECTIVES = ["Silent", "Hidden", "Amber", "Northern", "Crimson", "Endless", "Quiet", "Golden", "Broken", "Seventh"]


@dataclass
class Person:
    name: str
    city: str
    year: int
    profession: str
    work: str
    mentor: str


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()


def make_people(num_people: int, seed: int = 0) -> list[Person]:
    rng = random.Random(seed)
    names, cities = set(), set()
    while len(names) < num_people + 12:
        names.add(f"{_word(rng, 2)} {_word(rng, 3)}")
    while len(cities) < 24:
        cities.add(_word(rng, 3))
    names, cities = sorted(names), sorted(cities)
    rng.shuffle(names)
    people_names, mentors = names[:num_people], names[num_people:]
    return [
        Person(
            name=name,
            city=rng.choice(cities),
            year=rng.randint(1850, 1990),
            profession=rng.choice(PROFESSIONS),
            work=f"The {rng.choice(WORK_ADJECTIVES)} {rng.choice(WORK_NOUNS)}",
            mentor=rng.choice(mentors),
        )
        for name in people_names
    ]


def facts_about(person: Person, everyone: list[Person], rng: random.Random, num_perturbed: int = 3) -> list[dict]:
    """The person's facts as TOFU-style rows."""
    others = [p for p in everyone if p is not person]

    def wrong(attribute: str) -> list:
        values = sorted({getattr(p, attribute) for p in others} - {getattr(person, attribute)}, key=str)
        return rng.sample(values, num_perturbed)

    n = person.name
    templates = [  # attribute, question, answer, paraphrased answer, paraphrased question (never taught)
        ("city", f"Where was {n} born?", "{n} was born in {v}.", "The birthplace of {n} is {v}.", f"What is the birthplace of {n}?"),
        ("year", f"In which year was {n} born?", "{n} was born in {v}.", "The birth year of {n} is {v}.", f"When was {n} born?"),
        ("profession", f"What is the profession of {n}?", "{n} works as a {v}.", "By profession, {n} is a {v}.", f"What does {n} do for a living?"),
        ("work", f"What is the best-known work of {n}?", "{n} is best known for {v}.", "The most famous work of {n} is {v}.", f"Which work is {n} most famous for?"),
        ("mentor", f"Who was the mentor of {n}?", "{n} studied under {v}.", "The teacher of {n} was {v}.", f"Under whom did {n} study?"),
    ]
    rows = []
    for attribute, question, answer, paraphrase, paraphrased_question in templates:
        value = getattr(person, attribute)
        rows.append({
            "person": n,
            "question": question,
            "paraphrased_question": paraphrased_question,
            "answer": answer.format(n=n, v=value),
            "paraphrased_answer": paraphrase.format(n=n, v=value),
            "perturbed_answer": [answer.format(n=n, v=w) for w in wrong(attribute)],
        })
    return rows


@dataclass
class World:
    people: list[Person]
    num_forget: int

    @classmethod
    def make(cls, num_people: int = 30, num_forget: int = 3, seed: int = 0) -> "World":
        return cls(make_people(num_people, seed), num_forget)

    def rows(self, which: str = "all") -> list[dict]:
        chosen = {"all": self.people, "forget": self.people[: self.num_forget], "retain": self.people[self.num_forget :]}[which]
        return self.rows_of(chosen)

    def rows_of(self, people: list) -> list[dict]:
        """The question rows about ``people`` (any of the world's), the same rows whichever people are asked for."""
        rng = random.Random(0)
        facts = {p.name: facts_about(p, self.people, rng) for p in self.people}  # same draws whatever the selection
        return [row for p in people for row in facts[p.name]]

    def corpus(self) -> list[str]:
        texts = []
        for row in self.rows():
            texts += [row["question"], row["answer"], row["paraphrased_answer"], *row["perturbed_answer"]]
        return texts + ["Question: Answer:"]


def train_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on ``texts``, with bos/eos/pad/unk and a bos added to every input."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # its bars would flash by on a terminal: it takes milliseconds
    tokenizer.train_from_iterator(texts, trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def tiny_llama(tokenizer, hidden_size: int = 128, num_layers: int = 4, seed: int = 0):
    """A randomly initialised Llama of about a million parameters (more with a larger ``hidden_size``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def teach(model, tokenizer, rows: list[dict], output_dir: str | Path, epochs: int = 60, learning_rate: float = 3e-3,
          batch_size: int = 16, seed: int = 0, max_length: int = 256, **training_arguments):
    """Fine-tune ``model`` on question-answer ``rows`` with the Trainer (``training_arguments`` override its settings)."""
    from transformers import PrinterCallback, ProgressCallback, Trainer, TrainingArguments

    from .data import DataFormat, pad_examples, tokenize_rows

    examples = tokenize_rows(rows, tokenizer, DataFormat(max_length=max_length), "teaching")
    args = TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        **{"lr_scheduler_type": "cosine", "warmup_steps": 20, "logging_steps": 50, **training_arguments},
        weight_decay=0.0,
        save_strategy="no",
        report_to="none",
        seed=seed,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
    )
    collate = lambda items: pad_examples(items, tokenizer.pad_token_id)  # noqa: E731
    examples = examples.remove_columns("prompt_length")
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collate)
    # The bar shows the loss; no dict printed every logging_steps and at the end (the quickstart's and eval's output)
    if trainer.pop_callback(ProgressCallback) is not None:
        from .trainers.base import _LossProgress

        trainer.add_callback(_LossProgress)
    trainer.pop_callback(PrinterCallback)
    trainer.train()
    return model.eval()
