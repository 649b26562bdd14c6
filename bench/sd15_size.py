"""An SD 1.5-size UNet trained from scratch, for accelerator throughput and MFU figures.

    python bench/train_throughput.py --config bench/sd15_size.py          # ours: MFU, memory
    python bench/train_throughput.py --config bench/sd15_size.py --peer   # and diffusers' Flax

Stable Diffusion 1.5's UNet architecture (859.5M parameters: channels 320/640/1280/1280, two
resnets per level, cross-attention on the three upper levels and the mid block, 8 heads,
conv projections) on 64x64 inputs, with a text encoder of CLIP ViT-L/14's text size (12
layers, width 768, 77 tokens) built from a seed, bf16 compute with float32 parameters,
gradients and Adam state, FSDP over every device. Nothing is downloaded. The one difference
from SD 1.5 is the UNet's input and output: 3 channels (the bench's pixel batches) instead of
the VAE's 4 latent channels, 5,760 of its 859.5M parameters and a negligible share of its
FLOPs. `bench/gpu_figures.py` runs it on an accelerator; on CPU, shrink it with --set.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import demo  # noqa: E402

# diffusers' UNet2DConditionModel config of runwayml/stable-diffusion-v1-5 (in/out channels
# aside); `attention_head_dim` 8 is the number of heads there (diffusers' historical naming).
SD15_UNET = {
    "sample_size": 64, "in_channels": 3, "out_channels": 3,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "attention_head_dim": 8, "cross_attention_dim": 768, "norm_num_groups": 32,
    "transformer_layers_per_block": 1, "class_embed_type": None,
    "projection_class_embeddings_input_dim": None, "addition_embed_type": None,
    "resnet_time_scale_shift": "default", "coordinate_channels": False, "patch_size": 1,
    "remat": False,
}


def get_config():
    config = demo.get_config()
    config.data.image_size = 64
    config.model.unet.update(SD15_UNET)
    text = config.model.text_encoder
    # The demo's BPE tokenizer (trained on the synthetic captions when the run starts): its
    # 512-token vocabulary is the one part smaller than CLIP's (a lookup, no FLOPs).
    text.kind, text.tokenizer, text.max_length = "demo", "bpe", 77
    text.hidden_size, text.intermediate_size = 768, 3072
    text.num_hidden_layers, text.num_attention_heads = 12, 12
    config.model.dtype = "bfloat16"
    config.train.global_batch_size = 32
    config.mesh.shape = (("data", 1), ("fsdp", -1))
    return config
