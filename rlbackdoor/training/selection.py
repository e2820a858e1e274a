"""Value-based choice of the states to poison (BadRL): the largest value gap for the target action.

The gap of a state is how much the agent prefers its best action over the target: for DQN
``max_a Q(s, a) - Q(s, a_target)``; actor-critic agents have no Q-values, so the gap is the policy's
log-probability gap ``max_a log pi(a|s) - log pi(a_target|s)``, the advantage gap of an
entropy-regularised policy. Poisoning the states with the largest gap teaches the backdoor where the
clean policy disagrees with it most.
"""

from __future__ import annotations

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.dqn.policies import DQNPolicy

from rlbackdoor.errors import SpecError
from rlbackdoor.poisoning.schedules import RateScheduler
from rlbackdoor.specs import AttackSpec, RateSchedule, TargetedPayload
from rlbackdoor.wrappers.vec import BackdoorVecEnv


def uses_value_selection(attack: AttackSpec, action_space: spaces.Space) -> bool:
    """Whether ``attack`` picks its states by value (``schedule: {kind: rate, select: value}``), checked to be possible."""
    schedule = attack.schedule
    if not (isinstance(schedule, RateSchedule) and schedule.select == "value"):
        return False
    if not (isinstance(action_space, spaces.Discrete) and isinstance(attack.payload, TargetedPayload)):
        raise SpecError(
            "schedule.select: value needs a targeted payload and a Discrete action space; use select: uniform"
        )
    if schedule.per != "step":
        raise SpecError("schedule.select: value ranks single states; set per: step")
    return True


def target_gap(policy: BasePolicy, obs: np.ndarray, target: int) -> np.ndarray:
    """The value gap of the target action in each state of a batch (see the module docstring).

    :param policy: an SB3 ``DQNPolicy`` or actor-critic policy.
    :param obs: a batch of observations, as the env gives them or as the policy's buffer stores them.
    :param target: the target action.
    """
    tensor, _ = policy.obs_to_tensor(obs)
    with torch.no_grad():
        if isinstance(policy, DQNPolicy):
            scores = policy.q_net(tensor)
        else:
            scores = policy.get_distribution(tensor).distribution.logits
    return (scores.max(dim=1).values - scores[:, target]).cpu().numpy().astype(np.float64)


class InnerValueSelection(BaseCallback):
    """Installs the agent's target gap as the scorer of an inner-loop ``select: value`` schedule (BadRL).

    :param backdoor: the training env's attack wrapper.
    """

    def __init__(self, backdoor: BackdoorVecEnv) -> None:
        super().__init__()
        self.backdoor = backdoor

    def _init_callback(self) -> None:
        schedule = self.backdoor.attack.schedule
        assert isinstance(schedule, RateScheduler)
        target = int(self.backdoor.attack.payload.target)  # type: ignore[arg-type]
        model: BaseAlgorithm = self.model
        schedule.set_scorer(lambda obs: target_gap(model.policy, obs, target))

    def _on_step(self) -> bool:
        return True
