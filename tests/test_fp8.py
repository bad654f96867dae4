import dataclasses

import pytest
import torch

import fluxlab
from fluxlab import shapes

from conftest import latents


def test_fp8_on_cpu_runs_weight_only_and_says_so(tiny, tiny_pipe, capsys):
    tiny = dataclasses.replace(tiny, prompt="a large red circle on a blue background")
    reference = latents(tiny_pipe, tiny)
    reference_image = fluxlab.generate(tiny_pipe, tiny)
    done = fluxlab.optimize(tiny_pipe, fp8="rowwise")
    assert "no FP8 tensor cores" in done["fp8"]["ran"] and "weight-only" in done["fp8"]["ran"]
    # torchao must not switch on coordinate-descent tuning (195 s of a 213 s cold start on H100)
    assert torch._inductor.config.coordinate_descent_tuning is False
    assert "no FP8 tensor cores" in capsys.readouterr().out
    weight = tiny_pipe.transformer.transformer_blocks[0].attn.to_q.weight
    assert "Float8" in type(weight).__name__
    out = latents(tiny_pipe, tiny)
    assert torch.isfinite(out).all()
    relative = ((out - reference).norm() / reference.norm()).item()
    assert 0 < relative < 0.1  # measured 0.031 on the trained tiny pipeline at 8 steps
    seen, expected = shapes.read(fluxlab.generate(tiny_pipe, tiny)), shapes.read(reference_image)
    assert (seen["background"], seen["colour"]) == (expected["background"], expected["colour"]) == ("blue", "red")


def test_options_apply_once(tiny_pipe):
    fluxlab.optimize(tiny_pipe, cache=0.1)
    with pytest.raises(ValueError, match="cache was already applied"):
        fluxlab.optimize(tiny_pipe, cache=0.2)
