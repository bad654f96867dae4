"""Time a pipeline call: warm-up apart, device synchronised, repeated; build the record every timed configuration
is stored as (chapters, benchmark, serving pool)."""
import io
import statistics
import time
from pathlib import Path

import torch

from . import cache, records
from .applied import applied, describe
from .parallel import World, barrier
from .pipeline import generate
from .settings import Settings


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(pipe, settings: Settings, world: World) -> tuple[float, object]:
    """Seconds of one pipeline call, all processes starting together, the device synchronised at both ends."""
    if world.world_size > 1:
        barrier()
    sync(settings.device)
    start = time.perf_counter()
    image = generate(pipe, settings)
    sync(settings.device)
    return time.perf_counter() - start, image


def timing(warmup_s: list[float], times_s: list[float]) -> dict:
    return dict(warmup_s=warmup_s, times_s=times_s, min_s=min(times_s), median_s=statistics.median(times_s),
                cold_start_s=warmup_s[0])


def step_costs(pipe, settings: Settings) -> dict:
    """Seconds of each transformer call (denoising step) of one more pipeline call, and whether First Block Cache
    computed it (a skipped step still runs the first block and the decision)."""
    device, marks = settings.device, []

    def stamp(*_):
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            marks.append(event)
        else:
            marks.append(time.perf_counter())

    handles = [pipe.transformer.register_forward_pre_hook(stamp), pipe.transformer.register_forward_hook(stamp)]
    try:
        generate(pipe, settings)
    finally:
        for h in handles:
            h.remove()
    sync(device)
    pairs = list(zip(marks[::2], marks[1::2]))
    seconds = [a.elapsed_time(b) / 1e3 for a, b in pairs] if device.type == "cuda" else [b - a for a, b in pairs]
    stats = cache.stats(pipe.transformer)
    computed = [c for _, _, c in stats.runs[-1]] if stats else [True] * len(seconds)
    return dict(seconds=seconds, computed=computed)


def vae_decode_seconds(pipe, settings: Settings) -> float:
    """Median seconds of the VAE decoding one image's latents (3 calls after one warm-up): the part of an image
    that context parallelism does not split."""
    vae = pipe.vae
    shape = (1, vae.config.latent_channels, settings.height // 8, settings.width // 8)
    latents = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(0)).to(settings.device, vae.dtype)
    times = []
    with torch.no_grad():
        for _ in range(4):
            sync(settings.device)
            start = time.perf_counter()
            vae.decode(latents, return_dict=False)
            sync(settings.device)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def record(*, name: str, chapter: str, settings: Settings, optimizations: dict, processes: int, timing: dict,
           label: str | None = None, dtype: str, cache_summary: dict | None = None, peak_mem_gb: float | None = None,
           image: str | None = None, extras: dict | None = None) -> dict:
    """A record in the one schema (`fluxlab.records`)."""
    return dict(schema=records.SCHEMA, name=name, chapter=chapter,
                label=label or describe(optimizations, processes), model_source=settings.source.label,
                model_weights=records.model_weights(settings.source), random_weights=settings.source.is_random,
                dtype=dtype, settings=settings.as_dict(), optimizations=optimizations, processes=processes,
                timing=timing, cache=cache_summary, peak_mem_gb=peak_mem_gb, image=image, extras=extras or {},
                provenance=records.provenance(settings.device, processes))


def measure(pipe, settings: Settings, *, name: str, chapter: str, output_dir: str | Path | None,
            world: World | None = None, warmup: int = 1, repeats: int = 3, label: str | None = None,
            extras: dict | None = None) -> dict:
    """Run `warmup` calls (the first is the cold start), then `repeats` timed calls; then, untimed, each of
    `extras` (name -> function(pipe, settings)), e.g. `{"step_costs": fluxlab.step_costs}`.

    Process 0 writes `<output_dir>/<chapter>--<name>.json` and `.png` only after every call succeeded (nothing
    with `output_dir=None`), and every process returns the record."""
    if isinstance(warmup, bool) or not isinstance(warmup, int) or isinstance(repeats, bool) \
            or not isinstance(repeats, int) or warmup < 1 or repeats < 1:
        raise ValueError(f"warmup={warmup!r}, repeats={repeats!r}: both must be integers >= 1 (the warm-up is "
                         "kept out of the timing).")
    world = world or World(0, 1, settings.device)
    bar = dict(pipe._progress_bar_config) if hasattr(pipe, "_progress_bar_config") else {}
    pipe.set_progress_bar_config(disable=True)  # no progress bar inside the timed calls
    try:
        warmup_s = [timed_call(pipe, settings, world)[0] for _ in range(warmup)]
        if settings.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(settings.device)
        times, image = [], None
        for _ in range(repeats):
            seconds, image = timed_call(pipe, settings, world)
            times.append(seconds)
        stats = cache.stats(pipe.transformer)
        summary = stats.summary() if stats else None
        peak, memory = None, {}
        if settings.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(settings.device) / 1e9
            memory["peak_reserved_gb"] = torch.cuda.max_memory_reserved(settings.device) / 1e9
        measured = {key: fn(pipe, settings) for key, fn in (extras or {}).items()} | memory
    finally:
        pipe.set_progress_bar_config(**bar)
    rec = record(name=name, chapter=chapter, settings=settings, optimizations=applied(pipe),
                 processes=world.world_size, timing=timing(warmup_s, times), label=label,
                 dtype=str(pipe.transformer.dtype).removeprefix("torch."), cache_summary=summary, peak_mem_gb=peak,
                 image=f"{chapter}--{name}.png" if output_dir is not None else None, extras=measured)
    if world.is_main and output_dir is not None:
        save(rec, image, output_dir)
    if world.world_size > 1:
        barrier()
    return rec


def save(rec: dict, image, output_dir: str | Path) -> None:
    """The record's image (a thumbnail for random weights: noise does not compress) and the record itself."""
    output_dir = Path(output_dir)
    if rec["random_weights"]:
        image = image.resize((256, 256 * image.height // image.width))
    png = io.BytesIO()
    image.save(png, format="PNG")
    records.replace_atomically(output_dir / rec["image"], png.getvalue())
    records.write(output_dir / f"{rec['chapter']}--{rec['name']}.json", [rec])
