"""The feature-maps picture kind: each chosen layer's maps for the probe, and their statistics.

    maps = MapsKind(max_channels=32, normalize="channel", cmap="viridis", order="activation")
    captured = maps.capture(run, probe)      # the probe pass (every rank)
    drawn = maps.draw(run, shot)             # rank zero: one grid per layer, probe strip, stats

With ``order="activation"`` the channels chosen at the first captured validation stay the
layer's channels for the run (and in checkpoints), so a column is one channel over time.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fm_lightning import capture, rendering
from fm_lightning.gallery import PROBE_FILE
from fm_lightning.pictures import Drawn, Picture, PictureKind, Run, Shot


class MapsKind(PictureKind):
    def __init__(
        self, max_channels: int, normalize: str, cmap: str, order: str, stats: bool = True
    ) -> None:
        if normalize not in rendering.NORMALIZE_MODES:
            raise ValueError(
                f"expected `normalize` in {rendering.NORMALIZE_MODES}, got {normalize!r}"
            )
        if order not in rendering.ORDERS:
            raise ValueError(f"expected `order` in {rendering.ORDERS}, got {order!r}")
        rendering.check_cmap(cmap)
        self.max_channels = max_channels
        self.normalize = normalize
        self.cmap = cmap
        self.order = order
        self.stats = stats
        self.channels: dict[str, Tensor] = {}  # order="activation": {layer: (C',) indices}

    def capture(self, run: Run, probe: Any, stats: bool | None = None) -> dict[str, Any]:
        """The probe pass on ``run.modules`` (:func:`fm_lightning.capture.capture`)."""
        captured, _ = capture.capture(
            run.model,
            probe,
            run.modules,
            max_channels=self.max_channels,
            order=self.order,
            layouts_by_layer=run.layouts,
            readings=run.readings,
            stats=self.stats if stats is None else stats,
            forward_context=run.forward_context(),
            channels=self.channels,
        )
        if self.order == "activation":  # the first channels chosen for a layer stay its own
            for key, cap in captured.items():
                if cap.channels is not None:
                    self.channels.setdefault(key, cap.channels.cpu())
        return captured

    def channels_for(self, run: Run, probe: Any) -> dict[str, Tensor]:
        """``{layer: (C',) indices}`` the maps draw for ``probe`` (its layouts measured first)."""
        run.measure_layouts_once(probe)
        captured = self.capture(run, probe, stats=False)
        return {k: c.channels for k, c in captured.items() if c.channels is not None}

    def grid(self, cap: capture.Captured) -> Tensor:
        """One layer's picture: rows are probe inputs, columns its drawn channels."""
        return rendering.feature_picture(
            cap.act,
            max_channels=self.max_channels,
            normalize=self.normalize,
            cmap=self.cmap,
            order=self.order,
            channels=cap.channels,
        )

    def draw(self, run: Run, shot: Shot) -> Drawn:
        drawn = Drawn()
        for layer in capture.not_run(run.modules, shot.captured):
            run.warn_once(
                f"not-run:{layer}",
                f"layer {layer!r} did not run in the probe pass, so it is not drawn. Likely "
                "reasons: a training-only branch (an auxiliary head), a fused kernel that "
                "bypasses the module (fused attention), or a branch the forward skips for "
                "these inputs.",
            )
        for key, cap in shot.captured.items():
            if cap.error is not None:
                run.warn_once(f"skip:{key}", f"skipping layer {key!r}: {cap.error}.")
                continue
            try:
                grid = self.grid(cap)
            except rendering.UnsupportedActivationError as err:
                run.warn_once(f"skip:{key}", f"skipping {key!r}: {err}.")
                continue
            except Exception as err:
                run.fail("render", err)
                continue
            folder = shot.folders[key]
            caption = f"{shot.when}, {maps_caption(cap)}"
            drawn.pictures.append(
                Picture(f"feature_maps/{key}", f"{folder}/{shot.frame.stem}.png", grid, caption)
            )
            drawn.stats[folder] = dict(cap.stats)
            for stat, value in cap.stats.items():
                drawn.scalars[f"feature_stats/{key}/{stat}"] = value
        images = capture.first_image(shot.probe)  # non-image inputs have no strip, quietly
        if images is not None:
            try:
                strip = rendering.image_grid(images.float().cpu())
                caption = f"{len(images)} fixed validation inputs"
                drawn.pictures.append(Picture("probe_inputs", PROBE_FILE, strip, caption))
            except Exception as err:
                run.fail("render", err)
        return drawn

    def state_dict(self) -> dict[str, Any]:
        return {"channels": dict(self.channels)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.channels = dict(state.get("channels") or {})


def maps_caption(cap: capture.Captured) -> str:
    """What a maps grid shows: ``channels 0-31 of 64; measured: NCHW`` or ``10 of 10 features``."""
    if cap.channels is None:
        text = f"{cap.act.shape[-1]} of {cap.total_channels} features"
    else:
        text = f"channels {ranges(cap.channels.tolist())} of {cap.total_channels}"
    return f"{text}; {cap.note}" if cap.note else text


def ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``: channel lists in captions and messages."""
    spans: list[list[int]] = []
    for v in values:
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)
