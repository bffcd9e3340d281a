"""hubunlearn: make causal language models forget, measure it, and publish the result on the Hugging Face Hub.

Imports stay light here (``hubunlearn.testing`` is imported before ``huggingface_hub`` reads its settings);
``load``, ``push`` and ``ECOModel`` are loaded on first use. hubunlearn's info lines reach stderr without any
logging setup (see :mod:`hubunlearn.logs`).
"""

from .logs import install_default_handler

__version__ = "0.1.0"
__all__ = ["load", "push", "ECOModel", "__version__"]


def __getattr__(name: str):
    if name in ("load", "push"):
        from . import hub

        return getattr(hub, name)
    if name == "ECOModel":
        from .eco import ECOModel

        return ECOModel
    raise AttributeError(f"module 'hubunlearn' has no attribute {name!r}")


install_default_handler()
