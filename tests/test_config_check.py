import pytest

from configs import demo, tiny
from train.config_check import ConfigError, validate_config


def test_shipped_configs_are_valid():
    from data_pipeline.synthetic import BACKGROUNDS

    # The longest synthetic caption in words: two shapes in corners and the longest background.
    longest = max(len(f"a c s in the bottom right and a c s in the bottom right on a {b} "
                      "background".split()) for b in BACKGROUNDS)
    for config in (demo.get_config(), tiny.get_config()):
        validate_config(config)  # raises ConfigError on the first bad field
        # Both train on the synthetic captions with the BPE tokenizer (one token per caption
        # word, tested in test_bpe_tokenizer.py): none may be cut off.
        assert config.model.text_encoder.tokenizer == "bpe"
        assert config.model.text_encoder.max_length > longest


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("diffusion.schedule", "quadratic", "config.diffusion.schedule='quadratic'"),
        ("diffusion.prediction_type", "x", "config.diffusion.prediction_type"),
        ("sample.sampler", "euler_z", "config.sample.sampler"),
        ("train.caption_dropout_prob", 1.5, "config.train.caption_dropout_prob=1.5"),
        ("optim.learning_rate", 0.0, "config.optim.learning_rate=0.0 must be > 0"),
        ("model.unet.sample_size", 8, "must equal config.data.image_size"),
        ("model.unet.norm_num_groups", 5, "not divisible by norm_num_groups=5"),
        ("model.text_encoder.kind", "t9", "config.model.text_encoder.kind"),
        ("sample.steps", 0, "config.sample.steps=0"),
        ("diffusion.timestep_sampling", "beta", "config.diffusion.timestep_sampling='beta'"),
        ("diffusion.logit_std", 0.0, "config.diffusion.logit_std=0.0 must be > 0"),
        ("diffusion.timestep_shift", 0.0, "config.diffusion.timestep_shift=0.0 must be > 0"),
        ("model.unet.resnet_time_scale_shift", "film", "resnet_time_scale_shift='film'"),
        ("model.unet.patch_size", 3,
         "x patch_size 3 (one downsample per UNet level after the patch fold)"),
        ("model.text_encoder.tokenizer", "words", "config.model.text_encoder.tokenizer='words'"),
        ("model.text_encoder.bpe_vocab_size", 100, "bpe_vocab_size=100 must be >= 260"),
        ("model.attention", "flash", "config.model.attention='flash' is not allowed"),
    ],
)
def test_bad_values_name_the_field(field, value, message):
    config = tiny.get_config()
    section, _, name = field.rpartition(".")
    target = config
    for part in section.split("."):
        target = target[part]
    target[name] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_config(config)


def test_byte_tokens_that_cut_synthetic_captions_are_rejected():
    config = tiny.get_config()
    config.model.text_encoder.tokenizer = "bytes"
    config.model.text_encoder.max_length = 48
    with pytest.raises(ConfigError, match="max_length=48 would truncate the synthetic"):
        validate_config(config)
    config.model.text_encoder.max_length = 112
    validate_config(config)


def test_tar_source_needs_shards():
    config = tiny.get_config()
    config.data.source = "tar"
    with pytest.raises(ConfigError, match="config.data.paths is empty"):
        validate_config(config)


def test_locked_config_rejects_unknown_keys():
    config = tiny.get_config()
    config.lock()
    with pytest.raises(AttributeError, match="learning_rat"):
        config.optim.learning_rat = 1.0
