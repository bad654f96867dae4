"""Tables, plots and image grids, all built from records (`fluxlab.records`); which records compare is
`fluxlab.compare`'s business."""
import inspect
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image, ImageDraw
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from . import applied, compare, figures

if TYPE_CHECKING:
    from IPython.display import Markdown


def markdown(text: str) -> "Markdown":
    """Text a notebook renders as Markdown (IPython comes with the notebook stack, the `book` extra: imported when a
    page asks, so that `import fluxlab` needs no notebook stack)."""
    from IPython.display import Markdown

    return Markdown(text)


def show(*objects) -> None:
    """Display each object in the notebook's output."""
    from IPython.display import display

    display(*objects)

RANDOM_NOTE = ("`flux-dev-random` has FLUX.1-dev's architecture with random weights: its timings are the real "
               "model's cost, but its images are noise and its cache hit rates say nothing about the real model.")
ADHERENCE_NOTE = ("Adherence: of the tiny pipeline's held-out prompts (colour/shape/background combinations never seen "
                  "in training), how many images show the prompted background colour, shape colour and shape, read "
                  "from the pixels (a chapter scores every 6th of the 66; `make adherence` scores all of them).")
TIMING_NOTE = ("Times: median (minimum) of the timed calls after a separate warm-up; text encoding, denoising and VAE "
               "decode. Speedup, PSNR and SSIM: against the plain pipeline measured in the same run. A speedup is "
               "*within noise* where the ratio of the slowest to the fastest timed calls of the two includes 1.0.")
CPU_NOTE = ("Timed on a CPU: these timings are for following along, not for comparing. What the tiny pipeline shows "
            "here is the cache's behaviour (steps skipped), prompt adherence and image quality.")


def cpu_note(rec: dict) -> str:
    """One line for pages whose records were timed on a CPU (empty on a GPU)."""
    return f"*{CPU_NOTE}*\n\n" if rec["settings"]["device"] == "cpu" else ""


def cache_note(recs: list[dict]) -> str:
    """Why First Block Cache saved nothing in these records of random weights: how far the first block's output moved
    between steps, against the thresholds, read off the records' cache decisions ('' where no such record)."""
    idle = [r for r in recs if r["random_weights"] and r["cache"] and not r["cache"]["skipped"]]
    diffs = [d for r in idle for d in r["cache"].get("diffs", []) if d is not None]
    if not diffs:
        return ""
    thresholds = ", ".join(sorted({f"{r['cache']['threshold']:g}" for r in idle}))
    names = ", ".join(f"`{r['name']}`" for r in idle)
    return (f"On random weights ({', '.join(sorted({r['model_source'] for r in idle}))}) First Block Cache computed "
            f"every step in {names}: between steps the first block's output moved "
            f"by {min(diffs):.2f} to {max(diffs):.2f} of its size, above the threshold ({thresholds}). Random weights "
            "carry no image that settles from step to step, so the cache only adds its check; what it saves must be "
            "measured on the real model's weights.")


def _fmt(x, spec=".2f", none="—"):
    return none if x is None else format(x, spec)


def image(rec: dict, folder: str | Path) -> Image.Image:
    return Image.open(Path(folder) / rec["image"]).convert("RGB")


def _as_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def quality(img: Image.Image, reference: Image.Image) -> dict:
    """PSNR (dB, inf when identical) and SSIM of an image against the reference image."""
    a, b = _as_tensor(img), _as_tensor(reference.resize(img.size))
    mse = torch.mean((a - b) ** 2).item()
    psnr = float("inf") if mse == 0 else peak_signal_noise_ratio(a, b, data_range=1.0).item()
    return dict(psnr_db=psnr, ssim=structural_similarity_index_measure(a, b, data_range=1.0).item())


def where(recs: list[dict]) -> str:
    """What the records have in common, for a caption: device, processes, source, size, steps."""
    devices = sorted({r["provenance"]["device_name"] for r in recs})
    sources = sorted({r["model_source"] for r in recs})
    sizes = sorted({f"{r['settings']['height']}x{r['settings']['width']}, {r['settings']['steps']} steps" for r in recs})
    return " · ".join([", ".join(devices), "model source " + ", ".join(sources), "; ".join(sizes)])


def row(rec: dict, folder: str | Path, baseline: dict | None) -> dict:
    """The numbers of one results-table row; speedup and quality only against a baseline of the same run."""
    comparable = baseline is not None and compare.same_run(rec, baseline)
    q = quality(image(rec, folder), image(baseline, folder)) if comparable and rec["image"] else {}
    cache, score = rec["cache"], rec["extras"].get("adherence")
    return dict(label=rec["label"], processes=rec["processes"], median_s=rec["timing"]["median_s"],
                min_s=rec["timing"]["min_s"],
                speedup=compare.speedup(baseline, rec) if comparable else None,
                skipped=f"{cache['skipped']}/{cache['steps']}" if cache else None,
                psnr_db=q.get("psnr_db"), ssim=q.get("ssim"),
                adherence=f"{score['adherent']}/{score['prompts']}" if score else None)


def speedup_text(s: dict | None) -> str:
    """'1.68x', or '1.02x (within noise)' where the timed calls' range of ratios includes 1.0; '—' without one."""
    if s is None:
        return "—"
    return f"{s['ratio']:.2f}x" + (" (within noise)" if s["noise"] and s["ratio"] != 1 else "")


def _cells(r: dict) -> list[str]:
    return [f"{_fmt(r['median_s'], '.3f')} ({_fmt(r['min_s'], '.3f')})", speedup_text(r["speedup"]), r["skipped"] or "—",
            _fmt(r["psnr_db"], ".1f"), _fmt(r["ssim"], ".3f")]


def _notes(recs: list[dict], extra: list[str] = ()) -> str:
    notes = [TIMING_NOTE, *extra]
    if any(r["extras"].get("adherence") for r in recs):
        notes.append(ADHERENCE_NOTE)
    if any(r["random_weights"] for r in recs):
        notes.append(RANDOM_NOTE)
    return "<details><summary>About this table</summary>\n\n" + "\n\n".join(notes) + "\n\n</details>"


def table(recs: list[dict], folder: str | Path, baseline: dict | None = None) -> "Markdown":
    """The results table: one compact row per record, what they share in the caption, notes folded away."""
    rows = [row(r, folder, baseline) for r in recs]
    scored = any(r["adherence"] for r in rows)
    head = ["Configuration", "Procs", "s/image", "Speedup", "Skipped steps", "PSNR (dB)", "SSIM"]
    head += ["Adherence"] * scored
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([r["label"], str(r["processes"]), *_cells(r)]
                                       + [r["adherence"] or "—"] * scored) + " |")
    return markdown(f"*{where(recs)}*\n\n" + "\n".join(lines) + "\n\n" + _notes(recs))


def against(first: dict, rec: dict) -> str:
    """How `rec`'s time compares with `first`'s: '7.88x slower', '1.25x faster', '1.01x slower (within noise)'."""
    s = compare.speedup(first, rec)
    text = f"{s['ratio']:.2f}x faster" if s["ratio"] >= 1 else f"{1 / s['ratio']:.2f}x slower"
    return text + (" (within noise)" if s["noise"] else "")


def memory_cost(recs: list[dict]) -> "Markdown":
    """Time against GPU memory: s/image, how each record's time compares with the first's, and the timed calls' peak
    allocated memory."""
    if recs[0]["peak_mem_gb"] is None:
        return markdown(f"*Peak GPU memory needs a GPU: these records ran on {recs[0]['provenance']['device_name']}.*")
    lines = ["| Configuration | s/image | Time against the first row | Peak allocated (GB) |", "|---|---|---|---|"]
    for i, r in enumerate(recs):
        lines.append(f"| {r['label']} | {r['timing']['median_s']:.3f} | {against(recs[0], r) if i else '—'} "
                     f"| {r['peak_mem_gb']:.1f} |")
    note = ("Peak allocated: the most PyTorch held in tensors during the timed calls. What its allocator reserved "
            "besides, from earlier in this process, could be handed back; the performance page runs each "
            "configuration under a cap instead.")
    return markdown(f"*{where(recs)}*\n\n" + "\n".join(lines) + f"\n\n*{note}*")


def step_cost_table(recs: list[dict]) -> "Markdown":
    """Per record with step costs: skipped steps, s/image, and the median cost of a computed and a skipped step."""
    lines = ["| Configuration | Skipped steps | s/image | Computed step (ms) | Skipped step (ms) | Skipped / computed |",
             "|---|---|---|---|---|---|"]
    for rec in recs:
        c = step_cost(rec)
        ratio = f"{c['ratio']:.1%}" if c["ratio"] is not None else "—"
        lines.append(f"| {rec['label']} | {c['skipped']}/{c['steps']} | {rec['timing']['median_s']:.3f} "
                     f"| {_fmt(c['computed_ms'], '.1f')} | {_fmt(c['skipped_ms'], '.1f')} | {ratio} |")
    note = ("Each denoising step (transformer call) of one extra call after the timed ones, timed on the device; a "
            "skipped step still runs the first block and the cache's decision.")
    return markdown(f"*{where(recs)}*\n\n" + "\n".join(lines) + f"\n\n*{note}*")


def step_cost(rec: dict) -> dict:
    """From a record's step costs: steps, skipped steps, the median computed and skipped step (ms), and their ratio
    (None where a kind is missing)."""
    costs = rec["extras"]["step_costs"]
    full = [s for s, c in zip(costs["seconds"], costs["computed"]) if c]
    skip = [s for s, c in zip(costs["seconds"], costs["computed"]) if not c]
    full_ms = float(np.median(full)) * 1e3 if full else None
    skip_ms = float(np.median(skip)) * 1e3 if skip else None
    return dict(steps=len(full) + len(skip), skipped=len(skip), computed_ms=full_ms, skipped_ms=skip_ms,
                ratio=skip_ms / full_ms if full_ms and skip_ms else None)


def skip_cost(recs: list[dict]) -> str | None:
    """A skipped step's cost as a share of a computed one, as the step-cost table shows it: one value, or the range
    over the records ('2.9% to 4.0%'); None where nothing was skipped."""
    ratios = sorted(c["ratio"] for c in map(step_cost, recs) if c["ratio"] is not None)
    if not ratios:
        return None
    low, high = f"{ratios[0]:.1%}", f"{ratios[-1]:.1%}"
    return low if low == high else f"{low} to {high}"


def plot_skips(recs: list[dict]):
    """Seconds per image against skipped steps, with the least-squares line: its slope is what a skip saves."""
    skipped = np.array([(r["cache"] or {}).get("skipped", 0) for r in recs], dtype=float)
    seconds = np.array([r["timing"]["median_s"] for r in recs])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(skipped, seconds, "o", color="#4c72b0", label="measured (median)")
    if len(set(skipped)) > 1:
        slope, intercept = np.polyfit(skipped, seconds, 1)
        xs = np.linspace(0, skipped.max(), 2)
        ax.plot(xs, intercept + slope * xs, "--", color="gray", label=f"fit: {intercept:.2f} s {slope:+.3f} s per skip")
    ax.set_xlabel("skipped denoising steps")
    ax.set_ylabel("seconds per image")
    ax.set_title(where(recs), fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_times(recs: list[dict]):
    """Horizontal bars of median s/image with the minimum marked; each bar names its card(s) where the records ran
    on more than one kind."""
    fig, ax = plt.subplots(figsize=(7.5, 0.6 * len(recs) + 1.3))
    several = len({r["provenance"]["device_name"] for r in recs}) > 1
    labels = [textwrap.fill(f"{r['label']} ({device(r) if several else str(r['processes']) + 'p'})", 40)
              for r in recs]
    ax.barh(labels, [r["timing"]["median_s"] for r in recs], color="#4c72b0", label="median")
    ax.plot([r["timing"]["min_s"] for r in recs], labels, "k|", markersize=14, label="min")
    ax.invert_yaxis()
    ax.set_xlabel("seconds per image")
    ax.set_title(where(recs), fontsize=8)
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


def record_grid(recs: list[dict], folder: str | Path, columns: int = 4, size: int = 192) -> Image.Image:
    width = max(8, size // 7)
    captions = [f"{textwrap.shorten(r['label'], width)}\n{r['model_source']}, {r['timing']['median_s']:.3f} s"
                for r in recs]
    return grid([image(r, folder) for r in recs], captions, columns, size)


def threshold_explorer(recs: list[dict], folder: str | Path, live: bool):
    """A slider over the cache thresholds in live Jupyter; the same content as a static grid otherwise."""
    if not live:
        return record_grid(recs, folder, columns=len(recs), size=160)
    import ipywidgets as widgets

    out = widgets.Output()

    def select(index):
        rec = recs[index]
        out.clear_output(wait=True)
        with out:
            cache = rec["cache"]
            skipped = f"{cache['skipped']}/{cache['steps']} steps skipped" if cache else "no cache"
            print(f"{rec['label']}: {rec['timing']['median_s']:.3f} s/image, {skipped} ({rec['model_source']})")
            show(image(rec, folder).resize((384, 384)))

    slider = widgets.SelectionSlider(options=[(r["label"], i) for i, r in enumerate(recs)], description="threshold")
    widgets.interactive_output(select, {"index": slider})
    select(0)
    return widgets.VBox([slider, out])


def serving_table(one_shot: dict, served: dict) -> "Markdown":
    """A pool's per-request latency against the chapter's own timed call, and what a one-shot job pays first."""
    t, c = served["timing"], one_shot["timing"]
    lines = ["| Measured | Seconds |", "|---|---|",
             f"| One-shot job: start the processes, load, optimize, compile, first image (pool start) "
             f"| {t['cold_start_s']:.1f} |",
             f"| This chapter's first call after its load (`{one_shot['label']}`) | {c['cold_start_s']:.1f} |",
             f"| This chapter's timed call, median (min) | {c['median_s']:.3f} ({c['min_s']:.3f}) |",
             f"| Pool, per request after warm-up, median (min) | {t['median_s']:.3f} ({t['min_s']:.3f}) |"]
    parts = served["extras"].get("pool", {}).get("per_request_median")
    if parts:  # where a request's time goes, medians of the timed requests
        lines += [f"| of which: the image, in the workers | {parts['image_in_worker_s']:.3f} |",
                  f"| of which: PNG encoding, on process 0 | {parts['png_encode_s']:.3f} |",
                  f"| of which: hand-over between processes (the rest) | {parts['hand_over_s']:.3f} |"]
    note = (f"Same configuration, same processes, same run ({served['processes']} process(es), {where([served])}). "
            f"The pool answers in {t['median_s'] / c['median_s'] - 1:+.1%} of the chapter's timed call, PNG "
            "encoding and the hand-over between processes included; torchrun's own start is not included.")
    return markdown("\n".join(lines) + f"\n\n*{note}*")


def device(rec: dict) -> str:
    """The card(s) a record ran on: '2x NVIDIA H200', 'NVIDIA H100 80GB HBM3'."""
    name = rec["provenance"]["device_name"]
    return f"{rec['processes']}x {name}" if rec["processes"] > 1 else name


def conclusion_table(rows: list[dict], records: list[dict], folder: str | Path) -> "Markdown":
    """The article's closing table: each declared row (`{"row", "needs", "processes", "article"}`) with the record
    that matches what it applies (`fluxlab.compare.find`) and the card(s) it ran on, against the plain pipeline of
    that record's own run, beside the article's number (`article`: seconds and speedup on L20 GPUs, quoted)."""
    lines = ["| Optimizations | Procs | Article on L20: s/image (speedup) | Ran here as | Device | s/image | Speedup "
             "| Skipped steps | PSNR (dB) | SSIM |", "|---|---|---|---|---|---|---|---|---|---|"]
    ran = []  # (row, its record) for each row a record matches
    for spec in rows:
        quoted = "{:.2f} ({:.2f}x)".format(*spec["article"]) if spec.get("article") else "—"
        rec = compare.find(records, spec["needs"], spec["processes"])
        if rec is None:
            why = f"not run: no {spec['processes']}-process run of it in this book"
            lines.append(f"| {spec['row']} | {spec['processes']} | {quoted} | {why} |" + " — |" * 6)
            continue
        ran.append((spec, rec))
        base = compare.baseline_for(rec, records)
        cells = _cells(row(rec, folder, base))
        if base is not None:  # each row's own baseline, of the same run and card(s), not the Baseline row's
            cells[1] += f" of {base['timing']['median_s']:.3f} s"
        lines.append(f"| {spec['row']} | {spec['processes']} | {quoted} | {rec['label']} | {device(rec)} | "
                     + " | ".join(cells) + " |")
    found = [rec for _, rec in ran]
    head = cpu_note(found[0]) + f"*{where(found)}*\n\n" if found else ""
    slower = [note for i, (spec, rec) in enumerate(ran) if (note := _slower(spec, rec, ran[:i], records))]
    article = ("The article's column quotes its table (\"Fastest FLUX.1-dev Inference with Context Parallelism and "
               "First Block Cache on NVIDIA L20 GPUs\"); its speedups are over its own 1x L20 baseline. This book's "
               "speedups are over the plain pipeline of the same chapter run, whose median the cell gives.")
    return markdown(head + "\n".join(lines) + "\n\n" + "".join(f"{n}\n\n" for n in slower)
                    + _notes(found, [article]))


TECHNIQUES = dict(cache="First Block Cache", fp8="FP8", compile="compilation", parallel="context parallelism")


def _slower(spec: dict, rec: dict, before: list[tuple[dict, dict]], records: list[dict]) -> str | None:
    """Why a conclusion row is slower than the row before it whose techniques it adds to, on the same card(s),
    as far as the records say: what its run left out that the other's had, steps its cache skipped, and the same
    configuration without the added techniques in its own run. None where the row is not slower."""
    needs = set(spec["needs"].items())
    base_spec, base = next(((s, r) for s, r in reversed(before)
                            if set(s["needs"].items()) < needs and s["processes"] == spec["processes"]), (None, None))
    if base is None or device(base) != device(rec) or rec["timing"]["median_s"] <= base["timing"]["median_s"]:
        return None
    why = []
    missing = {k: v for k, v in base["optimizations"].items() if k not in rec["optimizations"]}
    if missing:
        why.append(f"its configuration leaves out {applied.describe(missing)}, which that row's has")
    added = {k for k in spec["needs"] if k not in base_spec["needs"]}
    if "cache" in added and not rec["cache"]["skipped"]:
        why.append(f"its cache skipped none of the {rec['cache']['steps']} steps, so it added its check and saved "
                   "nothing")
    alone = next((r for r in reversed(records) if compare.same_run(r, rec) and r["processes"] == rec["processes"]
                  and set(r["optimizations"]) == set(rec["optimizations"]) - added), None)
    if alone is not None:
        why.append(f"the same configuration without {' and '.join(TECHNIQUES[k] for k in sorted(added))}, timed in "
                   f"its run, took {alone['timing']['median_s']:.3f} s ({alone['label']}): "
                   f"adding it gives a speedup of {speedup_text(compare.speedup(alone, rec))}")
    if not compare.same_run(rec, base):
        why.append("the two rows were timed in different runs")
    return (f"**{spec['row']}** ({rec['timing']['median_s']:.3f} s) is slower than **{base_spec['row']}** "
            f"({base['timing']['median_s']:.3f} s) on the same card: " + ("; ".join(why) or "the records give no "
                                                                         "cause") + ".")


def status_page(records: list[dict], chapters: list[dict], title: str, bench: list[dict] = ()) -> str:
    """Markdown: the hardware, versions, commit and duration behind every chapter of this book, and the benchmark
    runs (`bench`: their records) that the performance page reads."""
    lines = [f"# {title}", "", "Every number in this book comes from these runs.", "",
             "| Chapter | Status | Duration (s) | Processes | Device | Model source | Git commit | Date (UTC) |",
             "|---|---|---|---|---|---|---|---|"]
    newest = {}
    for rec in records:  # oldest first: the last one of a chapter is its newest
        newest[rec["chapter"]] = rec
    for ch in chapters:
        rec = newest.get(ch["name"])
        prov = rec["provenance"] if rec else {}
        commit = prov.get("git_commit") or ch.get("git_commit") or "—"
        lines.append(f"| {ch['name']} | {ch['status']} | {_fmt(ch.get('duration_s'), '.0f')} "
                     f"| {ch.get('processes', 1)} | {prov.get('device_name') or ch.get('device') or '—'} "
                     f"| {', '.join(sorted({r['model_source'] for r in records if r['chapter'] == ch['name']})) or '—'} "
                     f"| `{commit[:12]}` | {prov.get('date_utc') or ch.get('finished_utc') or '—'} |")
    lines += [f"\n*{ch['name']}: {ch['note']}.*" for ch in chapters if ch.get("note")]
    runs = {}
    for rec in bench:
        runs.setdefault((Path(rec["_path"]).name, rec["provenance"]["run_id"]), []).append(rec)
    if runs:
        lines += ["", "## Benchmark runs", "", "The performance page reads these `scripts/bench.py` records.", "",
                  "| File | Configurations | Processes (most) | Device | Model source | Git commit | fluxlab | Date (UTC) |",
                  "|---|---|---|---|---|---|---|---|"]
        for (name, _), recs in runs.items():
            prov = recs[0]["provenance"]
            lines.append(f"| `{name}` | {len(recs)} | {max(r['processes'] for r in recs)} | {prov['device_name']} "
                         f"| {', '.join(sorted({r['model_source'] for r in recs}))} | `{prov['git_commit'][:12]}` "
                         f"| {prov['versions'].get('fluxlab') or '—'} | {prov['date_utc']} |")
    newest_prov = [r["provenance"] for r in [*records, *bench]]
    if newest_prov:
        prov = max(newest_prov, key=lambda p: p["date_utc"])
        lines += ["", "## Software", "", "Of the newest run above.", "", "| Package | Version |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(prov["versions"].items())]
        for key in ("driver", "cuda", "cudnn", "gpu_links"):
            if prov.get(key):
                lines.append(f"| {key} | {prov[key]} |")
    return "\n".join(lines) + "\n"


def source_code(*objects) -> "Markdown":
    """The source of fluxlab's own pieces, shown in a chapter that introduces them; a file's path stands for its
    whole text (a module that cannot be imported here, e.g. a Triton kernel where there is no CUDA)."""
    return markdown("\n".join(f"```python\n{o.read_text() if isinstance(o, Path) else inspect.getsource(o)}```"
                              for o in objects))


def where_time_goes(recs: list[dict]) -> None:
    """Per record and process: compute, communication not overlapped and idle seconds of one profiled image
    (a figure and a sentence each), where the records were profiled."""
    profiled = [r for r in recs if r["extras"].get("profile")]
    if not profiled:
        show(markdown("*No kernel timeline here: the profile needs CUDA GPUs.*"))
        return
    fig = figures.rank_time(profiled)
    show(fig)
    plt.close(fig)
    lines = []
    for r in profiled:
        parts = [f"process {i}: compute {p['compute_s']:.3f} s, communication not overlapped "
                 f"{p['exposed_communication_s']:.3f} s, idle {p['idle_s']:.3f} s of {p['wall_s']:.3f} s"
                 for i, p in enumerate(r["extras"]["profile"])]
        lines.append(f"* **{r['label']}** (timed {r['timing']['median_s']:.3f} s; one more image under the profiler): "
                     + "; ".join(parts) + ".")
    show(markdown("\n".join(lines)))


def scaling_table(recs: list[dict]) -> "Markdown":
    """The newest run of each process count, each row against the one-process baseline of its own run."""
    by_run = {}
    for r in recs:
        by_run.setdefault(r["provenance"]["run_id"], []).append(r)
    newest = {}
    for run in by_run.values():
        count = max(r["processes"] for r in run)
        if count not in newest or run[0]["provenance"]["date_utc"] > newest[count][0]["provenance"]["date_utc"]:
            newest[count] = run
    lines = ["| Procs | Configuration | s/image | vs 1-process baseline |", "|---|---|---|---|"]
    for count in sorted(newest):
        run = sorted(newest[count], key=lambda r: (r["processes"], -r["timing"]["median_s"]))
        base = next((r for r in run if compare.is_baseline(r)), None)
        for r in run:
            ratio = "—" if base is None else f"{base['timing']['median_s'] / r['timing']['median_s']:.2f}x"
            lines.append(f"| {r['processes']} | {r['label']} | {r['timing']['median_s']:.3f} "
                         f"({r['timing']['min_s']:.3f}) | {ratio} |")
    return markdown(f"*{where(recs)}*\n\n" + "\n".join(lines))
