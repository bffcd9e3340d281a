"""Hugging Face Space: the original and the unlearned model side by side (made by `hubunlearn space --deploy`).

Run locally with `python app.py`; `HUBUNLEARN_UNLEARNED` / `HUBUNLEARN_ORIGINAL` override the models below,
`HUBUNLEARN_DEVICE` the device (auto, cpu, cuda[:N]) and `PORT` the port. On ZeroGPU hardware the generation runs under `spaces.GPU` when that package is installed.
"""

import os

try:  # ZeroGPU: borrow a GPU per call (imported before torch, as ZeroGPU asks); elsewhere this package is absent
    from spaces import GPU as gpu
except ImportError:
    gpu = None

from hubunlearn.space import SideBySide, build_demo

UNLEARNED = os.environ.get("HUBUNLEARN_UNLEARNED", "{unlearned}")
ORIGINAL = os.environ.get("HUBUNLEARN_ORIGINAL", "{original}") or None
DEVICE = os.environ.get("HUBUNLEARN_DEVICE", "auto")  # auto: the GPU when the Space has one

demo = build_demo(SideBySide.load(UNLEARNED, ORIGINAL, DEVICE), gpu=gpu)

if __name__ == "__main__":
    demo.launch(server_name="0.0.0.0", server_port=int(os.environ.get("PORT", "7860")))
