"""FeatureMapCallback's failure policy: nothing it does stops training; each problem is said once.

    failures = Failures(strict=False)
    failures.fail("capture", err)               # warns once per cause; the run goes on
    failures.fail("input", err, disable=True)   # ... and the callback draws nothing more
    failures.warn_once("layout:conv1", message) # a problem with what is drawn, once per key
    failures.warn(message)                      # a note from any rank; never raises

With ``strict=True``, ``fail`` and ``warn_once`` raise instead (tests, debugging). Ranks other
than zero warn too, their messages prefixed with the rank: a failure there must not go unseen.
"""

from __future__ import annotations

import warnings

from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message

PREFIX = "FeatureMapCallback: "


class Failures:
    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.disabled = False  # a failure that turns the callback off for the run happened
        self._said: set[str] = set()  # keys already warned about

    def fail(self, cause: str, err: Exception, disable: bool = False) -> None:
        """``cause`` (``"input"``, ``"capture"``, ...) failed with ``err``: warned once per cause
        and error type, the callback turned off for the run if ``disable``; raised if strict."""
        if self.strict:
            raise err
        self.disabled = self.disabled or disable
        what = "is turned off for this run" if disable else "goes on"
        self.warn_once(
            f"{cause}:{type(err).__name__}",
            f"{cause} failed ({type(err).__name__}: {err}); training goes on and the callback "
            f"{what}. Pass strict=True to raise instead.",
        )

    def warn_once(self, key: str, message: str) -> None:
        """A problem with what is drawn: warned once per key, or raised with strict=True."""
        if self.strict:
            raise RuntimeError(PREFIX + message)
        self.warn(message, key)

    def warn(self, message: str, key: str | None = None) -> None:
        """A warning from any rank (once per ``key``, when given); never raises."""
        if key is not None and key in self._said:
            return
        if key is not None:
            self._said.add(key)
        if rank_zero_only.rank == 0:
            rank_zero_warn(PREFIX + message)
        else:
            warnings.warn(
                rank_prefixed_message(PREFIX + message, rank_zero_only.rank), stacklevel=3
            )
