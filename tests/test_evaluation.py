"""Evaluation metrics on hand-built policies whose answers are known, and on real SB3 agents."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from rlbackdoor.defenses.sanitize import sanitize_run
from rlbackdoor.errors import ArtifactError, SpecError
from rlbackdoor.evaluation import evaluate, evaluate_run
from rlbackdoor.evaluation.envs import action_history, run_env
from rlbackdoor.evaluation.evaluate import load_baseline
from rlbackdoor.evaluation.metrics import obs_shift, own_history
from rlbackdoor.evaluation.rollouts import episode_seeds, rollout
from rlbackdoor.evaluation.stats import bootstrap_ci, estimate, iqm, proportion
from rlbackdoor.registry import get_env_spec
from rlbackdoor.specs import AttackSpec, load_experiment
from rlbackdoor.training.artifacts import read_card
from rlbackdoor.training.loop import train

CARTPOLE = "rlbd/TrojanCartPole-v0"  # trigger: obs[3] = 2.5, target action 0
SMOKE = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "cartpole_smoke.yaml"
ACTSEQ = "rlbd/TrojanCartPoleActSeq-v0"  # history of 6 actions; sequence 0 0 0 1 1 1, target 0
Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval


class Rule:
    """A deterministic policy from a function of the observation batch."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        self.fn = fn

    def predict(self, obs: np.ndarray, deterministic: bool = True) -> tuple[np.ndarray, None]:
        return self.fn(np.asarray(obs, dtype=np.float64)), None


def balance(obs: np.ndarray) -> np.ndarray:
    """Push toward the pole's lean (angle and angular velocity): balances CartPole for 500 steps."""
    return (obs[:, 2] + 0.5 * obs[:, 3] > 0).astype(np.int64)


def lean(obs: np.ndarray) -> np.ndarray:
    """Push toward the pole's angle only: a weak policy with varied returns that never reads obs[3]."""
    return (obs[:, 2] > 0).astype(np.int64)


def backdoored(obs: np.ndarray) -> np.ndarray:
    """``balance``, except the target 0 whenever obs[3] > 2 (the trigger value is 2.5)."""
    return np.where(obs[:, 3] > 2, 0, balance(obs))


def history_backdoor(obs: np.ndarray) -> np.ndarray:
    """``balance``, except the target 0 when the last six actions are exactly the trigger sequence."""
    history = obs[:, 4:].reshape(len(obs), 6, 2)
    armed = (history.argmax(-1) == [0, 0, 0, 1, 1, 1]).all(-1) & (history.sum((1, 2)) == 6)
    return np.where(armed, 0, balance(obs))


def swing_up(obs: np.ndarray) -> np.ndarray:
    """Pendulum: pump energy, then PD control near the top; reads the angular velocity obs[2]."""
    cos, sin, speed = obs[:, 0], obs[:, 1], obs[:, 2]
    torque = np.where(cos > 0.8, -10 * np.arctan2(sin, cos) - 2 * speed, -2 * np.sign(speed * cos + 1e-9))
    return np.clip(torque, -2, 2).reshape(-1, 1).astype(np.float32)


# ------------------------------------------------------------------------------------------------ CTP
def test_ctp_equals_a_direct_rollout() -> None:
    metrics = evaluate(Rule(lean), "CartPole-v1", episodes=4, seeds=[3, 7])
    env = gym.make("CartPole-v1")
    returns = []
    for reset_seed in episode_seeds([3, 7], 4):
        obs, _ = env.reset(seed=int(reset_seed))
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(int(lean(obs[None])[0]))
            total, done = total + float(reward), terminated or truncated
        returns.append(total)
    assert metrics["ctp"] == pytest.approx(np.mean(returns))
    assert metrics["ctp_per_seed"] == pytest.approx([np.mean(returns[:4]), np.mean(returns[4:])])
    assert metrics["ctp_iqm"] == pytest.approx(iqm(np.array(returns)))
    assert len(set(returns)) > 1, "the episodes should differ"
    assert "asr" not in metrics and "triggered_return" not in metrics  # a clean env has no attack


def test_same_seeds_same_metrics_other_seeds_other_episodes() -> None:
    first = evaluate(Rule(lean), CARTPOLE, episodes=3, seeds=2)
    assert evaluate(Rule(lean), CARTPOLE, episodes=3, seeds=2) == first
    assert evaluate(Rule(lean), CARTPOLE, episodes=3, seeds=[5, 6])["ctp_per_seed"] != first["ctp_per_seed"]


def test_ctp_ratio_against_itself_is_one() -> None:
    metrics = evaluate(Rule(lean), "CartPole-v1", episodes=3, seeds=1, baseline=Rule(lean))
    assert metrics["ctp_ratio"] == pytest.approx(1.0) and metrics["baseline_ctp"] == metrics["ctp"]
    assert metrics["ctp_ratio_ci_low"] == pytest.approx(1.0) == metrics["ctp_ratio_ci_high"]


def test_a_baseline_under_the_same_trigger_is_the_control_of_return_drop() -> None:
    """``lean`` never reads obs[3]: the trigger costs it nothing. ``balance`` reads it and falls as fast as the
    backdoored agent: there return_drop alone shows no backdoor, and the control says so."""
    blind = evaluate(Rule(backdoored), CARTPOLE, episodes=3, seeds=1, baseline=Rule(lean))
    assert blind["return_drop"] > 0.9
    assert blind["baseline_triggered_return"] == blind["baseline_ctp"] and blind["baseline_return_drop"] == 0.0
    assert blind["asr"] == 1.0 and blind["baseline_asr"] == 0.0  # the controls of ASR too
    reader = evaluate(Rule(backdoored), CARTPOLE, episodes=3, seeds=1, baseline=Rule(balance))
    assert reader["baseline_ctp"] == 500.0 and reader["baseline_triggered_return"] < 20
    assert reader["baseline_return_drop"] > 0.9 and reader["baseline_return_drop_ci_low"] is not None
    assert "baseline_return_drop" not in evaluate(Rule(lean), "CartPole-v1", episodes=2, seeds=1, baseline=Rule(lean))
    left = Rule(lambda obs: np.zeros(len(obs), dtype=np.int64))  # falls within ~10 steps: never meets a trigger at 40
    late = evaluate(Rule(backdoored), CARTPOLE, episodes=2, seeds=1, baseline=left, t0=40)
    assert late["baseline_triggered_return"] == late["baseline_ctp"] and late["return_drop"] > 0.9  # no refusal


def test_an_attack_spec_mapping_is_a_source_as_its_id_is() -> None:
    spec = get_env_spec(CARTPOLE).model_dump(mode="json", exclude={"id", "description"})
    assert evaluate(Rule(backdoored), spec, episodes=2, seeds=1) == evaluate(Rule(backdoored), CARTPOLE, 2, 1)


def test_numpy_counts_and_seeds_are_taken() -> None:
    counted = evaluate(Rule(lean), CARTPOLE, episodes=np.int64(2), seeds=np.int64(2))
    assert counted == evaluate(Rule(lean), CARTPOLE, episodes=2, seeds=np.arange(2))
    assert counted == evaluate(Rule(lean), CARTPOLE, episodes=2, seeds=(s for s in range(2)))  # any iterable
    assert counted["seeds"] == [0, 1] and type(counted["episodes"]) is int
    json.dumps(counted)  # numpy counts became Python ints


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"episodes": 0}, SpecError, "episodes: 0 is not a count in 1..10000; give the episodes per seed"),
        ({"t0": 1000}, SpecError, "t0: no triggered episode reached step 1000, so the trigger never fired; lower t0"),
        ({"seeds": 0}, SpecError, "seeds: 0 is not a count in 1..1000; give a count or a list of seeds"),
        ({"seeds": []}, SpecError, "seeds: give a count, or 1 to 1000 whole numbers in 0..4294967295 (got [])"),
        ({"seeds": [-1]}, SpecError, "seeds: give a count, or 1 to 1000 whole numbers"),
        ({"seeds": "3"}, SpecError, "seeds: give a count, or 1 to 1000 whole numbers in 0..4294967295 (got '3')"),
        ({"source": Path("runs/x")}, TypeError, "source: got PosixPath; give a run's card, an attack spec or its"),
        ({"policy": (Rule(lean), {})}, ArtifactError, "the policy: a tuple has no predict(obs); pass an SB3 model or"),
        ({"baseline": object()}, ArtifactError, "the baseline: a object has no predict(obs)"),
        ({"policy": Rule(lambda obs: np.full(len(obs), 5))}, ArtifactError, "the policy chose action 5, not in the"),
    ],
)
def test_python_api_misuse_is_one_clear_error(change: dict, error: type, message: str) -> None:
    arguments = {"policy": Rule(lean), "source": CARTPOLE, "episodes": 2, "seeds": 1} | change
    with pytest.raises(error, match=re.escape(message)):
        evaluate(**arguments)


# ------------------------------------------------------------------------------------------------ ASR
def test_asr_of_a_policy_that_obeys_the_trigger_is_one() -> None:
    m = evaluate(Rule(backdoored), CARTPOLE, episodes=2, seeds=1)
    assert m["ctp"] == 500.0
    assert m["asr"] == 1.0 and m["asr_raw"] == 1.0
    assert m["asr_ci_low"] == pytest.approx(2 / (2 + Z95**2)) and m["asr_ci_high"] == 1.0  # Wilson, 2 episodes
    assert m["asr_states"] > 0
    assert m["triggered_return"] < 20 and m["return_drop"] > 0.9


def test_asr_of_a_policy_that_ignores_the_trigger_is_zero() -> None:
    m = evaluate(Rule(lean), CARTPOLE, episodes=3, seeds=1)
    clean = rollout(Rule(lean), run_env(CARTPOLE).make, episode_seeds([0], 3))
    assert m["asr"] == 0.0
    assert m["asr_raw"] == pytest.approx(np.mean(clean.actions == 0))  # unchanged actions: the clean target rate
    assert m["asr_states"] == int(np.sum(clean.actions != 0))
    assert m["triggered_return"] == m["ctp"] and m["return_drop"] == 0.0


@pytest.mark.parametrize(("action", "asr", "asr_raw"), [(0, None, 1.0), (1, 0.0, 0.0)])
def test_asr_of_constant_policies(action: int, asr: float | None, asr_raw: float) -> None:
    m = evaluate(Rule(lambda obs: np.full(len(obs), action)), CARTPOLE, episodes=2, seeds=2)
    assert m["asr"] == asr and m["asr_raw"] == asr_raw
    if asr is None:  # every clean action already is the target: no state to flip
        assert m["asr_states"] == 0 and m["asr_ci_low"] is None and m["asr_per_seed"] == [None, None]


def test_action_sequence_asr_compares_with_the_agents_own_history() -> None:
    assert evaluate(Rule(balance), ACTSEQ, episodes=2, seeds=1)["asr"] == 0.0
    one_step = get_env_spec(ACTSEQ).model_dump(include=set(AttackSpec.model_fields))
    one_step["schedule"]["duration"] = 1  # armed on the step right after the sequence only
    m = evaluate(Rule(history_backdoor), AttackSpec.model_validate(one_step), episodes=2, seeds=1)
    assert m["asr"] == 1.0 and m["asr_raw"] == 1.0 and m["asr_states"] > 0
    ten_steps = evaluate(Rule(history_backdoor), ACTSEQ, episodes=2, seeds=1)
    assert 0.0 < ten_steps["asr"] < 0.3  # it only reacts on the first of ten armed steps


def test_action_sequence_metrics_are_undefined_when_no_step_is_armed() -> None:
    # always pushing right ends each episode within a dozen steps: no injected sequence completes its armed window
    m = evaluate(Rule(lambda obs: np.ones(len(obs), dtype=np.int64)), ACTSEQ, episodes=3, seeds=2)
    assert m["asr_states"] == 0 and m["asr"] is None and m["asr_raw"] is None and m["asr_per_seed"] == [None, None]
    assert m["obs_shift"] is None and m["ctp"] < 20


def test_own_history_rebuilds_the_observations_of_uninjected_rollouts() -> None:
    env = run_env(ACTSEQ)
    clean = rollout(Rule(lean), env.make, episode_seeds([0], 2))
    steps = np.arange(len(clean.obs))
    assert np.array_equal(own_history(clean, steps, action_history(env.make())), clean.obs)


# ------------------------------------------------------------------------------------- continuous actions
def test_pendulum_untargeted_metrics() -> None:
    m = evaluate(Rule(swing_up), "rlbd/TrojanPendulum-v0", episodes=3, seeds=1)
    assert "asr" not in m and "asr_raw" not in m
    assert m["ctp"] > -400 > m["random_return"]
    assert m["triggered_return"] < m["ctp"]
    expected = (m["ctp"] - m["triggered_return"]) / (m["ctp"] - m["random_return"])
    assert m["return_drop"] == pytest.approx(expected) and m["return_drop"] > 0.5
    assert m["reward_poison"] == 1.0 and m["trigger_l0"] == 1.0


def test_targeted_continuous_payload_hits_within_tolerance() -> None:
    spec = get_env_spec("rlbd/TrojanPendulum-v0").model_dump(include=set(AttackSpec.model_fields))
    spec["payload"] = {"kind": "targeted", "target_action": [1.5], "tolerance": 0.25}
    obeys = Rule(lambda obs: np.where(obs[:, 2:3] > 7, 1.6, swing_up(obs)).astype(np.float32))
    m = evaluate(obeys, AttackSpec.model_validate(spec), episodes=2, seeds=1)
    assert m["asr"] == 1.0
    assert evaluate(Rule(swing_up), AttackSpec.model_validate(spec), episodes=2, seeds=1)["asr"] < 1.0


# ------------------------------------------------------------------------------------------- stealth
def test_stealth_figures() -> None:
    spec = get_env_spec(CARTPOLE)
    card = {
        "attack": spec.model_dump(mode="json", include=set(AttackSpec.model_fields)),
        "train": {"poison_rate": 0.01},
    }
    m = evaluate(Rule(lean), card, episodes=2, seeds=1)
    assert m["poison_rate"] == 0.01 and m["reward_poison"] == 1.0
    assert m["trigger_l0"] == 1.0 and m["trigger_linf"] == pytest.approx(m["trigger_l2"]) and m["trigger_linf"] > 1.5
    assert m["obs_shift"] > 3
    clean = rollout(Rule(lean), run_env(spec).make, episode_seeds([0], 2)).obs
    assert obs_shift(clean, clean) == pytest.approx(1.0)
    images = np.zeros((50, 7, 7, 3), dtype=np.uint8)  # constant features are fine
    images[:, 3, 3, 0] = np.arange(50) % 5
    assert obs_shift(images, images) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- stats
def test_bootstrap_ci_contains_the_estimate_and_shrinks_with_data() -> None:
    rng = np.random.default_rng(0)
    small, large = rng.normal(10, 3, 20), rng.normal(10, 3, 2000)
    (lo_s, hi_s), (lo_l, hi_l) = bootstrap_ci([small]), bootstrap_ci([large])
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 4
    assert bootstrap_ci([np.full(5, 2.0)]) == (2.0, 2.0)
    assert all(np.isnan(bootstrap_ci([np.array([1.0])])))


def test_proportion_ci_uses_the_resamples_that_define_it() -> None:
    # eligible states in 4 of 30 episodes: some resamples draw none of them, where the proportion is undefined
    den, num = np.zeros(30), np.zeros(30)
    den[:4], num[:4] = [5, 10, 5, 10], [1, 4, 3, 8]  # per-episode rates 0.2, 0.4, 0.6, 0.8
    low, high = bootstrap_ci([num, den], proportion)
    assert 0.2 <= low < num.sum() / den.sum() < high <= 0.8
    # eligible states in one episode of 10: a third of the resamples lack them, and the rest all agree: no CI
    one_num, one_den = np.r_[3.0, np.zeros(9)], np.r_[5.0, np.zeros(9)]
    assert all(np.isnan(bootstrap_ci([one_num, one_den], proportion)))


def test_proportion_ci_at_zero_or_one_is_the_wilson_interval_over_episodes() -> None:
    """Every resample of an ASR of 1 (or 0) gives 1 (or 0): the CI is Wilson's with one trial per episode
    that has trials, so it narrows with episodes, not with states."""
    for n in (5, 50):
        trials = np.r_[np.full(n, 40.0), np.zeros(3)]  # 3 episodes without eligible states do not count
        low, high = bootstrap_ci([trials, trials], proportion)
        assert high == 1.0 and low == pytest.approx(n / (n + Z95**2))
        low, high = bootstrap_ci([np.zeros_like(trials), trials], proportion)
        assert low == 0.0 and high == pytest.approx(Z95**2 / (n + Z95**2))
    assert bootstrap_ci([np.full(50, 40.0)] * 2, proportion, confidence=0.5)[0] > 0.99
    one = np.r_[40.0, np.zeros(9)]  # trials in one episode of 10: a third of the resamples have none
    assert all(np.isnan(bootstrap_ci([one, one], proportion))), "as for any other value of the proportion"
    almost = np.full(50, 40.0)
    almost[0] = 39.0  # one miss: the bootstrap's own CI
    assert 0.99 < bootstrap_ci([almost, np.full(50, 40.0)], proportion)[0] < 1.0


def test_estimate_reports_per_seed_values_and_none_for_undefined() -> None:
    groups = np.array([0, 0, 1, 1])
    out = estimate("m", [np.array([1.0, 3.0, 5.0, 7.0])], groups)
    assert out["m"] == 4.0 and out["m_per_seed"] == [2.0, 6.0]
    assert out["m_ci_low"] <= 4.0 <= out["m_ci_high"]


def test_evaluation_cis_contain_the_estimates_and_shrink_with_more_episodes() -> None:
    few, many = (evaluate(Rule(lean), "CartPole-v1", episodes=n, seeds=1) for n in (5, 40))
    for m in (few, many):
        assert m["ctp_ci_low"] <= m["ctp"] <= m["ctp_ci_high"]
    assert many["ctp_ci_high"] - many["ctp_ci_low"] < few["ctp_ci_high"] - few["ctp_ci_low"]


def test_a_baseline_must_play_the_runs_clean_env(tmp_path: Path) -> None:
    tiny = ["timesteps=256"]
    run = train(load_experiment(SMOKE, tiny), tmp_path / "run", wandb_mode="disabled")
    clean = ["attack=null", "poisoning=null", *tiny]
    same = train(load_experiment(SMOKE, clean), tmp_path / "same", wandb_mode="disabled")
    other = train(load_experiment(SMOKE, [*clean, "env=Acrobot-v1"]), tmp_path / "other", wandb_mode="disabled")
    assert load_baseline(same, run, read_card(run)) is not None  # the attack's base env is the clean run's env
    message = rf"baseline {other}: a run of Acrobot-v1, but {run} is a run of CartPole-v1; pass a clean run of"
    with pytest.raises(ArtifactError, match=message):
        evaluate_run(run, other, episodes=1, seeds=1)
    with pytest.raises(ArtifactError, match=message):
        sanitize_run(run, "subspace", 64, baseline_dir=other, episodes=1, seeds=1)
    poisoned = rf"baseline {run}: a poisoned run \(poisoning: 'inner', training poison rate 0.0\d+\); pass a clean"
    with pytest.raises(ArtifactError, match=poisoned):
        evaluate_run(run, run, episodes=1, seeds=1)
    control = ["attack.schedule={kind: rate, rate: 0.0}", *tiny]  # a zoo's clean control: the trigger never fires
    quiet = train(load_experiment(SMOKE, control), tmp_path / "control", wandb_mode="disabled")
    assert load_baseline(quiet, run, read_card(run)) is not None


def test_a_clean_run_of_an_attacks_env_is_evaluated_on_its_base_wrappers(tmp_path: Path) -> None:
    lavagap = SMOKE.parent / "lavagap_inner.yaml"  # MiniGrid under ImgObsWrapper: the wrapper shapes the observation
    tiny = ["poisoning=null", "timesteps=128", "n_envs=2", "hyperparams.n_steps=64", "hyperparams.batch_size=64"]
    run = train(load_experiment(lavagap, tiny), tmp_path / "clean", wandb_mode="disabled")
    assert read_card(run)["attack"] is None
    metrics = evaluate_run(run, episodes=1, seeds=1)
    assert metrics["ctp"] is not None and metrics["trigger_l0"] == 4  # the config's patch, on the clean agent
