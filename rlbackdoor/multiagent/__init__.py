"""Multi-agent backdoors: PettingZoo parallel envs under attack, their Gymnasium single-agent views, fixed policies.

PettingZoo and the env packages (mpe2, SuperSuit) load on first use, not on import.
"""

from rlbackdoor.multiagent.registry import (
    get_parallel_spec,
    list_parallel_envs,
    make_base_parallel,
    make_parallel,
    parallel_env_specs,
)

__all__ = ["get_parallel_spec", "list_parallel_envs", "make_base_parallel", "make_parallel", "parallel_env_specs"]
