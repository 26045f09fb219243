"""Tests for fm_lightning.probing: one small real model per measurement outcome, exact values.

Each check compares the drawn tensor with one built index by index from the output. Run with
FM_TODAYS_RULES=1 to see which of them the old name-based rules get wrong (tests/measuring.py).
"""

from __future__ import annotations

import measuring
import pytest
import torch
from measuring import ChannelNorm, on_grid, output_of
from torch import Tensor, nn

from fm_lightning.layouts import Fallback, Measured
from fm_lightning.probing import measure_layout, measure_layouts


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def read(model: nn.Module, name: str, probe: object) -> tuple[object, Tensor, str]:
    """(reading, drawn tensor, note) of layer ``name`` for ``probe``, as the callback reads it."""
    reading, maps = measuring.read(model, name, probe)
    return reading, maps.act, maps.note


# ------------------------------------------------------------------------------ the models


class ToNHWC(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1)


class TinyViT(nn.Module):
    """Patches of 4 px, ``prefix`` learned tokens first, a residual attention block and an MLP."""

    def __init__(self, prefix: int, dim: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.prefix = nn.Parameter(torch.randn(1, prefix, dim))
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.block = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)  # (N, h*w, D)
        t = torch.cat([self.prefix.expand(len(t), -1, -1), t], dim=1)  # (N, k + h*w, D)
        q = self.norm(t)
        t = t + self.attn(q, q, q, need_weights=False)[0]
        return t + self.block(t)


class NormLayerNorm(nn.Conv1d):
    """A Conv1d whose name says LayerNorm (HF Wav2Vec2 has such names): (N, C, T) all the same."""


class LyingAudio(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Sequential(NormLayerNorm(1, 8, 5, stride=2), nn.GELU())

    def forward(self, x: Tensor) -> Tensor:  # (N, T) -> (N, 8, T')
        return self.layer(x[:, None])


class Frames(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 8, 4, stride=4)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(self.conv(x[:, None]).transpose(1, 2))


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.conv2(self.pool(self.conv1(x))))


class ZeroInPlace(nn.Module):
    """Overwrites its input in place (as ReLU(inplace=True) does, but losing every position)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mul_(0).add_(x.mean(dim=(2, 3), keepdim=True).detach())


class EditsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv0(x)
        y = self.conv1(h)  # keeps h for its backward
        return y + h.mul_(2).mean()


# -------------------------------------------------------------------------------- outcomes


def test_nchw_conv_maps_are_measured_as_nchw():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2))
    x = torch.randn(2, 3, 20, 28)
    reading, act, note = read(model, "2", x)
    assert reading == Measured(shape=(6, 9, 13), channel=1, rows=2, cols=3)
    assert note == "measured: NCHW"
    assert torch.equal(act, output_of(model, "2", x))


def test_channels_last_output_is_measured_and_permuted():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), ToNHWC(), nn.Linear(8, 5))
    x = torch.randn(2, 3, 21, 29)
    reading, act, note = read(model, "2", x)
    assert reading == Measured(shape=(10, 14, 5), channel=3, rows=1, cols=2)
    assert note == "measured: channels-last -> NCHW"
    assert torch.equal(act, output_of(model, "2", x).permute(0, 3, 1, 2))


@pytest.mark.parametrize("prefix", [0, 1, 2, 4])
def test_tokens_are_placed_on_their_grid_with_the_prefix_tokens_left_out(prefix):
    model = TinyViT(prefix)
    x = torch.randn(2, 3, 32, 32)
    reading, act, note = read(model, "block", x)
    assert reading.tokens == (prefix, 8, 8)
    assert note == f"measured: tokens 8x8{f' +{prefix} prefix' if prefix else ''}, 16 channels"
    assert torch.equal(act, on_grid(output_of(model, "block", x), prefix, 8, 8))


@pytest.mark.parametrize(("size", "grid"), [((16, 40), (4, 10)), ((36, 12), (9, 3))])
def test_non_square_token_grids_come_from_the_model(size, grid):
    model = TinyViT(prefix=1)
    x = torch.randn(2, 3, *size)
    reading, act, _ = read(model, "block", x)
    assert reading.tokens == (1, *grid)
    assert torch.equal(act, on_grid(output_of(model, "block", x), 1, *grid))


def test_tokens_whose_short_rows_also_move_along_the_width_are_still_a_grid():
    # 3 tokens a row: the last quarter of the tokens ends a row further right than the first
    # starts, so the token dim moves along the width too (0.157 of it with this seed).
    torch.manual_seed(5)
    model = TinyViT(prefix=1)
    x = torch.randn(2, 3, 36, 12)
    reading, act, _ = read(model, "block", x)
    assert reading.tokens == (1, 9, 3)
    assert torch.equal(act, on_grid(output_of(model, "block", x), 1, 9, 3))


def test_a_1d_signal_is_drawn_as_strips_along_time():
    model = nn.Sequential(nn.Conv1d(2, 6, 5, stride=2), nn.ReLU(), nn.Conv1d(6, 4, 3))
    x = torch.randn(2, 2, 100)
    reading, act, note = read(model, "2", x)
    assert reading == Measured(shape=(4, 46), channel=1, rows=None, cols=2)
    assert note == "measured: 1-D, 46 positions, 4 channels"
    assert torch.equal(act, output_of(model, "2", x)[:, :, None])


def test_a_sequence_of_49_steps_is_never_folded_into_a_square():
    # (N, T, D) frames of a 1-D signal, 49 of them: a 7 x 7 square by the old rules.
    model = Frames()
    x = torch.randn(2, 196)
    reading, act, _ = read(model, "encoder", x)
    assert reading == Measured(shape=(49, 8), channel=2, rows=None, cols=1)
    assert torch.equal(act, output_of(model, "encoder", x).transpose(1, 2)[:, :, None])


def test_class_names_that_lie_do_not_change_the_reading():
    audio = LyingAudio()
    x = torch.randn(2, 64)
    reading, act, _ = read(audio, "layer", x)
    assert reading == Measured(shape=(8, 30), channel=1, rows=None, cols=2)
    assert torch.equal(act, output_of(audio, "layer", x)[:, :, None])  # not tokens on a grid

    image = nn.Sequential(nn.Conv2d(3, 6, 3), ChannelNorm(6))
    x = torch.randn(2, 3, 14, 18)
    reading, act, _ = read(image, "1", x)
    assert reading == Measured(shape=(6, 12, 16), channel=1, rows=2, cols=3)
    assert torch.equal(act, output_of(image, "1", x))  # not permuted as channels-last


def test_global_pool_is_measured_as_one_by_one_maps_and_features_need_nothing():
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x = torch.randn(2, 3, 12, 12)
    assert measure_layout(model, model[1], x) == Measured(
        shape=(5, 1, 1), channel=1, rows=2, cols=3
    )
    assert measure_layout(model, model[2], x) is None  # (N, F): nothing to place


# -------------------------------------------------------------------------------- fallback


class Ids(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.encoder(self.embed(input_ids))


def test_integer_ids_fall_back_to_a_sequence_never_a_square():
    model = Ids().eval()
    ids = torch.randint(0, 50, (2, 12))  # 12 tokens: "3x3 +3 prefix" by the old rules
    reading, act, note = read(model, "encoder", {"input_ids": ids})
    assert reading == Fallback("no floating-point input to take gradients from", False)
    assert note.startswith("fallback (no floating-point input to take gradients from): ")
    assert act.shape == (2, 8, 1, 12)


class Detached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.side = nn.Conv2d(4, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        with torch.no_grad():
            z = self.side(y)
        return y + self.side(y.detach()) + z


def test_no_gradient_path_falls_back_with_the_reason_in_the_note():
    model = Detached()
    x = torch.randn(2, 3, 10, 10)
    reading, act, note = read(model, "side", x)
    assert reading == Fallback("no gradient from the input reaches the output", True)
    assert note == "fallback (no gradient from the input reaches the output): nchw"
    assert act.shape == (2, 4, 8, 8)


def test_an_output_that_does_not_depend_on_the_input_falls_back():
    class Constant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Linear(4, 6)

        def forward(self, x: Tensor) -> Tensor:
            return self.table(torch.ones(len(x), 5, 4)) + 0 * x.sum()

    model = Constant()
    reading = measure_layout(model, model.table, torch.randn(2, 3, 8, 8))
    assert reading == Fallback("no gradient from the input reaches the output", True)


def test_a_forward_that_raises_falls_back_instead_of_raising():
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: Tensor) -> Tensor:
            if x.requires_grad:
                raise RuntimeError("no grad here, please")
            return self.conv(x)

    reading = measure_layout(Broken(), Broken().conv, torch.randn(2, 3, 8, 8))
    assert reading == Fallback("RuntimeError: no grad here, please", True)


def test_layers_run_before_a_forward_raises_are_measured_the_others_fall_back():
    class BrokenHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1)

        def forward(self, x: Tensor) -> Tensor:
            y = self.conv(x)
            if y.requires_grad:
                raise RuntimeError("head needs no_grad")
            return self.head(y)

    model = BrokenHead()
    readings = measure_layouts(
        model, torch.randn(2, 3, 8, 8), {"conv": model.conv, "head": model.head}
    )
    assert readings == {
        "conv": Measured(shape=(4, 6, 6), channel=1, rows=2, cols=3),
        "head": Fallback("RuntimeError: head needs no_grad", True),
    }


# ---------------------------------------------------------------------- the model untouched


def test_measuring_leaves_modes_grads_and_flags_as_they_were():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Conv2d(4, 2, 1)
    )
    model.train()
    model[1].eval()  # a frozen norm keeps its own mode
    model[0].weight.requires_grad_(False)
    model[3].weight.grad = torch.ones_like(model[3].weight)
    grad, stats = model[3].weight.grad, model[1].running_mean.clone()
    with torch.inference_mode():
        readings = measure_layouts(model, torch.randn(4, 3, 9, 9), {"0": model[0], "3": model[3]})
    assert readings["3"] == Measured(shape=(2, 7, 7), channel=1, rows=2, cols=3)
    assert [m.training for m in model] == [True, False, True, True]
    assert model[3].weight.grad is grad and torch.equal(grad, torch.ones_like(grad))
    assert model[0].weight.grad is None and not model[0].weight.requires_grad
    assert torch.equal(model[1].running_mean, stats)
    assert not model[3]._forward_hooks and not model[0]._forward_hooks


def test_each_call_of_a_shared_module_is_measured_on_its_own():
    model = Shared()
    readings = measure_layouts(model, torch.randn(2, 3, 16, 24), {"pool": model.pool})
    assert readings == {
        "pool": Measured(shape=(4, 8, 12), channel=1, rows=2, cols=3),
        "pool@2": Measured(shape=(4, 4, 6), channel=1, rows=2, cols=3),
    }


def test_a_layer_whose_output_is_edited_in_place_later_is_measured_before_the_edit():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), ZeroInPlace(), nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 3, 10, 14)
    readings = measure_layouts(model, x, {"0": model[0], "2": model[2]})
    assert readings["0"] == Measured(shape=(4, 8, 12), channel=1, rows=2, cols=3)
    assert readings["2"] == Fallback("no gradient from the input reaches the output", True)


def test_a_layer_whose_saved_input_is_edited_in_place_later_is_measured_on_its_own_pass():
    model = EditsInput()
    readings = measure_layouts(model, torch.randn(2, 3, 10, 14), {"conv1": model.conv1})
    assert readings == {"conv1": Measured(shape=(2, 8, 12), channel=1, rows=2, cols=3)}


def test_one_channel_maps_and_shapes_never_drawn():
    model = nn.Sequential(nn.Identity(), nn.Flatten(0))
    x = torch.randn(2, 1, 12, 16)  # grey images: the channel dim is the one of size 1
    assert measure_layout(model, model[0], x) == Measured(
        shape=(1, 12, 16), channel=1, rows=2, cols=3
    )
    assert measure_layout(model, model[1], x) is None  # 1-D: interpret refuses it, not us


def test_the_callback_warns_once_naming_a_layer_it_could_not_measure(tmp_path):
    import warnings

    from conftest import tiny_trainer
    from torch.utils.data import DataLoader, TensorDataset

    from fm_lightning import FeatureMapCallback, ImageClassifier

    class IdsClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ids = Ids()
            self.head = nn.Linear(8, 3)

        def forward(self, input_ids: Tensor) -> Tensor:
            return self.head(self.ids(input_ids).mean(1))

    data = TensorDataset(torch.randint(0, 50, (16, 12)), torch.randint(0, 3, (16,)))
    loader = DataLoader(data, batch_size=8)
    cb = FeatureMapCallback(layers=["ids.encoder"], num_images=4, save_dir=tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tiny_trainer(tmp_path, [cb], max_epochs=2).fit(
            ImageClassifier(IdsClassifier(), num_classes=3), loader, loader
        )
    ours = [str(w.message) for w in record if "FeatureMapCallback" in str(w.message)]
    assert len(ours) == 1, ours  # once, not once per epoch
    assert "layer 'ids.encoder'" in ours[0] and "layouts={'ids.encoder': " in ours[0]
    assert "no floating-point input" in ours[0]
    assert len(list((tmp_path / "ids.encoder").glob("epoch=*.png"))) == 2  # still drawn


# ---------------------------------------------------------------- chained backward passes


def _tiny_vit(prefix: int, seed: int = 0) -> TinyViT:
    torch.manual_seed(seed)
    return TinyViT(prefix)


CHAINED = {  # id: (model, probe shape, layers, how many layers the chained pass should shortcut)
    "nchw": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2)
        ),
        (2, 3, 20, 28),
        ["0", "1", "2"],
        2,
    ),
    "nhwc": (
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), ToNHWC(), nn.Linear(8, 5)),
        (2, 3, 21, 29),
        ["0", "1", "2"],
        2,
    ),
    **{
        f"tokens, {k} prefix": (
            lambda k=k: TinyViT(k),
            (2, 3, 32, 32),
            ["patch", "norm", "block"],
            2,
        )
        for k in (0, 1, 2, 4)
    },
    "tokens 4x10": (lambda: TinyViT(1), (2, 3, 16, 40), ["patch", "norm", "block"], 2),
    "tokens 9x3": (lambda: _tiny_vit(1, seed=5), (2, 3, 36, 12), ["patch", "norm", "block"], 2),
    "1-D": (
        lambda: nn.Sequential(nn.Conv1d(2, 6, 5, stride=2), nn.ReLU(), nn.Conv1d(6, 4, 3)),
        (2, 2, 100),
        ["0", "1", "2"],
        2,
    ),
    "frames": (Frames, (2, 196), ["conv", "encoder"], 1),
    "lying audio": (LyingAudio, (2, 64), ["layer.0", "layer"], 1),
    "channel norm": (
        lambda: nn.Sequential(nn.Conv2d(3, 6, 3), ChannelNorm(6)),
        (2, 3, 14, 18),
        ["0", "1"],
        1,
    ),
    "global pool": (  # a pool has no positions to chain through: measured the full way
        lambda: nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        (2, 3, 12, 12),
        ["0", "1", "2"],
        0,
    ),
    "shared pool": (Shared, (2, 3, 16, 24), ["conv1", "pool", "conv2"], 3),
    "edited in place": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), ZeroInPlace(), nn.Conv2d(4, 2, 1)),
        (2, 3, 10, 14),
        ["0", "2"],
        0,
    ),
    "saved input edited": (EditsInput, (2, 3, 10, 14), ["conv0", "conv1"], 0),
    "detached": (Detached, (2, 3, 10, 10), ["conv", "side"], 0),
}


@pytest.mark.parametrize("case", CHAINED)
def test_chained_readings_equal_the_full_ones(case):
    build, shape, layers, shortcuts = CHAINED[case]
    readings, full, taken = measuring.chained_and_full(build(), torch.randn(shape), layers)
    assert readings == full
    assert taken == shortcuts


class Bypass(nn.Module):
    """``late`` sees ``early``'s maps transposed (and faint) and the input itself: the skip
    around ``early`` decides where ``late``'s positions lie."""

    def __init__(self) -> None:
        super().__init__()
        self.early, self.late = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(7, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # (N, 3, 12, 12)
        transposed = self.early(x).transpose(2, 3) * 0.01  # (N, 4, W, H)
        return self.late(torch.cat([transposed, x], dim=1))


def test_a_skip_from_the_input_around_a_measured_layer_is_measured_the_full_way():
    readings, full, taken = measuring.chained_and_full(
        Bypass(), torch.randn(2, 3, 12, 12), ["early", "late"]
    )
    assert readings["late"] == Measured(shape=(4, 12, 12), channel=1, rows=2, cols=3)
    assert readings == full and taken == 0


class Unshuffled(nn.Module):
    """``coarse`` folds each 2 x 2 block of pixels into channels (PixelUnshuffle); ``tokens`` are
    the pixels again, unfolded: a grid finer than ``coarse``'s positions, behind a CLS token."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.coarse = nn.Conv2d(3, 4, 1), nn.PixelUnshuffle(2)
        self.cls, self.tokens = nn.Parameter(torch.randn(1, 1, 4)), nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # (N, 3, 16, 16)
        fine = nn.functional.pixel_shuffle(self.coarse(self.conv(x)), 2)  # (N, 4, 16, 16)
        t = fine.flatten(2).transpose(1, 2)  # (N, 256, 4)
        return self.tokens(torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1))


def test_a_token_grid_finer_than_the_layer_chained_to_is_measured_the_full_way():
    # On coarse's 8 x 8 positions no grid of at least half the 257 tokens holds the last token's
    # region alone: chained, they would be read as 1-D. Only the full pass sees the pixels.
    readings, full, taken = measuring.chained_and_full(
        Unshuffled(), torch.randn(2, 3, 16, 16), ["coarse", "tokens"]
    )
    assert readings["coarse"] == Measured(shape=(16, 8, 8), channel=1, rows=2, cols=3)
    assert readings["tokens"].tokens == (1, 16, 16)
    assert readings == full and taken == 0
