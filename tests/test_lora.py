"""LoRA: surgery, the training split, merging, and files that PyTorch tools read and write.

References are diffusers' PyTorch pipeline with peft: a tiny random SD 1.x pipeline
(`tests/tiny_sd.py`) loads our exported file with `load_lora_weights`, and reads kohya-named
files with its own conversion code, so our naming is checked against the code users run.
Everything runs eagerly on tiny models: no XLA compile per LoRA variant.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import lora as lora_lib
from models.hf_weights import load_torch_state_dict, read_safetensors
from models.text_encoder import CLIPTextTransformer
from models.unet import UNet2DConditionModel, unet_kwargs_from_diffusers_config
from tests.tiny_sd import LATENT_CHANNELS, LATENT_SIZE, TEXT_WIDTH, build_tiny_sd_pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

UNET_RANK, UNET_ALPHA = 2, 6.0  # scale 3: a file that dropped alpha could not match
TEXT_RANK, TEXT_ALPHA = 2, 1.0
# proj_in is a 1x1 conv in SD 1.x: LoRA on convs goes through the same files.
UNET_TARGETS = (*lora_lib.DEFAULT_TARGETS, "proj_in")
_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    path = build_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sd"), version="1.x")
    unet_config = json.loads((path / "unet" / "config.json").read_text())
    text_config = json.loads((path / "text_encoder" / "config.json").read_text())
    rng = np.random.default_rng(0)
    return {
        "path": path,
        "unet_kwargs": unet_kwargs_from_diffusers_config(unet_config),
        "unet_state": read_safetensors(path / "unet" / "diffusion_pytorch_model.safetensors"),
        "text_kwargs": {key: text_config[key] for key in _TEXT_FIELDS},
        "text_state": {k.removeprefix("text_model."): v for k, v in
                       read_safetensors(path / "text_encoder").items()
                       if k != "text_model.embeddings.position_ids"},
        "sample": rng.standard_normal((2, LATENT_SIZE, LATENT_SIZE, LATENT_CHANNELS),
                                      dtype=np.float32),
        "timesteps": np.array([10, 700]),
        "context": rng.standard_normal((2, 7, TEXT_WIDTH), dtype=np.float32),
        "input_ids": rng.integers(0, text_config["vocab_size"] - 1, (2, 9)),
    }


def _unet(sd):
    module = nnx.eval_shape(lambda: UNet2DConditionModel(**sd["unet_kwargs"], rngs=nnx.Rngs(0)))
    load_torch_state_dict(module, sd["unet_state"])
    return module


def _text_encoder(sd):
    module = nnx.eval_shape(lambda: CLIPTextTransformer(**sd["text_kwargs"], rngs=nnx.Rngs(0)))
    load_torch_state_dict(module, sd["text_state"])
    return module


def _run_unet(module, sd):
    return np.asarray(module(jnp.asarray(sd["sample"]), jnp.asarray(sd["timesteps"]),
                             jnp.asarray(sd["context"])))


def _run_text(module, sd):
    return np.asarray(module(jnp.asarray(sd["input_ids"])))


def _randomise_lora(module, seed):
    """Non-zero A and B everywhere (B starts at zero, which would hide a wrong B layout)."""
    rng = np.random.default_rng(seed)
    for _, variable in nnx.to_flat_state(nnx.state(module, lora_lib.LORA_PARAMS)):
        variable.set_value(jnp.asarray(0.3 * rng.standard_normal(variable.shape), jnp.float32))


def _torch_unet_out(unet, sd):
    with torch.no_grad():
        out = unet(torch.from_numpy(sd["sample"]).permute(0, 3, 1, 2),
                   torch.from_numpy(sd["timesteps"]), torch.from_numpy(sd["context"])).sample
    return out.permute(0, 2, 3, 1).numpy()


def _torch_text_out(text_encoder, sd):
    with torch.no_grad():
        return text_encoder(torch.from_numpy(sd["input_ids"])).last_hidden_state.numpy()


@pytest.fixture(scope="module")
def trained(sd):
    """Our UNet and text encoder with random non-zero LoRA factors, and their outputs."""
    unet, text = _unet(sd), _text_encoder(sd)
    base_unet_out, base_text_out = _run_unet(unet, sd), _run_text(text, sd)
    lora_lib.apply_lora(unet, rank=UNET_RANK, alpha=UNET_ALPHA, targets=UNET_TARGETS,
                        rngs=nnx.Rngs(1))
    lora_lib.apply_lora(text, rank=TEXT_RANK, alpha=TEXT_ALPHA,
                        targets=lora_lib.TEXT_ENCODER_TARGETS, rngs=nnx.Rngs(2))
    _randomise_lora(unet, 3)
    _randomise_lora(text, 4)
    out = {"unet": unet, "text": text, "unet_out": _run_unet(unet, sd),
           "text_out": _run_text(text, sd)}
    # Otherwise every comparison below could pass with the adapters ignored.
    assert np.abs(out["unet_out"] - base_unet_out).max() > 0.05
    assert np.abs(out["text_out"] - base_text_out).max() > 0.05
    return out


def test_fresh_adapters_change_nothing_and_split_out_alone(sd):
    unet = _unet(sd)
    plain_tree = jax.tree.structure(nnx.state(unet))
    before = _run_unet(unet, sd)
    wrapped = lora_lib.apply_lora(unet, rank=4, alpha=8.0, rngs=nnx.Rngs(0))

    reference = diffusers.UNet2DConditionModel.from_pretrained(sd["path"] / "unet")
    attentions = [m for m in reference.modules()
                  if isinstance(m, diffusers.models.attention_processor.Attention)]
    projections = [getattr(a, name) for a in attentions for name in ("to_q", "to_k", "to_v")]
    projections += [a.to_out[0] for a in attentions]
    assert wrapped == len(projections) == 4 * len(attentions) > 0
    np.testing.assert_array_equal(_run_unet(unet, sd), before)

    graphdef, base, lora = lora_lib.split_lora(unet)
    expected = sum(4 * (p.in_features + p.out_features) for p in projections)
    assert lora_lib.count_params(lora) == expected
    # The frozen base is the plain model's state as it is: pretrained weights slot in.
    assert jax.tree.structure(base) == plain_tree
    assert lora_lib.count_params(base) == sum(v.size for v in sd["unet_state"].values())

    rebuilt = nnx.merge(graphdef, lora_lib.merge_params(base, lora))
    np.testing.assert_array_equal(_run_unet(rebuilt, sd), before)


def test_lora_forward_equals_merged_forward(sd, trained):
    unet = _unet(sd)
    wrapped = lora_lib.apply_lora(unet, rank=UNET_RANK, alpha=UNET_ALPHA, targets=UNET_TARGETS,
                                  rngs=nnx.Rngs(1))
    nnx.update(unet, nnx.state(trained["unet"], lora_lib.LORA_PARAMS))
    assert lora_lib.merge_lora(unet) == wrapped
    assert not nnx.to_flat_state(nnx.state(unet, lora_lib.LORA_PARAMS))
    assert jax.tree.structure(nnx.state(unet)) == jax.tree.structure(nnx.state(_unet(sd)))
    np.testing.assert_allclose(_run_unet(unet, sd), trained["unet_out"], atol=2e-5, rtol=1e-5)


def test_gradients_reach_the_lora_factors_only(sd):
    text = _text_encoder(sd)
    lora_lib.apply_lora(text, rank=TEXT_RANK, alpha=TEXT_ALPHA,
                        targets=lora_lib.TEXT_ENCODER_TARGETS, rngs=nnx.Rngs(0))
    graphdef, base, lora = lora_lib.split_lora(text)
    input_ids = jnp.asarray(sd["input_ids"])

    @jax.jit
    def grads(lora_params, base_params):
        loss = lambda params: jnp.mean(nnx.merge(graphdef, base_params, params)(input_ids) ** 2)
        return jax.grad(loss)(lora_params)

    grad = grads(lora, base)
    layers = sd["text_kwargs"]["num_hidden_layers"]
    assert len(nnx.to_flat_state(grad)) == 2 * 4 * layers  # A and B of q, k, v, out per layer
    # At init B = 0, so only B gets a gradient; A's is exactly zero.
    for path, value in nnx.to_flat_state(grad):
        magnitude = float(jnp.abs(value.get_value()).max())
        assert (magnitude > 0) == (path[-1] == "lora_b"), path


def _lora_states(trained):
    return (nnx.state(trained["unet"], lora_lib.LORA_PARAMS),
            nnx.state(trained["text"], lora_lib.LORA_PARAMS))


def _pipeline(sd):
    return diffusers.StableDiffusionPipeline.from_pretrained(sd["path"], safety_checker=None)


def test_peft_export_loads_into_diffusers_and_back(sd, trained, tmp_path):
    unet_lora, text_lora = _lora_states(trained)
    written = lora_lib.export_lora(tmp_path, unet_lora, alpha=UNET_ALPHA,
                                   text_encoder_lora=text_lora, text_encoder_alpha=TEXT_ALPHA)
    assert written == tmp_path / "pytorch_lora_weights.safetensors"

    pipe = _pipeline(sd)
    pipe.load_lora_weights(tmp_path)
    np.testing.assert_allclose(_torch_unet_out(pipe.unet, sd), trained["unet_out"],
                               atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(_torch_text_out(pipe.text_encoder, sd), trained["text_out"],
                               atol=1e-4, rtol=1e-4)

    loaded = lora_lib.load_lora_file(tmp_path)
    assert {c: len(layers) for c, layers in loaded.items()} == {
        "unet": len(nnx.to_flat_state(unet_lora)) // 2,
        "text_encoder": len(nnx.to_flat_state(text_lora)) // 2,
    }
    unet, text = _unet(sd), _text_encoder(sd)
    lora_lib.apply_lora_weights(unet, loaded)
    assert lora_lib.apply_lora_file(text, tmp_path, component="text_encoder", merge=True) == 8
    np.testing.assert_allclose(_run_unet(unet, sd), trained["unet_out"], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(_run_text(text, sd), trained["text_out"], atol=2e-5, rtol=1e-5)


def _kohya_file(path, trained, extra=None):
    """The trained adapters under kohya-ss names: module path with underscores, lora_down
    (A) / lora_up (B), alpha as a tensor."""
    from safetensors.numpy import save_file

    unet_lora, text_lora = _lora_states(trained)
    peft = {**lora_lib.lora_state_dict_peft(unet_lora, "unet"),
            **lora_lib.lora_state_dict_peft(text_lora, "text_encoder")}
    tensors = {}
    for key, value in peft.items():
        component, module = key.split(".", 1)
        module, which = module.rsplit(".", 2)[0], key.split(".")[-2]
        stem = ("lora_unet_" if component == "unet" else "lora_te_") + module.replace(".", "_")
        tensors[f"{stem}.{'lora_down' if which == 'lora_A' else 'lora_up'}.weight"] = value
        alpha = UNET_ALPHA if component == "unet" else TEXT_ALPHA
        tensors[f"{stem}.alpha"] = np.asarray(alpha, np.float32)
    tensors.update(extra or {})
    save_file(tensors, str(path))
    return path


def test_kohya_file_matches_diffusers_reading_of_it(sd, trained, tmp_path):
    path = _kohya_file(tmp_path / "kohya.safetensors", trained)
    assert all(key.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_",
                               "lora_unet_up_blocks_", "lora_te_text_model_encoder_layers_"))
               for key in read_safetensors(path))

    pipe = _pipeline(sd)
    pipe.load_lora_weights(str(path))
    np.testing.assert_allclose(_torch_unet_out(pipe.unet, sd), trained["unet_out"],
                               atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(_torch_text_out(pipe.text_encoder, sd), trained["text_out"],
                               atol=1e-4, rtol=1e-4)

    loaded = lora_lib.load_lora_file(path)
    unet, text = _unet(sd), _text_encoder(sd)
    assert lora_lib.apply_lora_weights(unet, loaded, merge=True) == len(loaded["unet"])
    assert not nnx.to_flat_state(nnx.state(unet, lora_lib.LORA_PARAMS))
    lora_lib.apply_lora_weights(text, loaded, component="text_encoder")
    np.testing.assert_allclose(_run_unet(unet, sd), trained["unet_out"], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(_run_text(text, sd), trained["text_out"], atol=2e-5, rtol=1e-5)

    # A user's scale multiplies alpha / rank, as diffusers' per-call LoRA scale does.
    half = _unet(sd)
    lora_lib.apply_lora_weights(half, loaded, scale=0.5)
    with torch.no_grad():
        expected = pipe.unet(
            torch.from_numpy(sd["sample"]).permute(0, 3, 1, 2),
            torch.from_numpy(sd["timesteps"]), torch.from_numpy(sd["context"]),
            cross_attention_kwargs={"scale": 0.5},
        ).sample.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(_run_unet(half, sd), expected, atol=1e-4, rtol=1e-4)


def _save(path, tensors):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(path))
    return path


def test_kxk_conv_lora_merges_like_diffusers_and_is_refused_unmerged(sd, tmp_path):
    # LoCon-style: a 3x3 down factor and a 1x1 up factor on a resnet conv.
    rng = np.random.default_rng(5)
    stem = "lora_unet_down_blocks_0_resnets_0_conv1"
    channels = sd["unet_state"]["down_blocks.0.resnets.0.conv1.weight"].shape[0]
    path = _save(tmp_path / "locon.safetensors", {
        f"{stem}.lora_down.weight": 0.3 * rng.standard_normal((2, channels, 3, 3)),
        f"{stem}.lora_up.weight": 0.3 * rng.standard_normal((channels, 2, 1, 1)),
        f"{stem}.alpha": np.asarray(1.0),
    })
    loaded = lora_lib.load_lora_file(path)
    with pytest.raises(ValueError, match=r"down_blocks\.0\.resnets\.0\.conv1.*merge=True"):
        lora_lib.apply_lora_weights(_unet(sd), loaded)

    unet = _unet(sd)
    assert lora_lib.apply_lora_weights(unet, loaded, merge=True) == 1
    pipe = _pipeline(sd)
    pipe.load_lora_weights(str(path))
    np.testing.assert_allclose(_run_unet(unet, sd), _torch_unet_out(pipe.unet, sd),
                               atol=1e-4, rtol=1e-4)


def test_bad_targets_and_files_get_named_errors(sd, tmp_path):
    unet = _unet(sd)
    with pytest.raises(ValueError, match=r"\['to_x'\] match no .*'to_q'"):
        lora_lib.apply_lora(unet, rank=2, alpha=2.0, targets=("to_q", "to_x"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"conv1, a \(3, 3\) conv"):
        lora_lib.apply_lora(unet, rank=2, alpha=2.0, targets=("conv1",), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank must be a positive int"):
        lora_lib.apply_lora(unet, rank=0, alpha=2.0, rngs=nnx.Rngs(0))
    lora_lib.apply_lora(unet, rank=2, alpha=2.0, targets=("attn2.to_k",), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"attn2\.to_k already has a LoRA adapter"):
        lora_lib.apply_lora(unet, rank=2, alpha=2.0, targets=("to_k",), rngs=nnx.Rngs(0))

    width = TEXT_WIDTH
    good = {"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v.lora_down.weight":
            np.ones((2, width)),
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v.lora_up.weight":
            np.ones((sd["unet_state"]["mid_block.attentions.0.transformer_blocks.0.attn2.to_v"
                                     ".weight"].shape[0], 2))}
    stray = "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q"
    nowhere = _save(tmp_path / "nowhere.safetensors", {
        **good, f"{stray}.lora_down.weight": np.ones((2, 4)),
        f"{stray}.lora_up.weight": np.ones((4, 2))})
    with pytest.raises(ValueError, match="down_blocks_7_attentions_0_transformer_blocks_0_attn1"):
        lora_lib.apply_lora_weights(_unet(sd), lora_lib.load_lora_file(nowhere))

    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v"
    wrong = _save(tmp_path / "wrong.safetensors", {
        **good, f"{name}.lora_down.weight": np.ones((2, width + 1))})
    with pytest.raises(ValueError, match=r"attn2\.to_v: down \(2, 33\)"):
        lora_lib.apply_lora_weights(_unet(sd), lora_lib.load_lora_file(wrong))

    half = _save(tmp_path / "half.safetensors", {
        "unet.mid_block.attentions.0.proj_in.lora_A.weight": np.ones((2, 4))})
    with pytest.raises(ValueError, match=r"proj_in has only \['down'\]"):
        lora_lib.load_lora_file(half)
    alien = _save(tmp_path / "alien.safetensors", {"unet.conv_in.hada_w1_a": np.ones((2, 2))})
    with pytest.raises(ValueError, match=r"unet\.conv_in\.hada_w1_a"):
        lora_lib.load_lora_file(alien)
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors"):
        lora_lib.load_lora_file((tmp_path / "export_dir").mkdir() or tmp_path / "export_dir")
    with pytest.raises(ValueError, match=r"no 'text_encoder' part, only \['unet'\]"):
        lora_lib.apply_lora_weights(_text_encoder(sd), lora_lib.load_lora_file(
            _save(tmp_path / "good.safetensors", good)), component="text_encoder")

    with pytest.raises(ValueError, match=r"model\.lora\.rank: a non-negative int"):
        lora_lib.check_lora_config(-1, 4.0, lora_lib.DEFAULT_TARGETS)
    with pytest.raises(ValueError, match=r"model\.lora\.alpha: a positive number"):
        lora_lib.check_lora_config(4, 0, lora_lib.DEFAULT_TARGETS)
    with pytest.raises(ValueError, match=r"model\.lora\.targets"):
        lora_lib.check_lora_config(4, 4.0, "to_q")
    lora_lib.check_lora_config(0, None, None)  # full fine-tuning ignores the rest


def test_lora_training_parts_from_abstract_build_and_pretrained_base(sd):
    """What train/setup needs: abstract parts, factors created in their shards, the
    pretrained weights as the frozen base."""
    from train.sharding import DEFAULT_RULES, make_mesh, tree_shardings

    build = lambda: UNet2DConditionModel(**sd["unet_kwargs"], rngs=nnx.Rngs(0))
    kw = dict(rank=UNET_RANK, alpha=UNET_ALPHA, targets=UNET_TARGETS)
    graphdef, abstract_base, abstract_lora = lora_lib.abstract_lora_model(build, **kw)
    pretrained = _unet(sd)
    assert jax.tree.structure(abstract_base) == jax.tree.structure(nnx.state(pretrained))

    mesh = make_mesh((("data", 2), ("fsdp", 4)))
    shardings = tree_shardings(mesh, abstract_lora, DEFAULT_RULES)
    init = jax.jit(lambda rng: lora_lib.init_lora_params(build, rng, **kw),
                   out_shardings=shardings)
    lora = init(jax.random.key(0))
    assert jax.tree.structure(lora) == jax.tree.structure(abstract_lora)
    for path, variable in nnx.to_flat_state(lora):
        value = variable.get_value()
        if path[-1] == "lora_a":  # [in, r]: inputs split over fsdp like the kernel's
            assert value.sharding.spec[0] == "fsdp" and float(jnp.abs(value).max()) > 0
        else:
            assert float(jnp.abs(value).max()) == 0.0  # B = 0: training starts at the base

    # On one device again: eager ops on arrays spread over 8 devices compile anew.
    lora = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), lora)
    model = nnx.merge(graphdef, lora_lib.merge_params(nnx.state(pretrained), lora))
    np.testing.assert_array_equal(_run_unet(model, sd), _run_unet(pretrained, sd))
