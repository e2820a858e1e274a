"""Training-time trajectory sanitization on real poisoned rollouts."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

import rlbackdoor
from rlbackdoor.attack import make_base_env
from rlbackdoor.defenses import SubspaceSanitizer, SupportSanitizer
from rlbackdoor.defenses.filtering import FilterVecEnv, RolloutFilter, TransitionFilter
from rlbackdoor.errors import ArtifactError, SpecError
from rlbackdoor.trajectories import Trajectories, collect
from rlbackdoor.wrappers.vec import BackdoorVecEnv


@pytest.mark.parametrize(
    ("env_id", "sanitizer", "n_clean"),
    [("rlbd/TrojanLavaGap-v0", SubspaceSanitizer, 600), ("rlbd/TrojanCartPole-v0", SupportSanitizer, 300)],
)
def test_filter_finds_poisoned_transitions(env_id, sanitizer, n_clean):
    spec = rlbackdoor.get_env_spec(env_id)
    clean = collect(make_base_env(spec), None, n_clean, 0, spec.base)
    poisoned = collect(gym.make(env_id), None, 4000, 1, env_id)
    assert poisoned.poisoned.sum() > 20
    filt = TransitionFilter(sanitizer()).fit(clean)
    kept, report = filt.filter(poisoned, "drop")
    assert report.recall >= 0.9 and report.precision >= 0.5
    assert len(kept) == len(poisoned) - report.flagged
    assert kept.poisoned.sum() == report.poisoned - report.true_positives
    repaired, same = filt.filter(poisoned, "repair")
    assert same == report and len(repaired) == len(poisoned)
    assert filt.flag_rewards(repaired.rewards).sum() == 0


def test_trajectories_round_trip_without_pickles(tmp_path):
    data = collect(gym.make("rlbd/TrojanCartPole-v0"), None, 300, 0, "rlbd/TrojanCartPole-v0")
    path = data.save(tmp_path / "t.npz")
    back = Trajectories.load(path)
    assert back.env == "rlbd/TrojanCartPole-v0"
    for name in ("observations", "actions", "rewards", "dones", "poisoned", "triggered"):
        np.testing.assert_array_equal(getattr(back, name), getattr(data, name))
    assert not list(tmp_path.glob("*.tmp"))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ArtifactError, match="not a trajectory file"):
        Trajectories.load(tmp_path / "bad.npz")


def test_select_keeps_episode_ends():
    data = collect(gym.make("CartPole-v1"), None, 200, 0)
    keep = np.ones(len(data), dtype=bool)
    ends = np.flatnonzero(data.dones)
    keep[ends[0]] = False
    kept = data.select(keep)
    assert kept.dones.sum() == data.dones.sum()


def test_online_filter_repairs_what_the_learner_sees():
    spec = rlbackdoor.get_env_spec("rlbd/TrojanCartPole-v0")
    clean = collect(make_base_env(spec), None, 300, 0, spec.base)
    filt = TransitionFilter(SupportSanitizer()).fit(clean)
    venv = FilterVecEnv(BackdoorVecEnv(make_vec_env(lambda: make_base_env(spec), n_envs=4, seed=0), spec, 0), filt)
    venv.reset()
    rng = np.random.default_rng(0)
    for _ in range(1000):
        obs, rewards, _, _ = venv.step(rng.integers(0, 2, size=4))
        assert not filt.flag_observations(obs).any()
        assert rewards.min() >= filt.reward_low
    stats = venv.stats()
    assert stats["obs_poisoned"] > 10 and stats["obs_recall"] >= 0.9
    assert stats["reward_recall"] > 0.3


def test_unfitted_and_empty_inputs_fail_clearly():
    with pytest.raises(SpecError, match="not fitted"):
        TransitionFilter(None).flag_rewards(np.zeros(3))
    empty = collect(gym.make("CartPole-v1"), None, 0, 0)
    with pytest.raises(SpecError, match="no clean transitions"):
        TransitionFilter(None).fit(empty)


class BufferRewards(BaseCallback):
    """Keeps the rollout buffer's rewards, advantages and returns as the learner will train on them."""

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        rb = self.model.rollout_buffer
        self.rewards, self.advantages, self.returns = rb.rewards.copy(), rb.advantages.copy(), rb.returns.copy()
        self.values = rb.values.copy()


@pytest.mark.parametrize("mode", ["drop", "repair"])
def test_rollout_filter_drops_or_repairs_the_poisoned_steps(mode: str):
    """Inner loop: the env's ``poisoned`` flags are the truth; a -1 reward (CartPole pays 1) marks the step."""
    spec = rlbackdoor.get_env_spec("rlbd/TrojanCartPole-v0")
    filt = TransitionFilter(SupportSanitizer("impute")).fit(collect(make_base_env(spec), None, 300, 0, spec.base))
    env = BackdoorVecEnv(make_vec_env(lambda: make_base_env(spec), n_envs=4, seed=0), spec, 0)
    model = PPO("MlpPolicy", env, n_steps=256, batch_size=256, n_epochs=1, seed=0, device="cpu")
    rollout_filter, buffer = RolloutFilter(filt, mode=mode), BufferRewards()
    model.learn(1024, callback=[rollout_filter, buffer])
    report = rollout_filter.report
    assert report.poisoned > 0 and report.recall >= 0.5 and report.precision == 1.0
    assert buffer.rewards.min() >= filt.reward_low  # every reward back in the clean range
    dropped = (buffer.advantages == 0) & (buffer.returns == buffer.values)  # out of the loss; one rollout here
    assert dropped.sum() == (report.flagged if mode == "drop" else 0)


def test_rollout_filter_keeps_the_time_limit_bootstrap():
    """SB3 adds gamma V(s_T) to the reward of a step cut by a time limit: the filter checks the env's reward
    (CartPole's 1, in the clean range) and leaves the bootstrap alone."""
    filt = TransitionFilter(SupportSanitizer("impute")).fit(collect(gym.make("CartPole-v1"), None, 300, 0))
    env = make_vec_env(lambda: gym.make("CartPole-v1", max_episode_steps=8), n_envs=2, seed=0)
    model = PPO("MlpPolicy", env, n_steps=32, batch_size=64, n_epochs=1, seed=0, device="cpu")
    rollout_filter, buffer = RolloutFilter(filt, mode="repair"), BufferRewards()
    model.learn(64, callback=[rollout_filter, buffer])
    assert rollout_filter.report.n == 64 and rollout_filter.report.flagged == 0
    assert np.abs(buffer.rewards - 1.0).max() > 1e-3  # the bootstrapped rewards are still there
