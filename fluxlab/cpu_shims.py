"""Two shims that let diffusers' context parallelism run on CPU processes (gloo); no effect on GPU.

1. `enable_parallelism` computes `rank % torch.accelerator.device_count()`, which is 0 without an accelerator.
2. Ring attention needs an attention op that also returns the log-sum-exp; on CPU that is
   `aten._scaled_dot_product_flash_attention_for_cpu`, which diffusers' flash backend does not call.
"""
import torch
from diffusers.models import attention_dispatch

_original_device_count = torch.accelerator.device_count
_original_flash_forward = attention_dispatch._native_flash_attention_forward_op


def _device_count() -> int:
    return _original_device_count() or 1


def _flash_forward(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    if query.device.type != "cpu":
        return _original_flash_forward(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                       return_lse, _save_ctx, _parallel_config)
    # diffusers' layout is (batch, sequence, heads, dim); the kernel's is (batch, heads, sequence, dim).
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), dropout_p, is_causal, scale=scale)
    out = out.transpose(1, 2).contiguous()
    lse = lse.transpose(1, 2).contiguous()
    return (out, lse) if return_lse else out


def install() -> None:
    """Idempotent; call before `enable_parallelism` on CPU."""
    torch.accelerator.device_count = _device_count
    attention_dispatch._native_flash_attention_forward_op = _flash_forward
