"""The optimization ladder from scripts/bench.py's records: tables, where the GPU time goes, and the targets."""
import json
from pathlib import Path

import matplotlib.pyplot as plt
from IPython.display import Markdown, display

# The targets we hold the full-size model to (1024x1024, 28 steps, end to end, no cache), per process count:
# seconds per image, and speedup over the reference configuration of the same run.
TARGETS = {1: dict(seconds=2.1, speedup=2.5, reference="the eager bf16 baseline"),
           2: dict(seconds=1.2, speedup=1.7, reference="the best one-process configuration")}
CATEGORY_COLOURS = {"FP8 GEMM": "#c44e52", "GEMM (bf16)": "#dd8452", "attention": "#4c72b0",
                    "fused elementwise / quantization (triton)": "#55a868", "communication": "#8172b3",
                    "convolution": "#937860", "other": "#8c8c8c"}
SAME = 0.01  # rungs within 1% of their previous rung count as no change


def runs(folder: str | Path) -> list[dict]:
    """Every benchmark record in `folder`, fewest processes first. `complete` is False for a progress file
    (bench-<N>gpu.partial.json), which a run leaves when it stops before its last configuration."""
    found = []
    for path in sorted(Path(folder).glob("bench-*gpu*.json")):
        run = json.loads(path.read_text())
        run["complete"], run["_path"] = not path.name.endswith(".partial.json"), path.name
        for config in run["configs"]:
            _drop_annotations(config.get("profile"))
        found.append(run)
    return sorted(found, key=lambda r: (r["world_size"], not r["complete"]))


def _drop_annotations(profile: dict | None) -> None:
    """Profiles written before bench skipped them count NCCL's GPU-side range ("nccl:all_to_all") as well as the
    kernel it covers: take it out once."""
    if not profile:
        return
    twice = sum(v for k, v in profile.get("top_kernels_s", {}).items() if k.startswith("nccl:"))
    if twice:
        profile["by_category_s"]["communication"] = round(profile["by_category_s"]["communication"] - twice, 4)
        profile["kernel_s"] = round(profile["kernel_s"] - twice, 4)
        profile["top_kernels_s"] = {k: v for k, v in profile["top_kernels_s"].items() if not k.startswith("nccl:")}


def previous(configs: list[dict], config: dict) -> dict | None:
    """The rung `config` adds to: for a context-parallel configuration, the one-process configuration with the same
    other optimizations; else the row above."""
    if "parallel" in config["optimizations"]:
        rest = {k: v for k, v in config["optimizations"].items() if k != "parallel"}
        return next((c for c in configs if c["processes"] == 1 and c["optimizations"] == rest), None)
    i = configs.index(config)
    return configs[i - 1] if i else None


def heading(run: dict) -> str:
    prov = run["provenance"]
    state = "" if run["complete"] else " · **incomplete run**: it stopped before its last configuration"
    if run["world_size"] > 1 and prov.get("cuda"):  # a GPU run
        state = f" · GPU links: {prov.get('gpu_links') or 'not recorded'}" + state
    return (f"**{run['world_size']}x {run['device']}** · {run['model_source']} · {run['height']}x{run['width']}, "
            f"{run['steps']} steps · {run['scope']} · commit `{prov['git_commit'][:12]}` · {prov['date_utc']} "
            f"· `{run['_path']}`{state}")


def table(run: dict) -> Markdown:
    """One row per configuration: s/image, speedup over the run's baseline and over the row above (what that
    rung adds), cold start, peak memory and the final latents' distance from the baseline's."""
    cached = any(c.get("skipped_steps") is not None for c in run["configs"])
    head = ("| Configuration | Processes | s/image (median) | s/image (min) | vs baseline | vs previous rung "
            "| Cold start (s) | Peak GPU memory (GB) | Latents rel. error |" + (" Skipped steps |" if cached else "")
            + "\n" + "|---" * (9 + cached) + "|\n")
    body = ""
    for c in run["configs"]:
        before = previous(run["configs"], c)
        step = "—" if before is None else f"{before['s_median'] / c['s_median']:.2f}x"
        body += (f"| {c['label']} (`{c['name']}`) | {c['processes']} | {c['s_median']:.3f} | {c['s_min']:.3f} "
                 f"| {c['ratio_vs_baseline']:.2f}x | {step} | {c['cold_start_s']:.1f} | {c['peak_mem_gb'] or 0:.1f} "
                 f"| {c['latents_rel_error']:.1e} |" + (f" {c.get('skipped_steps', '—')} |" if cached else "") + "\n")
    note = ("Each configuration loads a fresh pipeline, makes one untimed call (the cold start, compilation "
            "included) and then the timed calls; ratios are between configurations of this one run. The previous rung is "
            "the row above; for a context-parallel row, the same optimizations in one process. Latents rel. "
            "error: distance of the final latents from the baseline's, relative to their norm (random weights: a "
            "numerics figure, not image quality).")
    return Markdown(heading(run) + "\n\n" + head + body + f"\n*{note}*")


def show(run: dict) -> None:
    """The run's table, verdict and (where it was profiled) kernel-time plot, in the notebook."""
    display(table(run), verdict(run))
    if any(c.get("profile") for c in run["configs"]):
        display(plot(run))
        plt.close("all")


def plot(run: dict):
    """Per configuration, the GPU kernel time of one image by kind (process 0's), with the wall time marked."""
    configs = [c for c in run["configs"] if c.get("profile")]
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(configs) + 1.6))
    names = [c["name"] for c in configs]
    left = [0.0] * len(configs)
    for category, colour in CATEGORY_COLOURS.items():
        widths = [c["profile"]["by_category_s"].get(category, 0.0) for c in configs]
        if any(widths):
            ax.barh(names, widths, left=left, color=colour, label=category)
            left = [a + b for a, b in zip(left, widths)]
    ax.plot([c["s_median"] for c in configs], names, "k|", markersize=16, label="wall time (median)")
    ax.invert_yaxis()
    ax.set_xlabel("seconds per image")
    ax.set_title(f"{run['world_size']}x {run['device']}: GPU kernel time by kind (process 0)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def verdict(run: dict) -> Markdown:
    """The run against its targets, which rungs paid, and where the best configuration's time goes."""
    configs, procs = run["configs"], run["world_size"]
    target = TARGETS.get(procs)
    uncached = [c for c in configs if c.get("skipped_steps") is None]
    best = min((c for c in uncached if c["processes"] == procs), key=lambda c: c["s_median"], default=None)
    if best is None:
        return Markdown(f"No configuration over {procs} processes finished in this run.")
    if procs == 1:
        reference = configs[0]
    else:
        reference = min((c for c in uncached if c["processes"] == 1), key=lambda c: c["s_median"])
    speedup = reference["s_median"] / best["s_median"]
    lines = [f"Fastest here: **{best['label']}**, {best['s_median']:.3f} s per image (median), "
             f"{speedup:.2f}x {reference['label']} ({reference['s_median']:.3f} s) of the same run."]
    if target:
        met = best["s_median"] <= target["seconds"] and speedup >= target["speedup"]
        where = "" if "H100" in run["device"] else f" (the targets are for H100; this run is on {run['device']})"
        lines.append(f"Target: <= {target['seconds']} s and >= {target['speedup']}x {target['reference']}: "
                     f"**{'met' if met else 'not met'}**{where}.")
    if procs > 1:
        lines.append(f"For scale: {procs} processes that each did exactly 1/{procs} of {reference['label']}'s work "
                     f"would take {reference['s_median'] / procs:.3f} s (arithmetic, not a measurement).")
    kept, dropped = [], []
    for c in configs:
        before = previous(configs, c)
        if before is not None:
            gain = before["s_median"] / c["s_median"] - 1
            (kept if gain > SAME else dropped).append(f"`{c['name']}` ({gain:+.1%} vs `{before['name']}`)")
    lines.append("Faster than the previous rung: " + (", ".join(kept) or "none") + ". Not faster (within "
                 f"{SAME:.0%} or slower): " + (", ".join(dropped) or "none") + ".")
    profile = best.get("profile")
    if profile:
        cats = profile["by_category_s"]
        parts = ", ".join(f"{k} {v:.3f} s" for k, v in cats.items())
        lines.append(f"Where {best['name']}'s time goes (process 0, one image): {profile['kernel_s']:.3f} s of GPU "
                     f"kernels ({parts}) in {best['s_median']:.3f} s of wall time.")
        floor = sum(cats.get(k, 0.0) for k in ("FP8 GEMM", "GEMM (bf16)", "attention"))
        if target and procs == 1:
            lines.append(f"Its matrix multiplications and attention alone take {floor:.3f} s; to reach "
                         f"{target['seconds']} s everything else (quantization, norms, activations, text encoders, "
                         f"VAE, launch gaps) would have to fit in {max(0.0, target['seconds'] - floor):.3f} s, "
                         f"against {best['s_median'] - floor:.3f} s measured.")
    return Markdown("\n\n".join(lines))
