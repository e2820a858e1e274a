"""Differentiable views of an SB3 policy for analysis: preprocessing, hidden activations, action scores, values.

Works for actor-critic policies (PPO, A2C: ``mlp_extractor.policy_net`` then ``action_net``) and DQN
policies (``q_net``), on vector and image observations. Inputs are float tensors in the env's layout
(HWC images stay HWC); the view transposes and preprocesses them as SB3 does (``preprocess_obs``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import PurePath

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.preprocessing import preprocess_obs
from stable_baselines3.dqn.policies import DQNPolicy
from torch import nn

from rlbackdoor.errors import ObservationError, SpecError

Edit = Callable[[int, torch.Tensor], torch.Tensor]
"""Called with (hidden layer index, activations); returns the activations to continue with."""


class PolicyNet:
    """The layers of an SB3 policy as a chain ``features -> hidden layers -> action scores``.

    :param policy: an ``ActorCriticPolicy`` (discrete or continuous actions) or a ``DQNPolicy``.
    :param obs_shape: the shape of one observation as the env emits it (HWC images are transposed).
    """

    def __init__(self, policy: BasePolicy, obs_shape: tuple[int, ...]) -> None:
        self.policy = policy
        if isinstance(policy, ActorCriticPolicy):
            chain = [policy.pi_features_extractor, *policy.mlp_extractor.policy_net]
            self.head: nn.Module = policy.action_net
        elif isinstance(policy, DQNPolicy):
            chain = [policy.q_net.features_extractor, *policy.q_net.q_net[:-1]]
            self.head = policy.q_net.q_net[-1]
        else:
            fix = (
                "load a run directory with rlbackdoor.load_policy"
                if isinstance(policy, str | PurePath)
                else "train the agent with ppo, a2c or dqn"
            )
            raise SpecError(
                f"detectors analyse ActorCriticPolicy (PPO, A2C) and DQNPolicy, not {type(policy).__name__}; {fix}"
            )
        self.chain = chain
        # hidden layers: after every activation, and after a features extractor that has weights (CNN)
        self.hidden_at = [
            i
            for i, m in enumerate(chain)
            if (i == 0 and any(True for _ in m.parameters())) or (i > 0 and not isinstance(m, nn.Linear))
        ]
        if not self.hidden_at:
            raise SpecError("the policy has no hidden layer to analyse; use a net_arch with at least one layer")
        space = policy.observation_space
        if not isinstance(space, spaces.Box):
            raise SpecError(f"detectors need a Box observation space, got {type(space).__name__}")
        self.space = space
        self.obs_shape = tuple(obs_shape)
        if self.obs_shape == space.shape:
            self.transpose = False
        elif len(self.obs_shape) == 3 and (self.obs_shape[2], *self.obs_shape[:2]) == space.shape:
            self.transpose = True
        else:
            raise ObservationError(
                f"observations of shape {self.obs_shape} do not fit the policy's observation space {space.shape}; "
                "use the env the agent was trained on"
            )
        self.discrete = isinstance(policy.action_space, spaces.Discrete)
        self.n_actions = int(policy.action_space.n) if self.discrete else 0
        with torch.no_grad():
            probe = self.forward(self.tensor(np.zeros((1, *self.obs_shape))))[0]
        self.widths = [int(a.shape[1]) for a in probe]

    # ------------------------------------------------------------------------------------ inputs
    def tensor(self, obs: np.ndarray) -> torch.Tensor:
        """A float tensor of a batch of env observations (checked against the env's observation shape)."""
        obs = np.asarray(obs)
        if obs.shape[1:] != self.obs_shape:
            raise ObservationError(
                f"observation batch of shape {obs.shape} does not match ({', '.join(map(str, self.obs_shape))}) "
                "with a leading batch axis; use observations of the env the agent was trained on"
            )
        return torch.as_tensor(obs, dtype=torch.float32)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.transpose:
            x = x.permute(0, 3, 1, 2)
        return preprocess_obs(x, self.space, normalize_images=self.policy.normalize_images)

    # ----------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, edit: Edit | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Hidden activations (one ``(B, width)`` tensor per hidden layer) and action scores of ``x``.

        :param x: float observations in the env's layout.
        :param edit: rewrites the activations of a hidden layer before they flow on (neuron stimulation).
        """
        h = self._prepare(x)
        hidden = []
        for i, module in enumerate(self.chain):
            h = module(h)
            if i in self.hidden_at:
                k = len(hidden)
                if edit is not None:
                    h = edit(k, h)
                hidden.append(h)
        return hidden, self.head(h)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Action scores: logits of an actor-critic policy, Q-values of a DQN policy (the mean action if continuous)."""
        return self.forward(x)[1]

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """State values: the critic of an actor-critic policy, ``max_a Q`` of a DQN policy."""
        if isinstance(self.policy, DQNPolicy):
            return self.scores(x).max(dim=1).values
        prepared = self._prepare(x)
        features = self.policy.vf_features_extractor(prepared)
        return self.policy.value_net(self.policy.mlp_extractor.forward_critic(features)).squeeze(1)

    # ---------------------------------------------------------------------------------- numpy API
    @torch.no_grad()
    def activations(self, obs: np.ndarray, layers: list[int] | None = None) -> np.ndarray:
        """Hidden activations of a batch of env observations, the chosen layers (default: all) concatenated."""
        acts = self.forward(self.tensor(obs))[0]
        chosen = range(len(acts)) if layers is None else layers
        return torch.cat([acts[k] for k in chosen], dim=1).numpy().astype(np.float64)

    @torch.no_grad()
    def actions(self, obs: np.ndarray) -> np.ndarray:
        """Deterministic discrete actions of a batch of env observations."""
        self.require_discrete()
        return self.scores(self.tensor(obs)).argmax(dim=1).numpy()

    def require_discrete(self) -> None:
        """Raise :class:`SpecError` unless the action space is discrete."""
        if not self.discrete:
            raise SpecError(
                f"this detector needs a Discrete action space, got {type(self.policy.action_space).__name__}; "
                "use a neuron-statistics detector (bands, spectral, clustering) instead"
            )
