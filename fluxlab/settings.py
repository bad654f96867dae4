"""Generation settings, checked before any heavy work."""
import dataclasses
import json
import re
from pathlib import Path

import torch

PACKAGE = Path(__file__).parent
TINY_DIR = PACKAGE / "tiny"
FLUX_DEV_CONFIGS = PACKAGE / "configs" / "flux-dev"
DEFAULT_REPO = "black-forest-labs/FLUX.1-dev"
OFFLINE_SOURCES = ("tiny", "flux-dev-random")
ARTICLE_PROMPT = "A cat holding a sign that says hello world"
# The tiny pipeline knows only its shapes world, so its default prompt is one of its training captions.
TINY_PROMPT = "a large yellow circle on a blue background"
# Prompt, resolution and T5 length each source runs at unless told otherwise.
SOURCE_DEFAULTS = {
    "tiny": dict(prompt=TINY_PROMPT, height=128, width=128, max_sequence_length=64),
    "flux-dev-random": dict(prompt=ARTICLE_PROMPT, height=1024, width=1024, max_sequence_length=512),
    "real": dict(prompt=ARTICLE_PROMPT, height=1024, width=1024, max_sequence_length=512),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass(frozen=True)
class Source:
    """Where the pipeline comes from: `kind` is real, flux-dev-random or tiny."""

    kind: str
    location: str | None = None  # hub id or local folder, for kind == "real"

    @property
    def label(self) -> str:
        return self.kind if self.location is None else f"real:{self.location}"

    @property
    def is_random(self) -> bool:
        return self.kind == "flux-dev-random"


def resolve_source(spec: str) -> Source:
    """'tiny', 'flux-dev-random', a hub id ('owner/name') or a local folder of a FLUX.1-dev pipeline."""
    if spec in OFFLINE_SOURCES:
        return Source(spec)
    if spec == "real":
        return Source("real", DEFAULT_REPO)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"model source {spec!r}: the folder has no model_index.json; expected a pipeline "
                             "folder in the hub layout (model_index.json, transformer/, vae/, ...).")
        return Source("real", str(path.resolve()))
    if spec.startswith(("/", ".", "~")) or path.exists():
        raise ValueError(f"model source {spec!r}: no such folder. Allowed: 'tiny', 'flux-dev-random', "
                         f"a hub id such as '{DEFAULT_REPO}', or an existing local pipeline folder.")
    if _HUB_ID.match(spec):
        return Source("real", spec)
    raise ValueError(f"unknown model source {spec!r}. Allowed: 'tiny', 'flux-dev-random', a hub id such as "
                     f"'{DEFAULT_REPO}', or an existing local pipeline folder.")


def transformer_config(source: Source) -> dict:
    """The transformer's config, read without loading weights (a hub source is assumed to be FLUX.1-dev)."""
    if source.kind == "tiny":
        path = TINY_DIR / "transformer" / "config.json"
    elif source.kind == "real" and Path(source.location).is_dir():
        path = Path(source.location) / "transformer" / "config.json"
    else:
        path = FLUX_DEV_CONFIGS / "transformer.json"
    return json.loads(path.read_text())


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here. Allowed: 'auto', 'cpu'.")
    if not device.startswith(("cpu", "cuda")):
        raise ValueError(f"unknown device {device!r}. Allowed: 'auto', 'cpu', 'cuda', 'cuda:N'.")
    return torch.device(device)


@dataclasses.dataclass(frozen=True)
class Settings:
    """One image request: what to load, where to run it, and the pipeline's arguments."""

    source: Source
    device: torch.device
    prompt: str
    height: int
    width: int
    steps: int
    guidance: float
    seed: int
    max_sequence_length: int

    def pipe_kwargs(self) -> dict:
        return dict(prompt=self.prompt, height=self.height, width=self.width, num_inference_steps=self.steps,
                    guidance_scale=self.guidance, max_sequence_length=self.max_sequence_length)

    @property
    def image_tokens(self) -> int:
        return (self.height // 16) * (self.width // 16)

    def on(self, device: torch.device) -> "Settings":
        """The same request on another device (e.g. this rank's GPU)."""
        return dataclasses.replace(self, device=device)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(source=self.source.label, device=str(self.device))
        return d


def settings(model_source: str = "tiny", device: str = "auto", prompt: str | None = None,
             height: int | None = None, width: int | None = None, steps: int = 28, guidance: float = 3.5,
             seed: int = 0, max_sequence_length: int | None = None) -> Settings:
    """Check every argument and fill the source's defaults; raises ValueError saying what is allowed."""
    source = resolve_source(model_source)
    defaults = SOURCE_DEFAULTS[source.kind]
    prompt = defaults["prompt"] if prompt is None else prompt
    height = defaults["height"] if height is None else height
    width = defaults["width"] if width is None else width
    max_sequence_length = defaults["max_sequence_length"] if max_sequence_length is None else max_sequence_length
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value < 16 or value % 16:
            raise ValueError(f"{name}={value!r}: must be a positive multiple of 16 (FLUX packs 2x2 patches of "
                             "an 8x downsampled latent), e.g. 128, 512, 1024.")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}: must be an integer >= 1 (the article uses 28).")
    if not 1 <= max_sequence_length <= 512:
        raise ValueError(f"max_sequence_length={max_sequence_length!r}: must be between 1 and 512.")
    if not prompt:
        raise ValueError("prompt is empty: give the text to draw.")
    return Settings(source, resolve_device(device), prompt, height, width, steps, float(guidance), int(seed),
                    max_sequence_length)


def check_threshold(threshold: float) -> float:
    if threshold is None or not isinstance(threshold, (int, float)) or threshold < 0:
        raise ValueError(f"cache threshold {threshold!r}: must be a number >= 0 (0 caches nothing; "
                         "the article uses 0.06-0.12).")
    return float(threshold)
