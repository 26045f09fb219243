"""Helpers for the layout tests: a layer read as the callback reads it, expected drawings.

``FM_TODAYS_RULES=1 pytest tests/test_probing.py tests/test_layouts_models.py`` reads every layer
by the name-based rules instead of the measurement, to show which checks those rules fail.
"""

from __future__ import annotations

import os
from typing import Any
from unittest import mock

import torch
from torch import Tensor, nn

from fm_lightning import probing
from fm_lightning.capture import call_model, num_rows, resolve_layers
from fm_lightning.layouts import Fallback, Maps, interpret
from fm_lightning.probing import Reading, measure_layout, measure_layouts


def output_of(model: nn.Module, name: str, probe: Any) -> object:
    """What layer ``name`` returns for ``probe`` (model in eval mode, no gradients)."""
    seen: dict[str, object] = {}
    handle = model.get_submodule(name).register_forward_hook(
        lambda m, a, out: seen.setdefault("out", out)
    )
    try:
        with torch.no_grad():
            call_model(model.eval(), probe)
    finally:
        handle.remove()
    return seen["out"]


def read(model: nn.Module, name: str, probe: Any) -> tuple[Reading, Maps]:
    """(measured reading, drawn maps) of layer ``name`` for ``probe``."""
    model.eval()
    layer = model.get_submodule(name)
    if os.environ.get("FM_TODAYS_RULES"):
        reading = Fallback("today's rules")
    else:
        reading = measure_layout(model, layer, probe)
    output = output_of(model, name, probe)
    n = num_rows(probe)
    return reading, interpret(output, module=layer, model=model, num_rows=n, reading=reading)


def chained_and_full(
    model: nn.Module, probe: Any, layers: list[str]
) -> tuple[dict[str, Reading], dict[str, Reading], int]:
    """(chained readings, full readings, how many layers the chained pass read from a backward
    pass that stopped at an earlier layer) of ``layers`` (names or patterns) for ``probe``."""
    modules = resolve_layers(model.eval(), layers)
    full = measure_layouts(model, probe, modules, chain=False)
    taken: list[Reading] = []

    def spy(*args: Any, **kwargs: Any) -> Reading:
        reading = chained(*args, **kwargs)
        if reading is not None:
            taken.append(reading)
        return reading

    chained = probing._chained
    with mock.patch.object(probing, "_chained", spy):
        readings = measure_layouts(model, probe, modules)
    return readings, full, len(taken)


def on_grid(tokens: Tensor, k: int, h: int, w: int) -> Tensor:
    """(N, k + h*w, D) tokens drawn on their grid, built index by index: (N, D, h, w)."""
    n, _, d = tokens.shape
    out = torch.empty(n, d, h, w)
    for i in range(h):
        for j in range(w):
            out[:, :, i, j] = tokens[:, k + i * w + j]
    return out


class ChannelNorm(nn.Module):
    """LayerNorm over channels of an NCHW map, returning NCHW: only a LayerNorm inside."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
