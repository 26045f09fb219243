"""Tests for fm_lightning.layouts: real timm / torch modules, real forward hooks, exact values."""

from __future__ import annotations

import dataclasses
import re
from types import SimpleNamespace

import pytest
import timm
import torch
from measuring import on_grid as tokens_on_grid
from torch import Tensor, nn

from fm_lightning.layouts import LAYOUTS, LayoutError, Maps, check_layout, interpret
from fm_lightning.rendering import feature_grid


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def hooked(model: nn.Module, names: list[str], *args, **kwargs) -> dict[str, object]:
    """Runs model(*args, **kwargs) once in eval mode; returns {name: what its hook received}."""
    outputs: dict[str, object] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: outputs.__setitem__(name, out)
        )
        for name in names
    ]
    try:
        with torch.no_grad():
            model.eval()(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def read(model: nn.Module, name: str, output: object, num_rows: int, **kwargs) -> Maps:
    return interpret(
        output, module=model.get_submodule(name), model=model, num_rows=num_rows, **kwargs
    )


# ------------------------------------------------------------------------------------- ViT


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()


@pytest.mark.parametrize(
    ("name", "channels"),
    [("blocks.0", 192), ("blocks.11", 192), ("blocks.3.norm1", 192), ("blocks.3.mlp.fc1", 768)],
)
def test_vit_tokens_are_drawn_on_the_patch_grid_without_the_cls_token(vit, name, channels):
    x = torch.randn(3, 3, 64, 64)
    out = hooked(vit, [name], x)[name]
    assert out.shape == (3, 17, channels)  # 1 CLS + 4x4 patches
    maps = read(vit, name, out, num_rows=3)
    assert maps.act.shape == (3, channels, 4, 4)
    assert maps.layout == "tokens"
    assert maps.note == f"tokens 4x4 +1 prefix, {channels} channels"
    torch.testing.assert_close(maps.act, tokens_on_grid(out, 1, 4, 4), rtol=0, atol=0)


def test_vit_gelu_inside_mlp_is_drawn_as_tokens(vit):
    out = hooked(vit, ["blocks.0.mlp.act"], torch.randn(2, 3, 64, 64))["blocks.0.mlp.act"]
    maps = read(vit, "blocks.0.mlp.act", out, num_rows=2)
    assert (maps.layout, maps.act.shape) == ("tokens", (2, 768, 4, 4))


def test_vit_patch_embed_has_no_prefix_and_head_is_features(vit):
    outs = hooked(vit, ["patch_embed", "head"], torch.randn(2, 3, 64, 64))
    patches = read(vit, "patch_embed", outs["patch_embed"], num_rows=2)
    assert patches.note == "tokens 4x4, 192 channels"  # Conv2d-made 3-D output: not (N, C, L)
    torch.testing.assert_close(patches.act, tokens_on_grid(outs["patch_embed"], 0, 4, 4))
    head = read(vit, "head", outs["head"], num_rows=2)
    assert (head.act.shape, head.layout, head.note) == ((2, 1000), "features", "")


def test_vit_register_tokens_are_dropped_with_the_cls_token():
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=64, reg_tokens=4, num_classes=0
    )
    assert model.num_prefix_tokens == 5
    out = hooked(model, ["blocks.1"], torch.randn(2, 3, 64, 64))["blocks.1"]
    assert out.shape == (2, 21, 192)
    maps = read(model, "blocks.1", out, num_rows=2)
    assert maps.note == "tokens 4x4 +5 prefix, 192 channels"
    torch.testing.assert_close(maps.act, tokens_on_grid(out, 5, 4, 4), rtol=0, atol=0)


def test_vit_non_square_grid_comes_from_the_model_not_a_square_guess():
    # 64x32 px: 4x2 patches + CLS = 9 tokens, which a square guess would read as 3x3, no CLS.
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(64, 32))
    out = hooked(model, ["blocks.0"], torch.randn(2, 3, 64, 32))["blocks.0"]
    maps = read(model, "blocks.0", out, num_rows=2)
    assert maps.act.shape == (2, 192, 4, 2)
    torch.testing.assert_close(maps.act, tokens_on_grid(out, 1, 4, 2), rtol=0, atol=0)


def test_vit_inside_a_wrapper_finds_the_grid_on_an_ancestor(vit):
    wrapper = nn.Sequential()
    wrapper.add_module("net", vit)
    out = hooked(wrapper, ["net.blocks.2"], torch.randn(2, 3, 64, 64))["net.blocks.2"]
    assert read(wrapper, "net.blocks.2", out, num_rows=2).note.startswith("tokens 4x4 +1 prefix")


def test_dynamic_size_vit_nhwc_patch_embed_and_off_grid_tokens():
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=64, dynamic_img_size=True
    )
    outs = hooked(model, ["patch_embed", "blocks.0"], torch.randn(2, 3, 96, 64))
    assert outs["patch_embed"].shape == (2, 6, 4, 192)  # (N, H, W, C), stated by output_fmt
    patches = read(model, "patch_embed", outs["patch_embed"], num_rows=2)
    assert (patches.act.shape, patches.note) == ((2, 192, 6, 4), "channels-last -> NCHW")
    # 1 + 6*4 = 25 tokens: not the configured 4x4 grid, and 25 - 1 is not a square, so the
    # stated CLS count rules out the 5x5 "guess" and the tokens are drawn as a sequence.
    blocks = read(model, "blocks.0", outs["blocks.0"], num_rows=2)
    assert (blocks.layout, blocks.act.shape) == ("sequence", (2, 192, 1, 25))
    assert blocks.note == "25 tokens as a sequence (no h x w grid), 192 channels"
    with pytest.raises(LayoutError, match=r"expected L = the model's 1 prefix tokens"):
        read(model, "blocks.0", outs["blocks.0"], num_rows=2, layout="tokens")


def test_tokens_without_a_model_grid_use_a_square_guess():
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    out = hooked(layer, [""], torch.randn(2, 50, 16))[""]
    maps = interpret(out, module=layer, model=layer, num_rows=2)
    assert maps.note == "tokens 7x7 +1 prefix (square grid guessed), 16 channels"
    torch.testing.assert_close(maps.act, tokens_on_grid(out, 1, 7, 7), rtol=0, atol=0)
    seq = interpret(out, module=layer, model=layer, num_rows=2, layout="sequence")
    assert (seq.act.shape, seq.note) == ((2, 16, 1, 50), "sequence of 50 steps, 16 channels")


# -------------------------------------------------------------------------------- ConvNeXt


@pytest.fixture(scope="module")
def convnext_nhwc():
    # conv_mlp=False: block norm and MLP run channels-last, as in the original ConvNeXt.
    torch.manual_seed(0)
    return timm.create_model("convnext_atto", pretrained=False, conv_mlp=False).eval()


@pytest.mark.parametrize(
    ("name", "channels"),
    [
        ("stages.0.blocks.0.norm", 40),
        ("stages.0.blocks.0.mlp.fc1", 160),  # 4x the stage width
        ("stages.0.blocks.0.mlp.act", 160),
        ("stages.1.blocks.0.mlp", 80),
    ],
)
def test_convnext_channels_last_layers_are_permuted(convnext_nhwc, name, channels):
    out = hooked(convnext_nhwc, [name], torch.randn(2, 3, 64, 64))[name]
    side = out.shape[1]
    assert out.shape == (2, side, side, channels)
    maps = read(convnext_nhwc, name, out, num_rows=2)
    assert (maps.layout, maps.note) == ("nhwc", "channels-last -> NCHW")
    assert maps.act.shape == (2, channels, side, side)
    assert torch.equal(maps.act[:, 5], out[..., 5])
    assert maps.act.data_ptr() == out.data_ptr()  # a view, not a copy


def test_convnext_block_and_channels_first_norms_stay_nchw(convnext_nhwc):
    outs = hooked(convnext_nhwc, ["stages.0.blocks.0"], torch.randn(2, 3, 64, 64))
    block = read(convnext_nhwc, "stages.0.blocks.0", outs["stages.0.blocks.0"], num_rows=2)
    assert (block.layout, block.note, block.act.shape) == ("nchw", "", (2, 40, 16, 16))
    assert block.act is outs["stages.0.blocks.0"]
    # Default convnext_atto (conv_mlp=True) uses LayerNorm2d, an nn.LayerNorm subclass that
    # is channels-first: it must not be permuted.
    conv_mlp = timm.create_model("convnext_atto", pretrained=False)
    name = "stages.0.blocks.0.norm"
    assert type(conv_mlp.get_submodule(name)).__name__ == "LayerNorm2d"
    out = hooked(conv_mlp, [name], torch.randn(2, 3, 64, 64))[name]
    maps = read(conv_mlp, name, out, num_rows=2)
    assert (maps.layout, maps.act.shape) == ("nchw", (2, 40, 16, 16))


# ---------------------------------------------------------------------------- global pool


def test_resnet_global_pool_is_kept_as_1x1_maps_and_drawn_with_visible_values():
    model = timm.create_model("resnet18", pretrained=False)
    outs = hooked(model, ["global_pool.pool", "global_pool"], torch.randn(2, 3, 64, 64))
    maps = read(model, "global_pool.pool", outs["global_pool.pool"], num_rows=2)
    assert (maps.layout, maps.note, maps.act.shape) == ("nchw", "", (2, 512, 1, 1))
    grid = feature_grid(maps.act, max_channels=8)  # 8 tiles of 16x16 per image row
    colours = {tuple(grid[1 + 8, 1 + 17 * c + 8].tolist()) for c in range(8)}
    assert len(colours) > 4  # not one flat colour
    flat = read(model, "global_pool", outs["global_pool"], num_rows=2)  # flattened by timm
    assert (flat.layout, flat.act.shape) == ("features", (2, 512))


# ------------------------------------------------------------------------ sequences (RNNs)


@pytest.mark.parametrize("batch_first", [True, False])
def test_lstm_draws_time_along_the_width_for_both_layouts(batch_first):
    lstm = nn.LSTM(8, 16, batch_first=batch_first)
    x = torch.randn(3, 5, 8) if batch_first else torch.randn(5, 3, 8)
    out = hooked(lstm, [""], x)[""]  # (out, (h, c))
    maps = interpret(out, module=lstm, model=lstm, num_rows=3)
    assert maps.act.shape == (3, 16, 1, 5)
    seq = out[0] if batch_first else out[0].transpose(0, 1)  # (N, L, H)
    assert torch.equal(maps.act[:, :, 0, :], seq.transpose(1, 2))
    flip = "" if batch_first else "sequence-first -> batch-first; "
    assert maps.note == f"[0] of tuple; {flip}sequence of 5 steps, 16 channels"


def test_sequence_first_lstm_is_transposed_even_when_length_equals_probe_size():
    lstm = nn.GRU(8, 16)  # batch_first=False: (L, N, H) even when L == N
    out = hooked(lstm, [""], torch.randn(3, 3, 8))[""]
    maps = interpret(out, module=lstm, model=lstm, num_rows=3)
    assert torch.equal(maps.act[:, :, 0, :], out[0].permute(1, 2, 0))


def test_sequence_first_attention_is_read_from_the_shape():
    encoder = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32)  # batch_first=False
    out = hooked(encoder, [""], torch.randn(10, 4, 16))[""]
    assert out.shape == (10, 4, 16)
    maps = interpret(out, module=encoder, model=encoder, num_rows=4)
    assert maps.note.startswith("sequence-first -> batch-first; tokens 3x3 +1 prefix")
    forced = interpret(out, module=encoder, model=encoder, num_rows=4, layout="sequence_first")
    assert torch.equal(forced.act, maps.act)


# ---------------------------------------------------------------------------------- Conv1d


def test_conv1d_outputs_and_their_activations_are_1d_maps():
    net = nn.Sequential(nn.Conv1d(2, 6, 3), nn.ReLU(), nn.MaxPool1d(2))
    outs = hooked(net, ["0", "1", "2"], torch.randn(4, 2, 30))
    for name, length in [("0", 28), ("1", 28), ("2", 14)]:
        maps = read(net, name, outs[name], num_rows=4)
        assert (maps.layout, maps.note, maps.act.shape) == ("conv1d", "1-D maps", (4, 6, 1, length))
        assert torch.equal(maps.act[:, :, 0], outs[name])


# ------------------------------------------------------------------------- HF-style models


@dataclasses.dataclass
class EncoderOutput:
    """What a HuggingFace model returns, minus the library: a dataclass of optional tensors."""

    last_hidden_state: Tensor | None = None
    pooler_output: Tensor | None = None


class HFStyleViT(nn.Module):
    """A HuggingFace-style ViT: a ``config``, ``pixel_values=``, a dataclass output, a CLS."""

    def __init__(self, image_size=32, patch_size=8, hidden=24):
        super().__init__()
        self.config = SimpleNamespace(image_size=image_size, patch_size=patch_size)
        self.embed = nn.Conv2d(3, hidden, patch_size, stride=patch_size)
        self.cls = nn.Parameter(torch.randn(1, 1, hidden))
        self.encoder = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden))

    def forward(self, pixel_values):
        tokens = self.embed(pixel_values).flatten(2).transpose(1, 2)  # (N, L, D)
        tokens = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], dim=1)
        hidden = self.encoder(tokens)
        return EncoderOutput(last_hidden_state=hidden, pooler_output=hidden[:, 0])


def test_hf_style_dataclass_output_draws_last_hidden_state_on_the_config_grid():
    model = HFStyleViT()
    x = torch.randn(2, 3, 32, 32)
    outs = hooked(model, ["", "encoder.1"], pixel_values=x)
    maps = interpret(outs[""], module=model, model=model, num_rows=2)
    assert maps.note == "last_hidden_state of EncoderOutput; tokens 4x4 +1 prefix, 24 channels"
    hidden = outs[""].last_hidden_state
    torch.testing.assert_close(maps.act, tokens_on_grid(hidden, 1, 4, 4), rtol=0, atol=0)
    inner = read(model, "encoder.1", outs["encoder.1"], num_rows=2)  # grid from the ancestor
    assert inner.note == "tokens 4x4 +1 prefix, 24 channels"


def test_dict_and_skipped_none_fields_say_which_tensor_is_drawn():
    t = torch.randn(2, 4, 5, 5)
    layer = nn.Identity()
    maps = interpret({"aux": None, "feat": t}, module=layer, model=layer, num_rows=2)
    assert maps.act is t and maps.note == "['feat'] of dict"
    empty = EncoderOutput(pooler_output=torch.randn(2, 7))
    maps = interpret(empty, module=layer, model=layer, num_rows=2)
    assert maps.note == "pooler_output of EncoderOutput" and maps.act.shape == (2, 7)
    with pytest.raises(LayoutError, match=r"expected a Tensor, or a tuple.*got dict without"):
        interpret({"a": [None, "x"]}, module=layer, model=layer, num_rows=2)


# ---------------------------------------------------------------------- refusals, overrides


def test_leading_dim_that_is_not_the_probe_size_is_refused():
    conv = nn.Conv2d(3, 4, 3)
    out = hooked(conv, [""], torch.randn(2, 3, 8, 8))[""]
    with pytest.raises(LayoutError, match=r"expected the leading dim to be the probe size 4"):
        interpret(out, module=conv, model=conv, num_rows=4)
    # (8, 2, 6): dim 1 is the probe size and dim 0 is not: read as sequence-first, not refused
    linear = nn.Linear(3, 6)
    out = hooked(linear, [""], torch.randn(8, 2, 3))[""]
    assert interpret(out, module=linear, model=linear, num_rows=2).act.shape[0] == 2


@pytest.mark.parametrize("shape", [(4,), (4, 2, 3, 5, 5), (4, 0, 3, 3)])
def test_outputs_that_cannot_be_maps_are_refused(shape):
    layer = nn.Identity()
    with pytest.raises(LayoutError, match=re.escape(f"got shape {tuple(shape)}")):
        interpret(torch.randn(shape), module=layer, model=layer, num_rows=4)


@pytest.mark.parametrize(
    ("layout", "shape", "message"),
    [
        ("nhwc", (2, 5, 8), r"expected \(N, H, W, C\) for 'nhwc', got shape \(2, 5, 8\)"),
        ("nchw", (2, 8), r"expected \(N, C, H, W\) or \(N, C, L\) for 'nchw', got \(2, 8\)"),
        ("tokens", (2, 3, 4, 4), r"expected \(N, L, D\) for 'tokens', got shape \(2, 3, 4, 4\)"),
        ("tokens", (2, 35, 8), r"expected L = k <= 8 prefix tokens .* got L = 35"),
        ("sequence", (2, 8), r"expected \(N, L, D\) for 'sequence', got shape \(2, 8\)"),
    ],
)
def test_explicit_layouts_refuse_shapes_they_cannot_read(layout, shape, message):
    layer = nn.Identity()
    with pytest.raises(LayoutError, match=message):
        interpret(torch.randn(shape), module=layer, model=layer, num_rows=2, layout=layout)


def test_explicit_layouts_force_their_reading():
    layer = nn.Identity()  # element-wise, no known layers: auto would read NCHW / tokens
    x = torch.randn(2, 6, 7, 3)
    nhwc = interpret(x, module=layer, model=layer, num_rows=2, layout="nhwc")
    assert torch.equal(nhwc.act, x.permute(0, 3, 1, 2))
    assert interpret(x, module=layer, model=layer, num_rows=2).act is x
    feats = interpret(x, module=layer, model=layer, num_rows=2, layout="features")
    assert feats.act.shape == (2, 126) and feats.note == "(6, 7, 3) flattened to 126 features"
    seq = torch.randn(2, 5, 17)
    conv1d = interpret(seq, module=layer, model=layer, num_rows=2, layout="nchw")
    assert (conv1d.layout, conv1d.act.shape) == ("conv1d", (2, 5, 1, 17))


def test_callable_layout_is_applied_and_its_result_checked():
    layer = nn.Identity()
    tokens = torch.randn(2, 10, 4)  # 1 CLS + 3x3

    def drop_cls(t):
        return t[:, 1:].mT.unflatten(2, (3, 3))

    maps = interpret((tokens,), module=layer, model=layer, num_rows=2, layout=drop_cls)
    assert (maps.layout, maps.note) == ("custom", "[0] of tuple; layout function drop_cls")
    torch.testing.assert_close(maps.act, tokens_on_grid(tokens, 1, 3, 3), rtol=0, atol=0)
    bad = [
        (
            lambda t: t[:, 1:],
            re.escape(
                "expected layout function <lambda> to return a non-empty (2, C, H, W) or (2, F) "
                "tensor for an output of shape (2, 10, 4), got (2, 9, 4)"
            ),
        ),
        (lambda t: t[:1].flatten(1), r"got \(1, 40\)"),
        (lambda t: t.tolist(), r"got list"),
        (lambda t: t.view(3, 3), r"layout function <lambda> failed on an output of shape"),
    ]
    for fn, message in bad:
        with pytest.raises(LayoutError, match=message):
            interpret(tokens, module=layer, model=layer, num_rows=2, layout=fn)


@pytest.mark.parametrize("value", [*LAYOUTS, torch.flatten, lambda t: t])
def test_check_layout_accepts_names_and_functions(value):
    assert check_layout(value) is value


@pytest.mark.parametrize("value", ["NHWC", "nwhc", "", None, 3, ["tokens"], nn.Identity])
def test_check_layout_rejects_anything_else_naming_the_choices(value):
    with pytest.raises(ValueError, match=r"expected a layout, one of \('auto', 'nchw'.*got"):
        check_layout(value)
    with pytest.raises(ValueError, match=r"got " + repr(value).replace("[", r"\[")[:20]):
        interpret(
            torch.randn(2, 3), module=nn.Identity(), model=nn.Identity(), num_rows=2, layout=value
        )
