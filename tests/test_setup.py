"""build_run's checks and wiring that need no compiled step: batch split errors, the precision
policy, config fields reaching the networks, schedules, sharding rules, the peak-FLOPs table."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.factory import build_frozen_text_encoder, build_unet
from tests.train_runs import tiny_config
from train.mfu import (
    attention_flops,
    jaxpr_matmul_flops,
    measured_matmul_peak,
    peak_flops_per_device,
)
from train.setup import build_run
from train.sharding import make_mesh, mesh_spec, param_shardings
from train.state import learning_rate_schedule


@pytest.mark.parametrize("batch, accum, message", [
    (12, 1, r"global_batch_size=12 must be divisible by the data-parallel size 8"),
    (16, 4, r"global_batch_size=16 must be divisible by .* x train.grad_accum_steps=4"),
])
def test_batch_that_does_not_divide_fails_before_compiling(batch, accum, message):
    config = tiny_config(train__global_batch_size=batch, train__grad_accum_steps=accum)
    with pytest.raises(ValueError, match=message):
        build_run(config, make_mesh(config.mesh.shape), workdir=None)


def test_bfloat16_policy_compute_in_bf16_state_in_f32():
    config = tiny_config(model__dtype="bfloat16")
    run = build_run(config, make_mesh(config.mesh.shape), workdir=None, init=False,
                    compile=False)
    # The text encoder computes in bf16 from float32 parameters.
    assert {x.dtype for x in jax.tree_util.tree_leaves(run.text_params)} == {np.dtype(np.float32)}
    ids = jnp.asarray(run.tokenizer(["a red circle"]))
    cond = jax.eval_shape(run.encode_text, run.text_params, ids)
    assert cond["hidden"].dtype == jnp.bfloat16
    # Parameters, optimizer state, EMA (and so gradients and updates) stay float32.
    new_state, metrics = jax.eval_shape(
        run.train_step, run.abstract_state, run.text_params, run.abstract_batch)
    floats = [x.dtype for x in jax.tree_util.tree_leaves(
        (new_state.params, new_state.opt_state, new_state.ema_params))
        if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and set(floats) == {np.dtype(np.float32)}
    assert metrics["loss"].dtype == jnp.float32


def test_config_fields_reach_the_networks():
    config = tiny_config(model__dtype="bfloat16")
    config.model.unet.remat = True
    unet = nnx.eval_shape(lambda: build_unet(config.model, nnx.Rngs(0)))
    assert unet.down_blocks[0].remat and unet.mid_block.attentions[0].remat
    assert unet.dtype == jnp.bfloat16
    _, graphdef, params = build_frozen_text_encoder(config.model)
    encoder = nnx.merge(graphdef, params)
    assert encoder.final_layer_norm.dtype == jnp.bfloat16


@pytest.mark.parametrize("decay, middle, end", [
    ("cosine", 0.5 * (1 + 0.05), 0.05),
    ("linear", 0.5 * (1 + 0.05), 0.05),
    ("constant", 1.0, 1.0),
])
def test_learning_rate_schedules(decay, middle, end):
    optim = tiny_config().optim
    optim.learning_rate, optim.warmup_steps, optim.decay = 2.0, 10, decay
    optim.end_learning_rate_factor = 0.05
    lr = learning_rate_schedule(optim, num_train_steps=110)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(5)), 1.0, rtol=1e-6)  # linear warmup
    np.testing.assert_allclose(float(lr(10)), 2.0, rtol=1e-6)
    np.testing.assert_allclose(float(lr(60)), 2.0 * middle, rtol=1e-5)
    np.testing.assert_allclose(float(lr(110)), 2.0 * end, rtol=1e-5)


def test_rules_map_logical_names_to_mesh_axes():
    mesh = make_mesh([("data", 2), ("fsdp", 4)])
    rules = (("embed", "fsdp"), ("mlp", None))
    assert mesh_spec((None, None, "embed", "mlp"), (3, 3, 32, 64), mesh, rules) == \
        jax.sharding.PartitionSpec(None, None, "fsdp")
    # A dimension that does not divide stays whole; so does an axis the mesh lacks.
    assert mesh_spec((None, None, "embed", "mlp"), (3, 3, 14, 64), mesh, rules) == \
        jax.sharding.PartitionSpec()
    assert mesh_spec(("embed", "mlp"), (8, 8), make_mesh([("data", -1)]), rules) == \
        jax.sharding.PartitionSpec()
    # Mapping "mlp" instead shards the output features: the rules decide, not the model.
    assert mesh_spec(("embed", "mlp"), (14, 64), mesh, (("mlp", "fsdp"),)) == \
        jax.sharding.PartitionSpec(None, "fsdp")


def test_param_shardings_for_a_model_follow_the_rules():
    config = tiny_config()
    unet = nnx.eval_shape(lambda: build_unet(config.model, nnx.Rngs(0)))
    mesh = make_mesh([("data", 1), ("fsdp", 8)])
    shardings = param_shardings(mesh, unet, config.mesh.rules)
    kernel = shardings["down_blocks"][0]["resnets"][0]["conv1"]["kernel"].get_value()
    assert kernel.spec == jax.sharding.PartitionSpec(None, None, "fsdp")
    bias = shardings["down_blocks"][0]["resnets"][0]["conv1"]["bias"].get_value()
    assert bias.is_fully_replicated
    _, _, text_params = build_frozen_text_encoder(config.model)
    text = param_shardings(mesh, text_params, config.mesh.rules)
    table = text["embeddings"]["token_embedding"]["embedding"].get_value()
    assert table.spec == jax.sharding.PartitionSpec(None, "fsdp")


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-40GB", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12),
    ("cpu", None),
])
def test_peak_flops_table(kind, peak):
    assert peak_flops_per_device(types.SimpleNamespace(device_kind=kind)) == peak


def test_measured_matmul_peak_is_a_plausible_rate():
    peak = measured_matmul_peak(size=256, repeats=3)
    assert 1e8 < peak < 1e14


def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_model_flops_of_dots_and_convolutions():
    count = lambda f, *args: jaxpr_matmul_flops(jax.make_jaxpr(f)(*args))
    a, b = jnp.ones((3, 4)), jnp.ones((4, 5))
    assert count(jnp.matmul, a, b) == 2 * 3 * 4 * 5
    batched = jnp.ones((7, 3, 4))
    assert count(lambda x: jnp.einsum("bij,bkj->bik", x, x), batched) == 2 * 7 * 3 * 3 * 4
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 5))
    forward = count(_conv, x, w)
    assert forward == 2 * (2 * 8 * 8 * 5) * (3 * 3 * 3)
    # The backward pass: an input-gradient and a weight-gradient convolution, each the
    # forward's size.
    assert count(jax.grad(lambda x, w: _conv(x, w).sum(), (0, 1)), x, w) == 3 * forward
    grouped = jnp.ones((3, 3, 1, 6))  # depthwise-style: 3 groups of 1 input feature
    assert count(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=3), x, grouped) == 2 * (2 * 8 * 8 * 6) * (3 * 3 * 1)


def test_model_flops_through_nested_jaxprs():
    count = lambda f, *args: jaxpr_matmul_flops(jax.make_jaxpr(f)(*args))
    a = jnp.ones((4, 4))
    one = 2 * 4 * 4 * 4
    assert count(jax.jit(lambda x: x @ x), a) == one
    assert count(jax.checkpoint(lambda x: x @ x), a) == one
    assert count(lambda x: jax.lax.scan(lambda c, _: (c @ c, None), x, None, length=5)[0],
                 a) == 5 * one
    # A cond runs one branch: its costliest is counted.
    assert count(lambda p, x: jax.lax.cond(p, lambda x: x @ x @ x, lambda x: x, x),
                 True, a) == 2 * one


@pytest.mark.parametrize("layout", [0, 1])
def test_fused_attention_flops(layout):
    batch, queries, keys, heads, head_dim = 2, 64, 16, 4, 8
    order = (lambda t: (batch, t, heads, head_dim)) if layout == 0 else (
        lambda t: (batch, heads, t, head_dim))
    forward = attention_flops("dot_product_attention_fwd_wrapper", order(queries), order(keys),
                              layout)
    # Q K^T and P V: 2 products of batch x heads x queries x keys x head_dim multiply-adds.
    assert forward == 2 * 2 * batch * heads * queries * keys * head_dim
    assert attention_flops("dot_product_attention_bwd_wrapper", order(queries), order(keys),
                           layout) == 2 * forward


def test_model_flops_leave_out_remat_recomputation():
    figures = []
    for remat in (False, True):
        config = tiny_config()
        config.model.unet.remat = remat
        run = build_run(config, make_mesh(config.mesh.shape), workdir=None, init=False,
                        compile=False)
        figures.append(run.figures["model_flops_per_step_per_device"])
    # Remat recomputes the forward pass in the backward one; MFU counts the model's work once.
    assert figures[0] == figures[1] > 0
