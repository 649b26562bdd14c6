"""Tiny: the demo pipeline shrunk for tests and smoke runs (seconds per phase on CPU).

Launch:
    python -m train --config configs/tiny.py --workdir /tmp/t2i_tiny
"""

from configs import demo


def get_config():
    config = demo.get_config()
    config.data.synthetic_num_samples = 256
    config.data.synthetic_num_shards = 4
    config.data.shuffle_buffer = 64
    config.data.image_size = 16
    config.model.unet.sample_size = 16
    config.model.unet.block_out_channels = (16, 32)
    config.model.unet.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D")
    config.model.unet.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D")
    config.model.unet.attention_head_dim = 2
    config.model.unet.cross_attention_dim = 32
    config.model.unet.projection_class_embeddings_input_dim = 32
    config.model.text_encoder.hidden_size = 32
    config.model.text_encoder.intermediate_size = 64
    config.model.text_encoder.num_hidden_layers = 1
    config.model.text_encoder.num_attention_heads = 2
    config.optim.warmup_steps = 2
    config.train.global_batch_size = 16
    config.train.num_train_steps = 6
    config.train.log_every_steps = 2
    config.train.checkpoint_every_steps = 3
    config.train.sample_every_steps = 3
    config.train.sample_prompts = ("a red circle in the top left", "a blue square")
    config.sample.steps = 4
    config.sample.batch_size = 8
    return config
