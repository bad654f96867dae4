"""Loading the three sources, and the progress bar a reader sees by hand (not in the book's pages)."""
import shutil

import pytest
import torch

import fluxlab
from fluxlab.pipeline import flux_dev_random
from fluxlab.settings import TINY_DIR

from conftest import latents


def test_local_folder_in_hub_layout_loads_with_the_real_model_code(tmp_path, tiny, tiny_pipe):
    folder = tmp_path / "FLUX.1-dev"
    shutil.copytree(TINY_DIR, folder)
    settings = fluxlab.check_settings(str(folder), device="cpu", prompt=tiny.prompt, steps=8, height=128, width=128,
                                      max_sequence_length=64)
    assert settings.source.kind == "real"
    pipe = fluxlab.load_pipeline(settings)
    assert torch.equal(latents(pipe, settings), latents(tiny_pipe, tiny))


def test_missing_weights_say_how_to_get_them(tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(TINY_DIR, folder)
    for f in folder.glob("transformer/*.safetensors"):
        f.unlink()
    with pytest.raises(fluxlab.ModelUnavailable, match="flux-dev-random") as err:
        fluxlab.load_pipeline(fluxlab.check_settings(str(folder), device="cpu"))
    assert "huggingface-cli download" in str(err.value)


def test_hub_id_without_network_fails_clearly():
    with pytest.raises(fluxlab.ModelUnavailable, match="'tiny'"):
        fluxlab.load_pipeline(fluxlab.check_settings("black-forest-labs/FLUX.1-dev", device="cpu"))


def test_flux_dev_random_has_the_real_architecture():
    pipe = flux_dev_random(torch.device("meta"), torch.bfloat16)
    count = {n: sum(p.numel() for p in getattr(pipe, n).parameters())
             for n in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    assert count == dict(transformer=11_901_408_320, vae=83_819_683, text_encoder=123_060_480,
                         text_encoder_2=4_762_310_656)
    assert len(pipe.transformer.transformer_blocks) == 19 and len(pipe.transformer.single_transformer_blocks) == 38
    assert fluxlab.settings.full_size(fluxlab.check_settings("flux-dev-random").source)
    assert not fluxlab.settings.full_size(fluxlab.check_settings("tiny").source)


def test_tiny_weights_are_safetensors_only():
    files = [f.name for f in TINY_DIR.rglob("*") if f.is_file()]
    assert any(f.endswith(".safetensors") for f in files)
    assert not any(f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")) for f in files)


def test_progress_bar_by_hand_not_in_the_books_runs(tiny, monkeypatch, capsys):
    monkeypatch.delenv("FLUXLAB_PROGRESS", raising=False)
    pipe = fluxlab.load_pipeline(tiny)
    fluxlab.generate(pipe, tiny)
    assert "8/8" in capsys.readouterr().err  # diffusers' denoising bar, as a reader running a cell expects
    fluxlab.measure(pipe, tiny, name="b", chapter="t", output_dir=None, repeats=1)
    assert "8/8" not in capsys.readouterr().err  # never inside timed calls
    monkeypatch.setenv("FLUXLAB_PROGRESS", "0")  # what the book's runner sets
    quiet = fluxlab.load_pipeline(tiny)
    fluxlab.generate(quiet, tiny)
    assert "8/8" not in capsys.readouterr().err
