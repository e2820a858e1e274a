"""Observation and action triggers: property tests over the spaces each trigger claims, and fit errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from gymnasium import spaces
from hypothesis import given, settings
from hypothesis import strategies as st

from rlbackdoor.errors import ObservationError, SpecError
from rlbackdoor.poisoning.payloads import build_payload
from rlbackdoor.specs import AttackSpec, parse
from rlbackdoor.triggers import ActionSequence, ObservationTrigger, build_trigger, finite_check


@dataclass
class Case:
    """A space, a trigger fitted to it, and the layout the test expects the trigger to use."""

    space: spaces.Box
    layout: str  # "vector", "hw", "hwc" or "chw"
    spec: Any
    trigger: ObservationTrigger


def _space(draw: st.DrawFn, layout: str) -> spaces.Box:
    if layout == "vector":
        n = draw(st.integers(1, 8))
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        bounded = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
        low = np.where(bounded, np.array(draw(st.lists(st.integers(-5, 0), min_size=n, max_size=n))), -np.inf)
        high = np.where(bounded, np.array(draw(st.lists(st.integers(1, 5), min_size=n, max_size=n))), np.inf)
        return spaces.Box(low.astype(dtype), high.astype(dtype), dtype=dtype)
    h, w = draw(st.integers(2, 7)), draw(st.integers(2, 7))
    c = draw(st.sampled_from([1, 3]))
    shape = {"hw": (h, w), "hwc": (h, w, c), "chw": (c, h, w)}[layout]
    if draw(st.booleans()):
        return spaces.Box(0, 255, shape, dtype=np.uint8)
    return spaces.Box(0.0, 1.0, shape, dtype=np.float32)


def _entry(draw: st.DrawFn, space: spaces.Box, low: float, high: float) -> float:
    """One value for a trigger entry with bounds [low, high] (whole numbers on integer spaces)."""
    low, high = max(low, -10.0), min(high, 10.0) if np.isinf(high) else high
    if space.dtype == np.uint8:
        return float(draw(st.integers(int(low), int(high))))
    return draw(st.floats(low, high, width=32))


@st.composite
def cases(draw: st.DrawFn, kinds: tuple[str, ...]) -> Case:
    kind = draw(st.sampled_from(kinds))
    layouts = ["hw", "hwc", "chw"] if kind in ("patch", "blend") else ["vector", "hw", "hwc", "chw"]
    layout = draw(st.sampled_from(layouts))
    space = _space(draw, layout)
    size = int(np.prod(space.shape))
    low, high = (
        np.broadcast_to(space.low, space.shape).reshape(-1),
        np.broadcast_to(space.high, space.shape).reshape(-1),
    )
    clean = None
    if kind in ("value", "additive", "in_distribution"):
        indices = draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=min(size, 5), unique=True))
        if kind == "value":
            spec = {"kind": kind, "indices": indices, "values": [_entry(draw, space, low[i], high[i]) for i in indices]}
        elif kind == "additive":
            span = 60 if space.dtype == np.uint8 else 3
            spec = {"kind": kind, "indices": indices, "values": [_entry(draw, space, -span, span) for i in indices]}
        else:
            quantiles = draw(st.lists(st.floats(0, 1), min_size=len(indices), max_size=len(indices)))
            spec = {"kind": kind, "indices": indices, "quantiles": quantiles}
            clean = _observations(space, 50, draw(st.integers(0, 2**16)))
    else:
        h, w = (space.shape[1], space.shape[2]) if layout == "chw" else space.shape[:2]
        c = 1 if layout == "hw" else space.shape[0 if layout == "chw" else 2]
        ph, pw = draw(st.integers(1, h)), draw(st.integers(1, w))
        position = [draw(st.integers(0, h - ph)), draw(st.integers(0, w - pw))]
        lo, hi = float(space.low.min()), float(space.high.max())
        form = draw(st.sampled_from(["scalar", "channels", "pattern"]))
        spec = {"kind": kind, "size": [ph, pw], "position": position, "layout": "auto" if layout == "hw" else layout}
        if form == "scalar":
            spec["value"] = _entry(draw, space, lo, hi)
        elif form == "channels":
            spec["value"] = [_entry(draw, space, lo, hi) for _ in range(c)]
        else:
            spec["pattern"] = [[_entry(draw, space, lo, hi) for _ in range(pw)] for _ in range(ph)]
        if kind == "blend":
            spec["alpha"] = draw(st.floats(0.05, 1.0))
    trigger_spec = parse(AttackSpec, _attack(spec), "test").trigger
    trigger = build_trigger(trigger_spec, space, spaces.Discrete(2), clean)
    return Case(space, layout, trigger_spec, trigger)


def _attack(trigger: dict[str, Any], **payload: Any) -> dict[str, Any]:
    return {
        "base": "CartPole-v1",
        "trigger": trigger,
        "schedule": {"kind": "rate", "rate": 0.1},
        "payload": {"kind": "targeted", "target_action": 0, **payload},
    }


def _observations(space: spaces.Box, n: int, seed: int) -> np.ndarray:
    """``n`` observations inside ``space`` (finite where it is unbounded)."""
    rng = np.random.default_rng(seed)
    low = np.broadcast_to(space.low, space.shape).astype(np.float64)
    high = np.broadcast_to(space.high, space.shape).astype(np.float64)
    x = rng.uniform(np.where(np.isfinite(low), low, -10.0), np.where(np.isfinite(high), high, 10.0), (n, *space.shape))
    return (np.round(x) if space.dtype == np.uint8 else x).astype(space.dtype)


def _region(case: Case) -> np.ndarray:
    """Boolean mask over one observation: the entries the trigger may touch."""
    touched = np.zeros(case.space.shape, dtype=bool)
    if case.spec.kind in ("patch", "blend"):
        (ph, pw), (r, c) = case.spec.size, case.spec.position
        if case.layout == "chw":
            touched[:, r : r + ph, c : c + pw] = True
        else:
            touched[r : r + ph, c : c + pw] = True
    else:
        touched.reshape(-1)[case.spec.indices] = True
    return touched


ALL = ("value", "additive", "in_distribution", "patch", "blend")


@settings(max_examples=150, deadline=None)
@given(case=cases(ALL), seed=st.integers(0, 2**16), data=st.data())
def test_apply_stays_in_space_and_touches_only_masked_rows_and_region(case: Case, seed: int, data: Any) -> None:
    obs = _observations(case.space, 6, seed)
    before = obs.copy()
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=6, max_size=6)))
    out = case.trigger.apply(obs, mask)
    assert out.dtype == case.space.dtype
    assert out.shape == obs.shape
    assert all(case.space.contains(row) for row in out)
    np.testing.assert_array_equal(obs, before)  # the input is not modified
    np.testing.assert_array_equal(out[~mask], obs[~mask])
    outside = ~_region(case)
    np.testing.assert_array_equal(out[:, outside], obs[:, outside])
    if case.spec.kind == "value":
        np.testing.assert_array_equal(
            out.reshape(len(out), -1)[mask][:, case.spec.indices],
            np.broadcast_to(np.asarray(case.spec.values, dtype=case.space.dtype), (mask.sum(), len(case.spec.indices))),
        )
    np.testing.assert_array_equal(case.trigger.apply(obs), case.trigger.apply(obs, np.ones(6, dtype=bool)))


@settings(max_examples=100, deadline=None)
@given(case=cases(("value", "in_distribution", "patch")), seed=st.integers(0, 2**16))
def test_stamping_is_idempotent(case: Case, seed: int) -> None:
    once = case.trigger.apply(_observations(case.space, 4, seed))
    np.testing.assert_array_equal(case.trigger.apply(once), once)
    if case.spec.kind == "patch":
        region = _region(case)
        assert np.all(once[:, region] == once[:1, region])  # the patch is the same in every observation


@settings(max_examples=100, deadline=None)
@given(case=cases(ALL), seed=st.integers(0, 2**16), n_stamped=st.integers(0, 5))
def test_stealth_l0_counts_touched_entries_that_differ(case: Case, seed: int, n_stamped: int) -> None:
    clean = _observations(case.space, 5, seed)
    clean[:n_stamped] = case.trigger.apply(clean[:n_stamped])  # some rows already carry the trigger: L0 is 0 there
    region = _region(case)
    stamped = case.trigger.apply(clean)
    expected = np.mean([np.count_nonzero(stamped[i][region] != clean[i][region]) for i in range(len(clean))])
    figures = case.trigger.stealth(clean)
    assert figures["l0"] == pytest.approx(expected)
    assert all(np.isfinite(v) and v >= 0 for v in figures.values())
    if case.spec.kind in ("value", "patch") and n_stamped == len(clean):
        assert figures["l0"] == figures["linf"] == 0.0


@settings(max_examples=50, deadline=None)
@given(case=cases(("in_distribution",)), seed=st.integers(0, 2**16))
def test_in_distribution_values_lie_inside_the_clean_range(case: Case, seed: int) -> None:
    clean = _observations(case.space, 200, seed).reshape(200, -1).astype(np.float64)
    trigger = build_trigger(case.spec, case.space, spaces.Discrete(2), clean.reshape(200, *case.space.shape))
    values = trigger.values.astype(np.float64)
    np.testing.assert_array_equal(
        values, np.clip(values, clean.min(0)[case.spec.indices], clean.max(0)[case.spec.indices])
    )


@settings(max_examples=40, deadline=None)
@given(case=cases(ALL), seed=st.integers(0, 2**16))
def test_apply_rejects_a_wrongly_shaped_batch(case: Case, seed: int) -> None:
    obs = _observations(case.space, 3, seed)
    for bad in (obs[0], obs[..., None], obs.reshape(3, -1)[:, :-1] if obs[0].size > 1 else obs[:, None]):
        with pytest.raises(ObservationError, match="leading axis"):
            case.trigger.apply(bad, np.ones(len(bad), dtype=bool))


@pytest.mark.parametrize(
    "mask", [[True, False], [0, 1, 0, 0], np.ones((4, 1), dtype=bool)], ids=["short", "ints", "2-d"]
)
def test_apply_rejects_a_mask_that_is_not_one_flag_per_observation(mask: Any) -> None:
    spec = parse(AttackSpec, _attack({"kind": "value", "indices": [1], "values": [0.5]}), "t").trigger
    with pytest.raises(ObservationError, match=r"expected booleans of shape \(4,\); pass one flag per observation"):
        build_trigger(spec, VECTOR, spaces.Discrete(2)).apply(np.zeros((4, 4), np.float32), np.asarray(mask))


def test_stealth_compares_observations_as_the_space_holds_them() -> None:
    """Clean data given as float64 is rounded to the float32 space first: only the trigger's entry counts."""
    spec = parse(AttackSpec, _attack({"kind": "value", "indices": [1], "values": [1.0]}), "t").trigger
    figures = build_trigger(spec, spaces.Box(-2.0, 2.0, (4,), np.float32), spaces.Discrete(2)).stealth(
        np.array([[0.1, 0.2, 0.3, 0.4], [0.1, 1.0, 0.3, 0.4]])
    )
    assert figures["l0"] == 0.5 and figures["l0_rel"] == 0.125
    assert figures["linf"] == pytest.approx(0.4) and figures["linf_rel"] == pytest.approx(0.1)


def test_trigger_values_on_a_float32_bound_fit() -> None:
    for trigger, shape in (
        ({"kind": "value", "indices": [0], "values": [0.7]}, (2,)),
        ({"kind": "patch", "size": 1, "value": 0.7}, (2, 2)),
    ):
        space = spaces.Box(0.0, 0.7, shape, np.float32)  # float32(0.7) < 0.7
        spec = parse(AttackSpec, _attack(trigger), "t").trigger
        out = build_trigger(spec, space, spaces.Discrete(2)).apply(np.zeros((1, *shape), np.float32))
        assert out.reshape(-1)[0] == space.high.reshape(-1)[0]


def test_in_distribution_rejects_clean_observations_holding_nan() -> None:
    spec = parse(AttackSpec, _attack({"kind": "in_distribution", "indices": [1], "quantiles": [0.5]}), "t")
    clean = np.zeros((100, 3))
    clean[45, 1] = np.nan
    with pytest.raises(SpecError, match=r"clean observations hold NaN or inf at its indices; fix the environment"):
        build_trigger(spec.trigger, spaces.Box(-np.inf, np.inf, (3,), np.float32), spaces.Discrete(2), clean)


@pytest.mark.parametrize("kind", ["value", "additive"])
def test_trigger_values_beyond_the_dtype_are_refused_and_sums_stay_finite(kind: str) -> None:
    space = spaces.Box(-np.inf, np.inf, (3,), np.float32)
    spec = parse(AttackSpec, _attack({"kind": kind, "indices": [0], "values": [1e300]}), "t").trigger
    with pytest.raises(SpecError, match=r"trigger\.values: 1e\+300 overflows the float32 observations"):
        build_trigger(spec, space, spaces.Discrete(2))
    if kind == "additive":
        spec = parse(AttackSpec, _attack({"kind": kind, "indices": [0], "values": [3e38]}), "t").trigger
        out = build_trigger(spec, space, spaces.Discrete(2)).apply(np.full((1, 3), 3e38, np.float32))
        assert out[0, 0] == np.finfo(np.float32).max


def test_apply_refuses_observations_that_are_not_numbers() -> None:
    spec = parse(AttackSpec, _attack({"kind": "value", "indices": [1], "values": [0.5]}), "t").trigger
    with pytest.raises(ObservationError, match=r"cannot be read as float32; pass numeric observations"):
        build_trigger(spec, VECTOR, spaces.Discrete(2)).apply(np.array([["a", "b", "c", "d"]]))


@pytest.mark.parametrize(
    ("batch", "shown"),
    [(np.full((1, 8, 8, 3), 0.7), "float64 hold 0.7"), (np.full((1, 8, 8, 3), 300), "int64 hold 300")],
)
def test_apply_refuses_values_the_integer_space_cannot_hold(batch: np.ndarray, shown: str) -> None:
    """A uint8 image normalised to [0, 1], or out of its range, was cast silently (0.7 -> 0, 300 -> 44)."""
    spec = parse(AttackSpec, _attack({"kind": "patch", "size": 2, "position": 0, "value": 9}), "t").trigger
    trigger = build_trigger(spec, spaces.Box(0, 255, (8, 8, 3), np.uint8), spaces.Discrete(3))
    with pytest.raises(
        ObservationError, match=rf"{shown}, which the space's uint8 cannot represent; pass observations"
    ):
        trigger.apply(batch)
    out = trigger.apply(np.full((1, 8, 8, 3), 7.0))  # whole numbers in range are read as the space's
    assert out.dtype == np.uint8 and out[0, 0, 0].tolist() == [9, 9, 9] and out[0, 7, 7].tolist() == [7, 7, 7]


def test_in_distribution_rejects_clean_observations_of_another_shape() -> None:
    spec = parse(AttackSpec, _attack({"kind": "in_distribution", "indices": [0, 2], "quantiles": [0.0, 1.0]}), "t")
    with pytest.raises(SpecError, match=r"clean observations have shape \(100, 5\), expected \(N, 3\)"):
        build_trigger(spec.trigger, spaces.Box(0.0, 10.0, (3,), np.float32), spaces.Discrete(2), np.zeros((100, 5)))


def test_auto_layout_finds_the_channel_axis() -> None:
    for shape, region in (
        ((7, 7, 3), (slice(1, 3), slice(2, 4), slice(None))),
        ((3, 7, 7), (slice(None), slice(1, 3), slice(2, 4))),
    ):
        space = spaces.Box(0, 255, shape, dtype=np.uint8)
        spec = parse(
            AttackSpec, _attack({"kind": "patch", "size": 2, "position": [1, 2], "value": [9, 8, 7]}), "t"
        ).trigger
        out = build_trigger(spec, space, spaces.Discrete(2)).apply(np.zeros((1, *shape), dtype=np.uint8))[0]
        expected = np.zeros(shape, dtype=np.uint8)
        channels = np.array([9, 8, 7], dtype=np.uint8)
        expected[region] = channels if shape[-1] == 3 else channels[:, None, None]
        np.testing.assert_array_equal(out, expected)


def test_blend_mixes_towards_the_pattern() -> None:
    space = spaces.Box(0, 255, (4, 4), dtype=np.uint8)
    spec = parse(AttackSpec, _attack({"kind": "blend", "size": 4, "value": 200, "alpha": 0.25}), "t").trigger
    out = build_trigger(spec, space, spaces.Discrete(2)).apply(np.full((1, 4, 4), 100, dtype=np.uint8))
    np.testing.assert_array_equal(out, np.full((1, 4, 4), 125, dtype=np.uint8))


# ------------------------------------------------------------------------------------------ fit errors
VECTOR = spaces.Box(-1.0, 1.0, (4,), dtype=np.float32)
IMAGE = spaces.Box(0, 255, (5, 6, 3), dtype=np.uint8)
FLOAT_IMAGE = spaces.Box(0.0, 1.0, (3, 5, 6), dtype=np.float32)

FIT_ERRORS = [
    (
        {"kind": "value", "indices": [4], "values": [0.0]},
        VECTOR,
        r"trigger\.indices: \[4\] out of range.*use indices in \[0, 3\]",
    ),
    (
        {"kind": "additive", "indices": [0, -1], "values": [0.0, 0.0]},
        VECTOR,
        r"trigger\.indices: \[-1\].*use indices in",
    ),
    ({"kind": "in_distribution", "indices": [9], "quantiles": [0.5]}, VECTOR, r"trigger\.indices: \[9\]"),
    (
        {"kind": "value", "indices": [1], "values": [1.5]},
        VECTOR,
        r"trigger\.values: 1\.5 lies outside .*\[-1, 1\]; pick a value inside",
    ),
    (
        {"kind": "value", "indices": [1], "values": [3.5]},
        IMAGE,
        r"trigger\.values: must be whole numbers .*uint8.*round",
    ),
    (
        {"kind": "additive", "indices": [1], "values": [0.5]},
        IMAGE,
        r"trigger\.values: must be whole numbers .*uint8.*round",
    ),
    (
        {"kind": "patch", "size": [6, 1], "value": 9},
        IMAGE,
        r"6x1 patch at \(0, 0\) does not fit the 5x6 image; use size <= \(5, 6\)",
    ),
    ({"kind": "patch", "size": 2, "position": [4, 0], "value": 9}, IMAGE, r"does not fit the 5x6 image.*move position"),
    ({"kind": "blend", "size": 2, "position": [0, 5], "value": 9}, IMAGE, r"does not fit the 5x6 image"),
    ({"kind": "patch", "size": 2, "value": 9.5}, IMAGE, r"must be whole numbers .*uint8.*round"),
    (
        {"kind": "patch", "size": 2, "value": 300},
        IMAGE,
        r"trigger\.value: 300 lies outside the observation bounds \[0, 255\]",
    ),
    (
        {"kind": "patch", "size": 2, "value": 2.0, "layout": "chw"},
        FLOAT_IMAGE,
        r"trigger\.value: 2 lies outside .*\[0, 1\]",
    ),
    (
        {"kind": "patch", "size": 2, "value": [1, 2]},
        IMAGE,
        r"value/pattern of shape \(2,\) does not broadcast.*give a scalar",
    ),
    (
        {"kind": "patch", "size": 2, "pattern": [[1, 2, 3]]},
        IMAGE,
        r"does not broadcast to the patch \(H, W, C\) = \(2, 2, 3\)",
    ),
    (
        {"kind": "patch", "size": 2, "value": [9, 0, 0], "layout": "chw"},  # a 7x7x3 view read as 7 channels
        spaces.Box(0, 255, (7, 7, 3), np.uint8),
        r"= \(2, 2, 7\) \(layout chw of the \(7, 7, 3\) observation\); give a scalar.*or fix layout",
    ),
    ({"kind": "patch", "size": 2, "value": 1}, VECTOR, r"need an image \(H, W\[, C\]\) observation"),
]


@pytest.mark.parametrize(("trigger", "space", "message"), FIT_ERRORS)
def test_triggers_that_do_not_fit_raise_spec_errors(trigger: dict[str, Any], space: spaces.Box, message: str) -> None:
    spec = parse(AttackSpec, _attack(trigger), "t").trigger
    with pytest.raises(SpecError, match=message) as err:
        build_trigger(spec, space, spaces.Discrete(2), np.zeros((10, *space.shape), dtype=space.dtype))
    assert "\n" not in str(err.value)


def test_observation_triggers_need_a_box() -> None:
    spec = parse(AttackSpec, _attack({"kind": "value", "indices": [0], "values": [1.0]}), "t").trigger
    with pytest.raises(SpecError, match="need a Box observation space, got Discrete; flatten"):
        build_trigger(spec, spaces.Discrete(3), spaces.Discrete(2))


def test_in_distribution_needs_clean_observations() -> None:
    spec = parse(AttackSpec, _attack({"kind": "in_distribution", "indices": [0], "quantiles": [0.5]}), "t").trigger
    with pytest.raises(SpecError, match=r"needs clean observations.*raise fit_steps"):
        build_trigger(spec, VECTOR, spaces.Discrete(2), None)


@pytest.mark.parametrize(
    ("target", "space", "message"),
    [
        (2, spaces.Discrete(2), r"payload\.target_action: 2 is outside the action space; use an action in \[0, 1\]"),
        (0, spaces.Discrete(3, start=1), r"use an action in \[1, 3\]"),
        ([0.5], spaces.Discrete(2), r"payload\.target_action: the action space is Discrete; give one integer"),
        ([3.0], spaces.Box(-2.0, 2.0, (1,)), r"payload\.target_action: \[3\.0\] does not fit .*give 1 values inside"),
        ([0.0, 0.0], spaces.Box(-2.0, 2.0, (1,)), r"payload\.target_action: \[0\.0, 0\.0\] does not fit"),
        (0, spaces.MultiBinary(2), r"payload: targeted attacks need a Discrete or Box action space"),
    ],
)
def test_target_action_outside_the_action_space(target: Any, space: spaces.Space, message: str) -> None:
    payload = parse(
        AttackSpec, _attack({"kind": "value", "indices": [0], "values": [0.0]}, target_action=target), "t"
    ).payload
    with pytest.raises(SpecError, match=message):
        build_payload(payload, space)


@pytest.mark.parametrize(
    ("sequence", "space", "message"),
    [
        ([0, 2, 1], spaces.Discrete(2), r"trigger\.sequence: actions \[2\] are outside .*use actions in \[0, 1\]"),
        ([-1, 0], spaces.Discrete(2), r"trigger\.sequence: actions \[-1\] are outside .*use actions in \[0, 1\]"),
        ([0, 1], spaces.Discrete(3, start=1), r"actions \[0\] are outside .*use actions in \[1, 3\]"),
        (
            [0],
            spaces.Box(-1.0, 1.0, (1,)),
            r"action_sequence needs a Discrete action space, got Box; use an observation",
        ),
    ],
)
def test_action_sequence_outside_the_action_space(sequence: list[int], space: spaces.Space, message: str) -> None:
    spec = parse(AttackSpec, _attack({"kind": "action_sequence", "sequence": sequence}), "t").trigger
    with pytest.raises(SpecError, match=message):
        ActionSequence(spec, space)


def test_action_sequence_and_target_take_actions_of_a_discrete_space_starting_below_zero() -> None:
    space = spaces.Discrete(3, start=-1)
    spec = parse(AttackSpec, _attack({"kind": "action_sequence", "sequence": [-1, 1]}, target_action=-1), "t")
    seq = ActionSequence(spec.trigger, space)
    seq.reset(1)
    assert not seq.observe(np.array([-1]))[0] and seq.observe(np.array([1]))[0]
    assert build_payload(spec.payload, space).hits(np.array([-1, 0])).tolist() == [True, False]


def test_a_whole_float_target_action_fits_a_discrete_space() -> None:
    spec = parse(AttackSpec, _attack({"kind": "value", "indices": [0], "values": [0.0]}, target_action=1.0), "t")
    assert build_payload(spec.payload, spaces.Discrete(2)).hits(np.array([0, 1])).tolist() == [False, True]


def test_a_scalar_target_action_fits_a_box_of_one_entry() -> None:
    spec = parse(AttackSpec, _attack({"kind": "value", "indices": [0], "values": [0.0]}, target_action=0.5), "t")
    payload = build_payload(spec.payload, spaces.Box(-2.0, 2.0, (1,)))
    assert payload.hits(np.array([[0.6], [1.0]])).tolist() == [True, False]


def test_action_sequence_reports_complete_matches_per_env() -> None:
    spec = parse(AttackSpec, _attack({"kind": "action_sequence", "sequence": [0, 0, 1]}), "t").trigger
    seq = ActionSequence(spec, spaces.Discrete(2))
    seq.reset(3)
    played = np.array([[0, 1, 1], [0, 0, 1], [1, 0, 0], [1, 1, 0], [1, 0, 1]])  # rows: steps, columns: envs
    matches = np.array([seq.observe(a) for a in played])
    np.testing.assert_array_equal(matches, np.eye(5, 3, k=-2, dtype=bool))
    seq.observe(np.zeros(3, dtype=int))
    seq.observe(np.zeros(3, dtype=int))
    seq.clear(np.array([False, False, True]))  # a new episode in env 2 forgets its two zeros
    np.testing.assert_array_equal(seq.observe(np.ones(3, dtype=int)), [True, True, False])


@pytest.mark.parametrize(
    ("shape", "n_envs"), [((4,), None), ((4,), 1), ((4,), 8), ((2, 3), None), ((7, 7, 3), None), ((100,), None)]
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_finite_check_finds_every_nan_and_inf_and_passes_huge_finite_values(
    shape: tuple[int, ...], n_envs: int | None, dtype: type
) -> None:
    check = finite_check(spaces.Box(-np.inf, np.inf, shape, dtype), n_envs)
    batch = () if n_envs is None else (n_envs,)
    obs = np.full(batch + shape, np.finfo(dtype).max / 2, dtype)  # finite; their sum overflows
    check(obs)
    check(obs.tolist())  # not an array: still checked
    for bad in (np.nan, np.inf, -np.inf):
        broken = obs.copy()
        broken.reshape(-1)[-1] = bad
        with pytest.raises(ObservationError, match="NaN or inf"):
            check(broken)
        with pytest.raises(ObservationError, match="NaN or inf"):
            check(broken[None])  # a misshapen observation: still checked


def test_finite_check_skips_spaces_without_floats() -> None:
    assert finite_check(spaces.Box(0, 255, (7, 7, 3), np.uint8)) is None
    assert finite_check(spaces.Discrete(3)) is None
    check = finite_check(spaces.Space(None, np.float64))  # no shape: the entry-by-entry check
    with pytest.raises(ObservationError, match="NaN or inf"):
        check(np.array([1.0, np.nan]))
