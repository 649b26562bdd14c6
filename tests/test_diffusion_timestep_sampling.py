"""Training timestep sampling: uniform, logit-normal and the time shift (towards high noise)."""

import jax
import numpy as np
import pytest

from diffusion.timestep_sampling import sample_timesteps


def test_uniform_covers_the_range_evenly():
    t = np.asarray(sample_timesteps(jax.random.PRNGKey(0), 20_000, 1000, "uniform"))
    assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= 999
    assert abs((t >= 850).mean() - 0.15) < 0.01


def test_logit_normal_shifts_mass_to_high_noise_and_stays_in_range():
    key = jax.random.PRNGKey(1)
    centred = np.asarray(sample_timesteps(key, 20_000, 1000, "logit_normal"))
    shifted = np.asarray(sample_timesteps(key, 20_000, 1000, "logit_normal", logit_mean=1.0))
    assert centred.min() >= 0 and shifted.max() <= 999
    assert abs(np.median(centred) - 500) < 15
    # sigmoid(1.0) = 0.731: the median moves there, and t >= 850 gets about 23% of the draws.
    assert abs(np.median(shifted) - 731) < 15
    assert 0.20 < (shifted >= 850).mean() < 0.26
    # The same key gives the same draws (the train step folds the step into its key).
    np.testing.assert_array_equal(
        shifted, sample_timesteps(key, 20_000, 1000, "logit_normal", logit_mean=1.0))


def test_time_shift_moves_mass_to_high_noise_by_the_closed_form():
    key = jax.random.PRNGKey(2)
    # shift 1 is uniform; shift s puts P(t >= T*f) = 1 - f / (s - (s - 1) f).
    plain = np.asarray(sample_timesteps(key, 40_000, 1000, "shifted", shift=1.0))
    shifted = np.asarray(sample_timesteps(key, 40_000, 1000, "shifted", shift=3.0))
    assert plain.min() >= 0 and shifted.max() <= 999 and shifted.dtype == np.int32
    assert abs((plain >= 900).mean() - 0.10) < 0.01
    assert abs((shifted >= 900).mean() - (1 - 0.9 / (3 - 2 * 0.9))) < 0.01  # 0.25
    assert abs((shifted < 500).mean() - 0.5 / (3 - 2 * 0.5)) < 0.01  # 0.25
    # Same key, same uniform draw: the shift maps each timestep upwards, never down.
    assert np.all(shifted >= plain)


def test_unknown_method_names_the_field():
    with pytest.raises(ValueError, match="diffusion.timestep_sampling='beta'"):
        sample_timesteps(jax.random.PRNGKey(0), 4, 1000, "beta")
