"""One figure per idea, drawn from the run's own data where there is data: First Block Cache's decision, Ulysses'
exchange of sequence shards for head shards, FP8's per-row scaling, and where a process's time goes."""
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import FancyArrowPatch, Rectangle

RANK_COLOURS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


def _box(ax, x, y, w, h, text, colour, fontsize=8):
    ax.add_patch(Rectangle((x, y), w, h, facecolor=colour, edgecolor="black", linewidth=0.6))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)


def _arrow(ax, a, b, text="", colour="black"):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=9, color=colour, linewidth=0.9))
    if text:
        ax.text((a[0] + b[0]) / 2 + 0.02, (a[1] + b[1]) / 2, text, fontsize=7, color=colour, va="center")


def first_block_cache(diffs: list, threshold: float, source: str):
    """Left: the decision at each step. Right: this run's first-block residual change per step against the
    threshold; below it the step reuses the cached residual of the other blocks."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2), gridspec_kw=dict(width_ratios=[1, 1.4]))
    left.set_xlim(0, 1)
    left.set_ylim(0, 1)
    left.axis("off")
    _box(left, 0.05, 0.78, 0.4, 0.14, "block 0 (always)", "#dbe5f1")
    _box(left, 0.02, 0.42, 0.46, 0.2, "relative change of\nblock 0's residual\nvs the last step", "#f7f7f7", 7)
    _box(left, 0.58, 0.7, 0.38, 0.2, "blocks 1..N\n(computed)", "#f4d6c4")
    _box(left, 0.58, 0.12, 0.38, 0.2, "+ cached residual\nof blocks 1..N", "#d5ead8")
    _arrow(left, (0.25, 0.78), (0.25, 0.62))
    _arrow(left, (0.48, 0.56), (0.58, 0.78), f"> {threshold:g}: compute")
    _arrow(left, (0.48, 0.48), (0.58, 0.25), f"<= {threshold:g}: skip")
    steps = [i for i, d in enumerate(diffs) if d is not None]
    values = [d for d in diffs if d is not None]
    computed = [d > threshold for d in values]
    right.plot(steps, values, "-", color="gray", linewidth=0.8)
    right.scatter([s for s, c in zip(steps, computed) if c], [v for v, c in zip(values, computed) if c],
                  color="#dd8452", s=18, label="computed", zorder=3)
    right.scatter([s for s, c in zip(steps, computed) if not c], [v for v, c in zip(values, computed) if not c],
                  color="#55a868", s=18, label="skipped", zorder=3)
    right.axhline(threshold, ls="--", color="black", linewidth=0.8, label=f"threshold {threshold:g}")
    right.set_xlabel("denoising step")
    right.set_ylabel("relative change")
    right.set_title(f"measured, {source}", fontsize=8)
    right.legend(fontsize=7)
    fig.tight_layout()
    return fig


def ulysses(processes: int = 2, heads: int = 4):
    """Before attention each process holds a slice of the sequence with every head; one all-to-all gives each the
    whole sequence for heads/processes of the heads; attention runs; a second all-to-all gives the slices back."""
    tokens = 2 * processes
    fig, axes = plt.subplots(1, 3, figsize=(9, 2.8))
    titles = ["before: sequence shards", "after all-to-all: head shards", "after attention + all-to-all back"]
    for panel, (ax, title) in enumerate(zip(axes, titles)):
        ax.set_xlim(-0.5, heads + 0.5)
        ax.set_ylim(-0.8, tokens + 0.2)
        ax.invert_yaxis()
        ax.axis("off")
        ax.set_title(title, fontsize=8)
        for t in range(tokens):
            for h in range(heads):
                owner = t * processes // tokens if panel != 1 else h * processes // heads
                ax.add_patch(Rectangle((h, t), 0.9, 0.9, facecolor=RANK_COLOURS[owner], alpha=0.85,
                                       edgecolor="white"))
        ax.text(heads / 2, -0.45, "heads →", ha="center", fontsize=7)
        ax.text(-0.35, tokens / 2, "tokens →", rotation=90, va="center", fontsize=7)
    for p in range(processes):
        axes[0].plot([], [], "s", color=RANK_COLOURS[p], label=f"process {p}")
    axes[0].legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, -0.35), ncol=processes, frameon=False)
    fig.tight_layout()
    return fig


def fp8_scaling(weight: torch.Tensor, name: str):
    """FP8 (e4m3, largest value 448) keeps ~2 significant digits, so each row of a weight is divided by a scale
    first. Left: how far apart the rows' largest values are. Right: each row's relative error after an FP8 round
    trip, with one scale per row (rowwise) or one for the whole matrix (tensorwise)."""
    w = weight.detach().float().cpu()
    rows = w.abs().amax(dim=1).clamp(min=1e-12)
    errors = {}
    for scheme, scale in (("rowwise", rows[:, None] / 448), ("tensorwise", rows.max() / 448)):
        q = (w / scale).to(torch.float8_e4m3fn).float() * scale
        errors[scheme] = ((q - w).norm(dim=1) / w.norm(dim=1).clamp(min=1e-12)).numpy()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
    left.hist(rows.numpy(), bins=40, color="#4c72b0")
    left.set_xlabel("largest |weight| of a row")
    left.set_ylabel("rows")
    left.set_title(f"{name}: {w.shape[0]} rows", fontsize=8)
    for scheme, colour in (("tensorwise", "#c44e52"), ("rowwise", "#55a868")):
        right.hist(errors[scheme], bins=40, alpha=0.75, color=colour,
                   label=f"{scheme}: median {np.median(errors[scheme]):.2%}")
    right.set_xlabel("relative error of the row after FP8")
    right.set_title(f"one scale per row vs one per tensor; worst row: rowwise {errors['rowwise'].max():.2%}, "
                    f"tensorwise {errors['tensorwise'].max():.2%}", fontsize=8)
    right.legend(fontsize=7)
    fig.tight_layout()
    return fig


def rank_time(recs: list[dict]):
    """Per configuration and process: compute, communication not hidden behind compute, and idle time of one
    profiled image (unions of kernel intervals, `fluxlab.profiling`)."""
    bars = [(f"{r['name']} p{i}", p) for r in recs for i, p in enumerate(r["extras"].get("profile") or [])]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(bars) + 1.4))
    labels = [b[0] for b in bars]
    left = np.zeros(len(bars))
    for key, colour, text in (("compute_s", "#4c72b0", "compute"),
                              ("exposed_communication_s", "#c44e52", "communication not overlapped"),
                              ("idle_s", "#cccccc", "idle")):
        widths = np.array([b[1][key] for b in bars])
        ax.barh(labels, widths, left=left, color=colour, label=text)
        left += widths
    ax.invert_yaxis()
    ax.set_xlabel("seconds of one profiled image (under the profiler)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"{recs[0]['provenance']['device_name']}: where each process's time goes", fontsize=8)
    fig.tight_layout()
    return fig


def phases(rec: dict):
    """One image's time: each denoising step's transformer call (`extras.step_costs`), and everything else in the
    pipeline call (text encoders, scheduler, VAE decode) as the rest of the median."""
    steps = rec["extras"]["step_costs"]["seconds"]
    rest = max(0.0, rec["timing"]["median_s"] - sum(steps))
    fig, ax = plt.subplots(figsize=(8, 2.1))
    left = 0.0
    for i, s in enumerate(steps):
        ax.barh([0], [s], left=left, color="#4c72b0" if i % 2 else "#6b8cc4", edgecolor="white", linewidth=0.3,
                label=f"{len(steps)} transformer steps: {sum(steps):.3f} s" if i == 0 else None)
        left += s
    ax.barh([0], [rest], left=left, color="#dd8452", label=f"rest: {rest:.3f} s")
    fig.legend(fontsize=8, loc="lower center", ncol=2, frameon=False)
    ax.set_yticks([])
    ax.set_xlabel("seconds (one image)")
    ax.set_title(f"{rec['provenance']['device_name']}, {rec['model_source']}: text encoders, scheduler and VAE "
                 "are the rest", fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))  # the legend sits below the axis label
    return fig
