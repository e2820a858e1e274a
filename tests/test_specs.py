"""Spec validation: valid specs round-trip, each invalid one is a one-line SpecError naming file and field."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from rlbackdoor.errors import SpecError
from rlbackdoor.specs import AttackSpec, EnvSpec, apply_overrides, load, load_experiment, parse, read_yaml

finite = st.floats(-10.0, 10.0, allow_nan=False, width=32)
small = st.integers(0, 20)

triggers = st.one_of(
    st.integers(1, 4).flatmap(
        lambda n: st.fixed_dictionaries(
            {
                "kind": st.sampled_from(["value", "additive"]),
                "indices": st.lists(small, min_size=n, max_size=n, unique=True),
                "values": st.lists(finite, min_size=n, max_size=n),
            }
        )
    ),
    st.fixed_dictionaries(
        {
            "kind": st.sampled_from(["patch", "blend"]),
            "size": st.tuples(st.integers(1, 4), st.integers(1, 4)).map(list),
            "position": st.tuples(small, small).map(list),
            "value": st.one_of(finite, st.lists(finite, min_size=1, max_size=3)),
            "layout": st.sampled_from(["auto", "hwc", "chw"]),
        }
    ),
    st.integers(1, 3).flatmap(
        lambda n: st.fixed_dictionaries(
            {
                "kind": st.just("in_distribution"),
                "indices": st.lists(small, min_size=n, max_size=n, unique=True),
                "quantiles": st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n),
            }
        )
    ),
    st.fixed_dictionaries({"kind": st.just("action_sequence"), "sequence": st.lists(st.integers(0, 5), min_size=1)}),
)
schedules = st.one_of(
    st.fixed_dictionaries(
        {
            "kind": st.just("rate"),
            "rate": st.floats(0.0, 1.0),
            "per": st.sampled_from(["step", "episode"]),
            "duration": st.integers(1, 50),
        }
    ),
    st.integers(1, 1000).flatmap(
        lambda h: st.fixed_dictionaries(
            {
                "kind": st.just("budget"),
                "horizon": st.just(h),
                "budget": st.integers(0, h),
                "duration": small.map(lambda d: d + 1),
            }
        )
    ),
    st.integers(0, 50).flatmap(
        lambda s: st.fixed_dictionaries(
            {
                "kind": st.just("window"),
                "start": st.just(s),
                "stop": st.integers(s + 1, s + 50),
                "rate": st.floats(0, 1),
            }
        )
    ),
)
payloads = st.one_of(
    st.fixed_dictionaries(
        {
            "kind": st.just("targeted"),
            "target_action": st.one_of(st.integers(0, 5), st.lists(finite, min_size=1, max_size=3)),
            "reward": st.fixed_dictionaries({"hit": finite, "miss": finite}),
            "force_action_prob": st.floats(0.0, 1.0),
        }
    ),
    st.fixed_dictionaries(
        {"kind": st.just("untargeted"), "mode": st.sampled_from(["negate", "fail_fast"]), "scale": st.floats(0.01, 10)}
    ),
)
attacks = st.fixed_dictionaries(
    {
        "base": st.sampled_from(["CartPole-v1", "Pendulum-v1"]),
        "trigger": triggers,
        "schedule": schedules,
        "payload": payloads,
        "seed": st.integers(0, 2**31),
    }
)


@settings(max_examples=60, deadline=None)
@given(attacks)
def test_valid_specs_round_trip(data: dict[str, Any]) -> None:
    spec = parse(AttackSpec, data, "spec.yaml")
    dumped = spec.model_dump(mode="json")
    assert parse(AttackSpec, dumped, "spec.yaml") == spec
    assert parse(AttackSpec, yaml.safe_load(yaml.safe_dump(dumped)), "spec.yaml") == spec


def _set(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``data`` with the dotted ``path`` set to ``value``."""
    out = {**data}
    head, _, rest = path.partition(".")
    out[head] = _set(data[head], rest, value) if rest else value
    return out


NAN = float("nan")

# (section, a valid section, the invalid change as (dotted path, value), the field path the message must name)
INVALID = [
    ("schedule", {"kind": "rate", "rate": 0.1}, ("rate", -0.01), "schedule.rate"),
    ("schedule", {"kind": "rate", "rate": 0.1}, ("rate", 1.01), "schedule.rate"),
    ("schedule", {"kind": "rate", "rate": 0.1}, ("rate", NAN), "schedule.rate"),
    ("schedule", {"kind": "rate", "rate": 0.1}, ("duration", 0), "schedule.duration"),
    ("schedule", {"kind": "rate", "rate": 0.1}, ("per", "week"), "schedule.per"),
    ("schedule", {"kind": "budget", "budget": 5, "horizon": 10}, ("budget", 11), "schedule.horizon"),
    ("schedule", {"kind": "window", "start": 3, "stop": 5}, ("stop", 3), "schedule.stop"),
    ("schedule", {"kind": "window", "start": 3, "stop": 5}, ("stop", 1), "schedule.stop"),
    ("schedule", {"kind": "rate", "rate": 0.1}, ("kind", "sometimes"), "schedule"),
    ("schedule", {"kind": "rate", "rate": 0.1}, ("ratee", 0.1), "schedule.ratee"),
    ("trigger", {"kind": "value", "indices": [1], "values": [1.0]}, ("values", [NAN]), "trigger.values.0"),
    ("trigger", {"kind": "value", "indices": [1], "values": [1.0]}, ("values", [math.inf]), "trigger.values.0"),
    ("trigger", {"kind": "value", "indices": [1], "values": [1.0]}, ("values", [1.0, 2.0]), "trigger.values"),
    ("trigger", {"kind": "additive", "indices": [1], "values": [1.0]}, ("indices", []), "trigger.indices"),
    ("trigger", {"kind": "patch", "value": 1.0}, ("pattern", [[1.0, NAN]]), "trigger.pattern"),
    ("trigger", {"kind": "patch", "value": 1.0}, ("value", NAN), "trigger.value"),
    ("trigger", {"kind": "patch", "value": 1.0}, ("size", [0, 2]), "trigger.size"),
    ("trigger", {"kind": "patch", "value": 1.0}, ("position", [-1, 0]), "trigger.position"),
    ("trigger", {"kind": "blend", "value": 1.0}, ("alpha", 0.0), "trigger.alpha"),
    (
        "trigger",
        {"kind": "in_distribution", "indices": [0], "quantiles": [0.5]},
        ("quantiles", [0.5, 0.1]),
        "trigger.quantiles",
    ),
    (
        "trigger",
        {"kind": "in_distribution", "indices": [0], "quantiles": [0.5]},
        ("quantiles", [1.5]),
        "trigger.quantiles",
    ),
    ("trigger", {"kind": "action_sequence", "sequence": [0, 1]}, ("sequence", []), "trigger.sequence"),
    ("trigger", {"kind": "value", "indices": [1], "values": [1.0]}, ("kind", "sparkle"), "trigger"),
    ("trigger", {"kind": "value", "indices": [1], "values": [1.0]}, ("colour", "red"), "trigger.colour"),
    ("payload", {"kind": "targeted", "target_action": 0}, ("force_action_prob", 1.5), "payload.force_action_prob"),
    ("payload", {"kind": "targeted", "target_action": 0}, ("target_action", [0.0, NAN]), "payload.target_action.1"),
    ("payload", {"kind": "targeted", "target_action": 0}, ("reward", {"hit": NAN}), "payload.reward.hit"),
    (
        "payload",
        {"kind": "targeted", "target_action": 0},
        ("reward", {"hit": 1.0, "bonus": 2.0}),
        "payload.reward.bonus",
    ),
    ("payload", {"kind": "untargeted"}, ("mode", "sabotage"), "payload.mode"),
    ("payload", {"kind": "untargeted"}, ("scale", 0.0), "payload.scale"),
    ("trigger", {"kind": "patch", "pattern": [[1.0]]}, ("pattern", [[None, 1.0], [1.0, 1.0]]), "trigger.pattern"),
    ("trigger", {"kind": "value", "indices": [1, 2], "values": [1.0, 2.0]}, ("indices", [3, 3]), "trigger.indices"),
    ("trigger", {"kind": "patch", "pattern": [[1.0]]}, ("pattern", [[{"a": 1}, 1.0]]), "trigger.pattern"),
    ("trigger", {"kind": "patch", "pattern": [[1.0]]}, ("pattern", [[1.0, 2.0], [3.0]]), "trigger.pattern"),
    ("trigger", {"kind": "blend", "value": 1.0}, ("alpha", NAN), "trigger.alpha"),
    ("schedule", {"kind": "rate", "rate": 0.1}, ("duration", "many"), "schedule.duration"),
    ("schedule", {"kind": "rate", "rate": 0.1}, ("duration", 10**20), "schedule.duration"),
    ("schedule", {"kind": "budget", "budget": 10, "horizon": 100}, ("horizon", 10**20), "schedule.horizon"),
    ("schedule", {"kind": "window", "start": 1, "stop": 5}, ("stop", 10**20), "schedule.stop"),
    (
        "trigger",
        {"kind": "in_distribution", "indices": [0], "quantiles": [0.5]},
        ("fit_steps", 10**12),
        "trigger.fit_steps",
    ),
    ("trigger", {"kind": "value", "indices": [1], "values": [1.0]}, ("values", ["abc"]), "trigger.values.0"),
]


@pytest.mark.parametrize(("section", "valid", "change", "where"), INVALID, ids=[f"{c[0]}-{c[3]}" for c in INVALID])
@settings(max_examples=5, deadline=None)
@given(data=attacks)
def test_invalid_specs_name_file_and_field(
    data: dict[str, Any], section: str, valid: dict[str, Any], change: tuple[str, Any], where: str
) -> None:
    good = {**data, section: valid}
    parse(AttackSpec, good, "envs/my_attack.yaml")
    with pytest.raises(SpecError) as err:
        parse(AttackSpec, _set(good, f"{section}.{change[0]}", change[1]), "envs/my_attack.yaml")
    message = str(err.value)
    assert "\n" not in message
    assert f"envs/my_attack.yaml: {where}: " in message
    assert "(fix: " in message or "; " in message  # every message names a fix


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (("surprise", 1), "surprise"),
        (("seed", "zero"), "seed"),
        (("seed", True), "seed"),
        (("seed", -1), "seed"),
        (("base_wrappers", ["not a ref"]), "base_wrappers.0.name"),
    ],
)
def test_invalid_top_level_fields(change: tuple[str, Any], where: str) -> None:
    data = {
        "base": "CartPole-v1",
        "trigger": {"kind": "value", "indices": [0], "values": [0.0]},
        "schedule": {"kind": "rate", "rate": 0.1},
        "payload": {"kind": "untargeted"},
    }
    with pytest.raises(SpecError, match=rf"^spec\.yaml: {where}:"):
        parse(AttackSpec, {**data, change[0]: change[1]}, "spec.yaml")


def test_missing_fields_listed_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "partial.yaml"
    path.write_text("id: rlbd/Partial-v0\nbase: CartPole-v1\n")
    with pytest.raises(SpecError) as err:
        load(EnvSpec, path)
    message = str(err.value)
    assert "\n" not in message
    for field in ("trigger", "schedule", "payload"):
        assert f"{path}: {field}: Field required (fix: add this field)" in message


def test_env_spec_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(
        "id: rlbd/Ok-v0\nbase: CartPole-v1\ntrigger: {kind: value, indices: [3], values: [2.5]}\n"
        "schedule: {kind: budget, budget: 3, horizon: 30}\npayload: {kind: targeted, target_action: 0}\n"
    )
    spec = load(EnvSpec, path)
    assert spec.schedule.budget == 3
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    assert load(EnvSpec, path) == spec


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"id: [unclosed\nbase: x\n", "invalid YAML at line 2"),
        (b"- just\n- a list\n", "expected a YAML mapping"),
        (b"\xff\xfe\x00\x01 binary", "is not UTF-8 text"),
        (None, "cannot read the file"),
    ],
    ids=["syntax", "not-a-mapping", "binary", "missing"],
)
def test_unreadable_yaml_names_the_file(tmp_path: Path, content: bytes | None, problem: str) -> None:
    path = tmp_path / "broken.yaml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SpecError) as err:
        load(EnvSpec, path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert problem in message


def test_a_directory_is_not_a_spec(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read the file"):
        load(EnvSpec, tmp_path)


def test_yaml_whose_aliases_contain_themselves_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text("name: x\nenv: CartPole-v1\nhyperparams: &h {a: *h}\n")
    with pytest.raises(SpecError, match="a YAML alias refers to a node that contains it; expand the alias"):
        read_yaml(path)
    shared = "a: &a [1, 2]\nb: &b [*a, *a, *a]\nc: [*b, *b, *b]\n"  # shared, not recursive: fine
    (tmp_path / "shared.yaml").write_text(shared)
    assert read_yaml(tmp_path / "shared.yaml")["c"][2][1] == [1, 2]


def test_yaml_nested_too_deep_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("name: x\nattack: " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(SpecError, match="YAML nested too deep to read; flatten it"):
        read_yaml(path)


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ("name: x\nenv: CartPole-v1\nname: y\n", 3, "name"),
        ("name: x\nhyperparams:\n  learning_rate: 0.1\n  gamma: 0.9\n  learning_rate: 0.2\n", 5, "learning_rate"),
        ("trigger: {kind: value, indices: [3], kind: patch}\n", 1, "kind"),
    ],
)
def test_duplicate_yaml_keys_are_one_line_naming_file_and_key(tmp_path: Path, text: str, line: int, key: str) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as err:
        read_yaml(path)
    assert str(err.value) == f"{path}: line {line}: key '{key}' appears twice in one mapping; keep one"
    with pytest.raises(SpecError) as err:
        apply_overrides({}, ["hyperparams={a: 1, a: 2}"])
    assert str(err.value) == "override 'hyperparams={a: 1, a: 2}': key 'a' appears twice in one mapping; keep one"


def test_merge_keys_may_be_overridden_by_the_mappings_own_keys(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {gamma: 0.9, lr: 0.1}\nrun: {<<: *b, lr: 0.2}\n")
    assert read_yaml(path)["run"] == {"gamma": 0.9, "lr": 0.2}


def test_exponents_without_a_dot_are_floats_in_files_as_in_overrides(tmp_path: Path) -> None:
    path = tmp_path / "floats.yaml"
    path.write_text(
        "name: x\nenv: CartPole-v1\nalgo: ppo\ntimesteps: 1e3\n"
        "hyperparams: {learning_rate: 3e-4, ent_coef: 1.0e-2, vf_coef: 5E+1, n_steps: 64, note: 1e}\n"
    )
    data = read_yaml(path)
    assert data["hyperparams"] == {
        "learning_rate": 3e-4,
        "ent_coef": 0.01,
        "vf_coef": 50.0,
        "n_steps": 64,
        "note": "1e",
    }
    assert apply_overrides({}, ["hyperparams.learning_rate=3e-4"])["hyperparams"]["learning_rate"] == 3e-4
    spec = load_experiment(path)  # YAML 1.1 read 1e3 and 3e-4 as strings: timesteps failed, SB3 got "3e-4"
    assert spec.timesteps == 1000 and spec.hyperparams["learning_rate"] == 3e-4


def test_integers_too_long_to_convert_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "long.yaml"
    path.write_text("name: x\nseed: " + "9" * 5000 + "\n")
    with pytest.raises(SpecError, match=r"long\.yaml: line 2: an integer of 5000 digits is too large; give a smaller"):
        read_yaml(path)
