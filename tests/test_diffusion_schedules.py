import numpy as np
import pytest

from diffusion.schedules import SCHEDULES, NoiseSchedule, make_schedule


@pytest.mark.parametrize("name", SCHEDULES)
def test_shapes_dtypes_and_monotonic(name):
    schedule = make_schedule(name, 1000, 0.00085, 0.012)
    assert isinstance(schedule, NoiseSchedule)
    assert schedule.num_train_timesteps == 1000
    for array in schedule:
        assert array.shape == (1000,)
        assert array.dtype == np.float32
    alphas_cumprod = np.asarray(schedule.alphas_cumprod)
    assert np.all(np.diff(alphas_cumprod) < 0)
    assert 0.0 < alphas_cumprod[-1] < alphas_cumprod[0] < 1.0
    np.testing.assert_allclose(schedule.alphas, 1.0 - np.asarray(schedule.betas), atol=1e-7)


def test_linear_endpoints_match_ddpm_paper():
    schedule = make_schedule("linear")
    assert float(schedule.betas[0]) == pytest.approx(1e-4)
    assert float(schedule.betas[-1]) == pytest.approx(0.02)
    assert float(schedule.alphas_cumprod[0]) == pytest.approx(0.9999)
    # DDPM's 1000-step linear schedule ends at sqrt(alpha_bar_T) ~= 0.00635.
    assert float(schedule.alphas_cumprod[-1]) == pytest.approx(4.0358e-5, rel=1e-3)


def test_scaled_linear_is_linear_in_sqrt_beta():
    schedule = make_schedule("scaled_linear", 1000, 0.00085, 0.012)
    sqrt_betas = np.sqrt(np.asarray(schedule.betas, dtype=np.float64))
    np.testing.assert_allclose(np.diff(sqrt_betas, 2), 0.0, atol=1e-6)
    assert float(schedule.betas[0]) == pytest.approx(0.00085)
    assert float(schedule.betas[-1]) == pytest.approx(0.012)
    # Stable Diffusion's final alpha_bar.
    assert float(schedule.alphas_cumprod[-1]) == pytest.approx(0.0046601, rel=1e-4)


def test_cosine_follows_alpha_bar_and_caps_beta():
    schedule = make_schedule("cosine", 1000)
    fractions = np.arange(1, 1001) / 1000

    def alpha_bar(fraction):
        return np.cos((fraction + 0.008) / 1.008 * np.pi / 2) ** 2

    expected = alpha_bar(fractions) / alpha_bar(0.0)
    # Before the cap kicks in at the very end, alphas_cumprod is the closed form.
    np.testing.assert_allclose(schedule.alphas_cumprod[:-1], expected[:-1], rtol=1e-4, atol=1e-7)
    assert float(schedule.betas[-1]) == pytest.approx(0.999)
    assert float(np.max(schedule.betas)) <= 0.999 + 1e-7


def test_zero_terminal_snr_rescale():
    plain = make_schedule("scaled_linear", 1000, 0.00085, 0.012)
    rescaled = make_schedule("scaled_linear", 1000, 0.00085, 0.012, rescale_zero_terminal_snr=True)
    assert float(rescaled.alphas_cumprod[-1]) == 0.0
    assert float(rescaled.alphas_cumprod[0]) == pytest.approx(float(plain.alphas_cumprod[0]))
    assert np.all(np.diff(np.asarray(rescaled.alphas_cumprod)) <= 0)


def test_unknown_schedule_names_field_and_choices():
    with pytest.raises(ValueError, match=r"diffusion\.schedule.*linear.*scaled_linear.*cosine"):
        make_schedule("squaredcos")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_train_timesteps": 1},
        {"num_train_timesteps": 10.0},
        {"beta_start": 0.0},
        {"beta_start": 0.03, "beta_end": 0.02},
        {"beta_end": 1.0},
    ],
)
def test_bad_schedule_arguments(kwargs):
    with pytest.raises(ValueError, match=r"diffusion\."):
        make_schedule("linear", **kwargs)
