"""The data section of the config check: each bad value names its field."""

import pytest

from configs import demo
from train.config_check import ConfigError, validate_config


@pytest.mark.parametrize("changes, message", [
    ({"source": "parquet"}, "data.source='parquet'"),
    ({"source": "arrayrecord"}, "data.paths is empty"),
    ({"source": "tfds"}, "data.tfds_name is empty"),
    ({"empty_captions": "keep"}, "data.empty_captions='keep'"),
    ({"decode_workers": "fibers"}, "data.decode_workers='fibers'"),
    ({"source": "tar", "paths": "x.tar", "decode_workers": "processes"}, "random-access"),
    ({"num_workers": 0}, "data.num_workers=0"),
    ({"storage_options": "endpoint=x"}, "storage_options is not a JSON object"),
    ({"storage_options": "[1]"}, "must be a JSON object"),
])
def test_bad_data_fields_are_named(changes, message):
    config = demo.get_config()
    config.data.update(changes)
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_every_source_with_its_fields_passes():
    for changes in ({"source": "synthetic"}, {"source": "arrayrecord", "paths": "/d"},
                    {"source": "tar", "paths": "/d"},
                    {"source": "tfds", "tfds_name": "my_captions"},
                    {"storage_options": '{"endpoint_url": "http://127.0.0.1:9000"}'}):
        config = demo.get_config()
        config.data.update(changes)
        validate_config(config)  # raises on a field it refuses
        # ... and the field each source needs is what made it pass.
        for field in ("paths", "tfds_name"):
            if field in changes:
                config.data[field] = ""
                with pytest.raises(ConfigError, match=f"data.{field}"):
                    validate_config(config)
