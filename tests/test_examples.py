"""Top-k examples with a known answer, receptive fields, dead channels (fm_lightning.topk,
fm_lightning.receptive_field, fm_lightning.pictures.examples)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fm_lightning.files import save_png
from fm_lightning.models import SimpleCNN
from fm_lightning.pictures.examples import DeadChannels, examples_grid
from fm_lightning.receptive_field import ReceptiveField, crop_at, receptive_field
from fm_lightning.topk import TopKExamples

SIZE = 24  # synthetic images are 1 x 24 x 24
BAR = 5  # bars are 5 pixels long, as wide as the filters


class Bars(nn.Module):
    """One 5x5 conv with hand-set filters: 0 finds horizontal bars, 1 vertical, 2 is dead."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, BAR)
        line = torch.full((BAR, BAR), -0.25)
        line[BAR // 2] = 1.0  # +1 on the middle row, -0.25 elsewhere: a vertical bar scores <= 0
        with torch.no_grad():
            self.conv.weight.copy_(torch.stack([line, line.T, torch.zeros(BAR, BAR)])[:, None])
            self.conv.bias.copy_(torch.tensor([0.0, 0.0, -1000.0]))  # channel 2 never fires

    def forward(self, x):
        return self.conv(x)


def bar_images():
    """12 images, each with a horizontal bar (top half) and a vertical bar (bottom half).

    Returns the images (12, 1, 24, 24), the bars' strengths (12,) each, and the input pixel
    at the centre of each bar (12, 2) each. Strengths are multiples of 1/16, so every
    response is exact.
    """
    g = torch.Generator().manual_seed(0)
    n = 12
    h_strength = 1 + torch.randperm(16, generator=g)[:n].float() / 16
    v_strength = 1 + torch.randperm(16, generator=g)[:n].float() / 16
    images = torch.zeros(n, 1, SIZE, SIZE)
    h_centre = torch.zeros(n, 2, dtype=torch.long)
    v_centre = torch.zeros(n, 2, dtype=torch.long)
    for i in range(n):
        # Horizontal bar rows 2..9 (its response rows stay above 12), vertical bar below row 14.
        r, c = (
            int(torch.randint(2, 10, (1,), generator=g)),
            int(torch.randint(0, 19, (1,), generator=g)),
        )
        images[i, 0, r, c : c + BAR] = h_strength[i]
        h_centre[i] = torch.tensor([r, c + 2])
        r, c = (
            int(torch.randint(14, 20, (1,), generator=g)),
            int(torch.randint(2, 22, (1,), generator=g)),
        )
        images[i, 0, r : r + BAR, c] = v_strength[i]
        v_centre[i] = torch.tensor([r + 2, c])
    return images, (h_strength, v_strength), (h_centre, v_centre)


def stream(model, images, indices, batches, k=4, channels=(0, 1, 2), overlay=True):
    """A TopKExamples for model.conv fed the given batches (lists of rows of `images`)."""
    rf = receptive_field(model, model.conv, images[:4])
    topk = TopKExamples(k, torch.tensor(channels), rf, overlay=overlay)
    with torch.no_grad():
        for rows in batches:
            rows = torch.as_tensor(rows)
            topk.update(model(images[rows]), images[rows], indices[rows])
    return topk


def assert_same(a, b):
    for field in ("channels", "scores", "indices", "positions", "crops", "overlays", "channel_max"):
        x, y = getattr(a, field), getattr(b, field)
        assert torch.equal(x.nan_to_num(-7.0), y.nan_to_num(-7.0)), field


def ranked(scores, indices, k):
    """Reference top-k: sort by score descending, then index ascending, in plain Python."""
    pairs = sorted(zip(scores.tolist(), indices.tolist(), strict=True), key=lambda p: (-p[0], p[1]))
    return [i for _, i in pairs[:k]]


# ---------------------------------------------------------------------------- the known answer


def test_each_channel_top_examples_are_the_strongest_matching_bars_with_centred_crops():
    model = Bars()
    images, (h_strength, v_strength), (h_centre, v_centre) = bar_images()
    indices = torch.arange(100, 112)  # dataset indices, not batch rows
    result = stream(model, images, indices, [range(12)], k=4).result()

    assert receptive_field(model, model.conv, images) == ReceptiveField(
        5, 5, (1.0, 1.0), (2.0, 2.0)
    )
    for channel, strength, centre in ((0, h_strength, h_centre), (1, v_strength, v_centre)):
        expected = ranked(strength, indices, 4)
        assert result.indices[channel].tolist() == expected
        rows = torch.tensor(expected) - 100
        assert torch.equal(result.scores[channel], BAR * strength[rows])  # the full bar, exactly
        # The argmax sits on the bar's centre (grid = input pixel - 2 for a 5x5 valid conv)...
        assert torch.equal(result.positions[channel], centre[rows] - 2)
        # ...and the crop is the bar, centred: its middle row (or column), nothing else.
        bar = torch.zeros(len(rows), 1, BAR, BAR)
        if channel == 0:
            bar[:, 0, BAR // 2, :] = strength[rows, None]
        else:
            bar[:, 0, :, BAR // 2] = strength[rows, None]
        assert torch.equal(result.crops[channel], bar)
        # The overlay is the channel's own map under the crop, peaking at the crop's centre.
        assert torch.equal(result.overlays[channel][:, 2, 2], result.scores[channel])


def test_ties_go_to_the_smaller_index_whatever_the_stream_order():
    model = Bars()
    images = torch.zeros(6, 1, SIZE, SIZE)
    images[:, 0, 5, 3 : 3 + BAR] = 1.0  # six identical images: every score ties
    indices = torch.tensor([50, 10, 40, 20, 60, 30])
    forward = stream(model, images, indices, [[0, 1, 2], [3, 4, 5]], k=3).result()
    backward = stream(model, images, indices, [[5], [4, 3], [2, 1, 0]], k=3).result()
    assert forward.indices[0].tolist() == [10, 20, 30]
    assert_same(forward, backward)


@pytest.mark.parametrize("pool_factor", [1, 8, 10_000])  # ranked every batch ... only at the end
def test_streaming_batches_of_any_size_equals_one_shot(monkeypatch, pool_factor):
    monkeypatch.setattr(TopKExamples, "pool_factor", pool_factor)
    model = Bars()
    images, _, _ = bar_images()
    indices = torch.arange(12)
    one_shot = stream(model, images, indices, [range(12)]).result()
    for batches in ([range(5), [5], range(6, 10), [10, 11]], [[i] for i in reversed(range(12))]):
        assert_same(stream(model, images, indices, batches).result(), one_shot)


def test_crops_are_of_the_inputs_as_they_were_when_streamed():
    # The candidates wait in a pool until they are ranked: a batch tensor overwritten after its
    # update (a reused buffer, an in-place transform) must not change what is drawn.
    model = Bars()
    images, _, _ = bar_images()
    expected = stream(model, images, torch.arange(12), [range(6), range(6, 12)]).result()
    rf = receptive_field(model, model.conv, images[:4])
    topk = TopKExamples(4, torch.tensor([0, 1, 2]), rf)
    buffer = torch.empty(6, 1, SIZE, SIZE)
    with torch.no_grad():
        for rows in (range(6), range(6, 12)):
            buffer.copy_(images[list(rows)])
            topk.update(model(buffer), buffer, torch.tensor(list(rows)))
            buffer.fill_(-5.0)
    assert topk.pool_nbytes() > 0  # still pooled here: ranked only by result()
    assert_same(topk.result(), expected)


def test_the_pool_stays_under_its_bound_however_long_the_stream(monkeypatch):
    monkeypatch.setattr(TopKExamples, "pool_bytes", 64 * 2**10)
    model = Bars()
    images, _, _ = bar_images()
    topk = stream(model, images, torch.arange(12), [range(4)], k=4)
    g = torch.Generator().manual_seed(2)
    batch_bytes = 16 * (SIZE * SIZE * 4 + 3 * (model(images[:1]).shape[-1] ** 2 * 4 + 40))
    most = 0
    with torch.no_grad():
        for step in range(60):
            x = torch.rand(16, 1, SIZE, SIZE, generator=g) * (1 + step / 10)  # ever better
            topk.update(model(x), x, torch.arange(16) + 1000 * step)
            most = max(most, topk.pool_nbytes())
    assert 0 < most <= TopKExamples.pool_bytes + batch_bytes


def test_the_accelerator_path_without_host_reads_gives_the_same_result(monkeypatch):
    model = Bars()
    images, _, _ = bar_images()
    batches = [range(5), [5], range(6, 10), [10, 11]]
    cpu = stream(model, images, torch.arange(12), batches).result()
    # As on a GPU: no host reads, every slot recomputed and merged with torch.where.
    monkeypatch.setattr(TopKExamples, "host_read_devices", frozenset())
    assert_same(stream(model, images, torch.arange(12), batches).result(), cpu)


def test_merging_two_rank_shards_equals_one_process():
    model = Bars()
    images, _, _ = bar_images()
    indices = torch.arange(12) * 7  # any unique dataset indices
    single = stream(model, images, indices, [range(12)]).result()
    for shard_a, shard_b in (
        (range(0, 12, 2), range(1, 12, 2)),  # DistributedSampler's interleaving
        (range(0, 5), range(5, 12)),  # contiguous, uneven
    ):
        a = stream(model, images, indices, [list(shard_a)[:3], list(shard_a)[3:]])
        b = stream(model, images, indices, [list(shard_b)])
        assert_same(TopKExamples.merge([a.state(), b.state()]), single)
        # As Lightning's all_gather returns it: one dict, a leading world dimension.
        gathered = {key: torch.stack([a.state()[key], b.state()[key]]) for key in a.state()}
        assert_same(TopKExamples.merge(gathered), single)
    # DistributedSampler pads the last shard with inputs from the start: they count once.
    a = stream(model, images, indices, [range(0, 12, 2)])
    b = stream(model, images, indices, [[*range(1, 12, 2), 0, 2]])
    assert_same(TopKExamples.merge([a.state(), b.state()]), single)
    # On one process all_gather returns the state itself.
    assert_same(TopKExamples.merge(stream(model, images, indices, [range(12)]).state()), single)


def test_fewer_inputs_than_k_leave_empty_slots_ranked_last():
    model = Bars()
    images, _, _ = bar_images()
    result = stream(model, images, torch.arange(12), [[0, 1]], k=4).result()
    assert result.indices[0, 2:].tolist() == [-1, -1]
    assert result.scores[0, 2:].tolist() == [-math.inf, -math.inf]
    assert result.crops[0, 2:].isnan().all()
    assert (result.indices[0, :2] >= 0).all()


def test_state_size_does_not_grow_with_the_batches_seen():
    model = Bars()
    images, _, _ = bar_images()
    topk = stream(model, images, torch.arange(12), [range(4)], k=4)
    after_one = {key: (t.shape, t.dtype) for key, t in topk.state().items()}
    size = topk.nbytes()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for step in range(40):
            x = torch.rand(16, 1, SIZE, SIZE, generator=g)
            topk.update(model(x), x, torch.arange(16) + 1000 * step)
    assert {key: (t.shape, t.dtype) for key, t in topk.state().items()} == after_one
    assert topk.nbytes() == size
    # 3 channels x k=4 slots x (5x5 crop + 5x5 overlay floats + score + index + 2 positions),
    # plus the per-channel maximum of all 3 channels.
    assert size == 3 * 4 * (25 * 4 + 25 * 4 + 4 + 8 + 16) + 3 * 4


def test_a_channel_with_a_large_negative_bias_is_dead():
    model = Bars()
    images, _, _ = bar_images()
    result = stream(model, images, torch.arange(12), [range(12)]).result()
    assert result.dead.tolist() == [False, False, True]
    assert result.channel_max[2].item() == -1000.0
    # channel_max covers every channel even when only some are drawn.
    drawn = stream(model, images, torch.arange(12), [range(12)], channels=(1,)).result()
    assert drawn.dead.tolist() == [False, False, True] and drawn.scores.shape == (1, 4)


def test_dead_channels_tracks_since_when_and_warns_once_per_crossing():
    model = Bars()
    images, _, _ = bar_images()
    dead = DeadChannels()
    history = []
    # Channel 2 fires at epoch 0, dies at 1 (the large negative bias), stays dead at 2,
    # comes back at 3 and dies again at 4.
    for epoch, bias in enumerate([0.5, -1000.0, -1000.0, 0.5, -1000.0]):
        with torch.no_grad():
            model.conv.bias[2] = bias
        result = stream(model, images, torch.arange(12), [range(6), range(6, 12)]).result()
        dead.update(epoch, result.dead)
        history.append((dict(dead.since), dead.crossed(0.3)))
    assert history == [
        ({}, False),
        ({2: 1}, True),  # 1/3 > 0.3: warn
        ({2: 1}, False),  # still above: once per crossing
        ({}, False),
        ({2: 4}, True),  # a new crossing warns again, with a new since-epoch
    ]
    assert dead.fraction == pytest.approx(1 / 3) and dead.channels == [2]
    assert DeadChannels().crossed(None) is False
    restored = DeadChannels()
    restored.load_state_dict(dead.state_dict())
    assert restored.state_dict() == dead.state_dict()
    assert restored.crossed(0.3) is False  # the crossing was already reported before saving
    with pytest.raises(ValueError, match="expected a DeadChannels.state_dict"):
        restored.load_state_dict({"since": {}})
    with pytest.raises(ValueError, match="bool tensor"):
        dead.update(5, torch.zeros(3))


# ---------------------------------------------------------------------------- fields and crops


def test_receptive_field_of_simplecnn_from_the_model_itself():
    model = SimpleCNN()
    x = torch.randn(4, 1, 28, 28)
    # conv1: 5x5, stride 1. conv2: 5x5 over 2x-pooled 5x5 maps: 14 px, stride 2, position i
    # covering input rows 2i .. 2i + 13.
    assert receptive_field(model, model.conv1, x) == ReceptiveField(5, 5, (1.0, 1.0), (2.0, 2.0))
    assert receptive_field(model, model.conv2, x) == ReceptiveField(14, 14, (2.0, 2.0), (6.5, 6.5))
    # Near the border the field is clipped, but the mapping is the same.
    assert receptive_field(model, model.conv2, x, position=(7, 0))[2:] == ((2.0, 2.0), (6.5, 6.5))


def test_receptive_field_under_inference_mode_restores_everything():
    model = SimpleCNN()
    model.train()
    model.fc1.eval()  # a mixed state, restored as it was
    (model.conv1.weight.grad,) = (torch.ones_like(model.conv1.weight),)
    with torch.inference_mode():
        x = torch.randn(4, 1, 28, 28)  # an inference tensor, as in a validation loop
        rf = receptive_field(model, model.conv2, x)
    assert rf == ReceptiveField(14, 14, (2.0, 2.0), (6.5, 6.5))
    assert model.training and model.conv2.training and not model.fc1.training
    assert torch.equal(model.conv1.weight.grad, torch.ones_like(model.conv1.weight))
    assert model.conv2.weight.grad is None
    assert not model.conv2._forward_hooks
    with pytest.raises(ValueError, match="floating-point"):
        receptive_field(model, model.conv2, torch.zeros(1, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="position inside"):
        receptive_field(model, model.conv2, torch.randn(1, 1, 28, 28), position=(8, 0))
    assert not model.conv2._forward_hooks  # removed on errors too


def test_receptive_field_of_a_token_layout_on_its_patch_grid():
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)

    def patch_grid(tokens):  # (N, L, D) -> (N, D, 4, 4), after any prefix (class) token
        tokens = tokens[:, -16:]
        return tokens.transpose(1, 2).reshape(len(tokens), -1, 4, 4)

    # Patch embedding: each token sees exactly its own 16x16 patch.
    field = receptive_field(vit, vit.patch_embed, x, to_maps=patch_grid)
    assert field == ReceptiveField(16, 16, (16.0, 16.0), (7.5, 7.5))
    # After attention a token sees the whole image; the patch grid still places it.
    field = receptive_field(vit, vit.blocks[0], x, to_maps=patch_grid)
    assert field == ReceptiveField(64, 64, (16.0, 16.0), (7.5, 7.5))
    with pytest.raises(ValueError, match="to_maps"):
        receptive_field(vit, vit.blocks[0], x)


def test_crop_at_maps_grid_positions_to_pixels_and_pads_outside():
    x = torch.arange(2 * 10 * 12, dtype=torch.float32).view(2, 1, 10, 12)
    rf = ReceptiveField(3, 5, (2.0, 2.0), (1.0, 1.0))
    crops = crop_at(x, torch.tensor([[2, 2], [0, 0]]), rf, images=torch.tensor([1, 0]))
    assert crops.shape == (2, 1, 3, 5)
    # Position (2, 2) centres on pixel (5, 5): rows 4..6, columns 3..7.
    assert torch.equal(crops[0, 0], x[1, 0, 4:7, 3:8])
    # Position (0, 0) centres on (1, 1): columns -1..3, the first one outside the input.
    assert crops[1, 0, :, 0].isnan().all()
    assert torch.equal(crops[1, 0, :, 1:], x[0, 0, 0:3, 0:4])
    # An even size has no centre pixel: the half rounds up, (1, 4.5) -> rows 0..2, columns 3..6.
    even = crop_at(x[:1], torch.tensor([[0, 0]]), ReceptiveField(3, 4, (1.0, 1.0), (1.0, 4.5)))
    assert torch.equal(even[0, 0], x[0, 0, 0:3, 3:7])
    # A position off the grid (-1, 0) centres on (-1, 1): rows -2..0, only the last inside.
    off = crop_at(x[:1], torch.tensor([[-1, 0]]), rf)
    assert off[0, 0, :2].isnan().all() and torch.equal(off[0, 0, 2, 1:], x[0, 0, 0, 0:4])
    ints = crop_at(x[:1].to(torch.uint8), torch.tensor([[0, 0]]), rf)  # one image, default images
    assert ints.dtype == torch.uint8 and (ints[0, 0, :, 0] == 0).all()
    with pytest.raises(ValueError, match=r"positions of shape \(1, 2\)"):
        crop_at(x[:1], torch.tensor([0, 0]), rf)


def test_an_empty_batch_changes_nothing():
    rf = ReceptiveField(5, 5, (1.0, 1.0), (2.0, 2.0))
    topk = TopKExamples(2, torch.tensor([0, 1]), rf)
    topk.update(torch.randn(3, 2, 4, 4), torch.randn(3, 1, 8, 8), torch.arange(3))
    before = {key: t.clone() for key, t in topk.state().items()}
    topk.update(torch.zeros(0, 2, 4, 4), torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    after = topk.state()
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_bad_arguments_name_the_problem():
    rf = ReceptiveField(5, 5, (1.0, 1.0), (2.0, 2.0))
    with pytest.raises(ValueError, match="k to be an int >= 1"):
        TopKExamples(0, torch.tensor([0]), rf)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        TopKExamples(3, torch.tensor([0.0]), rf)
    topk = TopKExamples(3, torch.tensor([0, 4]), rf)
    with pytest.raises(RuntimeError, match="before any update"):
        topk.state()
    with pytest.raises(ValueError, match=r"act of shape \(B, C, h, w\)"):
        topk.update(torch.zeros(2, 4), torch.zeros(2, 1, 8, 8), torch.arange(2))
    with pytest.raises(ValueError, match="channels < 4"):
        topk.update(torch.zeros(2, 4, 4, 4), torch.zeros(2, 1, 8, 8), torch.arange(2))
    with pytest.raises(ValueError, match=r"indices to be a \(2,\) integer tensor"):
        topk.update(torch.zeros(2, 8, 4, 4), torch.zeros(2, 1, 8, 8), torch.zeros(2))


# ---------------------------------------------------------------------------- the picture


def test_examples_grid_rows_columns_captions_and_dead_mark(tmp_path):
    model = Bars()
    images, _, _ = bar_images()
    result = stream(model, images, torch.arange(12), [range(12)], k=4).result()
    grid = examples_grid(result)
    plain = examples_grid(result, overlay=False)
    assert grid.dtype == torch.uint8 and grid.shape == plain.shape and grid.shape[2] == 3
    # 3 rows of 40 px tiles (5 px crops x 8) + captions, 4 columns + a label column.
    row_h, col_w = 40 + 12 + 3, 40 + 3
    assert grid.shape[0] == 3 * row_h + 3 and grid.shape[1] == 36 + 4 * col_w + 3
    assert not torch.equal(grid, plain)  # the overlay shows
    red = (grid[..., 0] > 180) & (grid[..., 1] < 80) & (grid[..., 2] < 80)  # (H, W)
    rows_with_red = red.any(dim=1).nonzero().flatten()
    assert rows_with_red.min() >= 2 * row_h  # only the dead channel's row (the third) is marked
    assert red[2 * row_h :, :36].any()  # its label is red
    # the frame: 2 px around the row's tiles and captions, on all four sides
    top, bottom = 3 + 2 * row_h - 2, 3 + 2 * row_h + 40 + 12 + 1
    left, right = 36 - 2, 36 + 4 * col_w - 3 + 2
    assert red[top : top + 2, left:right].all() and red[bottom - 2 : bottom, left:right].all()
    assert red[top:bottom, left : left + 2].all() and red[top:bottom, right - 2 : right].all()
    not_dead = examples_grid(result, dead=torch.zeros(3, dtype=torch.bool))
    red = (not_dead[..., 0] > 180) & (not_dead[..., 1] < 80) & (not_dead[..., 2] < 80)
    assert not red.any()
    # Captions: dark text under the tiles, in every column.
    captions = grid[3 + 40 : 3 + 52, 36:].float().mean(dim=2) < 100  # (12, W) row 1's captions
    assert all(captions[:, 3 + j * col_w : (j + 1) * col_w].any() for j in range(4))
    save_png(grid, tmp_path / "bars.png")
    with Image.open(tmp_path / "bars.png") as im:
        assert im.size == (grid.shape[1], grid.shape[0])
    with pytest.raises(ValueError, match="overlay=False"):
        examples_grid(stream(model, images, torch.arange(12), [range(12)], overlay=False).result())


def test_wide_scores_widen_the_columns_so_captions_never_touch():
    model = Bars()
    images, _, _ = bar_images()
    result = stream(model, images, torch.arange(12), [range(12)], k=4).result()
    wide = dataclasses.replace(result, scores=-1234.5 - result.scores)  # "-1.24e+03" and the like
    narrow, grid = examples_grid(result), examples_grid(wide)
    assert grid.shape[0] == narrow.shape[0] and grid.shape[1] > narrow.shape[1]
    col_w = (grid.shape[1] - 36 - 3) // 4
    ink = grid[3 + 40 : 3 + 52].float().mean(dim=2) < 200  # (12, W) the first row's captions
    for j in range(4):  # every caption inside its own column, clear of the 3 px gap after it
        start = 36 + j * col_w
        assert ink[:, start : start + col_w - 3].any()
        assert not ink[:, start + col_w - 3 : start + col_w].any()


@pytest.mark.slow
def test_real_mnist_conv2_streamed_top_k_equals_brute_force(tmp_path, mnist_dir):
    from fm_lightning.data import MNISTDataModule

    torch.manual_seed(0)
    dm = MNISTDataModule(mnist_dir, batch_size=128)
    dm.setup("fit")
    model = SimpleCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step, (x, y) in enumerate(dm.train_dataloader()):  # about half an epoch
        loss = F.cross_entropy(model(dm.normalize(x)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 200:
            break
    model.eval()
    maps = []
    hook = model.conv2.register_forward_hook(lambda m, a, out: maps.append(out))
    val = dm.normalize(dm.val_set.images)  # (5000, 1, 28, 28)
    rf = receptive_field(model, model.conv2, val[:64])
    topk = TopKExamples(9, torch.arange(32), rf)
    try:
        with torch.inference_mode():
            for start in range(0, len(val), 500):
                model(val[start : start + 500])
                topk.update(
                    maps[-1],
                    val[start : start + 500],
                    torch.arange(start, start + 500)[: len(maps[-1])],
                )
            whole = model.conv2(model.pool(F.relu(model.conv1(val))))  # (5000, 32, 8, 8)
    finally:
        hook.remove()
    result = topk.result()
    scores = whole.flatten(2).amax(dim=2)  # (5000, 32)
    for c in range(32):
        assert result.indices[c].tolist() == ranked(scores[:, c], torch.arange(5000), 9)
    assert torch.allclose(result.scores, scores.T.gather(1, result.indices))
    assert torch.equal(result.channel_max, scores.amax(dim=0))
    expected = crop_at(val, result.positions.view(-1, 2), rf, result.indices.view(-1))
    assert torch.equal(result.crops.nan_to_num(9.0), expected.view_as(result.crops).nan_to_num(9.0))
    grid = examples_grid(result)
    assert grid.shape == (32 * (42 + 12 + 3) + 3, 36 + 9 * (42 + 3) + 3, 3)  # 14 px crops x 3
    assert np.asarray(grid).std() > 10
