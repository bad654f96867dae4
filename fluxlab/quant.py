"""FP8 with torchao: T5 weight-only, transformer dynamic activation + weight (per-row or per-tensor).

`quantize_fp8` is the function chapter 3 writes and explains; a test keeps the two the same.
"""
import torch
from torchao.quantization import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8WeightOnlyConfig,
    PerRow,
    PerTensor,
    quantize_,
)

GRANULARITIES = {"rowwise": PerRow, "tensorwise": PerTensor}
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448.0, the largest float8_e4m3fn value


def rowwise_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` quantized row by row as torchao quantizes a linear's input (scale = max|row| / 448, divided in x's dtype):
    the float8_e4m3fn rows and their float32 scales."""
    scale = (x.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).float().clamp_min(1e-30)
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def fp8_tensor_cores(device: torch.device) -> bool:
    """FP8 matrix multiplies need CUDA compute capability 8.9 or newer (Ada, Hopper, Blackwell)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_friendly(module: torch.nn.Module, fqn: str) -> bool:
    """FP8 GEMMs need both matrix dimensions divisible by 16."""
    return (isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0
            and module.out_features % 16 == 0)


def check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise ValueError(f"fp8={granularity!r}: allowed values are {tuple(GRANULARITIES)} (or None for no FP8).")
    return granularity


def quantize_fp8(pipe, granularity="rowwise"):
    # set_inductor_config=False: torchao would otherwise switch on inductor's
    # coordinate-descent tuning for the whole process (most of the cold start,
    # for no gain).
    weight_only = Float8WeightOnlyConfig(set_inductor_config=False)
    quantize_(pipe.text_encoder_2, weight_only, filter_fn=fp8_friendly)
    if fp8_tensor_cores(pipe.transformer.device):  # Ada, Hopper, Blackwell
        dynamic = Float8DynamicActivationFloat8WeightConfig(
            granularity=GRANULARITIES[granularity](), set_inductor_config=False)
        quantize_(pipe.transformer, dynamic, filter_fn=fp8_friendly)
    else:  # no FP8 tensor cores (a CPU, say): FP8 storage, matmuls in bf16/float32
        print(f"{pipe.transformer.device}: no FP8 tensor cores, FP8 weight-only")
        quantize_(pipe.transformer, weight_only, filter_fn=fp8_friendly)


def fp8_state(model: torch.nn.Module) -> dict | None:
    """How a model's linear weights are stored, read off the model: None if not in FP8, else whether activations
    are quantized too (dynamic) and the weight scale's granularity."""
    linear = next((m for m in model.modules() if fp8_friendly(m, "")), None)
    weight = getattr(linear, "weight", None)
    if weight is None or "Float8" not in type(weight).__name__:
        return None
    granularity = "rowwise" if list(weight.block_size) == [1, weight.shape[1]] else "tensorwise"
    return dict(dynamic_activation=weight.act_quant_kwargs is not None, granularity=granularity)
