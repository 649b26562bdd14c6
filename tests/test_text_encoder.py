"""Text encoder: tokenizers, causal CLIP transformer, demo determinism, Hugging Face parity."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from models.hf_weights import flat_param_names
from models.text_encoder import (
    CLIPTextTransformer,
    Tokenizer,
    build_text_encoder,
    build_tokenizer,
    load_clip_text_weights,
    pooled_output,
)

SIZES = dict(
    vocab_size=384,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=12,
)


def _demo_cfg(**overrides):
    cfg = ml_collections.ConfigDict(dict(
        kind="demo", pretrained_path="", seed=7, max_length=12, hidden_size=16,
        intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    ))
    cfg.update(overrides)
    return cfg


@nnx.jit
def _encode(model, ids):
    return model(ids)


@pytest.fixture(scope="module")
def demo():
    return build_text_encoder(_demo_cfg())


def test_byte_tokenizer_pads_truncates_and_ends(demo):
    tokenizer, _ = demo
    assert isinstance(tokenizer, Tokenizer) and tokenizer.max_length == 12
    ids = tokenizer(["ab", "a much longer caption than twelve bytes"])
    assert ids.dtype == np.int32 and ids.shape == (2, 12)
    assert ids[0].tolist() == [ord("a") + 3, ord("b") + 3, 1] + [0] * 9  # bytes, eos, pads
    assert ids[1, -1] == tokenizer.eos_token_id and 0 not in ids[1]
    assert tokenizer([]).shape == (0, 12)
    assert tokenizer("ab").tolist() == ids[:1].tolist()


def test_demo_build_is_deterministic(demo):
    _, model = demo
    _, again = build_text_encoder(_demo_cfg())
    _, other_seed = build_text_encoder(_demo_cfg(), rngs_seed=8)
    leaves = jax.tree.leaves(nnx.state(model))
    assert all(np.array_equal(a, b) for a, b in zip(leaves, jax.tree.leaves(nnx.state(again)),
                                                     strict=True))
    assert not np.array_equal(leaves[0], jax.tree.leaves(nnx.state(other_seed))[0])
    names = flat_param_names(model)
    assert names["embeddings.token_embedding.weight"] == (384, 16)
    assert names["encoder.layers.1.mlp.fc1.weight"] == (16, 32)


def test_shapes_and_causal_mask(demo):
    tokenizer, model = demo
    ids = tokenizer(["red dot", "blue box"])
    hidden = np.asarray(_encode(model, jnp.asarray(ids)))
    assert hidden.shape == (2, 12, 16) and hidden.dtype == np.float32
    # Changing position 5 leaves positions 0..4 untouched and changes 5 onwards.
    changed = ids.copy()
    changed[:, 5] = ord("z") + 3
    other = np.asarray(_encode(model, jnp.asarray(changed)))
    np.testing.assert_allclose(other[:, :5], hidden[:, :5], atol=1e-6)
    assert np.abs(other[:, 5:] - hidden[:, 5:]).max() > 1e-3
    # Different captions give different features at the end token.
    pooled = pooled_output(hidden, ids, tokenizer.eos_token_id)
    assert pooled.shape == (2, 16) and np.abs(pooled[0] - pooled[1]).max() > 1e-3
    np.testing.assert_array_equal(pooled[0], hidden[0, len("red dot")])


def test_config_errors():
    with pytest.raises(ValueError, match=r"model\.text_encoder\.kind.*'demo', 'clip'"):
        build_text_encoder(_demo_cfg(kind="t5"))
    with pytest.raises(FileNotFoundError, match="pretrained_path"):
        build_text_encoder(_demo_cfg(kind="clip"))
    with pytest.raises(FileNotFoundError, match="pretrained_path"):
        build_text_encoder(_demo_cfg(kind="clip", pretrained_path="/nonexistent/clip"))
    with pytest.raises(ValueError, match="num_attention_heads"):
        build_text_encoder(_demo_cfg(num_attention_heads=3))


def _hf_clip(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(**SIZES, eos_token_id=383)
    reference = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():  # LayerNorms start at the identity; perturb so a mix-up shows
        for tensor in reference.state_dict().values():
            tensor.add_(0.05 * torch.randn_like(tensor))
    reference.save_pretrained(tmp_path, safe_serialization=True)
    return torch, reference


def test_matches_hugging_face_clip(tmp_path):
    torch, reference = _hf_clip(tmp_path)
    model = nnx.eval_shape(lambda: CLIPTextTransformer(**SIZES, rngs=nnx.Rngs(0)))
    load_clip_text_weights(model, tmp_path / "model.safetensors")

    ids = np.random.default_rng(0).integers(3, 383, size=(2, 12)).astype(np.int32)
    ids[0, 7], ids[1, 11] = 383, 383
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(ids).long())
    hidden = _encode(model, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(hidden), expected.last_hidden_state.numpy(),
                               atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(pooled_output(hidden, ids, 383)),
                               expected.pooler_output.numpy(), atol=1e-4, rtol=1e-4)


def test_build_clip_from_pipeline_dir(tmp_path):
    # The diffusers pipeline layout: text_encoder/ and tokenizer/ side by side.
    _, reference = _hf_clip(tmp_path / "text_encoder")
    # A minimal BPE vocabulary is enough for AutoTokenizer to load offline.
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    bpe = tokenizers.models.BPE(vocab={"<|endoftext|>": 0, "a": 1, "b": 2}, merges=[])
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(bpe), eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", model_max_length=77,
    ).save_pretrained(tmp_path / "tokenizer")

    cfg = _demo_cfg(kind="clip", pretrained_path=str(tmp_path), max_length=0)
    tokenizer, model = build_text_encoder(cfg)
    assert tokenizer.max_length == SIZES["max_position_embeddings"]  # capped by the model
    assert tokenizer(["ab"]).shape == (1, 12)
    np.testing.assert_array_equal(
        np.asarray(model.embeddings.token_embedding.embedding[...]),
        reference.state_dict()["embeddings.token_embedding.weight"].numpy(),
    )
    with pytest.raises(ValueError, match="max_length"):
        build_tokenizer(_demo_cfg(kind="clip", pretrained_path=str(tmp_path), max_length=77))
