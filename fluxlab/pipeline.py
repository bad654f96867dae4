"""Load a pipeline from one of the three model sources (the real FLUX.1-dev, its architecture with random weights,
the bundled tiny pipeline) and generate an image with it."""
import contextlib
import gc
import json
import os

import diffusers
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from . import tokenizers
from .settings import DEFAULT_REPO, FLUX_DEV_CONFIGS, TINY_DIR, Settings


class ModelUnavailable(RuntimeError):
    """The real weights are not on this machine and cannot be fetched."""


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def show_progress() -> bool:
    """diffusers' denoising progress bar, for people running a notebook by hand; the book's runner turns it off
    (FLUXLAB_PROGRESS=0) so that executed pages do not show it."""
    return os.environ.get("FLUXLAB_PROGRESS", "1") != "0"


def load_pipeline(settings: Settings, dtype: torch.dtype | None = None) -> FluxPipeline:
    """The pipeline named by `settings.source`, on `settings.device`; bf16 on GPU, float32 on CPU."""
    dtype = dtype or default_dtype(settings.device)
    if show_progress():  # diffusers' loading bars follow the same switch
        diffusers.utils.logging.enable_progress_bar()
    else:
        diffusers.utils.logging.disable_progress_bar()
    source = settings.source
    if source.kind == "flux-dev-random":
        pipe = flux_dev_random(settings.device, dtype, seed=settings.seed)
    else:
        location = TINY_DIR if source.kind == "tiny" else source.location
        pipe = from_pretrained(str(location), dtype).to(settings.device)
    pipe.set_progress_bar_config(disable=not show_progress())
    return pipe


def generate(pipe, settings: Settings, output_type: str = "pil"):
    """One seeded pipeline call (the same seed gives the same image on every rank and every repeat)."""
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    return pipe(**settings.pipe_kwargs(), generator=generator, output_type=output_type).images[0]


def free_memory() -> None:
    """After `del pipe`: collect it now and hand its GPU memory back, so another pipeline or process can use it."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def from_pretrained(location: str, dtype: torch.dtype) -> FluxPipeline:
    """The loading code a user with the weights runs: safetensors only, no remote code."""
    try:
        return FluxPipeline.from_pretrained(location, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelUnavailable(
            f"could not load FLUX.1-dev from {location!r}: {err}\n"
            f"To use the real model: accept the licence of {DEFAULT_REPO} on the Hugging Face hub, log in "
            "(`huggingface-cli login`, or set HF_TOKEN in your environment) and pass the hub id, or download it "
            "once (`huggingface-cli download black-forest-labs/FLUX.1-dev --local-dir DIR`) and pass DIR.\n"
            "Without the weights, use model_source='flux-dev-random' (the same architecture with random weights, "
            "for timing on a GPU) or 'tiny' (the small bundled pipeline, runs on CPU)."
        ) from None


@contextlib.contextmanager
def _building(device: torch.device, dtype: torch.dtype):
    """Create parameters directly on `device` in `dtype` (no float32 copy on the host)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def build_pipeline(configs: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> FluxPipeline:
    """A FluxPipeline with freshly initialised weights from component configs (dicts keyed like the hub layout)."""
    torch.manual_seed(seed)
    with _building(device, dtype):
        transformer = FluxTransformer2DModel.from_config(configs["transformer"])
        vae = AutoencoderKL.from_config(configs["vae"])
        clip = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        t5 = T5EncoderModel(T5Config(**configs["text_encoder_2"]))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(configs["scheduler"]),
        vae=vae.eval(),
        text_encoder=clip.eval(),
        tokenizer=tokenizers.clip_tokenizer(configs["text_encoder"]["max_position_embeddings"]),
        text_encoder_2=t5.eval(),
        tokenizer_2=tokenizers.t5_tokenizer(),
        transformer=transformer.eval(),
    )
    return pipe


def flux_dev_configs() -> dict:
    return {p.stem: json.loads(p.read_text()) for p in FLUX_DEV_CONFIGS.glob("*.json")}


def flux_dev_random(device: torch.device, dtype: torch.dtype, seed: int = 0) -> FluxPipeline:
    """FLUX.1-dev's architecture (all five components) with random weights: the real model's cost, no image."""
    return build_pipeline(flux_dev_configs(), device, dtype, seed)
