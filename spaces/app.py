"""Hugging Face Space: the original and the unlearned model side by side (made by `hubunlearn space --deploy`).

Run locally with `python app.py`; `HUBUNLEARN_UNLEARNED` / `HUBUNLEARN_ORIGINAL` override the models below, and
`PORT` the port. On ZeroGPU hardware the generation runs under `spaces.GPU` when that package is installed.
"""

import os

from hubunlearn.space import SideBySide, build_demo

UNLEARNED = os.environ.get("HUBUNLEARN_UNLEARNED", "{unlearned}")
ORIGINAL = os.environ.get("HUBUNLEARN_ORIGINAL", "{original}") or None

try:  # ZeroGPU: borrow a GPU per call; elsewhere this package is absent and nothing changes
    from spaces import GPU as gpu
except ImportError:
    gpu = None

demo = build_demo(SideBySide.load(UNLEARNED, ORIGINAL), gpu=gpu)

if __name__ == "__main__":
    demo.launch(server_name="0.0.0.0", server_port=int(os.environ.get("PORT", "7860")))
