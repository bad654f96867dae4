"""Time a pipeline call: warm-up apart, device synchronised, repeated; the only writer of records."""
import io
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from . import records
from .optimize import applied, cache_stats, describe
from .parallel import Dist, barrier
from .serve import REQUEST_FIELDS
from .settings import Settings
from .sources import default_dtype


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(pipe, settings: Settings, output_type: str = "pil"):
    """One seeded pipeline call (the same seed gives the same image on every rank and every repeat)."""
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    return pipe(**settings.pipe_kwargs(), generator=generator, output_type=output_type).images[0]


def _timed_call(pipe, settings: Settings, dist: Dist) -> tuple[float, object]:
    if dist.world_size > 1:
        barrier()
    _sync(settings.device)
    start = time.perf_counter()
    image = generate(pipe, settings)
    _sync(settings.device)
    return time.perf_counter() - start, image


def _timing(warmup_s: list[float], times: list[float], **extra) -> dict:
    return dict(warmup_s=warmup_s, times_s=times, min_s=min(times), median_s=statistics.median(times),
                cold_start_s=warmup_s[0], **extra)


def step_times(pipe, settings: Settings) -> list[float]:
    """Seconds of each transformer call (denoising step) of one extra, untimed pipeline call."""
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
    _sync(device)
    pairs = zip(marks[::2], marks[1::2])
    if device.type == "cuda":
        return [a.elapsed_time(b) / 1e3 for a, b in pairs]
    return [b - a for a, b in pairs]


def _adherence(pipe, settings: Settings) -> dict | None:
    """Held-out prompt adherence, for the tiny source only (the checker knows its shapes world, nothing else)."""
    if settings.source.kind != "tiny":
        return None
    from .shapes import adherence

    stats = cache_stats(pipe)
    before = len(stats.runs) if stats else 0
    score = adherence(pipe, settings)
    if stats:
        skipped = stats.skipped_counts(before)
        score["mean_skipped_steps"] = sum(skipped) / len(skipped)
    return score


def measure(pipe, settings: Settings, *, name: str, chapter: str, output_dir: str | Path, dist: Dist | None = None,
            warmup: int = 1, repeats: int = 3, label: str | None = None, step_costs: bool = False,
            adherence: bool = False) -> dict:
    """Run `warmup` untimed-for-ranking calls (the first is the cold start), then `repeats` timed calls.

    Then, untimed: `step_costs` times each denoising step of one more call (with the cache's decision for each);
    `adherence` scores the held-out prompts (tiny source only; None for the others).
    Writes `<output_dir>/<chapter>--<name>.json` and `.png` (rank 0) only after every call succeeded,
    and returns the record.
    """
    if warmup < 1 or repeats < 1:
        raise ValueError(f"warmup={warmup}, repeats={repeats}: both must be >= 1 (warm-up is kept out of the timing).")
    dist = dist or Dist(0, 1, settings.device)
    warmup_s = [_timed_call(pipe, settings, dist)[0] for _ in range(warmup)]
    if settings.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(settings.device)
    times, image = [], None
    for _ in range(repeats):
        seconds, image = _timed_call(pipe, settings, dist)
        times.append(seconds)
    done = applied(pipe)
    stats = cache_stats(pipe)
    record = dict(
        name=name,
        chapter=chapter,
        label=label or describe(done, dist.world_size),
        model_source=settings.source.label,
        model_weights=records.model_weights(settings.source),
        dtype=str(pipe.transformer.dtype).removeprefix("torch."),
        random_weights=settings.source.is_random,
        settings=settings.as_dict(),
        optimizations={k: v for k, v in done.items() if not k.startswith("_")},
        timing=_timing(warmup_s, times),
        cache=stats.summary() if stats else None,
        peak_mem_gb=torch.cuda.max_memory_allocated(settings.device) / 1e9 if settings.device.type == "cuda" else None,
        image=f"{chapter}--{name}.png",
        provenance=records.provenance(settings.device, dist.world_size),
    )
    if step_costs:
        seconds = step_times(pipe, settings)
        computed = [c for _, _, c in stats.runs[-1]] if stats else [True] * len(seconds)
        record["step_costs"] = dict(seconds=seconds, computed=computed)
    if adherence:
        record["adherence"] = _adherence(pipe, settings)
    if dist.is_main:
        _save(record, image, settings, output_dir)
    if dist.world_size > 1:
        barrier()
    return record


def _save(record: dict, image, settings: Settings, output_dir: str | Path) -> None:
    output_dir = Path(output_dir)
    if settings.source.is_random:  # noise: keep a thumbnail, not megabytes of incompressible pixels
        image = image.resize((256, 256 * image.height // image.width))
    png = io.BytesIO()
    image.save(png, format="PNG")
    records.replace_atomically(output_dir / record["image"], png.getvalue())
    records.write(record, output_dir / f"{record['chapter']}--{record['name']}.json")


def measure_pool(pool, settings: Settings, *, name: str, chapter: str, output_dir: str | Path,
                 repeats: int = 3) -> dict:
    """Per-request latency of a started serving pool (`fluxlab.serve.Pool`), after one untimed request.

    The pool's start (spawn the processes, load, optimize and compile, first image) is what a one-shot job pays
    before its first image; it is recorded as the cold start. Writes the record like `measure`."""
    request = pool.check({k: getattr(settings, k) for k in REQUEST_FIELDS})
    pool.generate(request)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        png, _ = pool.generate(request)
        times.append(time.perf_counter() - start)
    optimizations = {k: v for k, v in pool.config.items() if k in ("cache", "fp8", "compile") and v is not None}
    label = "serving pool: " + (", ".join(f"{k} {v}" for k, v in optimizations.items()) or "no optimizations")
    record = dict(
        name=name, chapter=chapter, label=f"{label}, {pool.world_size} process(es)",
        model_source=settings.source.label, model_weights=records.model_weights(settings.source),
        dtype=str(default_dtype(settings.device)).removeprefix("torch."),
        random_weights=settings.source.is_random, settings=settings.as_dict(), optimizations=optimizations,
        timing=_timing([pool.start_s], times, first_image_in_worker_s=pool.warmup_s),
        cache=None, peak_mem_gb=None, image=f"{chapter}--{name}.png",
        provenance=records.provenance(settings.device, pool.world_size),
    )
    _save(record, Image.open(io.BytesIO(png)), settings, output_dir)
    return record
