"""The deletion check (fm_lightning.faithfulness) on a linear model whose evidence is known."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fm_lightning.faithfulness import deletion_drops


def left_half_model(channels: int = 1) -> nn.Module:
    """Class 0's logit is the sum of the left half of a 4 x 4 image (every channel); class 1's
    is a constant 1. Masking a left pixel to 0 lowers class 0's logit by its value."""
    linear = nn.Linear(channels * 16, 2)
    with torch.no_grad():
        weight = torch.zeros(channels, 4, 4)
        weight[:, :, :2] = 1.0
        linear.weight.copy_(torch.stack([weight.flatten(), torch.zeros(channels * 16)]))
        linear.bias.copy_(torch.tensor([0.0, 1.0]))
    return nn.Sequential(nn.Flatten(), linear).eval()


def test_a_map_on_the_evidence_drops_the_logit_more_than_random_pixels():
    x = torch.ones(3, 1, 4, 4)  # class 0's logit 8 > 1: predicted
    left = torch.zeros(3, 4, 4)
    left[:, :, :2] = torch.arange(8.0).view(4, 2)  # ranks the left half, no ties
    by_map, by_chance = deletion_drops(left_half_model(), x, left, fraction=0.25, random_masks=7)
    assert by_map.tolist() == [4.0, 4.0, 4.0]  # its top 4 pixels are all on the left
    assert by_chance.shape == (7, 3)
    assert (by_chance <= 4.0).all() and by_chance.mean() < 3.5  # 2 of 4 on the left, on average
    by_map, _ = deletion_drops(left_half_model(), x, left.flip(-1), fraction=0.25)
    assert by_map.tolist() == [0.0, 0.0, 0.0]  # the right half carries no evidence


def test_the_fill_value_and_every_channel_of_a_pixel_are_masked():
    x = torch.ones(2, 3, 4, 4)  # class 0's logit 24
    left = torch.zeros(2, 4, 4)
    left[:, 0, :2] = torch.tensor([2.0, 1.0])  # the top 2 pixels, 6 values with 3 channels
    by_map, _ = deletion_drops(left_half_model(3), x, left, fraction=6 / 48, fill=-1.0)
    assert by_map.tolist() == [12.0, 12.0]  # 6 values from 1 to -1


def test_blank_maps_are_ranked_at_random_and_the_draws_are_seeded():
    x = torch.ones(2, 1, 4, 4)
    flat = torch.zeros(2, 4, 4)
    first = deletion_drops(left_half_model(), x, flat, random_masks=3, seed=5)
    again = deletion_drops(left_half_model(), x, flat, random_masks=3, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert len(set(first[1].flatten().tolist())) > 1  # the random masks differ
    # a blank map's 3 masked pixels are drawn anew with each seed, not always the same ones
    by_seed = {deletion_drops(left_half_model(), x, flat, seed=s)[0][0].item() for s in range(10)}
    assert len(by_seed) > 1, by_seed


def test_maps_that_do_not_match_the_inputs_are_refused():
    with pytest.raises(
        ValueError, match=r"expected x \(N, C, H, W\).*got \(2, 1, 4, 4\) and \(2, 5, 5\)"
    ):
        deletion_drops(left_half_model(), torch.ones(2, 1, 4, 4), torch.zeros(2, 5, 5))
