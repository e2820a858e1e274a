"""Training-time trajectory sanitization on real poisoned rollouts."""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np
import pytest
import torch
from damage import damaged
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

import rlbackdoor
from rlbackdoor.attack import make_base_env
from rlbackdoor.cli import main
from rlbackdoor.defenses import SubspaceSanitizer, SupportSanitizer
from rlbackdoor.defenses.filtering import FilterReport, FilterVecEnv, RolloutFilter, TransitionFilter
from rlbackdoor.errors import ArtifactError, SpecError
from rlbackdoor.trajectories import FIELDS, Trajectories, collect
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
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as any file the user writes, not a private temp file
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    # numpy's advice to unpickle what is not an archive is not passed on
    with pytest.raises(ArtifactError, match=r"not a trajectory file \(not an .npz archive of arrays\); write it with"):
        Trajectories.load(tmp_path / "bad.npz")
    np.save(tmp_path / "one.npy", data.observations)
    with pytest.raises(ArtifactError, match=r"not a trajectory file \(one .npy array, not an .npz archive\)"):
        Trajectories.load(tmp_path / "one.npy")
    with pytest.raises(ArtifactError, match=r"missing.npz: no such file; check the path$"):
        Trajectories.load(tmp_path / "missing.npz")


@pytest.mark.parametrize(
    ("field", "change", "message"),
    [
        (
            "observations",
            lambda a: np.where(np.arange(a.size).reshape(a.shape) == 41, np.nan, a),
            "observations of transition 10 hold NaN",
        ),
        ("rewards", lambda a: np.where(np.arange(len(a)) == 7, np.inf, a), "rewards of transition 7 hold NaN or inf"),
        ("actions", lambda a: a[:-1], r"fields differ in length \(observations \(60, 4\), actions \(59,\)"),
        ("poisoned", lambda a: np.array("yes"), "fields differ in length"),
        ("dones", lambda a: a.astype(str), "dones has dtype <U5; store numbers"),
        ("rewards", lambda a: a[:, None], r"rewards has shape \(60, 1\); store one number per transition"),
        ("dones", lambda a: np.stack([a, a], 1), r"dones has shape \(60, 2\); store one number per transition"),
        ("poisoned", lambda a: np.stack([a] * 3, 1), r"poisoned has shape \(60, 3\); store one number"),
        ("triggered", lambda a: a.reshape(60, 1, 1), r"triggered has shape \(60, 1, 1\); store one number"),
    ],
)
def test_malformed_trajectory_files_are_refused(tmp_path, field, change, message):
    data = collect(gym.make("rlbd/TrojanCartPole-v0"), None, 60, 0, "rlbd/TrojanCartPole-v0")
    setattr(data, field, change(getattr(data, field)))
    path = data.save(tmp_path / "t.npz")
    with pytest.raises(ArtifactError, match=message):
        Trajectories.load(path)


def _meta_list(path):
    good = collect(gym.make("CartPole-v1"), None, 20, 0)
    np.savez(path, meta=np.array("[1]"), **{f: getattr(good, f) for f in FIELDS})


def _meta_nested(path):
    good = collect(gym.make("CartPole-v1"), None, 20, 0)
    np.savez(path, meta=np.array("[" * 100_000), **{f: getattr(good, f) for f in FIELDS})


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda path: path.write_bytes(b""), "not a trajectory file"),
        (lambda path: path.write_bytes(collect(gym.make("CartPole-v1"), None, 20, 0).save(path).read_bytes()[:300]), "not a trajectory file"),
        (lambda path: collect(gym.make("CartPole-v1"), None, 0, 0, "CartPole-v1").save(path), "holds no transitions"),
        (_meta_list, "meta is not a JSON object"),
        (_meta_nested, r"not a trajectory file \(maximum recursion depth exceeded"),
    ],
)  # fmt: skip
def test_empty_truncated_and_foreign_trajectory_files_are_refused(tmp_path, write, message):
    path = tmp_path / "t.npz"
    write(path)
    with pytest.raises(ArtifactError, match=message) as info:
        Trajectories.load(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_damaged_trajectory_files_load_or_fail_in_one_line(tmp_path):
    good = collect(gym.make("CartPole-v1"), None, 50, 0).save(tmp_path / "good.npz").read_bytes()
    path, refused = tmp_path / "t.npz", 0
    for seed in range(100):
        path.write_bytes(damaged(good, seed))
        try:
            Trajectories.load(path)
        except ArtifactError as err:
            refused += 1
            assert str(err).startswith(f"{path}: ") and "\n" not in str(err)
    assert refused >= 80


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
    assert stats["obs_poisoned"] > 10 and stats["obs_recall"] >= 0.75  # measured 0.82-1.0 over six draw streams
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


def test_rollout_filter_allows_float32_rounding_of_large_bootstraps():
    """A value near CartPole's 1 / (1 - gamma) = 100 makes ``r + gamma V`` a float32 whose rounding exceeds 1e-6: the
    env's reward is still 1 and nothing is flagged."""
    filt = TransitionFilter(None).fit(collect(gym.make("CartPole-v1"), None, 300, 0))
    env = make_vec_env(lambda: gym.make("CartPole-v1", max_episode_steps=8), n_envs=2, seed=0)
    model = PPO("MlpPolicy", env, n_steps=32, batch_size=64, n_epochs=1, seed=0, device="cpu")
    with torch.no_grad():
        model.policy.value_net.bias.fill_(99.37)
    rollout_filter, buffer = RolloutFilter(filt, mode="repair"), BufferRewards()
    model.learn(64, callback=[rollout_filter, buffer])
    assert buffer.rewards.max() > 90  # bootstrapped rewards were in the buffer
    assert rollout_filter.report.flagged == 0


def test_repair_predicts_a_stamped_observation_from_the_previous_step():
    """With a dynamics model, a flagged observation that follows another in its episode becomes the one-step
    prediction: CartPole's true position comes back; without a predecessor the sanitizer's guess is all there is."""
    filt = TransitionFilter(SupportSanitizer("impute"), margin=5.0, n_actions=2)
    filt.fit(collect(gym.make("CartPole-v1"), None, 1000, 0))
    data = collect(gym.make("CartPole-v1"), None, 400, 1)
    follows = np.flatnonzero(~data.dones[:-1])
    truth = data.observations[follows + 1]
    stamped = truth.copy()
    stamped[:, 0] = 4.0
    flags = filt.flag_observations(stamped)
    assert flags.all()
    repaired = filt.repair_observations(stamped, flags, data.observations[follows], data.actions[follows])
    np.testing.assert_allclose(repaired, truth, atol=0.02)
    guessed = filt.repair_observations(stamped, flags)
    assert np.abs(guessed[:, 0] - truth[:, 0]).max() > 0.05
    kept = filt.repair_observations(stamped, flags, data.observations[follows], data.actions[follows], ~flags)
    np.testing.assert_array_equal(kept, guessed)


def test_online_filter_shows_the_agent_the_predicted_observation():
    """Inner loop: the trigger overwrites the pole's angular velocity; the learner sees the one-step prediction
    instead, e.g. x_t = x_{t-1} + tau v_{t-1} (CartPole's Euler step)."""
    spec = rlbackdoor.get_env_spec("rlbd/TrojanCartPole-v0")
    clean = collect(make_base_env(spec), None, 1000, 0, spec.base)
    filt = TransitionFilter(SupportSanitizer("impute"), n_actions=2).fit(clean)
    venv = FilterVecEnv(BackdoorVecEnv(make_vec_env(lambda: make_base_env(spec), n_envs=4, seed=0), spec, 0), filt)
    previous = venv.reset()
    rng, checked = np.random.default_rng(0), 0
    for _ in range(1000):
        obs, _, dones, infos = venv.step(rng.integers(0, 2, size=4))
        for i in np.flatnonzero(venv.flagged & ~dones):
            assert obs[i, 0] == pytest.approx(previous[i, 0] + 0.02 * previous[i, 1], abs=1e-4)
            assert obs[i, 3] != spec.trigger.values[0]
            checked += infos[i]["rlbd"]["triggered"]
        previous = obs
    assert checked > 10


def test_rollout_filter_keeps_the_behaviour_log_probabilities():
    """Inner loop without the on-line filter: the agent drew its action on the triggered observation. The repaired
    step keeps that log-probability, so PPO's ratio weighs it as the off-policy sample it is."""
    spec = rlbackdoor.get_env_spec("rlbd/TrojanCartPole-v0")
    clean = collect(make_base_env(spec), None, 1000, 0, spec.base)
    filt = TransitionFilter(SupportSanitizer("impute"), n_actions=2).fit(clean)
    env = BackdoorVecEnv(make_vec_env(lambda: make_base_env(spec), n_envs=4, seed=0), spec, 0)
    model = PPO("MlpPolicy", env, n_steps=256, batch_size=256, n_epochs=1, seed=0, device="cpu")

    class Behaviour(BaseCallback):
        def _on_rollout_start(self) -> None:
            self.drawn: list[np.ndarray] = []

        def _on_step(self) -> bool:
            self.drawn.append(self.locals["log_probs"].numpy().copy())
            return True

        def _on_rollout_end(self) -> None:
            rb = self.model.rollout_buffer
            self.log_probs = rb.log_probs.copy()

    rollout_filter, behaviour = RolloutFilter(filt), Behaviour()
    model.learn(2048, callback=[rollout_filter, behaviour])  # ~20 poisoned steps
    assert rollout_filter.report.true_positives >= 5  # repaired steps, yet every log-probability is the drawn one
    np.testing.assert_array_equal(behaviour.log_probs, np.stack(behaviour.drawn))


def test_offline_repair_predicts_stamped_observations_in_time_order():
    """A saved dataset's flagged observations come back as one-step predictions, a run of them chained on the
    repaired ones; an episode's first observation gets the sanitizer's repair."""
    filt = TransitionFilter(SupportSanitizer("impute"), margin=5.0, n_actions=2)
    filt.fit(collect(gym.make("CartPole-v1"), None, 1000, 0))
    data = collect(gym.make("CartPole-v1"), None, 300, 1)
    first = np.flatnonzero(data.dones)[0] + 1  # the first observation of the second episode
    stamped = data.observations.copy()
    run = [5, 6, 7, first]
    stamped[run, 0] = 4.0
    tampered = Trajectories(stamped, data.actions, data.rewards, data.dones, data.poisoned, data.triggered)
    repaired, report = filt.filter(tampered, "repair")
    assert report.flagged == len(run)
    np.testing.assert_allclose(repaired.observations[[5, 6, 7]], data.observations[[5, 6, 7]], atol=0.02)
    np.testing.assert_array_equal(repaired.observations[first], filt.repair_observations(stamped[[first]], [True])[0])
    untouched = np.setdiff1d(np.arange(len(data)), run)
    np.testing.assert_array_equal(repaired.observations[untouched], data.observations[untouched])


def test_collect_with_a_sampling_policy_is_reproducible_and_leaves_torch_alone() -> None:
    policy = PPO("MlpPolicy", gym.make("CartPole-v1"), seed=0, device="cpu").policy  # untrained: near-uniform
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first, again = (collect(gym.make("rlbackdoor:rlbd/TrojanCartPole-v0"), policy, 300, seed=5) for _ in range(2))
    assert np.array_equal(first.actions, again.actions) and np.array_equal(first.observations, again.observations)
    assert not np.array_equal(first.actions, collect(gym.make("CartPole-v1"), policy, 300, seed=6).actions)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_filter_reports_undefined_precision_and_recall_as_null() -> None:
    report = FilterReport(n=10, flagged=0, poisoned=0, true_positives=0)
    assert report.as_dict()["precision"] is None and report.as_dict()["recall"] is None


def test_cli_reports_a_nested_trajectory_meta_in_one_line(tmp_path, capsys):
    path = tmp_path / "t.npz"
    _meta_nested(path)
    assert main(["sanitize", "--trajectories", str(path), "--out", str(tmp_path / "clean.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rlbd: error: {path}: not a trajectory file (maximum recursion depth exceeded")
    assert "\n" not in err and "Traceback" not in err and [p.name for p in tmp_path.iterdir()] == ["t.npz"]
