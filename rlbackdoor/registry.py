"""Registers every ``envs/*.yaml`` as a Gymnasium id under the ``rlbd/`` namespace, plus ``rlbd/Backdoor-v0``."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import gymnasium as gym

from rlbackdoor.attack import make_base_env
from rlbackdoor.errors import SpecError
from rlbackdoor.specs import AttackSpec, EnvSpec, load, parse
from rlbackdoor.wrappers.gym import BackdoorWrapper

FACTORY_ID = "rlbd/Backdoor-v0"


def data_dir(name: str) -> Path:
    """A data folder the package ships (``envs``, ``agents``): inside an installed wheel, else the checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / name, here.parent / name):
        if candidate.is_dir():
            return candidate
    raise SpecError(f"cannot find the '{name}' data folder next to {here}; reinstall rlbackdoor")


@cache
def env_specs() -> dict[str, EnvSpec]:
    """Every registered backdoor env spec, by id."""
    specs: dict[str, EnvSpec] = {}
    for path in sorted(data_dir("envs").glob("*.yaml")):
        spec = load(EnvSpec, path)
        if spec.id in specs:
            raise SpecError(f"{path}: id '{spec.id}' is already used by another file in envs/; rename one")
        specs[spec.id] = spec
    return specs


def get_env_spec(env_id: str) -> EnvSpec:
    """The spec of a registered id (with or without the ``rlbackdoor:`` module prefix)."""
    env_id = env_id.removeprefix("rlbackdoor:")
    specs = env_specs()
    if env_id not in specs:
        from rlbackdoor.multiagent.registry import parallel_env_specs

        known = ", ".join([*specs, *parallel_env_specs()])
        raise SpecError(f"unknown backdoor env id '{env_id}'; registered ids: {known}")
    return specs[env_id]


def registered_attack(env_id: str) -> AttackSpec:
    """The attack of a registered id, as a plain :class:`AttackSpec` (without ``id`` and ``description``)."""
    return AttackSpec.model_validate(get_env_spec(env_id).model_dump(include=set(AttackSpec.model_fields)))


def make_env(spec: dict[str, Any] | AttackSpec, render_mode: str | None = None, **unknown: Any) -> BackdoorWrapper:
    """Entry point of the registered ids: the base env under the spec's attack."""
    if unknown:
        raise SpecError(
            f"unknown keyword arguments {sorted(unknown)}; registered ids take render_mode only "
            f"(change the attack with {FACTORY_ID}, env_id= and the attack fields)"
        )
    if not isinstance(spec, (AttackSpec, dict)):
        raise SpecError(f"spec: expected an attack spec mapping, got {type(spec).__name__}; pass a dict of its fields")
    spec = spec if isinstance(spec, AttackSpec) else parse(AttackSpec, _attack_fields(spec), "spec")
    base = make_base_env(spec, **({"render_mode": render_mode} if render_mode else {}))
    return BackdoorWrapper(base, spec)


def make_factory_env(env_id: str | None = None, render_mode: str | None = None, **attack: Any) -> BackdoorWrapper:
    """Entry point of ``rlbd/Backdoor-v0``: ``env_id`` and the attack fields (trigger, schedule, payload, ...)."""
    if env_id is None:
        raise SpecError(f"{FACTORY_ID} needs env_id=<a Gymnasium id>; pass it to gymnasium.make")
    if "base" in attack:
        raise SpecError(f"{FACTORY_ID}: env_id names the base env; drop base= (base_kwargs and base_wrappers stay)")
    spec = parse(AttackSpec, {"base": env_id, **attack}, FACTORY_ID)
    return make_env(spec, render_mode)


def _attack_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The attack of a spec mapping: without a registered spec's own ``id`` and ``description`` (anything else
    that is no attack field, a misspelt one, is left for :func:`parse` to refuse)."""
    return {k: v for k, v in data.items() if k in AttackSpec.model_fields or k not in EnvSpec.model_fields}


# the base env inside is made by gymnasium.make, with its own order enforcing and env checker
_BASE_CHECKED: dict[str, Any] = {"order_enforce": False, "disable_env_checker": True}


def register_all() -> None:
    """Register the factory id and every spec in ``envs/`` (idempotent)."""
    if FACTORY_ID not in gym.registry:
        gym.register(FACTORY_ID, entry_point="rlbackdoor.registry:make_factory_env", **_BASE_CHECKED)
    for env_id, spec in env_specs().items():
        if env_id not in gym.registry:
            gym.register(
                env_id,
                entry_point="rlbackdoor.registry:make_env",
                kwargs={"spec": spec.model_dump(mode="json")},
                **_BASE_CHECKED,
            )
    from rlbackdoor.multiagent.registry import register_adapters

    register_adapters()
