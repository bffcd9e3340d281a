"""Peak memory of the log-probability losses with a 128k-token vocabulary: the full float32 log-softmax (before
issue 18) against hubunlearn's memory-lean versions (losses.gold_log_probs for gold-token log-probabilities;
KL and IHL in checkpointed chunks of positions).

Each case runs in its own process on the CPU: it makes the logits (and the reference logits for KL), resets the
process's peak resident memory (``/proc/self/clear_refs``), runs the loss forward and backward, and reads the peak
(``VmHWM``) above what was resident before (with glibc's mmap threshold fixed, so freed tensors leave). That extra memory includes the logits' gradient, which every variant
needs (``batch × length × vocab`` in the logits' dtype); the ratio is new / old. Batch 4 × 256 tokens,
vocabulary 128,256 (Llama 3's), float32 and bfloat16 logits, one thread. Time is one run's (the memory is what this
measures; on a shared, noisy machine read the time ratio as indicative only).

    .venv/bin/python benchmarks/logprob_memory.py        # writes benchmarks/results/logprob_memory.json (~5 min idle)
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "logprob_memory.json"
BATCH, LENGTH, VOCAB = 4, 256, 128_256
LOSSES = ("nll", "kl", "ihl")
DTYPES = ("float32", "bfloat16")
REPEATS = 1
# glibc returns a freed block to the system only if it was mapped on its own; its default threshold for that rises
# with the blocks freed, so memory freed mid-loss would stay resident and count. A fixed threshold keeps every block
# above 128 KiB mapped on its own: the resident peak is then the peak of live tensors.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _old_losses():
    """The formulas before issue 18: a full float32 log-softmax (or softmax) over the vocabulary, kept for backward."""
    import torch
    import torch.nn.functional as F

    from hubunlearn.trainers.losses import shift

    def nll(logits, labels, attention):
        shifted, targets, mask = shift(logits, labels)
        gold = torch.gather(shifted.float().log_softmax(-1), -1, targets.unsqueeze(-1)).squeeze(-1)
        return -(gold * mask).sum() / mask.sum()

    def kl(logits, reference, attention):
        mask = attention[:, 1:] != 0
        per_token = F.kl_div(logits[:, :-1].float().log_softmax(-1), reference[:, :-1].float().log_softmax(-1),
                             log_target=True, reduction="none").sum(-1)
        return (per_token * mask).sum() / mask.sum()

    def ihl(logits, labels, attention):
        shifted, targets, mask = shift(logits, labels)
        probs = shifted.float().softmax(-1)
        true_prob = torch.gather(probs, -1, targets.unsqueeze(-1)).squeeze(-1)
        other = probs.scatter(-1, targets.unsqueeze(-1), -1.0).max(-1).values
        return ((1 + true_prob - other) * mask).sum() / mask.sum()

    return {"nll": nll, "kl": kl, "ihl": ihl}


def _new_losses():
    from hubunlearn.trainers import losses

    return {"nll": lambda logits, labels, attention: losses.nll_loss(logits, labels),
            "kl": lambda logits, reference, attention: losses.kl_to_reference(logits, reference, attention),
            "ihl": lambda logits, labels, attention: losses.inverted_hinge_loss(logits, labels)}


def run_case(variant: str, loss: str, dtype: str) -> dict:
    """One measurement, in this process (called in a fresh one by :func:`main`)."""
    import torch

    from hubunlearn.benchmarking import reset_peak_memory, resident_memory_mib

    torch.set_num_threads(1)
    torch.manual_seed(0)
    function = (_old_losses() if variant == "old" else _new_losses())[loss]
    if variant == "new":  # import TRL before the measurement: its import is not the loss's memory
        from trl.trainer.utils import selective_log_softmax  # noqa: F401
    logits = (2 * torch.randn(BATCH, LENGTH, VOCAB)).to(getattr(torch, dtype)).requires_grad_()
    labels = torch.randint(0, VOCAB, (BATCH, LENGTH))
    labels[:, :64] = -100  # the prompt
    attention = torch.ones(BATCH, LENGTH, dtype=torch.long)
    second = (2 * torch.randn(BATCH, LENGTH, VOCAB)).to(getattr(torch, dtype)) if loss == "kl" else labels
    seconds, value = [], None
    for repeat in range(REPEATS):
        logits.grad = None
        reset_peak_memory()
        before, _ = resident_memory_mib()
        start = time.perf_counter()
        result = function(logits, second, attention)
        result.backward()
        seconds.append(time.perf_counter() - start)
        _, peak = resident_memory_mib()
        if repeat == 0:
            extra, value, gradient = peak - before, result.item(), logits.grad.float().abs().sum().item()
    return {"variant": variant, "loss": loss, "dtype": dtype, "peak_extra_bytes": round(extra * 2**20), "median_s": statistics.median(seconds),
            "value": value, "gradient_abs_sum": gradient, "logits_gradient_bytes": logits.numel() * logits.element_size()}


def main() -> dict:
    cases = []
    for dtype in DTYPES:
        for loss in LOSSES:
            for variant in ("old", "new"):  # interleaved: both see the same machine load
                output = subprocess.run([sys.executable, __file__, "--case", variant, loss, dtype], check=True,
                                        capture_output=True, text=True, env={**os.environ, **MALLOC}).stdout
                cases.append(json.loads(output.strip().splitlines()[-1]))
                print(f"{dtype:9} {loss:4} {variant}: {cases[-1]['peak_extra_bytes'] / 2**20:8.0f} MiB {cases[-1]['median_s']:6.2f} s", flush=True)
    summary = []
    for dtype in DTYPES:
        for loss in LOSSES:
            old, new = (next(c for c in cases if (c["variant"], c["loss"], c["dtype"]) == (v, loss, dtype)) for v in ("old", "new"))
            summary.append({"loss": loss, "dtype": dtype, "old_peak_mib": round(old["peak_extra_bytes"] / 2**20),
                            "new_peak_mib": round(new["peak_extra_bytes"] / 2**20),
                            "peak_ratio": round(new["peak_extra_bytes"] / old["peak_extra_bytes"], 3),
                            "time_ratio": round(new["median_s"] / old["median_s"], 2),
                            "same_value": abs(new["value"] - old["value"]) <= 1e-5 * max(1.0, abs(old["value"])),
                            "logits_gradient_mib": round(new["logits_gradient_bytes"] / 2**20)})
    import torch

    results = {"setup": {"batch": BATCH, "length": LENGTH, "vocab": VOCAB, "device": "cpu", "threads": 1,
                         "measure": "peak resident memory above the start of the loss's forward+backward (VmHWM after clear_refs)",
                         "malloc": MALLOC,
                         "machine": platform.processor() or platform.machine(), "torch": torch.__version__},
               "summary": summary, "cases": cases}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    for row in summary:
        print(f"{row['loss']:4} {row['dtype']:9} peak {row['old_peak_mib']:6} -> {row['new_peak_mib']:6} MiB "
              f"({row['peak_ratio']:.2f}x), time {row['time_ratio']:.2f}x, same value: {row['same_value']}")
    return results


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--case":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        print(json.dumps(run_case(*sys.argv[2:])))
    else:
        main()
