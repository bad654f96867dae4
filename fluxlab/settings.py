"""Generation settings: one validation of a request, used by the chapters, the runner, the benchmark and the server.

Every field is checked for its type and range before anything heavy runs; an error names the field, the value and
what is allowed.
"""
import dataclasses
import json
import math
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
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit integer


@dataclasses.dataclass(frozen=True)
class Limits:
    """Upper bounds of a request. The defaults let a chapter run anything a GPU can; the server is stricter
    (`SERVER_LIMITS`, set with `python -m fluxlab serve --max-steps ...`)."""

    max_steps: int = 1000
    max_side: int = 4096
    max_prompt_chars: int = 20_000


SERVER_LIMITS = Limits(max_steps=100, max_side=2048, max_prompt_chars=2000)


@dataclasses.dataclass(frozen=True)
class Source:
    """Where the pipeline comes from: `kind` is real, flux-dev-random or tiny."""

    kind: str
    location: str | None = None  # hub id or local folder, for kind == "real"

    @property
    def label(self) -> str:
        return self.kind if self.location is None else f"real:{self.location}"

    @property
    def spec(self) -> str:
        """What `check` takes to name this source again."""
        return self.kind if self.location is None else self.location

    @property
    def is_random(self) -> bool:
        return self.kind == "flux-dev-random"


def resolve_source(spec) -> Source:
    """'tiny', 'flux-dev-random', a hub id ('owner/name') or a local folder of a FLUX.1-dev pipeline."""
    allowed = (f"Allowed: 'tiny', 'flux-dev-random', a hub id such as '{DEFAULT_REPO}', or an existing local "
               "pipeline folder.")
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model_source={spec!r}: must be a non-empty string. {allowed}")
    if spec in OFFLINE_SOURCES:
        return Source(spec)
    if spec == "real":
        return Source("real", DEFAULT_REPO)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"model_source={spec!r}: the folder has no model_index.json; expected a pipeline "
                             "folder in the hub layout (model_index.json, transformer/, vae/, ...).")
        return Source("real", str(path.resolve()))
    if spec.startswith(("/", ".", "~")) or path.exists():
        raise ValueError(f"model_source={spec!r}: no such folder. {allowed}")
    if _HUB_ID.match(spec):
        return Source("real", spec)
    raise ValueError(f"unknown model source {spec!r}. {allowed}")


def transformer_config(source: Source) -> dict:
    """The transformer's config, read without loading weights (a hub source is assumed to be FLUX.1-dev)."""
    if source.kind == "tiny":
        path = TINY_DIR / "transformer" / "config.json"
    elif source.kind == "real" and Path(source.location).is_dir():
        path = Path(source.location) / "transformer" / "config.json"
    else:
        path = FLUX_DEV_CONFIGS / "transformer.json"
    return json.loads(path.read_text())


def resolve_device(device) -> torch.device:
    if not isinstance(device, str):
        raise ValueError(f"device={device!r}: must be a string. Allowed: 'auto', 'cpu', 'cuda', 'cuda:N'.")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"unknown device {device!r}. Allowed: 'auto', 'cpu', 'cuda', 'cuda:N'.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here. Allowed: 'auto', 'cpu'.")
    return torch.device(device)


def check_int(name: str, value, low: int, high: int, hint: str = "") -> int:
    """An integer (not a bool, not a float) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}={value!r}: must be an integer from {low} to {high}{hint}.")
    return value


def check_number(name: str, value, low: float, high: float, hint: str = "") -> float:
    """A finite number (not a bool) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ValueError(f"{name}={value!r}: must be a finite number from {low:g} to {high:g}{hint}.")
    return float(value)


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

    def with_request(self, limits: Limits = Limits(), **fields) -> "Settings":
        """This request with some fields replaced, checked again (the server's per-request path)."""
        current = dict(model_source=self.source.spec, device=str(self.device), prompt=self.prompt,
                       height=self.height, width=self.width, steps=self.steps, guidance=self.guidance,
                       seed=self.seed, max_sequence_length=self.max_sequence_length)
        return check(**{**current, **fields}, limits=limits)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(source=self.source.label, device=str(self.device))
        return d


def check(model_source="tiny", device="auto", prompt=None, height=None, width=None, steps=28, guidance=3.5,
          seed=0, max_sequence_length=None, limits: Limits = Limits()) -> Settings:
    """Check every argument and fill the source's defaults; raises ValueError naming the field, the value and
    what is allowed."""
    source = resolve_source(model_source)
    defaults = SOURCE_DEFAULTS[source.kind]
    prompt = defaults["prompt"] if prompt is None else prompt
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt={_short(prompt)}: must be a non-empty string (the text to draw).")
    try:
        prompt.encode("utf-8")  # the tokenizers take Unicode text only
    except UnicodeEncodeError as err:
        raise ValueError(f"prompt: not valid Unicode text ({err.reason}: {prompt[err.start:err.end]!r} at "
                         f"character {err.start}); send the text as UTF-8.") from None
    if len(prompt) > limits.max_prompt_chars:
        raise ValueError(f"prompt of {len(prompt)} characters: at most {limits.max_prompt_chars} are allowed "
                         "(T5 reads 512 tokens at most).")
    sides = {}
    for name, value in (("height", height), ("width", width)):
        value = defaults[name] if value is None else value
        sides[name] = check_int(name, value, 16, limits.max_side)
        if value % 16:
            raise ValueError(f"{name}={value!r}: must be a multiple of 16 (FLUX packs 2x2 patches of an 8x "
                             "downsampled latent), e.g. 128, 512, 1024.")
    msl = defaults["max_sequence_length"] if max_sequence_length is None else max_sequence_length
    return Settings(
        source=source, device=resolve_device(device), prompt=prompt, height=sides["height"], width=sides["width"],
        steps=check_int("steps", steps, 1, limits.max_steps, " (the article uses 28)"),
        guidance=check_number("guidance", guidance, 0.0, 100.0, " (the article uses 3.5)"),
        seed=check_int("seed", seed, 0, MAX_SEED),
        max_sequence_length=check_int("max_sequence_length", msl, 1, 512))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_threshold(threshold) -> float:
    return check_number("cache threshold", threshold, 0.0, 1.0,
                        " (0 caches nothing, 1 skips every step after the first; the article uses 0.06-0.12)")


def full_size(source) -> bool:
    """FLUX.1-dev's size (a 3072-wide transformer), read from the source's config without loading weights."""
    config = transformer_config(source)
    return config["num_attention_heads"] * config["attention_head_dim"] >= 3072


def check_full_size(need_gb, source, device, what: str) -> None:
    """Refuse the full-size model (FLUX.1-dev's size, any source) on a CPU, or on a GPU with less than `need_gb` GB;
    `what` names who needs it in the message. Other sources pass."""
    if not need_gb or not full_size(source):
        return
    if device.type != "cuda":
        raise ValueError(f"{what} with the full-size model needs a CUDA GPU with {need_gb} GB (it holds "
                         f"FLUX.1-dev's 12 B parameters); on {device.type} use model_source='tiny'.")
    have = torch.cuda.get_device_properties(device).total_memory / 1e9
    if have < need_gb:
        raise ValueError(f"{what} with the full-size model needs {need_gb} GB of GPU memory; "
                         f"{torch.cuda.get_device_name(device)} has {have:.0f} GB.")
