"""FLUX's attention processor with its attention call swapped out: the projections, norms, rotary embedding and
output projections are diffusers' `FluxAttnProcessor`'s, copied; `attend` is the one part a subclass replaces
(FP8 attention, `fluxlab.fp8_attention`; Ulysses' exchanges as peer writes, `fluxlab.peer_exchange`). diffusers
offers no hook between the rotary embedding and the output projection, hence the copy. The projections also take
inputs already in FP8 (`fluxlab.norm_fp8`)."""
import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

from . import mlp_fp8


class SwappedAttnProcessor(FluxAttnProcessor):
    """`FluxAttnProcessor` whose attention is `self.attend(attn, query, key, value)`, on (batch, sequence, heads,
    head_dim) tensors; FLUX passes no attention mask."""

    def attend(self, attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise ValueError(f"{type(self).__name__} takes no attention mask.")
        query, key, value, encoder_query, encoder_key, encoder_value = projections(
            attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query, encoder_key, encoder_value = (
                x.unflatten(-1, (-1, attn.head_dim)) for x in (encoder_query, encoder_key, encoder_value))
            encoder_query, encoder_key = attn.norm_added_q(encoder_query), attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = self.attend(attn, query, key, value).flatten(2, 3).to(query.dtype)
        return project_out(attn, hidden_states, encoder_hidden_states)


def projections(attn, hidden_states, encoder_hidden_states):
    """diffusers' q, k, v projections (and the text tokens'), from bf16 inputs or from inputs already in FP8:
    (rows, scales) tuples (`fluxlab.norm_fp8.Quantized`), multiplied by `fluxlab.mlp_fp8.product`."""
    if not isinstance(hidden_states, tuple):
        return _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    if attn.fused_projections:
        raise ValueError("FP8 inputs go to separate q, k and v projections: do not fuse them (fuse_qkv).")
    image = [mlp_fp8.product(layer, *hidden_states) for layer in (attn.to_q, attn.to_k, attn.to_v)]
    if encoder_hidden_states is None or attn.added_kv_proj_dim is None:
        return *image, None, None, None
    return *image, *(mlp_fp8.product(layer, *encoder_hidden_states)
                     for layer in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))


def project_out(attn, hidden_states: torch.Tensor, encoder_hidden_states):
    """The attention output (batch, text + image tokens, heads * head_dim) through FLUX's output projections: the
    single blocks' as it is, the double blocks' split into image (`to_out`) and text (`to_add_out`);
    `encoder_hidden_states`: the text tokens' input (bf16, or FP8 rows and scales), None in a single block."""
    if encoder_hidden_states is None:
        return hidden_states
    text = (encoder_hidden_states[0] if isinstance(encoder_hidden_states, tuple) else encoder_hidden_states).shape[1]
    encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
        [text, hidden_states.shape[1] - text], dim=1)
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
    return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())
