import pytest

from configs import demo, tiny
from train.config_check import ConfigError, validate_config


def test_shipped_configs_are_valid():
    from data_pipeline.synthetic import max_caption_bytes

    for config in (demo.get_config(), tiny.get_config()):
        validate_config(config)  # raises ConfigError on the first bad field
        # Both train on the synthetic captions: none may be cut off by the byte tokenizer.
        assert config.model.text_encoder.max_length > max_caption_bytes()


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
        ("model.unet.resnet_time_scale_shift", "film", "resnet_time_scale_shift='film'"),
        ("model.text_encoder.max_length", 48, "max_length=48 would truncate the synthetic"),
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


def test_tar_source_needs_shards():
    config = tiny.get_config()
    config.data.source = "tar"
    with pytest.raises(ConfigError, match="config.data.shards is empty"):
        validate_config(config)


def test_locked_config_rejects_unknown_keys():
    config = tiny.get_config()
    config.lock()
    with pytest.raises(AttributeError, match="learning_rat"):
        config.optim.learning_rat = 1.0
