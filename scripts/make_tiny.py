"""Write the bundled tiny pipeline (fluxlab/tiny) in the hub layout, with seeded random weights.

Usage: python scripts/make_tiny.py [--out fluxlab/tiny] [--seed 0]
"""
import argparse

import torch

from fluxlab.sources import build_pipeline
from fluxlab.settings import TINY_DIR

# FLUX.1-dev's architecture, scaled down: same components, same latent layout (16 channels, 8x, 2x2 packing).
TINY_CONFIGS = {
    "transformer": dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=16,
                        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32,
                        guidance_embeds=True, axes_dims_rope=[4, 6, 6]),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=16,
                block_out_channels=[32, 32, 64, 64], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False),
    "text_encoder": dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
                         hidden_act="quick_gelu", bos_token_id=0, eos_token_id=1, pad_token_id=1),
    "text_encoder_2": dict(vocab_size=128, d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2,
                           feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False),
    "scheduler": dict(base_image_seq_len=64, base_shift=0.5, max_image_seq_len=1024, max_shift=1.15,
                      num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(TINY_DIR))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pipe = build_pipeline(TINY_CONFIGS, torch.device("cpu"), torch.float32, seed=args.seed)
    pipe.save_pretrained(args.out, safe_serialization=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
