"""FP8 on the CPU: weight-only, said in one line; torchao leaves inductor's settings alone."""
import dataclasses

import torch

import fluxlab
from fluxlab import quant, shapes

from conftest import latents


def test_fp8_on_cpu_runs_weight_only_and_says_so(tiny, tiny_pipe, capsys):
    tiny = dataclasses.replace(tiny, prompt="a large red circle on a blue background")
    reference = latents(tiny_pipe, tiny)
    reference_image = fluxlab.generate(tiny_pipe, tiny)
    quant.quantize_fp8(tiny_pipe, "rowwise")
    assert "no FP8 tensor cores, FP8 weight-only" in capsys.readouterr().out
    # torchao must not switch on coordinate-descent tuning (195 s of a 213 s cold start on H100)
    assert torch._inductor.config.coordinate_descent_tuning is False
    assert quant.fp8_state(tiny_pipe.transformer) == dict(dynamic_activation=False, granularity="rowwise")
    assert quant.fp8_state(tiny_pipe.text_encoder_2)["dynamic_activation"] is False
    assert quant.fp8_state(tiny_pipe.vae) is None
    out = latents(tiny_pipe, tiny)
    relative = ((out - reference).norm() / reference.norm()).item()
    assert torch.isfinite(out).all() and 0 < relative < 0.1  # measured 0.031 on the trained tiny pipeline
    seen, expected = shapes.read(fluxlab.generate(tiny_pipe, tiny)), shapes.read(reference_image)
    assert (seen["background"], seen["colour"]) == (expected["background"], expected["colour"]) == ("blue", "red")


def test_chapter_3_writes_the_package_function(tmp_path):
    """d2l's rule: the chapter defines the function it teaches, the package keeps the same code."""
    import inspect

    import nbformat

    from conftest import ROOT

    nb = nbformat.read(ROOT / "notebooks" / "03_fp8_compile.ipynb", 4)
    cell = next(c.source for c in nb.cells if c.cell_type == "code" and "def quantize_fp8" in c.source)
    taught = cell[cell.index("def quantize_fp8"):].strip()
    assert taught == inspect.getsource(quant.quantize_fp8).strip()
