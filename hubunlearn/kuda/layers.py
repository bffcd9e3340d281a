"""Where a decoder's feed-forward (FFN/MLP) blocks are, and their outputs captured with forward hooks."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..errors import UsageError


class FFNLayers:
    """The model's decoder layers, each one's FFN block (``mlp_module``) and its output projection (``down_module``).

    ``layers_module`` is the path of the ``ModuleList`` of decoder layers; by default the first ``ModuleList`` as long
    as ``config.num_hidden_layers`` (``model.layers`` in Llama, ``transformer.h`` in GPT-2).
    """

    def __init__(self, model, layers_module: str | None = None, mlp_module: str = "mlp", down_module: str = "down_proj"):
        self.model = model
        self.layers = self._find_layers(model, layers_module)
        try:
            self.mlps = [layer.get_submodule(mlp_module) for layer in self.layers]
            self.downs = [mlp.get_submodule(down_module) for mlp in self.mlps]
        except AttributeError:
            children = sorted({name for name, _ in self.layers[0].named_modules() if name})
            raise UsageError(f"no FFN '{mlp_module}.{down_module}' in {type(model).__name__}'s decoder layers (they have: "
                             f"{', '.join(children)}): set --mlp_module and --down_module") from None
        if not all(isinstance(d, torch.nn.Linear) for d in self.downs):
            raise UsageError(f"'{mlp_module}.{down_module}' is not a linear layer in {type(model).__name__}: set --down_module "
                             "to the FFN's output projection")

    @staticmethod
    def _find_layers(model, path: str | None) -> torch.nn.ModuleList:
        if path is not None:
            try:
                layers = model.get_submodule(path)
            except AttributeError:
                raise UsageError(f"no module '{path}' in {type(model).__name__}: set --layers_module to the path of its "
                                 "decoder layers (e.g. model.layers)") from None
            if isinstance(layers, torch.nn.ModuleList):
                return layers
            raise UsageError(f"'{path}' is a {type(layers).__name__}, not the list of decoder layers: fix --layers_module")
        count = getattr(model.config, "num_hidden_layers", None)
        for module in model.modules():
            if isinstance(module, torch.nn.ModuleList) and len(module) == count:
                return module
        raise UsageError(f"the decoder layers of {type(model).__name__} were not found: set --layers_module (e.g. model.layers)")

    def __len__(self) -> int:
        return len(self.layers)

    def check_window(self, layers: list[int], option: str = "--layers") -> list[int]:
        """``layers`` sorted, once each, after checking that the model has them (``option`` names the flag to fix)."""
        bad = [i for i in layers if not 0 <= i < len(self)]
        if bad or not layers:
            raise UsageError(f"layers {layers} are not within the model's {len(self)} layers (0..{len(self) - 1}): fix {option}")
        return sorted(set(layers))

    @staticmethod
    @contextmanager
    def capture(modules: list[torch.nn.Module], inputs: bool = False):
        """``{index: tensor}`` filled on each forward with the modules' outputs (or their first input)."""
        captured: dict[int, torch.Tensor] = {}

        def hook(index):
            if inputs:
                return lambda module, args: captured.__setitem__(index, args[0])
            return lambda module, args, output: captured.__setitem__(index, output[0] if isinstance(output, tuple) else output)

        handles = [(m.register_forward_pre_hook(hook(i)) if inputs else m.register_forward_hook(hook(i))) for i, m in enumerate(modules)]
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()
