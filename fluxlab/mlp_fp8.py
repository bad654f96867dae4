"""FLUX's MLP outputs quantized to FP8 in the GELU's own kernel: one pass over each row of the input of the output
projections that follow the GELU.

With FP8 rowwise (torchao), a linear layer quantizes its input row by row: 448 over the row's absolute maximum. The
single blocks' proj_out reads the attention output joined to the GELU of the MLP (4608 x 15360 per image), the
double blocks' feed-forward output projection reads the GELU (4096 x 12288 and 512 x 12288). inductor fuses GELU,
join and quantization into one kernel, but one that writes the bf16 row and reads it back to scale it (two passes
over the largest activation of the model). `gelu_join_fp8` (`fluxlab.mlp_fp8_triton`) holds each row in registers:
it reads the inputs once and writes the FP8 row and its scale. The blocks then call the FP8 product that torchao's
linear would (`torch._scaled_mm`); torchao's linear quantizes its input itself, so it cannot be handed one already
in FP8. Its block forwards are diffusers', with that one step changed; chapter 3 and the bench measure it.
"""
import types

import torch
from diffusers.models.activations import GELU

from .gelu import gelu_tanh
from .quant import fp8_tensor_cores, rowwise_fp8

if torch.cuda.is_available():  # torch's CUDA wheels bring Triton, its CPU wheels do not
    from . import mlp_fp8_triton  # noqa: F401  (registers torch.ops.fluxlab.gelu_join_fp8)


def unavailable(device: torch.device) -> str | None:
    """Why the one-pass kernel cannot run on `device` (one line), or None if it can."""
    if fp8_tensor_cores(device):
        return None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return (f"gelu_fp8=True writes FP8 tensor cores' inputs with a Triton kernel (CUDA, compute capability 8.9 or "
            f"newer); not on {name}.")


def reference(attn: torch.Tensor, mlp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernel computes, in torch: the bf16 row cat([attn, GELU(mlp)]) quantized as torchao quantizes a
    linear's input (rowwise, scale = bf16(max|row| / 448)); returns the FP8 rows and their float32 scales."""
    return rowwise_fp8(torch.cat([attn, gelu_tanh(mlp)], dim=-1))


def gelu_join_fp8(attn: torch.Tensor, mlp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference` for 2-D tensors: the Triton kernel on a GPU, torch elsewhere (tests)."""
    if mlp.device.type != "cuda":
        return reference(attn, mlp)
    if {attn.dtype, mlp.dtype} != {torch.bfloat16}:
        raise ValueError(f"gelu_fp8's kernel reads bf16 activations (FLUX's dtype), not {attn.dtype}/{mlp.dtype}.")
    return torch.ops.fluxlab.gelu_join_fp8(attn, mlp)


def product(layer: torch.nn.Linear, data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """layer(x) for a layer with a torchao FP8 rowwise weight and x already quantized row by row (`data`: FP8
    rows, `scale`: one float32 per row): torchao's product, `torch._scaled_mm` with the weight's own accumulation
    setting (torchao's linear quantizes its input itself, so it cannot be handed one already in FP8)."""
    weight = layer.weight
    if getattr(weight, "act_quant_kwargs", None) is None or list(weight.block_size) != [1, weight.shape[1]]:
        raise ValueError("gelu_fp8 and norm_fp8 feed FP8 rowwise products: quantize the transformer first with "
                         "fluxlab.quant.quantize_fp8(pipe, 'rowwise') on an FP8 GPU.")
    rows = data.shape[:-1]
    out = torch._scaled_mm(data.reshape(-1, data.shape[-1]), weight.qdata.t(), scale_a=scale.reshape(-1, 1),
                           scale_b=weight.scale.reshape(1, -1), bias=layer.bias, out_dtype=weight.dtype,
                           use_fast_accum=weight.mm_config.use_fast_accum)
    return out.reshape(*rows, -1)


def linear(layer: torch.nn.Linear, attn: torch.Tensor | None, mlp: torch.Tensor) -> torch.Tensor:
    """layer(cat([attn, GELU(mlp)], -1)) for a layer with a torchao FP8 rowwise weight: the input quantized by
    `gelu_join_fp8`, then `product`."""
    rows = mlp.shape[:-1]
    mlp = mlp.reshape(-1, mlp.shape[-1])
    attn = mlp.new_empty(mlp.shape[0], 0) if attn is None else attn.reshape(mlp.shape[0], -1)
    data, scale = gelu_join_fp8(attn, mlp)
    return product(layer, data, scale).reshape(*rows, -1)


def single_block_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                         joint_attention_kwargs=None):
    """diffusers' FluxSingleTransformerBlock.forward with GELU, join and proj_out's input quantization in one
    kernel (`linear`)."""
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
    mlp_hidden_states = self.proj_mlp(norm_hidden_states)
    attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb,
                            **(joint_attention_kwargs or {}))
    hidden_states = residual + gate.unsqueeze(1) * linear(self.proj_out, attn_output, mlp_hidden_states)
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


def feed_forward(self, hidden_states):
    """diffusers' FeedForward (tanh-GELU, dropout, linear) with the GELU and the output projection's input
    quantization in one kernel (`linear`); dropout is the identity at inference."""
    return linear(self.net[2], None, self.net[0].proj(hidden_states))


def use(transformer) -> None:
    """Give a FLUX transformer's single blocks and feed-forwards the one-pass forwards (before CUDA graphs and
    First Block Cache, which wrap the blocks' forwards; FP8 rowwise quantization may come after)."""
    for block in transformer.single_transformer_blocks:
        block.forward = types.MethodType(single_block_forward, block)
    for block in transformer.transformer_blocks:
        for ff in (block.ff, block.ff_context):
            act, dropout, _ = ff.net
            if not (isinstance(act, GELU) and act.approximate == "tanh" and isinstance(dropout, torch.nn.Dropout)):
                raise ValueError(f"gelu_fp8 expects FLUX's feed-forward (tanh-GELU, dropout, linear), not {ff.net}.")
            ff.forward = types.MethodType(feed_forward, ff)


def used(transformer) -> bool:
    """Whether `use` was applied (read off the feed-forwards: the blocks' forwards may be wrapped by hooks)."""
    return any(getattr(b.ff.forward, "__func__", None) is feed_forward for b in transformer.transformer_blocks)
