"""Ulysses attention with one all-to-all for query, key and value together.

diffusers' Ulysses exchanges the query, the key and the value in three all-to-alls and the output in a fourth. On
one NVLink host an all-to-all of a few MB costs NCCL's per-call floor (about 42 us measured on 2 H200s, the same
for 1 MB as for 14 MB), and FLUX makes 57 x 28 of these layers per image: one call of three times the size instead
of three saves two floors per layer. diffusers has no option for it, so `OneExchangeProcessor` is FLUX's attention
processor (diffusers' `FluxAttnProcessor`, whose projections, norms and rotary embedding it reuses) with the
attention call replaced by `exchanged_attention`.
"""
import torch
import torch.distributed._functional_collectives as funcol
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor, _get_qkv_projections


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Chunk i of dim 0 goes to process i; chunk i of the result came from process i."""
    out = funcol.all_to_all_single(x.flatten(), None, None, group).reshape(x.shape)
    return funcol.wait_tensor(out) if isinstance(out, funcol.AsyncCollectiveTensor) else out


def exchanged_attention(query, key, value, group, world: int, backend=None) -> torch.Tensor:
    """Attention over the whole sequence from this process's share of it: (batch, tokens / world, heads, dim) each
    in, the same shape out. One all-to-all brings every token of heads/world heads here, one sends the output back."""
    b, s, h, d = query.shape
    qkv = torch.stack((query, key, value))  # (3, b, s, h, d)
    qkv = qkv.reshape(3, b, s, world, h // world, d).permute(3, 0, 1, 2, 4, 5).contiguous()  # head groups first
    qkv = _all_to_all(qkv, group)  # (world, 3, b, s, h/world, d): dim 0 is now the sequence chunk's process
    qkv = qkv.permute(1, 2, 0, 3, 4, 5).reshape(3, b, world * s, h // world, d)
    out = dispatch_attention_fn(qkv[0], qkv[1], qkv[2], backend=backend)  # (b, world * s, h/world, d)
    out = out.reshape(b, world, s, h // world, d).permute(1, 0, 2, 3, 4).contiguous()  # sequence chunks first
    out = _all_to_all(out, group)  # dim 0 is now the head group's process
    return out.permute(1, 2, 0, 3, 4).reshape(b, s, h, d)


class OneExchangeProcessor(FluxAttnProcessor):
    """`FluxAttnProcessor` with Ulysses' exchanges done by `exchanged_attention`."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise ValueError("the one-exchange Ulysses processor takes no attention mask (FLUX passes none).")
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            query = torch.cat([attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim))), query], dim=1)
            key = torch.cat([attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim))), key], dim=1)
            value = torch.cat([encoder_value.unflatten(-1, (-1, attn.head_dim)), value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        cp = self._parallel_config.context_parallel_config
        hidden_states = exchanged_attention(query, key, value, cp._ulysses_mesh.get_group(), cp.ulysses_degree,
                                            self._attention_backend)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


def use_one_exchange(transformer) -> None:
    """Give every FLUX attention layer of a transformer under Ulysses context parallelism (after
    `enable_parallelism`) the one-exchange processor, keeping its attention backend."""
    config = getattr(transformer, "_parallel_config", None)
    cp = config and config.context_parallel_config
    if cp is None or cp.ulysses_degree < 2 or cp.ring_degree != 1:
        raise ValueError("the one-exchange processor replaces Ulysses' exchanges: enable Ulysses context "
                         "parallelism (ring degree 1) first.")
    for module in transformer.modules():
        if isinstance(module, FluxAttention):
            processor = OneExchangeProcessor()
            processor._attention_backend = module.processor._attention_backend
            processor._parallel_config = config
            module.processor = processor
