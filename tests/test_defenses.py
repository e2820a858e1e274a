"""Run-time sanitizers on real env observations."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import rlbackdoor
from rlbackdoor.attack import Attack, make_base_env, sample_observations
from rlbackdoor.defenses import SanitizedPolicy, SanitizeObservation, SubspaceSanitizer, SupportSanitizer
from rlbackdoor.errors import ObservationError, SpecError
from rlbackdoor.trajectories import collect


@pytest.fixture(scope="module")
def lavagap():
    spec = rlbackdoor.get_env_spec("rlbd/TrojanLavaGap-v0")
    env = make_base_env(spec)
    trigger = Attack.for_env(spec, env).obs_trigger
    return env, trigger, sample_observations(env, 294, 0), sample_observations(env, 500, 1)


class Controller:
    """A stabilising linear controller for CartPole: its rollouts are the defender's clean data."""

    def predict(self, obs, state=None, episode_start=None, deterministic=True):
        b = np.asarray(obs, dtype=np.float64).reshape(-1, 4)
        push = (0.5 * b[:, 0] + 1.0 * b[:, 1] + 15 * b[:, 2] + 2.5 * b[:, 3] > 0).astype(np.int64)
        return (push if np.ndim(obs) == 2 else push[0]), state


@pytest.fixture(scope="module")
def cartpole():
    spec = rlbackdoor.get_env_spec("rlbd/TrojanCartPole-v0")
    env = make_base_env(spec)
    clean = collect(env, Controller(), 2000, 0).observations[::5]
    return env, Attack.for_env(spec, env).obs_trigger, clean


def test_subspace_removes_an_off_span_patch_and_keeps_clean_views(lavagap):
    _, trigger, clean, held_out = lavagap
    sanitizer = SubspaceSanitizer().fit(clean)
    dim = sanitizer.params()["dim"]
    assert dim == np.linalg.matrix_rank(clean.reshape(len(clean), -1).astype(float))
    triggered = trigger.apply(held_out)
    restored = sanitizer.transform(triggered)
    assert restored.dtype == np.uint8 and restored.shape == held_out.shape
    assert np.array_equal(restored[:, :2, :2, 0], held_out[:, :2, :2, 0])
    assert (sanitizer.transform(held_out) == held_out).all(axis=(1, 2, 3)).mean() > 0.9
    assert sanitizer.score(triggered).min() > 10 * sanitizer.score(held_out).max() + 1


def test_subspace_is_the_identity_on_full_rank_vectors(cartpole):
    _, trigger, clean = cartpole
    sanitizer = SubspaceSanitizer().fit(clean)
    assert sanitizer.params()["dim"] == 4
    triggered = trigger.apply(clean[:50])
    np.testing.assert_allclose(sanitizer.transform(triggered), triggered, atol=1e-5)


def test_support_pulls_the_value_trigger_back_into_the_clean_range(cartpole):
    _, trigger, clean = cartpole
    sanitizer = SupportSanitizer().fit(clean)
    restored = sanitizer.transform(trigger.apply(clean[:100]))
    assert restored[:, 3].max() <= sanitizer.high[3] + 1e-6 < 2.5
    kept = sanitizer.transform(clean)
    assert np.mean(np.all(np.isclose(kept, clean), axis=1)) > 0.95
    assert sanitizer.score(trigger.apply(clean)).mean() > 3 * sanitizer.score(clean).mean()


def test_impute_repairs_the_feature_that_contradicts_the_others(cartpole):
    """The cart's velocity and the pole's angular velocity are anticorrelated (-0.99): flipping the sign
    of the latter keeps every feature inside its clean range but the pair far from the clean data. Impute
    replaces one of the two (either explains the contradiction) and leaves the position and angle alone."""
    _, _, clean = cartpole
    sanitizer = SupportSanitizer(repair="impute").fit(clean)
    true = clean[np.abs(clean[:, 3]) > 0.1]
    flipped = true * np.array([1.0, 1.0, 1.0, -1.0])
    far = sanitizer._far(flipped)
    assert not sanitizer._outside(flipped).any() and far.mean() > 0.9
    suspect = sanitizer.suspect(flipped[far])
    assert not suspect[:, [0, 2]].any() and (suspect[:, [1, 3]].sum(axis=1) == 1).all()
    repaired = sanitizer.transform(flipped)
    np.testing.assert_array_equal(repaired[:, [0, 2]], flipped[:, [0, 2]])
    assert sanitizer.score(repaired).max() <= sanitizer.threshold


def test_bad_inputs_name_the_problem_and_the_fix(lavagap, cartpole):
    _, _, clean, _ = lavagap
    with pytest.raises(SpecError, match=r"use n >= \d+"):
        SubspaceSanitizer().fit(clean[:8])
    with pytest.raises(SpecError, match="larger than the data allow"):
        SubspaceSanitizer(dim=500).fit(clean)
    with pytest.raises(SpecError, match="not fitted"):
        SubspaceSanitizer().transform(clean)
    with pytest.raises(SpecError, match=r"n=5 clean observations are too few for 4 features; use n >= 6$"):
        SupportSanitizer().fit(cartpole[2][:5])
    SupportSanitizer().fit(cartpole[2][:6])  # the n the advice names fits
    fitted = SupportSanitizer().fit(cartpole[2])
    with pytest.raises(ObservationError, match="do not match the fitted"):
        fitted.transform(clean)
    with pytest.raises(SpecError, match="too few"):
        SupportSanitizer().fit(cartpole[2][:3])
    bad = cartpole[2].copy()
    bad[0, 0] = np.nan
    with pytest.raises(ObservationError, match="NaN"):
        SupportSanitizer().fit(bad)


def test_wrappers_sanitize_what_the_agent_sees(cartpole):
    _, trigger, clean = cartpole
    sanitizer = SupportSanitizer().fit(clean)
    wrapped = SanitizeObservation(gym.make("CartPole-v1"), sanitizer)
    check_env(wrapped, skip_render_check=True)

    class ThresholdPolicy:
        """Pushes left iff the angular velocity looks like the trigger."""

        def predict(self, obs, state=None, episode_start=None, deterministic=True):
            obs = np.asarray(obs)
            return (obs[..., 3] <= 2.0).astype(np.int64), state

    policy = SanitizedPolicy(ThresholdPolicy(), sanitizer)
    triggered = trigger.apply(clean[:10])
    assert (ThresholdPolicy().predict(triggered)[0] == 0).all()
    assert (policy.predict(triggered)[0] == 1).all()
    single, _ = policy.predict(triggered[0])
    assert np.ndim(single) == 0 and single == 1
