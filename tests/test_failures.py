"""The callback's failure policy on its own (fm_lightning.failures); the Trainer-level behaviour
(training goes on, strict=True raises from a real fit) is in test_callback.py."""

from __future__ import annotations

import warnings

import pytest

from fm_lightning.failures import Failures


def caught(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in seen]


def test_a_cause_is_warned_once_per_error_type_and_training_goes_on():
    failures = Failures()
    said = caught(
        lambda: [
            failures.fail("capture", ValueError("bad shape")),
            failures.fail("capture", ValueError("another shape")),  # same cause and type: quiet
            failures.fail("capture", KeyError("x")),
        ]
    )
    assert len(said) == 2, said
    assert said[0] == (
        "FeatureMapCallback: capture failed (ValueError: bad shape); training goes on and the "
        "callback goes on. Pass strict=True to raise instead."
    )
    assert "KeyError" in said[1]
    assert not failures.disabled


def test_a_disabling_failure_turns_the_callback_off_and_says_so():
    failures = Failures()
    said = caught(lambda: failures.fail("input", TypeError("no tensor"), disable=True))
    assert failures.disabled
    assert said == [
        "FeatureMapCallback: input failed (TypeError: no tensor); training goes on and the "
        "callback is turned off for this run. Pass strict=True to raise instead."
    ]


def test_warn_once_per_key_and_plain_warnings_without_a_key_every_time():
    failures = Failures()
    said = caught(
        lambda: [
            failures.warn_once("layout:conv1", "conv1 falls back"),
            failures.warn_once("layout:conv1", "conv1 falls back"),
            failures.warn("a note"),
            failures.warn("a note"),
        ]
    )
    assert said == [
        "FeatureMapCallback: conv1 falls back",
        "FeatureMapCallback: a note",
        "FeatureMapCallback: a note",
    ]


def test_strict_raises_the_error_itself_and_problems_as_runtime_errors():
    failures = Failures(strict=True)
    err = ValueError("bad shape")
    with pytest.raises(ValueError) as raised:
        failures.fail("capture", err, disable=True)
    assert raised.value is err and not failures.disabled
    with pytest.raises(RuntimeError, match="^FeatureMapCallback: conv1 falls back$"):
        failures.warn_once("layout:conv1", "conv1 falls back")
    assert caught(lambda: failures.warn("a note")) == ["FeatureMapCallback: a note"]  # never raises


def test_the_callbacks_strict_can_be_changed_after_construction():
    from fm_lightning import FeatureMapCallback

    cb = FeatureMapCallback(["conv1"])
    cb.strict = True
    with pytest.raises(ValueError, match="bad shape"):
        cb._failures.fail("capture", ValueError("bad shape"))
