"""The demo encoder's byte-level BPE tokenizer: trained on the training captions, saved in the
workdir, read back by the sampler; one token per caption word, any prompt tokenizable."""

import itertools
import os

import ml_collections
import numpy as np
import pytest

from configs import tiny
from data_pipeline.input_pipeline import (
    prepare_tokenizer,
    read_captions,
    synthetic_tokenizer_workdir,
    write_synthetic_data,
)
from data_pipeline.synthetic import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    ShapeSpec,
    _single_caption,
    prompt_for,
    write_synthetic_shards,
)
from models.text_encoder import (
    TOKENIZER_FILE,
    build_text_encoder,
    build_tokenizer,
    load_bpe_tokenizer,
    save_bpe_tokenizer,
    train_bpe_tokenizer,
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(out, num_samples=400, num_shards=4, seed=0, progress=False,
                           two_shape_prob=0.2)
    return sorted(str(path) for path in out.glob("*.tar"))


def _tar_data(paths):
    return ml_collections.ConfigDict({"source": "tar", "paths": ",".join(paths),
                                      "storage_options": "", "caption_json_field": "caption"})


@pytest.fixture(scope="module")
def captions(shards):
    return read_captions(_tar_data(shards), 400)


def test_read_captions_follows_shard_order_and_limit(shards, captions):
    assert len(captions) == 400 and all(isinstance(c, str) and c for c in captions)
    assert read_captions(_tar_data(shards), 50) == captions[:50]
    # The second shard's captions follow the first's.
    assert read_captions(_tar_data(shards[1:]), 10) == captions[100:110]


def _tar_config(shards):
    config = tiny.get_config()
    config.data.source = "tar"
    config.data.paths = ",".join(shards)
    return config


def test_every_caption_word_is_one_token(captions):
    tokenizer = train_bpe_tokenizer(captions, 512, 32)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    ids = tokenizer(["a red circle in the top left", "A RED circle in the top left"])
    assert ids.shape == (2, 32) and ids.dtype == np.int32
    assert ids[0].tolist()[:8] == ids[1].tolist()[:8]  # lower-cased
    assert ids[0, 7] == 1 and not ids[0, 8:].any()  # 7 words, the end token, then padding
    # Every word of every demo prompt and background is a single token.
    words = set(" ".join(itertools.chain(
        (prompt_for(c, s, p) for c, s, p in itertools.product(COLOURS, SHAPES, POSITIONS)),
        (f"on a {b} background" for b in BACKGROUNDS))).split())
    for word in words:
        assert len(tokenizer.tokenizer(word)["input_ids"]) == 2, word
    # The longest single-shape caption fits with room to spare.
    spec = ShapeSpec("purple", "triangle", "bottom right", 0.4)
    longest = _single_caption(spec, "dark grey", 4)
    assert (tokenizer([longest])[0] == 1).nonzero()[0][0] < 16


def test_unseen_words_fall_back_to_bytes_and_training_is_deterministic(captions):
    tokenizer = train_bpe_tokenizer(captions, 512, 40)
    again = train_bpe_tokenizer(captions, 512, 40)
    prompt = "a zebra-striped ünïcode kite in the top left"
    ids = tokenizer([prompt])[0]
    assert 2 not in ids  # never the unknown token: every byte is in the alphabet
    decoded = tokenizer.tokenizer.backend_tokenizer.decode([int(i) for i in ids if i > 2])
    assert decoded.strip() == prompt.lower()
    np.testing.assert_array_equal(ids, again([prompt])[0])
    assert (tokenizer.tokenizer.backend_tokenizer.to_str()
            == again.tokenizer.backend_tokenizer.to_str())
    # A smaller vocabulary budget stops merging earlier.
    assert train_bpe_tokenizer(captions, 280, 40).vocab_size == 280 < tokenizer.vocab_size


def test_saved_tokenizer_round_trips_into_the_encoder(tmp_path, captions):
    tokenizer = train_bpe_tokenizer(captions, 512, 24)
    path = save_bpe_tokenizer(tokenizer, tmp_path)
    assert path == tmp_path / TOKENIZER_FILE and path.is_file()
    loaded = load_bpe_tokenizer(tmp_path, 24)
    np.testing.assert_array_equal(loaded(captions[:20]), tokenizer(captions[:20]))
    cfg = ml_collections.ConfigDict(dict(
        kind="demo", seed=3, max_length=24, hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, tokenizer="bpe"))
    built, encoder = build_text_encoder(cfg, workdir=tmp_path)
    assert encoder.embeddings.token_embedding.embedding.shape == (tokenizer.vocab_size, 16)
    assert encoder.embeddings.position_embedding.embedding.shape == (24, 16)
    np.testing.assert_array_equal(built(captions[:5]), tokenizer(captions[:5]))
    with pytest.raises(ValueError, match="needs the workdir"):
        build_tokenizer(cfg)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nowhere' / TOKENIZER_FILE}"):
        build_tokenizer(cfg, tmp_path / "nowhere")
    cfg.tokenizer = "words"
    with pytest.raises(ValueError, match="model.text_encoder.tokenizer='words'"):
        build_tokenizer(cfg, tmp_path)


def test_training_trains_once_and_never_replaces_a_saved_tokenizer(tmp_path, shards):
    workdir = str(tmp_path)
    prepare_tokenizer(_tar_config(shards), workdir)
    path = os.path.join(workdir, TOKENIZER_FILE)
    first = load_bpe_tokenizer(workdir, 32)
    assert first([prompt_for("red", "circle", "top left")])[0, 7] == 1
    # A resumed run reads the saved tokenizer: ids must not move under a checkpoint, even if
    # the shards (here: fewer of them) would train a different one.
    os.utime(path, (1, 1))
    prepare_tokenizer(_tar_config(shards[:1]), workdir)
    assert os.stat(path).st_mtime == 1


def test_a_max_length_that_cuts_synthetic_captions_is_an_error(tmp_path, shards):
    config = tiny.get_config()
    config.model.text_encoder.max_length = 9
    write_synthetic_data(config, str(tmp_path))
    with pytest.raises(ValueError, match="max_length=9 would truncate"):
        prepare_tokenizer(config, str(tmp_path))
    assert not os.path.exists(tmp_path / TOKENIZER_FILE)


def test_scratch_tokenizer_for_tools_matches_what_training_writes(tmp_path, shards):
    config = tiny.get_config()
    scratch = synthetic_tokenizer_workdir(config)
    prompt = prompt_for("green", "square", "bottom right")
    ids = load_bpe_tokenizer(scratch, 32)([prompt])[0]
    assert ids[7] == 1 and ids[6] > 2  # one token per word
    # A byte-tokenizer config needs no file.
    config.model.text_encoder.tokenizer = "bytes"
    assert os.listdir(synthetic_tokenizer_workdir(config)) == []
