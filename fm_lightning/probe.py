"""The probe: the fixed validation inputs that every captured validation draws, collected once.

    probe = Probe(num_images=4)
    probe.add(inputs, targets)            # each validation batch, until it holds num_images rows
    x = probe.assemble()                  # the rows so far as one input (a short probe), or None
    x = probe.share(strategy.broadcast, device)   # rank zero's probe on every rank, or None
    x = probe.share_assembled(broadcast, device, failures)  # assemble, then share (the callback)

The probe is what the model is called with (a Tensor, tuple or dict of (N, ...) tensors; see
:func:`fm_lightning.capture.call_model`), with the batches' true classes when they have them. It
lives in FeatureMapCallback's ``state_dict``, on the CPU, so a resumed run draws the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fm_lightning.capture import concat_rows, num_rows, take_rows, to_device
from fm_lightning.failures import Failures


class Probe:
    def __init__(self, num_images: int) -> None:
        self.num_images = num_images
        self.inputs: Any = None  # complete (or short) probe, once assembled
        self.targets: torch.Tensor | None = None  # (N,) true classes, when batches have them
        self._parts: list[tuple[Any, torch.Tensor | None]] = []

    def restart(self) -> None:
        """An unfinished probe (say, from the short sanity check) starts over: no image repeats."""
        if self.inputs is None:
            self._parts = []

    def needs(self) -> int:
        """Rows still missing (0 once assembled)."""
        if self.inputs is not None:
            return 0
        return self.num_images - sum(num_rows(x) for x, _ in self._parts)

    def add(self, inputs: Any, targets: torch.Tensor | None) -> None:
        """Keep copies of the rows still needed; assemble the probe once it is complete."""
        need = self.needs()
        if need <= 0:
            return
        self._parts.append((take_rows(inputs, need), None if targets is None else targets[:need]))
        if self.needs() <= 0:
            self.assemble()

    def assemble(self) -> Any:
        """The probe, from the rows collected so far (fewer than ``num_images`` when validation
        gave fewer); None when none were. Raises for batches of different shapes or dtypes."""
        if self.inputs is None and self._parts:
            parts, self._parts = self._parts, []
            self.inputs = concat_rows([x for x, _ in parts])
            targets = [y for _, y in parts]
            has_all = all(y is not None for y in targets)
            self.targets = torch.cat(targets).clone() if has_all else None
        return self.inputs

    def share(
        self, broadcast: Callable[[Any], Any], device: torch.device, send: bool = True
    ) -> Any:
        """Rank zero's probe (and targets) on every rank and on ``device``, or None (also when
        rank zero does not ``send`` it: a callback turned off).

        Ranks see different validation shards (or none, or failed to read theirs): rank zero's
        probe, or its None, is the one every rank uses. It is sent from the CPU, so unpickling it
        on another rank does not touch rank zero's GPU. ``broadcast`` is the strategy's.
        """
        cpu = None
        if send and self.inputs is not None:
            cpu = to_device((self.inputs, self.targets), "cpu")
        shared = broadcast(cpu)
        if shared is None:
            return None
        self.inputs, self.targets = to_device(shared, device)
        return self.inputs

    def share_assembled(
        self, broadcast: Callable[[Any], Any], device: torch.device, failures: Failures
    ) -> Any:
        """:meth:`share` of this rank's rows, assembled first (a collective: every rank calls it).

        Rows that do not make one probe (batches of different shapes or dtypes) turn the
        callback off through ``failures``; a probe short of ``num_images`` is said once.
        """
        local = None
        if not failures.disabled:
            try:
                local = self.assemble()
            except Exception as err:
                failures.fail("input", err, disable=True)
        if local is not None and (have := num_rows(local)) < self.num_images:
            failures.warn(
                f"validation gave only {have} of num_images={self.num_images} probe images.",
                key="short probe",
            )
        return self.share(broadcast, device, send=local is not None)

    def state_dict(self) -> dict[str, Any]:
        return {
            "probe": None if self.inputs is None else to_device(self.inputs, "cpu"),
            "targets": None if self.targets is None else self.targets.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inputs, self.targets = state.get("probe"), state.get("targets")
        self._parts = []
