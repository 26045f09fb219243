"""fm_lightning.capture without a Trainer: names and globs, the probe pass, probe structures."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v3_small, resnet18

from fm_lightning import SimpleCNN
from fm_lightning.capture import (
    MAX_MATCHES,
    call_model,
    capture,
    concat_rows,
    first_image,
    not_run,
    num_rows,
    probe_pass,
    resolve_layers,
    take_rows,
)


def test_star_stays_within_one_name_part_and_double_star_crosses_parts():
    blocks = resolve_layers(mobilenet_v3_small(), ["features.*"])
    assert list(blocks) == [f"features.{i}" for i in range(13)]  # not their 200 descendants
    convs = resolve_layers(resnet18(), ["**.conv1"])
    assert list(convs) == ["conv1"] + [f"layer{i}.{j}.conv1" for i in range(1, 5) for j in (0, 1)]
    assert list(resolve_layers(resnet18(), ["layer1.*.conv?"])) == [
        "layer1.0.conv1",
        "layer1.0.conv2",
        "layer1.1.conv1",
        "layer1.1.conv2",
    ]


def test_a_pattern_matching_too_many_modules_is_refused_with_the_count():
    with pytest.raises(ValueError, match=rf"at most {MAX_MATCHES} modules, got \d+ .*narrow it"):
        resolve_layers(mobilenet_v3_small(), ["features.**"])


def test_unknown_names_list_the_closest():
    with pytest.raises(ValueError, match="Closest: conv1"):
        resolve_layers(SimpleCNN(), ["conv_1"])


def test_compiled_modules_resolve_without_orig_mod():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.compile(SimpleCNN(), backend="eager")

    model = Wrapper()
    found = resolve_layers(model, ["conv1", "net._orig_mod.conv2", "net.fc1"])
    assert list(found) == ["conv1", "net.conv2", "net.fc1"]  # as named, never with _orig_mod
    assert found["conv1"] is model.net._orig_mod.conv1
    assert not any("_orig_mod" in name for name in found)


def test_compiled_model_hooks_fire_in_the_probe_pass_without_new_graphs():
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.reset()
    net = SimpleCNN().eval()
    compiled = torch.compile(net, backend="eager")
    with torch.no_grad():
        compiled(torch.randn(8, 1, 28, 28))
        compiled(torch.randn(5, 1, 28, 28))  # a ragged last batch: compiled for both sizes now
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    captured, _ = capture(compiled, torch.randn(5, 1, 28, 28), resolve_layers(compiled, ["conv1"]))
    assert captured["conv1"].act.shape == (5, 16, 24, 24)
    with torch.no_grad():
        compiled(torch.randn(5, 1, 28, 28))  # the compiled code is still what runs afterwards
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs


def test_probe_pass_removes_hooks_and_restores_modes_even_when_forward_fails():
    model = SimpleCNN().train()
    model.conv2.eval()  # a frozen submodule keeps its own mode
    modules = {"conv1": model.conv1, "conv2": model.conv2}
    captured, logits = capture(model, torch.zeros(2, 1, 28, 28), modules)
    assert captured["conv1"].act.shape == (2, 16, 24, 24) and logits.shape == (2, 10)
    with pytest.raises(RuntimeError):
        capture(model, torch.zeros(2, 3, 28, 28), modules)  # conv1 takes 1 channel
    assert all(not m._forward_hooks for m in model.modules())
    assert model.training and model.conv1.training and not model.conv2.training


def test_an_in_place_forward_never_changes_the_probe():
    class InPlace(nn.Module):
        def forward(self, x):
            return x.mul_(2)

    probe = torch.ones(2, 3)
    probe_pass(InPlace(), probe, {}, lambda *a: None)
    assert torch.equal(probe, torch.ones(2, 3))


def test_probe_structures_tensor_tuple_and_dict():
    seen = []

    class Kw(nn.Module):
        def forward(self, pixel_values, mask=None):
            seen.append((pixel_values.shape, mask))
            return pixel_values.sum()

    batch = {"pixel_values": torch.randn(3, 1, 8, 8), "mask": None}
    parts = [take_rows(batch, 2), take_rows(batch, 1)]
    probe = concat_rows(parts)
    rows = batch["pixel_values"][[0, 1, 0]]  # the second part took the first row again
    assert num_rows(probe) == 3 and torch.equal(probe["pixel_values"], rows)
    call_model(Kw(), probe)
    assert seen == [((3, 1, 8, 8), None)]
    pair = concat_rows([take_rows((torch.zeros(2, 4), torch.ones(2)), 2)] * 2)
    assert num_rows(pair) == 4 and isinstance(pair, tuple)
    with pytest.raises(TypeError, match="same batch size"):
        num_rows((torch.zeros(2, 4), torch.zeros(3)))
    with pytest.raises(TypeError, match="no tensor"):
        num_rows({"a": 1})


def test_first_image_is_4d_or_single_channel_3d_and_none_for_flat_inputs():
    assert first_image({"ids": torch.zeros(2, 5), "img": torch.zeros(2, 3, 8, 8)}).shape == (
        2,
        3,
        8,
        8,
    )
    assert first_image(torch.zeros(2, 28, 28)).shape == (2, 1, 28, 28)
    assert first_image(torch.zeros(2, 784)) is None


def test_layers_that_did_not_run_are_named():
    class Aux(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.aux = nn.Linear(4, 2)

        def forward(self, x):
            x = self.body(x)
            return (x, self.aux(x)) if self.training else x

    model = Aux()
    modules = resolve_layers(model, ["body", "aux"])
    captured, _ = capture(model, torch.zeros(2, 4), modules)
    assert not_run(modules, captured) == ["aux"]
