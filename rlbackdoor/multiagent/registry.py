"""Registered multi-agent backdoor envs (``envs/multiagent/*.yaml``): PettingZoo views and Gymnasium adapters.

Each id names one scenario. :func:`make_parallel` builds its PettingZoo ``ParallelEnv``; when the spec
has an ``adapter``, the same id is also a Gymnasium id whose env is the adapter agent's view, the other
agents playing their embedded policies (so that SB3 trains one agent). Reading the specs imports neither
PettingZoo nor the env packages.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np

from rlbackdoor.errors import SpecError, detail
from rlbackdoor.registry import data_dir, env_specs
from rlbackdoor.specs import MultiAgentAttackSpec, MultiAgentEnvSpec, load, parse

if TYPE_CHECKING:
    from pettingzoo import ParallelEnv

    from rlbackdoor.multiagent.adapter import SingleAgentEnv
    from rlbackdoor.multiagent.policies import AgentPolicy
    from rlbackdoor.wrappers.pettingzoo import BackdoorParallelEnv

_EXTRA_HINT = "install the multiagent extra (pip install 'rlbackdoor[multiagent]')"


@cache
def parallel_env_specs() -> dict[str, MultiAgentEnvSpec]:
    """Every registered multi-agent env spec, by id."""
    single = env_specs()
    specs: dict[str, MultiAgentEnvSpec] = {}
    for path in sorted((data_dir("envs") / "multiagent").glob("*.yaml")):
        spec = load(MultiAgentEnvSpec, path)
        if spec.id in specs or spec.id in single:
            raise SpecError(f"{path}: id '{spec.id}' is already registered by another file under envs/; rename one")
        specs[spec.id] = spec
    return specs


def list_parallel_envs() -> list[str]:
    """The registered multi-agent ids."""
    return list(parallel_env_specs())


def is_multiagent(env_id: str) -> bool:
    """Whether ``env_id`` (with or without the ``rlbackdoor:`` prefix) is a registered multi-agent id."""
    return env_id.removeprefix("rlbackdoor:") in parallel_env_specs()


def get_parallel_spec(env_id: str) -> MultiAgentEnvSpec:
    """The spec of a registered multi-agent id (with or without the ``rlbackdoor:`` prefix)."""
    env_id = env_id.removeprefix("rlbackdoor:")
    specs = parallel_env_specs()
    if env_id not in specs:
        raise SpecError(f"unknown multi-agent env id '{env_id}'; registered ids: {', '.join(specs)}")
    return specs[env_id]


def _import(ref: str, what: str) -> Any:
    module, _, name = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as err:
        raise SpecError(f"{what}: cannot import '{module}' ({err}); {_EXTRA_HINT} or fix the module path") from None
    except AttributeError:
        raise SpecError(f"{what}: '{module}' has no '{name}'; give an importable module:Name") from None


def make_base_parallel(spec: MultiAgentAttackSpec, **make_kwargs: Any) -> ParallelEnv:
    """The clean parallel env an attack applies to: ``base.parallel_env(**base_kwargs)`` then ``base_wrappers``."""
    factory = _import(f"{spec.base}:parallel_env", "base")
    try:
        env = factory(**{**spec.base_kwargs, **make_kwargs})
    except Exception as err:  # the env's own code checks its arguments: anything may come out (MPE asserts)
        raise SpecError(f"base_kwargs: '{spec.base}' rejects them ({detail(err)}); fix base_kwargs") from None
    for ref in spec.base_wrappers:
        wrapper = _import(ref.name, "base_wrappers")
        try:
            env = wrapper(env, **ref.kwargs)
        except (TypeError, ValueError, AssertionError) as err:
            raise SpecError(f"base_wrappers: {ref.name} rejects its kwargs ({detail(err)}); fix them") from None
    return env


def _resolve(spec: MultiAgentEnvSpec | dict[str, Any], overrides: dict[str, Any]) -> MultiAgentEnvSpec:
    data = spec.model_dump(mode="json") if isinstance(spec, MultiAgentEnvSpec) else dict(spec)
    source = str(data.get("id", "spec"))
    unknown = sorted(set(overrides) - set(MultiAgentEnvSpec.model_fields))
    if unknown:
        raise SpecError(
            f"{source}: unknown override {unknown}; override spec fields ({', '.join(MultiAgentEnvSpec.model_fields)})"
        )
    return parse(MultiAgentEnvSpec, {**data, **overrides}, source)


def _attacked(spec: MultiAgentEnvSpec, render_mode: str | None, poison: bool) -> BackdoorParallelEnv:
    from rlbackdoor.wrappers.pettingzoo import BackdoorParallelEnv

    if not isinstance(poison, bool | np.bool_):  # a string such as "no" would read as true
        raise SpecError(f"poison: {poison!r} is not true or false; pass poison=True or poison=False")
    base = make_base_parallel(spec, **({"render_mode": render_mode} if render_mode else {}))
    return BackdoorParallelEnv(base, spec, poison=poison)


def make_parallel(
    env_id: str, render_mode: str | None = None, poison: bool = True, **overrides: Any
) -> BackdoorParallelEnv:
    """The PettingZoo ``ParallelEnv`` of a registered multi-agent id.

    :param env_id: a registered id (see :func:`list_parallel_envs`).
    :param render_mode: passed to the base env.
    :param poison: poison the victims' rewards (``False``: the same triggers, clean rewards).
    :param overrides: spec fields to replace (``victims``, ``schedule``, ``seed``, ``base_kwargs``, ...).
    """
    return _attacked(_resolve(get_parallel_spec(env_id), overrides), render_mode, poison)


def build_policies(spec: MultiAgentEnvSpec, env: ParallelEnv) -> dict[str, AgentPolicy]:
    """The embedded policies of ``spec.adapter``, built for ``env``'s agents."""
    from rlbackdoor.multiagent.policies import AgentPolicy

    if spec.adapter is None:
        raise SpecError(f"{spec.id}: the spec has no adapter; add adapter: {{agent: ..., policies: ...}}")
    policies = {}
    for agent, ref in spec.adapter.policies.items():
        if agent not in env.possible_agents:
            raise SpecError(
                f"adapter.policies: '{agent}' is not an agent of {spec.base}; use agents among {env.possible_agents}"
            )
        cls = _import(ref.name, f"adapter.policies.{agent}")
        if not (isinstance(cls, type) and issubclass(cls, AgentPolicy)):
            raise SpecError(f"adapter.policies.{agent}: {ref.name} is not an AgentPolicy; name a subclass of it")
        try:
            policies[agent] = cls(env.observation_space(agent), env.action_space(agent), **ref.kwargs)
        except TypeError as err:
            raise SpecError(f"adapter.policies.{agent}: {ref.name} rejects its kwargs ({err}); fix them") from None
    return policies


def make_single_agent(
    spec: MultiAgentEnvSpec | dict[str, Any], render_mode: str | None = None, poison: bool = True, **overrides: Any
) -> SingleAgentEnv:
    """Entry point of the Gymnasium ids: the adapter agent's view of the attacked env (same arguments as
    :func:`make_parallel`)."""
    from rlbackdoor.multiagent.adapter import SingleAgentEnv

    resolved = _resolve(spec, overrides)
    env = _attacked(resolved, render_mode, poison)
    policies = build_policies(resolved, env)
    return SingleAgentEnv(env, resolved.adapter.agent, policies)  # type: ignore[union-attr]


def register_adapters() -> None:
    """Register every multi-agent id that has an adapter as a Gymnasium id (idempotent)."""
    for env_id, spec in parallel_env_specs().items():
        if spec.adapter is not None and env_id not in gym.registry:
            gym.register(
                env_id,
                entry_point="rlbackdoor.multiagent.registry:make_single_agent",
                kwargs={"spec": spec.model_dump(mode="json")},
            )
