"""Does a class-activation map point at what the model uses? The deletion check.

    result = class_activation_maps(net, x, "GradCAM", layer="relu2", targets=y)
    by_map, by_chance = deletion_drops(net, x, result.pred_maps, fill=x.min().item())
    wins = (by_map > by_chance.mean(0)).float().mean()  # the map beats random pixels

Petsiuk et al. (2018): set the pixels a map ranks highest to ``fill`` and see how far the
predicted class's logit falls, against as many pixels picked at random. A map that shows where the
evidence is lowers the logit more than chance. tests/test_default_cam.py and
benchmarks/cam_faithfulness.py both measure with this function.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["deletion_drops"]


@torch.no_grad()
def deletion_drops(
    net: nn.Module,
    x: Tensor,
    maps: Tensor,
    fraction: float = 0.2,
    fill: float = 0.0,
    random_masks: int = 10,
    seed: int = 1,
) -> tuple[Tensor, Tensor]:
    """How far the predicted class's logit drops when the map's top pixels are set to ``fill``.

    Args:
        net: the classifier, in eval mode; ``net(x)`` gives (N, num_classes) logits.
        x: (N, C, H, W) inputs as the net takes them (normalised).
        maps: (N, H, W) maps at the inputs' size, higher meaning more important.
        fraction: the share of each image's values set to ``fill`` (all channels of a pixel
            count separately: ``fraction * C * H * W`` values).
        fill: what masked values become, e.g. ``x.min()`` (black) or 0 (the dataset's mean
            after normalisation).
        random_masks: how many sets of random pixels to compare with.
        seed: seeds the random pixels and the random order among a map's tied values.

    Returns:
        ``(by_map, by_chance)``: (N,) logit drops when the map's top values are masked, and
        (random_masks, N) drops for as many random values. Ties in the map (a blank stretch)
        are broken at random.
    """
    if x.ndim != 4 or maps.shape != (x.shape[0], *x.shape[2:]):
        raise ValueError(
            f"expected x (N, C, H, W) and maps (N, H, W) of the same N, H, W, "
            f"got {tuple(x.shape)} and {tuple(maps.shape)}"
        )
    g = torch.Generator().manual_seed(seed)
    n, size = len(x), x[0].numel()
    k = int(fraction * size)
    logits = net(x)
    pred = logits.argmax(1, keepdim=True)  # (N, 1)

    def drop(order: Tensor) -> Tensor:  # order: (N, C*H*W), the highest k values are masked
        masked = x.flatten(1).scatter(1, order.topk(k, dim=1).indices, fill)
        return (logits.gather(1, pred) - net(masked.view_as(x)).gather(1, pred))[:, 0]

    ranks = maps[:, None].expand_as(x).flatten(1)  # (N, C*H*W): a pixel's rank in every channel
    ties = torch.rand(n, size, generator=g) * 1e-6  # blank stretches: random order
    by_map = drop(ranks + ties.to(x.device))
    by_chance = torch.stack(
        [drop(torch.rand(n, size, generator=g).to(x.device)) for _ in range(random_masks)]
    )
    return by_map, by_chance
