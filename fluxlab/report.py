"""Tables, plots, image grids and quality figures, all built from result records."""
import textwrap
from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Markdown
from PIL import Image, ImageDraw
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from . import records as _records

RANDOM_NOTE = ("`flux-dev-random` has FLUX.1-dev's architecture with random weights: its timings are the real "
               "model's cost, but its images are noise and its cache hit rates say nothing about the real model.")


def image(record: dict, folder: str | Path) -> Image.Image:
    return Image.open(Path(folder) / record["image"]).convert("RGB")


def _as_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def quality(img: Image.Image, reference: Image.Image) -> dict:
    """PSNR (dB, inf when identical) and SSIM of an image against the reference image."""
    a, b = _as_tensor(img), _as_tensor(reference)
    mse = torch.mean((a - b) ** 2).item()
    psnr = float("inf") if mse == 0 else peak_signal_noise_ratio(a, b, data_range=1.0).item()
    return dict(psnr_db=psnr, ssim=structural_similarity_index_measure(a, b, data_range=1.0).item())


def same_run(a: dict, b: dict) -> bool:
    """Two records may be compared as a ratio only if one run measured both on the same kind of device."""
    pa, pb = a["provenance"], b["provenance"]
    keys = ("height", "width", "steps", "prompt", "seed")
    return (pa["run_id"] == pb["run_id"] and pa["device_name"] == pb["device_name"]
            and a["model_source"] == b["model_source"] and all(a["settings"][k] == b["settings"][k] for k in keys))


EARLIER_TINY = "tiny (earlier training)"
EARLIER_TINY_NOTE = (f"{EARLIER_TINY}: made with a tiny pipeline trained before the one now bundled (its weights "
                     "fingerprint differs or predates fingerprints); its images and adherence are that model's.")


def source(rec: dict) -> str:
    """The record's model source; a tiny record made with other weights than the bundled ones says so."""
    if rec["model_source"] == "tiny" and rec.get("model_weights") != _records.tiny_weights():
        return EARLIER_TINY
    return rec["model_source"]


def _fmt(x, spec=".2f", none="—"):
    return none if x is None else format(x, spec)


def rows(records: list[dict], folder: str | Path, baselines: list[dict]) -> list[dict]:
    """One row per record: times, speedup and image quality against the first of `baselines` that ran with it."""
    out = []
    for rec in records:
        match = next((b for b in baselines if same_run(rec, b)), None)
        comparable = match is not None
        q = quality(image(rec, folder), image(match, folder)) if comparable else {}
        cache = rec.get("cache")
        out.append(dict(
            configuration=f"{rec['label']} ({rec['dtype']})", processes=rec["provenance"]["world_size"],
            device=rec["provenance"]["device_name"], source=source(rec),
            min_s=rec["timing"]["min_s"], median_s=rec["timing"]["median_s"],
            speedup=match["timing"]["median_s"] / rec["timing"]["median_s"] if comparable else None,
            skipped=f"{cache['skipped']}/{cache['steps']}" if cache else None,
            psnr_db=q.get("psnr_db"), ssim=q.get("ssim"), peak_mem_gb=rec.get("peak_mem_gb"),
            adherence=_adherence(rec.get("adherence")),
        ))
    return out


def _adherence(score: dict | None) -> str | None:
    return f"{score['adherent']}/{score['prompts']}" if score else None


def _head(columns: str, count: int, scored: bool) -> str:
    """A table's header row (plus the adherence column where any row has a score) and its separator."""
    return columns + (ADHERENCE_HEAD if scored else "") + "\n" + "|---" * (count + scored) + "|\n"


def _tail(row: dict, scored: bool) -> str:
    """The cells both results tables end with: speedup, skipped steps, PSNR, SSIM (and adherence)."""
    speedup = _fmt(row["speedup"]) + "x" if row["speedup"] is not None else "— (other run)"
    return (f"| {speedup} | {row['skipped'] or '—'} | {_fmt(row['psnr_db'], '.1f')} | {_fmt(row['ssim'], '.3f')} |"
            + (f" {row['adherence'] or '—'} |" if scored else "") + "\n")


def table(records: list[dict], folder: str | Path, baseline: dict | None = None) -> Markdown:
    """The article's results table for these records, as Markdown (renders in Jupyter and in the book)."""
    computed = rows(records, folder, [baseline] if baseline else [])
    scored = any(r["adherence"] for r in computed)
    head = _head("| Configuration | Processes | Device | Model source | s/image (min) | s/image (median) | Speedup "
                 "| Skipped steps | PSNR vs baseline (dB) | SSIM vs baseline |", 10, scored)
    body = ""
    for r in computed:
        body += (f"| {r['configuration']} | {r['processes']} | {r['device']} | {r['source']} | {_fmt(r['min_s'], '.3f')} "
                 f"| {_fmt(r['median_s'], '.3f')} " + _tail(r, scored))
    notes = []
    if scored:
        notes.append(ADHERENCE_NOTE)
    if any(r["random_weights"] for r in records):
        notes.append(RANDOM_NOTE)
    if any(r["source"] == EARLIER_TINY for r in computed):
        notes.append(EARLIER_TINY_NOTE)
    notes.append("Speedups and quality are measured against the baseline of the same run; timings are the median "
                 "and minimum of repeated calls after a separate warm-up.")
    return Markdown(head + body + "\n" + "\n\n".join(f"*{n}*" for n in notes))


ADHERENCE_HEAD = " Adherence (held-out prompts) |"
ADHERENCE_NOTE = ("Adherence: of the tiny pipeline's held-out prompts (colour/shape/background combinations never seen "
                  "in training), how many images show the prompted background colour, shape colour and shape, read "
                  "from the pixels. Measured for the tiny source only.")


def step_cost_table(records: list[dict]) -> Markdown:
    """Per record with step costs: skipped steps, s/image, and the median cost of a computed and a skipped step."""
    head = ("| Configuration | Model source | Device | Skipped steps | s/image (median) | Computed step (ms) "
            "| Skipped step (ms) | Skipped / computed |\n|---|---|---|---|---|---|---|---|\n")
    body = ""
    for rec in records:
        costs = rec["step_costs"]
        full = [s for s, c in zip(costs["seconds"], costs["computed"]) if c]
        skip = [s for s, c in zip(costs["seconds"], costs["computed"]) if not c]
        full_ms = float(np.median(full)) * 1e3 if full else None
        skip_ms = float(np.median(skip)) * 1e3 if skip else None
        ratio = f"{skip_ms / full_ms:.1%}" if full_ms and skip_ms else "—"
        body += (f"| {rec['label']} | {source(rec)} | {rec['provenance']['device_name']} | {len(skip)}/{len(full) + len(skip)} "
                 f"| {rec['timing']['median_s']:.3f} | {_fmt(full_ms, '.1f')} | {_fmt(skip_ms, '.1f')} | {ratio} |\n")
    note = ("Step costs: each denoising step (transformer call) of one extra call after the timed ones, timed on the "
            "device; a skipped step still runs the first block and the cache's decision.")
    return Markdown(head + body + f"\n*{note}*")


def plot_skips(records: list[dict]):
    """Seconds per image against skipped steps, with the least-squares line: its slope is what a skip saves."""
    skipped = np.array([(r.get("cache") or {}).get("skipped", 0) for r in records], dtype=float)
    seconds = np.array([r["timing"]["median_s"] for r in records])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(skipped, seconds, "o", color="#4c72b0", label="measured (median)")
    if len(set(skipped)) > 1:
        slope, intercept = np.polyfit(skipped, seconds, 1)
        xs = np.linspace(0, skipped.max(), 2)
        ax.plot(xs, intercept + slope * xs, "--", color="gray", label=f"fit: {intercept:.2f} s {slope:+.3f} s per skip")
    ax.set_xlabel("skipped denoising steps"); ax.set_ylabel("seconds per image")
    sources = sorted({r["model_source"] for r in records})
    devices = sorted({r["provenance"]["device_name"] for r in records})
    ax.set_title(f"{', '.join(devices)} - model source: {', '.join(sources)}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def serving_table(one_shot: dict, served: dict) -> Markdown:
    """A pool's per-request latency against what a one-shot job pays before its first image, from one run."""
    t = served["timing"]
    head = "| Measured | Processes | Device | Model source | Seconds |\n|---|---|---|---|---|\n"
    prov = served["provenance"]
    where = f"{prov['world_size']} | {prov['device_name']} | {source(served)}"
    body = (f"| One-shot job: start the processes, load, quantize, compile, first image | {where} "
            f"| {t['cold_start_s']:.1f} |\n"
            f"| First image of this chapter's torchrun job, after its load (`{one_shot['label']}`) "
            f"| {one_shot['provenance']['world_size']} | {one_shot['provenance']['device_name']} "
            f"| {source(one_shot)} | {one_shot['timing']['cold_start_s']:.1f} |\n"
            f"| Pool, per request after warm-up (median; min {t['min_s']:.3f}) | {where} | {t['median_s']:.3f} |\n")
    note = (f"A warm pool answers in {t['median_s']:.3f} s what a one-shot job answers in {t['cold_start_s']:.1f} s: "
            f"{t['cold_start_s'] / t['median_s']:.0f}x. Both measured in this run; torchrun's own start is not included.")
    return Markdown(head + body + f"\n*{note}*")


def plot_times(records: list[dict], title: str = ""):
    """Horizontal bars of median s/image with the minimum marked, labelled with device and source."""
    fig, ax = plt.subplots(figsize=(8, 0.7 * len(records) + 1.2))
    labels = [textwrap.fill(f"{r['label']} ({r['provenance']['world_size']}p)", 32) for r in records]
    med = [r["timing"]["median_s"] for r in records]
    ax.barh(labels, med, color="#4c72b0", label="median")
    ax.plot([r["timing"]["min_s"] for r in records], labels, "k|", markersize=14, label="min")
    ax.invert_yaxis()
    ax.set_xlabel("seconds per image")
    sources = sorted({r["model_source"] for r in records})
    devices = sorted({r["provenance"]["device_name"] for r in records})
    ax.set_title(title or f"{', '.join(devices)} - model source: {', '.join(sources)}", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def grid(images: list[Image.Image], captions: list[str], columns: int = 4, size: int = 192) -> Image.Image:
    """Images side by side, each with a caption under it."""
    rows_n = -(-len(images) // columns)
    cap_h = 14 * max(c.count("\n") + 1 for c in captions) + 6
    sheet = Image.new("RGB", (columns * size, rows_n * (size + cap_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, cap) in enumerate(zip(images, captions)):
        x, y = (i % columns) * size, (i // columns) * (size + cap_h)
        sheet.paste(img.resize((size, size)), (x, y))
        draw.multiline_text((x + 4, y + size + 2), cap, fill="black", spacing=2)
    return sheet


def record_grid(records: list[dict], folder: str | Path, columns: int = 4, size: int = 192) -> Image.Image:
    captions = [f"{r['label'][:30]}\n{source(r)}, {_fmt(r['timing']['median_s'], '.3f')} s" for r in records]
    return grid([image(r, folder) for r in records], captions, columns, size)


def threshold_explorer(records: list[dict], folder: str | Path, live: bool):
    """A slider over the cache thresholds in live Jupyter; the same content as a static grid otherwise."""
    if not live:
        return record_grid(records, folder, columns=len(records))
    import ipywidgets as widgets

    options = [(r["label"], i) for i, r in enumerate(records)]
    out = widgets.Output()

    def show(index):
        rec = records[index]
        out.clear_output(wait=True)
        with out:
            cache = rec.get("cache")
            skipped = f"{cache['skipped']}/{cache['steps']} steps skipped" if cache else "no cache"
            print(f"{rec['label']}: {rec['timing']['median_s']:.3f} s/image, {skipped} ({source(rec)})")
            display(image(rec, folder).resize((384, 384)))

    slider = widgets.SelectionSlider(options=options, description="threshold")
    widgets.interactive_output(show, {"index": slider})
    show(0)
    return widgets.VBox([slider, out])


def status_page(records: list[dict], chapters: list[dict], title: str) -> str:
    """Markdown: the hardware, versions, commit and duration behind every chapter of this book."""
    lines = [f"# {title}", "", "Every number in this book comes from these runs.", "",
             "| Chapter | Status | Duration (s) | Processes | Device | Model source | Git commit | Date (UTC) |",
             "|---|---|---|---|---|---|---|---|"]
    by_chapter = {}
    for rec in records:
        by_chapter.setdefault(rec["chapter"], rec)
    for ch in chapters:
        rec = by_chapter.get(ch["name"])
        prov = rec["provenance"] if rec else {}
        lines.append(f"| {ch['name']} | {ch['status']} | {_fmt(ch.get('duration_s'), '.0f')} | {ch.get('processes', 1)} "
                     f"| {prov.get('device_name', '—')} | {source(rec) if rec else '—'} "
                     f"| `{prov.get('git_commit', '—')[:12]}` | {prov.get('date_utc', '—')} |")
    stale = Counter(rec["chapter"] for rec in records if source(rec) == EARLIER_TINY)
    lines += [f"\n*{chapter}: {n} `tiny` record(s) were made with a tiny pipeline trained before the one now bundled; "
              "re-run the chapter to refresh them.*" for chapter, n in stale.items()]
    if records:
        prov = records[-1]["provenance"]
        lines += ["", "## Software", "", "| Package | Version |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(prov["versions"].items())]
        for key in ("driver", "cuda", "cudnn", "gpu_links"):
            if prov.get(key):
                lines.append(f"| {key} | {prov[key]} |")
    return "\n".join(lines) + "\n"


# The article's closing table: (row, chapter, record name). Context-parallel rows for each process count.
ARTICLE_ROWS = [
    ("Baseline", "01_baseline", "baseline"),
    ("FBCache (rdt=0.08)", "02_first_block_cache", "fbcache-0.08"),
    ("FP8 DQ + compile", "03_fp8_compile", "fp8-compile"),
    ("FBCache (0.12) + FP8 DQ + compile", "03_fp8_compile", "fbcache-0.12-fp8-compile"),
] + [(f"FBCache (0.12) + FP8 DQ + compile + context parallel, {n} processes", "04_context_parallel",
      f"cp{n}-fbcache-0.12-fp8-compile") for n in (2, 4)]


def conclusion(records: list[dict]) -> list[dict]:
    """The newest record for each of the article's rows (None where no run has produced it), each with the
    baselines it may be compared with: the first chapter's, then any other baseline of its own run."""
    newest = {(r["chapter"], r["name"]): r for r in records}  # records come oldest first
    baselines = [newest.get(("01_baseline", "baseline"))] + [r for r in reversed(records) if r["name"] == "baseline"]
    baselines = [b for b in baselines if b]
    return [dict(row=row, record=newest.get((chapter, name)), baselines=baselines)
            for row, chapter, name in ARTICLE_ROWS]


def conclusion_table(entries: list[dict], folder: str | Path) -> Markdown:
    measured = [e["record"] for e in entries if e["record"]]
    computed = iter(rows(measured, folder, entries[0]["baselines"]))
    scored = any(r.get("adherence") for r in measured)
    head = _head("| Optimizations | Ran as | Processes | Device | Model source | s/image (median) | Speedup "
                 "| Skipped steps | PSNR (dB) | SSIM |", 10, scored)
    body = ""
    for e in entries:
        if e["record"] is None:
            body += f"| {e['row']} | not run |" + " |" * (8 + scored) + "\n"
            continue
        r = next(computed)
        body += (f"| {e['row']} | {r['configuration']} | {r['processes']} | {r['device']} | {r['source']} "
                 f"| {_fmt(r['median_s'], '.3f')} " + _tail(r, scored))
    notes = ["Speedup, PSNR and SSIM are against a baseline measured in the same run (the first chapter's where it "
             "ran together with the row, else the baseline of the row's own chapter); bf16 on GPUs, float32 on CPUs."]
    if any(r["random_weights"] for r in measured):
        notes.append(RANDOM_NOTE)
    if scored:
        notes.append(ADHERENCE_NOTE)
    if any(source(r) == EARLIER_TINY for r in measured):
        notes.append(EARLIER_TINY_NOTE)
    return Markdown(head + body + "\n" + "\n\n".join(f"*{n}*" for n in notes))
