"""FLUX's tanh-GELU written as x * sigmoid(2z), the same function: 0.5 * (1 + tanh(z)) = sigmoid(2z).

inductor writes tanh as a call to libdevice's tanh, and the sigmoid form as one exponential and a division: fewer
float32 instructions per element. FLUX's largest fused elementwise kernel computes the single blocks' GELU, joins it
to the attention output and quantizes the row to FP8 in two passes over it; the swap shortens that kernel and the
double blocks' MLP kernel (chapter 3 and the bench measure it).
"""
import math

import torch
from diffusers.models.activations import GELU

TWO_SQRT_2_OVER_PI = 2 * math.sqrt(2 / math.pi)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """torch.nn.functional.gelu(x, approximate="tanh"), computed in float32 as x * sigmoid(2z)."""
    y = x.float()
    return (y * torch.sigmoid(TWO_SQRT_2_OVER_PI * (y + 0.044715 * y * y * y))).to(x.dtype)


class SigmoidGELU(torch.nn.Module):
    """nn.GELU(approximate="tanh") through `gelu_tanh`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(x)


def use(transformer) -> None:
    """Every tanh-GELU of a FLUX transformer through `gelu_tanh`: the single blocks' `act_mlp` modules, and the
    activation of the double blocks' feed-forwards (diffusers' GELU modules, whose projection stays as it is)."""
    for block in transformer.single_transformer_blocks:
        block.act_mlp = SigmoidGELU()
    for module in transformer.modules():
        if isinstance(module, GELU) and module.approximate == "tanh":
            module.gelu = gelu_tanh  # diffusers' GELU.forward calls self.gelu(projected)


def used(transformer) -> bool:
    """Whether `use` was applied."""
    return any(isinstance(m, SigmoidGELU) for m in transformer.modules())
