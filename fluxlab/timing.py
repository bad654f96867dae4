"""Time a pipeline call: warm-up apart, device synchronised, repeated; the only writer of records."""
import io
import statistics
import time
from pathlib import Path

import torch

from . import records
from .optimize import applied, cache_stats, describe
from .parallel import Dist, barrier
from .settings import Settings


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


def measure(pipe, settings: Settings, *, name: str, chapter: str, output_dir: str | Path, dist: Dist | None = None,
            warmup: int = 1, repeats: int = 3, label: str | None = None) -> dict:
    """Run `warmup` untimed-for-ranking calls (the first is the cold start), then `repeats` timed calls.

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
        dtype=str(pipe.transformer.dtype).removeprefix("torch."),
        random_weights=settings.source.is_random,
        settings=settings.as_dict(),
        optimizations={k: v for k, v in done.items() if not k.startswith("_")},
        timing=dict(warmup_s=warmup_s, times_s=times, min_s=min(times), median_s=statistics.median(times),
                    cold_start_s=warmup_s[0]),
        cache=stats.summary() if stats else None,
        peak_mem_gb=torch.cuda.max_memory_allocated(settings.device) / 1e9 if settings.device.type == "cuda" else None,
        image=f"{chapter}--{name}.png",
        provenance=records.provenance(settings.device, dist.world_size),
    )
    if dist.is_main:
        output_dir = Path(output_dir)
        if settings.source.is_random:  # noise: keep a thumbnail, not megabytes of incompressible pixels
            image = image.resize((256, 256 * image.height // image.width))
        png = io.BytesIO()
        image.save(png, format="PNG")
        records.replace_atomically(output_dir / record["image"], png.getvalue())
        records.write(record, output_dir / f"{chapter}--{name}.json")
    if dist.world_size > 1:
        barrier()
    return record
