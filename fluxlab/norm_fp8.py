"""LayerNorm, modulation and the FP8 quantization of the linears' input in one pass, once for all the linears
that read it.

Before each group of linears a FLUX block normalizes its stream (LayerNorm without weights), modulates it
(`* (1 + scale) + shift`, from the step's adaLN vector) and, with FP8 rowwise products (torchao), quantizes it row by
row in every linear that reads it: q, k and v in the double blocks (for the image and the text tokens), the MLP's
input projection, and in the single blocks q, k, v and the MLP's projection from one input. inductor fuses each into
reduction kernels that read the row several times. `layernorm_modulate_fp8` (`fluxlab.norm_fp8_triton`) holds each
row in registers: one read, the FP8 row and its scale written once, handed to every linear that reads it (a
`Quantized` in place of the bf16 tensor), which multiplies it with `fluxlab.mlp_fp8.product`. The block forwards are
diffusers' with those steps changed, and GELU + FP8 in one pass (`fluxlab.mlp_fp8`) in the MLPs.
"""
import types
from typing import NamedTuple

import torch

from . import mlp_fp8
from .flux_attention import SwappedAttnProcessor
from .quant import rowwise_fp8

if torch.cuda.is_available():  # torch's CUDA wheels bring Triton, its CPU wheels do not
    from . import norm_fp8_triton  # noqa: F401  (registers torch.ops.fluxlab.layernorm_modulate_fp8)


class Quantized(NamedTuple):
    """A linear's input already in FP8: rows (..., dim) and their float32 scales (..., 1)."""
    data: torch.Tensor
    scale: torch.Tensor


def reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> Quantized:
    """What the kernel computes, in torch as a FLUX block does: LayerNorm without weights, `* (1 + scale) + shift`
    per image, then torchao's rowwise quantization of a linear's input (`fluxlab.quant.rowwise_fp8`)."""
    y = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=eps)
    return Quantized(*rowwise_fp8(y * (1 + scale[:, None]) + shift[:, None]))


def layernorm_modulate_fp8(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> Quantized:
    """`reference` for (images, tokens, dim) `x`: the Triton kernel on a GPU (bf16), torch elsewhere (tests)."""
    if x.device.type != "cuda":
        return reference(x, shift, scale, eps)
    return Quantized(*torch.ops.fluxlab.layernorm_modulate_fp8(x, shift, scale, eps))


def feed_forward(ff, x: Quantized) -> torch.Tensor:
    """FLUX's feed-forward from an FP8 input: the projection, then GELU + FP8 in one pass into the output's."""
    return mlp_fp8.linear(ff.net[2], None, mlp_fp8.product(ff.net[0].proj, *x))


def double_block_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                         joint_attention_kwargs=None):
    """diffusers' FluxTransformerBlock.forward with each LayerNorm + modulation + quantization in one kernel, the
    attention's projections and the feed-forwards reading its FP8 rows."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1.linear(
        self.norm1.silu(temb)).chunk(6, dim=1)
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context.linear(
        self.norm1_context.silu(temb)).chunk(6, dim=1)
    attn_output, context_attn_output = self.attn(
        hidden_states=layernorm_modulate_fp8(hidden_states, shift_msa, scale_msa, self.norm1.norm.eps),
        encoder_hidden_states=layernorm_modulate_fp8(encoder_hidden_states, c_shift_msa, c_scale_msa,
                                                     self.norm1_context.norm.eps),
        image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
    hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output
    ff_input = layernorm_modulate_fp8(hidden_states, shift_mlp, scale_mlp, self.norm2.eps)
    hidden_states = hidden_states + gate_mlp.unsqueeze(1) * feed_forward(self.ff, ff_input)
    encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output
    context_input = layernorm_modulate_fp8(encoder_hidden_states, c_shift_mlp, c_scale_mlp, self.norm2_context.eps)
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * feed_forward(self.ff_context,
                                                                                             context_input)
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def single_block_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                         joint_attention_kwargs=None):
    """diffusers' FluxSingleTransformerBlock.forward with LayerNorm + modulation + quantization in one kernel, read
    by q, k, v and the MLP's projection, and GELU, join and proj_out's quantization in another (`fluxlab.mlp_fp8`)."""
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    shift, scale, gate = self.norm.linear(self.norm.silu(temb)).chunk(3, dim=1)
    x = layernorm_modulate_fp8(hidden_states, shift, scale, self.norm.norm.eps)
    attn_output = self.attn(hidden_states=x, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
    hidden_states = hidden_states + gate.unsqueeze(1) * mlp_fp8.linear(self.proj_out, attn_output,
                                                                       mlp_fp8.product(self.proj_mlp, *x))
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


def use(transformer) -> None:
    """Give a FLUX transformer's blocks the one-pass forwards (with an attention processor that takes FP8 inputs:
    `fluxlab.flux_attention.SwappedAttnProcessor`'s; before CUDA graphs and First Block Cache)."""
    if not all(isinstance(p, SwappedAttnProcessor) for p in transformer.attn_processors.values()):
        raise ValueError("norm_fp8 hands the attention FP8 inputs: use it with attention='cudnn_fp8'.")
    for block in transformer.transformer_blocks:
        block.forward = types.MethodType(double_block_forward, block)
    for block in transformer.single_transformer_blocks:
        block.forward = types.MethodType(single_block_forward, block)
    transformer._fluxlab_norm_fp8 = True  # the blocks' forwards may be wrapped by hooks later: what `used` reads


def used(transformer) -> bool:
    """Whether `use` was applied."""
    return getattr(transformer, "_fluxlab_norm_fp8", False)
