"""FP8 with torchao: T5 weight-only, transformer dynamic activation + weight (per-row or per-tensor)."""
import logging

import torch

GRANULARITIES = ("rowwise", "tensorwise")


def fp8_tensor_cores(device: torch.device) -> bool:
    """FP8 matrix multiplies need CUDA compute capability 8.9 or newer (Ada, Hopper, Blackwell)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise ValueError(f"fp8={granularity!r}: allowed values are {GRANULARITIES} (or None for no FP8).")
    return granularity


def _torchao():
    # torchao's import logs about optional CUDA extensions and deprecated pytree registrations; harmless.
    for name in ("torch.utils._pytree", "torchao"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import torchao.quantization as q

    return q


def _fp8_friendly(module: torch.nn.Module, fqn: str) -> bool:
    """FP8 GEMMs need both matrix dimensions divisible by 16."""
    return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def quantize_fp8(pipe, granularity: str = "rowwise") -> str:
    """Quantize in place; returns a sentence saying what ran (it differs where FP8 tensor cores are missing)."""
    granularity = check_granularity(granularity)
    q = _torchao()
    device = pipe.transformer.device
    # set_inductor_config=False on every config: torchao would otherwise turn on inductor's coordinate-descent
    # tuning process-wide, which benchmarks kernel variants for ~195 s of a 213 s cold start on H100 (measured)
    # for no steady-state gain (3.009 vs 2.997 s/image); fluxlab leaves inductor's settings to the caller.
    weight_only = q.Float8WeightOnlyConfig(set_inductor_config=False)
    q.quantize_(pipe.text_encoder_2, weight_only, filter_fn=_fp8_friendly)
    if fp8_tensor_cores(device):
        gran = q.PerRow() if granularity == "rowwise" else q.PerTensor()
        config = q.Float8DynamicActivationFloat8WeightConfig(granularity=gran, set_inductor_config=False)
        q.quantize_(pipe.transformer, config, filter_fn=_fp8_friendly)
        return f"FP8 dynamic activation + weight ({granularity}) on the transformer, FP8 weight-only on T5"
    q.quantize_(pipe.transformer, weight_only, filter_fn=_fp8_friendly)
    return (f"FP8 weight-only on the transformer and T5: {device} has no FP8 tensor cores (dynamic activation "
            "quantization needs CUDA compute capability 8.9+), so weights are stored in FP8 and multiplied "
            "in the activation dtype")
