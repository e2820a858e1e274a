"""Fixed policies embedded for the other agents of a multi-agent env (opponents, teammates, trigger agents)."""

from __future__ import annotations

import textwrap
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
from gymnasium import spaces

from rlbackdoor.errors import ArtifactError, SpecError


class AgentPolicy(ABC):
    """A fixed policy for one agent: reset at each episode, then one action per observation.

    :param observation_space: the agent's observation space.
    :param action_space: the agent's action space.
    """

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space) -> None:
        self.observation_space = observation_space
        self.action_space = action_space
        self.rng = np.random.default_rng()

    def reset(self, seed: int | None = None) -> None:
        """Start an episode; reseed the policy's draws when ``seed`` is given."""
        if seed is not None:
            self.rng = np.random.default_rng(seed)

    @abstractmethod
    def act(self, obs: Any) -> Any:
        """The action for ``obs``."""


def _discrete(action_space: spaces.Space, policy: str) -> spaces.Discrete:
    if not isinstance(action_space, spaces.Discrete):
        raise SpecError(
            f"adapter.policies: {policy} needs a Discrete action space, got {action_space}; pick another policy"
        )
    return action_space


class RandomPolicy(AgentPolicy):
    """Uniformly random actions (Discrete or Box)."""

    def act(self, obs: Any) -> Any:
        space = self.action_space
        if isinstance(space, spaces.Discrete):
            return np.int64(space.start + self.rng.integers(space.n))
        if isinstance(space, spaces.Box):
            return self.rng.uniform(space.low, space.high).astype(space.dtype)
        raise SpecError(f"adapter.policies: RandomPolicy cannot sample {space}; use a Discrete or Box action space")


class ResponsePolicy(AgentPolicy):
    """Answer the other player's last move: ``responses[move]``; a random move in the first round, or with
    probability ``noise``. It reads a :class:`~rlbackdoor.multiagent.wrappers.JointActions` observation of a
    two-player game, whose last entries are the other player's last move, one-hot.

    :param responses: the move to play after each move of the other player.
    :param noise: probability of a uniformly random move.
    """

    def __init__(
        self, observation_space: spaces.Space, action_space: spaces.Space, responses: list[int], noise: float = 0.0
    ) -> None:
        super().__init__(observation_space, action_space)
        space = _discrete(action_space, "ResponsePolicy")
        if len(responses) != int(space.n) or any(not space.contains(np.int64(a)) for a in responses):
            raise SpecError(
                f"adapter.policies: responses {responses} must give one action of {space} per action; fix responses"
            )
        if not 0.0 <= noise <= 1.0:
            raise SpecError(f"adapter.policies: noise {noise} must lie in [0, 1]")
        self.responses = np.asarray(responses, dtype=np.int64)
        self.noise = noise

    def act(self, obs: Any) -> Any:
        last = np.asarray(obs).reshape(-1)[-len(self.responses) :]
        if not last.any() or (self.noise > 0 and self.rng.random() < self.noise):
            return np.int64(self.action_space.start + self.rng.integers(self.action_space.n))
        return self.responses[int(np.argmax(last))]


class SeekLandmark(AgentPolicy):
    """MPE ``simple_spread`` with discrete actions: move toward landmark ``landmark`` (a greedy teammate).

    The observation holds the agent's velocity and position, then each landmark's position relative to the
    agent; the actions are no-op, left, right, down, up. The policy steers along the axis with the larger
    remaining distance from where its current velocity carries it (``LEAD`` times the velocity ahead), and
    idles within ``tolerance``.

    :param landmark: index of the landmark to cover.
    :param tolerance: distance at which the agent idles.
    """

    LEAD = 0.25

    def __init__(
        self, observation_space: spaces.Space, action_space: spaces.Space, landmark: int, tolerance: float = 0.05
    ) -> None:
        super().__init__(observation_space, action_space)
        space = _discrete(action_space, "SeekLandmark")
        size = int(np.prod(observation_space.shape or (0,)))
        if int(space.n) != 5 or not 0 <= 4 + 2 * landmark + 1 < size:
            raise SpecError(
                f"adapter.policies: SeekLandmark(landmark={landmark}) needs simple_spread's 5 discrete actions and a "
                f"landmark inside the {size}-entry observation; check landmark and continuous_actions=False"
            )
        self.index = 4 + 2 * landmark
        self.tolerance = tolerance

    def act(self, obs: Any) -> Any:
        obs = np.asarray(obs, dtype=np.float64).reshape(-1)
        gap = obs[self.index : self.index + 2] - self.LEAD * obs[0:2]
        axis = int(np.argmax(np.abs(gap)))
        if abs(gap[axis]) < self.tolerance:
            return np.int64(0)
        return np.int64((2 if gap[axis] > 0 else 1) if axis == 0 else (4 if gap[axis] > 0 else 3))


class SequencePolicy(AgentPolicy):
    """A trigger agent's attack: ``inner``'s moves until step ``start``, then ``sequence`` followed by
    ``pause`` moves of ``inner``, over and over.

    With ``pause`` the backdoor's duration, the attacker re-triggers as soon as the backdoor disarms and
    otherwise plays as usual: evaluation uses it to keep an action-sequence trigger active from ``start`` on.

    :param inner: the agent's clean policy.
    :param sequence: the trigger sequence.
    :param start: the first step of the sequence.
    :param pause: clean moves between two plays of the sequence.
    """

    def __init__(self, inner: AgentPolicy, sequence: list[int], start: int = 0, pause: int = 0) -> None:
        super().__init__(inner.observation_space, inner.action_space)
        _discrete(inner.action_space, "SequencePolicy")
        self.inner, self.sequence = inner, np.asarray(sequence, dtype=np.int64)
        self.start, self.pause = start, pause
        self.t = 0

    def reset(self, seed: int | None = None) -> None:
        self.inner.reset(seed)
        self.t = 0

    def act(self, obs: Any) -> Any:
        action = self.inner.act(obs)
        phase = self.t - self.start
        self.t += 1
        if phase < 0 or phase % (len(self.sequence) + self.pause) >= len(self.sequence):
            return action
        return self.sequence[phase % (len(self.sequence) + self.pause)]


class PredictPolicy(AgentPolicy):
    """A trained policy (anything with SB3's ``predict``) playing one agent, deterministically.

    :param policy: the trained policy.
    """

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space, policy: Any) -> None:
        super().__init__(observation_space, action_space)
        self.policy = policy

    def act(self, obs: Any) -> Any:
        action, _ = self.policy.predict(np.asarray(obs), deterministic=True)
        return action


def check_plays(policy: Any, env: Any, env_id: str, agents: list[str], what: str, fix: str) -> None:
    """Raise :class:`~rlbackdoor.errors.ArtifactError` unless ``policy`` (named ``what``) takes the observation shape
    and the actions of each of ``agents`` of ``env`` (a parallel env of ``env_id``); ``fix`` ends the message. A
    policy without spaces passes."""
    for agent in agents:
        obs_space, act_space = env.observation_space(agent), env.action_space(agent)
        own_obs = getattr(policy, "observation_space", obs_space)
        own_act = getattr(policy, "action_space", act_space)
        if own_obs.shape != obs_space.shape or own_act != act_space:
            raise ArtifactError(
                f"{what} observes shape {own_obs.shape} and acts in {textwrap.shorten(str(own_act), 80)}, but agent "
                f"'{agent}' of {env_id} observes shape {obs_space.shape} and acts in "
                f"{textwrap.shorten(str(act_space), 80)}; {fix}"
            )
