import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion.guidance import classifier_free_guidance, rescale_guidance
from diffusion.loss import diffusion_loss, min_snr_weight
from diffusion.parameterization import (
    PREDICTION_TYPES,
    add_noise,
    check_prediction_type,
    predict_x0_and_eps,
    snr,
    training_target,
)
from diffusion.schedules import NoiseSchedule, make_schedule

BATCH_SHAPE = (4, 8, 8, 3)


def _normal(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _schedule_from_alphas_cumprod(values):
    alphas_cumprod = np.asarray(values, dtype=np.float64)
    alphas = alphas_cumprod / np.concatenate([[1.0], alphas_cumprod[:-1]])
    return NoiseSchedule(
        betas=jnp.asarray(1.0 - alphas, jnp.float32),
        alphas=jnp.asarray(alphas, jnp.float32),
        alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
    )


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.uniform(-1.0, 1.0, BATCH_SHAPE), jnp.float32)
    noise = _normal(rng, BATCH_SHAPE)
    t = jnp.array([0, 10, 500, 999], jnp.int32)
    return x0, noise, t


def test_add_noise_broadcasts_per_example_timesteps(data):
    x0, noise, t = data
    schedule = make_schedule("linear")
    x_t = add_noise(schedule, x0, noise, t)
    assert x_t.shape == x0.shape and x_t.dtype == x0.dtype
    for index in range(len(t)):
        a = float(schedule.alphas_cumprod[int(t[index])])
        expected = np.sqrt(a) * x0[index] + np.sqrt(1 - a) * noise[index]
        np.testing.assert_allclose(x_t[index], expected, atol=1e-6)
    # A scalar t applies to every example.
    np.testing.assert_allclose(add_noise(schedule, x0, noise, 500)[2], x_t[2], atol=1e-6)


def test_v_target_definition(data):
    x0, noise, t = data
    schedule = make_schedule("cosine")
    a = np.asarray(schedule.alphas_cumprod)[np.asarray(t)].reshape(-1, 1, 1, 1)
    expected = np.sqrt(a) * noise - np.sqrt(1 - a) * x0
    target = training_target("v_prediction", schedule, x0, noise, t)
    np.testing.assert_allclose(target, expected, atol=1e-6)
    assert training_target("epsilon", schedule, x0, noise, t) is noise
    assert training_target("sample", schedule, x0, noise, t) is x0


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("schedule_name", ["linear", "scaled_linear", "cosine"])
def test_target_then_predict_round_trip(data, prediction_type, schedule_name):
    x0, noise, t = data
    if prediction_type == "sample":
        # eps = (x_t - sqrt(a) x0) / sqrt(1 - a) amplifies rounding where 1 - a is tiny.
        t = jnp.array([5, 10, 500, 999], jnp.int32)
    schedule = make_schedule(schedule_name, 1000, 0.00085, 0.012)
    x_t = add_noise(schedule, x0, noise, t)
    target = training_target(prediction_type, schedule, x0, noise, t)
    x0_hat, eps_hat = predict_x0_and_eps(prediction_type, schedule, target, x_t, t)
    # Where alphas_cumprod is tiny, eps-prediction recovers x0 only up to rounding amplified
    # by 1 / sqrt(alphas_cumprod); allow exactly that much per example.
    a = np.asarray(schedule.alphas_cumprod)[np.asarray(t)].reshape(-1, 1, 1, 1)
    assert np.all(np.abs(np.asarray(x0_hat) - np.asarray(x0)) <= 1e-5 + 1e-6 / np.sqrt(a))
    np.testing.assert_allclose(eps_hat, noise, atol=1e-4)


def test_v_prediction_round_trip_with_zero_terminal_snr(data):
    x0, noise, _ = data
    schedule = make_schedule("linear", rescale_zero_terminal_snr=True)
    t = jnp.full((BATCH_SHAPE[0],), 999, jnp.int32)
    x_t = add_noise(schedule, x0, noise, t)
    np.testing.assert_allclose(x_t, noise, atol=1e-6)
    target = training_target("v_prediction", schedule, x0, noise, t)
    x0_hat, eps_hat = predict_x0_and_eps("v_prediction", schedule, target, x_t, t)
    np.testing.assert_allclose(x0_hat, x0, atol=1e-5)
    np.testing.assert_allclose(eps_hat, noise, atol=1e-5)


def test_snr_values():
    schedule = _schedule_from_alphas_cumprod([0.9, 0.5, 0.1])
    np.testing.assert_allclose(snr(schedule, jnp.arange(3)), [9.0, 1.0, 1.0 / 9.0], rtol=1e-5)
    assert float(snr(schedule, 1)) == pytest.approx(1.0)


def test_unknown_prediction_type():
    with pytest.raises(ValueError, match=r"diffusion\.prediction_type.*v_prediction"):
        check_prediction_type("v")
    with pytest.raises(ValueError, match=r"diffusion\.prediction_type"):
        training_target("x0", make_schedule("linear", 10), jnp.zeros(2), jnp.zeros(2), 0)


# --- loss ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_loss_is_zero_at_the_target(data, prediction_type, weighting):
    x0, noise, t = data
    schedule = make_schedule("scaled_linear", 1000, 0.00085, 0.012)
    target = training_target(prediction_type, schedule, x0, noise, t)
    loss, per_example = diffusion_loss(
        prediction_type, schedule, target, x0, noise, t, weighting=weighting
    )
    assert per_example.shape == (BATCH_SHAPE[0],)
    assert float(loss) == pytest.approx(0.0, abs=1e-10)


def test_unweighted_loss_is_mse(data):
    x0, noise, t = data
    schedule = make_schedule("linear")
    model_output = noise + 0.5
    loss, per_example = diffusion_loss("epsilon", schedule, model_output, x0, noise, t)
    np.testing.assert_allclose(per_example, 0.25, rtol=1e-6)
    assert float(loss) == pytest.approx(0.25, rel=1e-6)


# SNR = 9, 1, 1/9 with gamma = 5: x0-space weights min(SNR, 5) = 5, 1, 1/9; eps divides by SNR,
# v by SNR + 1.
@pytest.mark.parametrize(
    "prediction_type, expected",
    [
        ("epsilon", [5.0 / 9.0, 1.0, 1.0]),
        ("v_prediction", [0.5, 0.5, 0.1]),
        ("sample", [5.0, 1.0, 1.0 / 9.0]),
    ],
)
def test_min_snr_hand_computed(prediction_type, expected):
    schedule = _schedule_from_alphas_cumprod([0.9, 0.5, 0.1])
    t = jnp.arange(3)
    x0 = jnp.zeros((3, 2, 2, 1))
    noise = jnp.ones((3, 2, 2, 1))
    target = training_target(prediction_type, schedule, x0, noise, t)
    # An error of 1 everywhere makes each per-example loss equal its weight.
    loss, per_example = diffusion_loss(
        prediction_type,
        schedule,
        target + 1.0,
        x0,
        noise,
        t,
        weighting="min_snr",
        min_snr_gamma=5.0,
    )
    np.testing.assert_allclose(per_example, expected, rtol=1e-5)
    assert float(loss) == pytest.approx(np.mean(expected), rel=1e-5)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_min_snr_weights_bounded_and_finite(prediction_type):
    schedule = make_schedule("linear", rescale_zero_terminal_snr=True)  # SNR 0 at t = 999
    snr_values = snr(schedule, jnp.arange(1000))
    weights = np.asarray(min_snr_weight(prediction_type, snr_values, 5.0))
    assert np.all(np.isfinite(weights))
    assert np.all(weights >= 0)
    bound = 5.0 if prediction_type == "sample" else 1.0
    assert np.all(weights <= bound + 1e-6)
    # Noisy timesteps (SNR < gamma) keep the eps loss unweighted.
    if prediction_type == "epsilon":
        assert weights[-1] == pytest.approx(1.0)
        assert weights[800] == pytest.approx(1.0)


def test_min_snr_eps_and_v_agree_in_x0_space(data):
    """Min-SNR is one objective: the eps and v parameterizations must weight the same x0 error."""
    x0, noise, t = data
    schedule = make_schedule("cosine")
    x_t = add_noise(schedule, x0, noise, t)
    x0_hat = x0 + 0.1 * jnp.sin(7 * x0)
    a = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    eps_hat = (x_t - jnp.sqrt(a) * x0_hat) / jnp.sqrt(1 - a)
    v_hat = jnp.sqrt(a) * eps_hat - jnp.sqrt(1 - a) * x0_hat
    _, eps_loss = diffusion_loss("epsilon", schedule, eps_hat, x0, noise, t, weighting="min_snr")
    _, v_loss = diffusion_loss("v_prediction", schedule, v_hat, x0, noise, t, weighting="min_snr")
    _, x0_loss = diffusion_loss("sample", schedule, x0_hat, x0, noise, t, weighting="min_snr")
    np.testing.assert_allclose(eps_loss, x0_loss, rtol=2e-3, atol=1e-8)
    np.testing.assert_allclose(v_loss, x0_loss, rtol=2e-3, atol=1e-8)


def test_loss_mask(data):
    x0, noise, t = data
    schedule = make_schedule("linear")
    model_output = noise + jnp.arange(4.0).reshape(-1, 1, 1, 1)
    mask = jnp.array([1.0, 1.0, 0.0, 0.0])
    loss, per_example = diffusion_loss("epsilon", schedule, model_output, x0, noise, t, mask=mask)
    np.testing.assert_allclose(per_example, [0.0, 1.0, 4.0, 9.0], atol=1e-6)
    assert float(loss) == pytest.approx(0.5)
    empty, _ = diffusion_loss("epsilon", schedule, model_output, x0, noise, t, mask=jnp.zeros(4))
    assert float(empty) == 0.0


def test_loss_in_float32_for_bfloat16_outputs(data):
    x0, noise, t = data
    schedule = make_schedule("linear")
    loss, per_example = diffusion_loss(
        "epsilon", schedule, (noise + 0.5).astype(jnp.bfloat16), x0, noise, t
    )
    assert loss.dtype == jnp.float32 and per_example.dtype == jnp.float32
    assert float(loss) == pytest.approx(0.25, rel=1e-2)


def test_loss_rejects_unknown_weighting(data):
    x0, noise, t = data
    with pytest.raises(ValueError, match=r"diffusion\.loss_weighting.*min_snr"):
        diffusion_loss("epsilon", make_schedule("linear"), noise, x0, noise, t, weighting="snr")


def test_loss_jits_and_differentiates(data):
    x0, noise, t = data
    schedule = make_schedule("cosine")

    @jax.jit
    def loss_of(scale, schedule, t):
        target = training_target("v_prediction", schedule, x0, noise, t)
        output = scale * target
        return diffusion_loss("v_prediction", schedule, output, x0, noise, t, weighting="min_snr")[
            0
        ]

    grad = jax.grad(loss_of)(1.0, schedule, t)
    assert float(grad) == pytest.approx(0.0, abs=1e-6)
    assert np.isfinite(float(jax.grad(loss_of)(0.5, schedule, t)))


# --- classifier-free guidance -------------------------------------------------------------


def test_cfg_scales():
    rng = np.random.default_rng(1)
    cond = _normal(rng, BATCH_SHAPE)
    uncond = _normal(rng, BATCH_SHAPE)
    np.testing.assert_allclose(classifier_free_guidance(cond, uncond, 1.0), cond, atol=1e-6)
    np.testing.assert_allclose(classifier_free_guidance(cond, uncond, 0.0), uncond, atol=1e-6)
    np.testing.assert_allclose(
        classifier_free_guidance(cond, uncond, 7.5), uncond + 7.5 * (cond - uncond), atol=1e-5
    )
    per_example_scale = jnp.array([0.0, 1.0, 2.0, 3.0]).reshape(-1, 1, 1, 1)
    guided = classifier_free_guidance(cond, uncond, per_example_scale)
    np.testing.assert_allclose(guided[1], cond[1], atol=1e-6)
    np.testing.assert_allclose(guided[3], 3 * cond[3] - 2 * uncond[3], atol=1e-5)
    traced = jax.jit(classifier_free_guidance)(cond, uncond, 7.5)
    np.testing.assert_allclose(traced, uncond + 7.5 * (cond - uncond), atol=1e-5)


def test_guidance_rescale():
    rng = np.random.default_rng(2)
    cond = _normal(rng, BATCH_SHAPE)
    uncond = 0.5 * _normal(rng, BATCH_SHAPE)
    guided = classifier_free_guidance(cond, uncond, 7.5)
    fully = classifier_free_guidance(cond, uncond, 7.5, guidance_rescale=1.0)
    np.testing.assert_allclose(
        np.std(fully, axis=(1, 2, 3)), np.std(cond, axis=(1, 2, 3)), rtol=1e-5
    )
    half = classifier_free_guidance(cond, uncond, 7.5, guidance_rescale=0.5)
    np.testing.assert_allclose(half, 0.5 * (guided + fully), atol=1e-5)
    np.testing.assert_allclose(rescale_guidance(guided, cond, 0.0), guided, atol=1e-6)
    constant = rescale_guidance(jnp.ones(BATCH_SHAPE), cond, 1.0)
    assert np.all(np.isfinite(constant))
