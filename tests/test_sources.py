import shutil

import pytest
import torch

import fluxlab
from fluxlab.settings import TINY_DIR
from fluxlab.sources import flux_dev_random

from conftest import latents


def test_local_folder_in_hub_layout_loads_with_the_real_model_code(tmp_path, tiny, tiny_pipe):
    folder = tmp_path / "FLUX.1-dev"
    shutil.copytree(TINY_DIR, folder)
    settings = fluxlab.settings(str(folder), device="cpu", prompt=tiny.prompt, steps=8, height=128, width=128,
                                max_sequence_length=64)
    assert settings.source.kind == "real"
    pipe = fluxlab.load(settings)
    assert torch.equal(latents(pipe, settings), latents(tiny_pipe, tiny))


def test_missing_weights_say_how_to_get_them(tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(TINY_DIR, folder)
    for f in folder.glob("transformer/*.safetensors"):
        f.unlink()
    with pytest.raises(fluxlab.ModelUnavailable, match="flux-dev-random") as err:
        fluxlab.load(fluxlab.settings(str(folder), device="cpu"))
    assert "huggingface-cli download" in str(err.value)


def test_hub_id_without_network_fails_clearly():
    with pytest.raises(fluxlab.ModelUnavailable, match="'tiny'"):
        fluxlab.load(fluxlab.settings("black-forest-labs/FLUX.1-dev", device="cpu"))


def test_flux_dev_random_has_the_real_architecture():
    pipe = flux_dev_random(torch.device("meta"), torch.bfloat16)
    count = {n: sum(p.numel() for p in getattr(pipe, n).parameters())
             for n in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    assert count == dict(transformer=11_901_408_320, vae=83_819_683, text_encoder=123_060_480,
                         text_encoder_2=4_762_310_656)
    assert len(pipe.transformer.transformer_blocks) == 19 and len(pipe.transformer.single_transformer_blocks) == 38


def test_tiny_weights_are_safetensors_only():
    files = [f.name for f in TINY_DIR.rglob("*") if f.is_file()]
    assert any(f.endswith(".safetensors") for f in files)
    assert not any(f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")) for f in files)
