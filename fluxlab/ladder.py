"""The optimization ladder from `scripts/bench.py`'s records: tables, where the GPU time goes, and a verdict against
targets the page states."""
import re
from pathlib import Path

import matplotlib.pyplot as plt
from IPython.display import Markdown

from . import records

KIND_COLOURS = {"FP8 GEMM": "#c44e52", "GEMM (bf16)": "#dd8452", "attention": "#4c72b0",
                "fused elementwise / quantization (triton)": "#55a868", "communication": "#8172b3",
                "convolution": "#937860", "other": "#8c8c8c"}
SAME = 0.01  # rungs within 1% of their previous rung count as no change


BENCH_FILES = "bench-*gpu*.json"  # what scripts/bench.py writes: `bench_file`, and its .partial.json


def bench_file(world_size: int, tag: str = "") -> str:
    """The file a benchmark run of `world_size` processes writes: bench-<N>gpu.json, or bench-<N>gpu-<tag>.json."""
    return f"bench-{world_size}gpu{'-' + tag if tag else ''}.json"


def tag(name: str) -> str:
    """A benchmark file's tag: '' for bench-<N>gpu.json, 'memory' for bench-<N>gpu-memory(.partial).json."""
    return name.removesuffix(".json").removesuffix(".partial").split("gpu", 1)[1].lstrip("-")


def runs(folder: str | Path) -> list[dict]:
    """Every benchmark file in `folder` as {"path", "complete", "world_size", "records", "failed"}, fewest processes
    first,
    each process count's untagged run before its tagged ones. `complete` is False for a progress file
    (bench-<N>gpu[-<tag>].partial.json) of a run that stopped early."""
    found = []
    for path in sorted(Path(folder).glob(BENCH_FILES)):
        recs = records.read(path)
        found.append(dict(path=path.name, complete=not path.name.endswith(".partial.json"), records=recs,
                          failed=records.failures(path), world_size=max(r["processes"] for r in recs)))
    return sorted(found, key=lambda r: (r["world_size"], tag(r["path"]) != "", not r["complete"], r["path"]))


def previous(recs: list[dict], rec: dict) -> dict | None:
    """The rung `rec` adds to: for a context-parallel record, an earlier one of the same processes that it changes
    in one optimization (added or set otherwise), else the one-process record with the same other optimizations;
    else the row above."""
    i = recs.index(rec)
    mine = rec["optimizations"]
    if "parallel" in mine:
        for r in recs[:i]:
            theirs = r["optimizations"]
            if r["processes"] == rec["processes"] and set(theirs) <= set(mine) \
                    and sum(theirs.get(k) != v for k, v in mine.items()) == 1:
                return r
        rest = {k: v for k, v in mine.items() if k != "parallel"}
        return next((r for r in recs if r["processes"] == 1 and r["optimizations"] == rest), None)
    return recs[i - 1] if i else None


def heading(run: dict) -> str:
    first = run["records"][-1]
    prov = first["provenance"]
    state = "" if run["complete"] else " · **incomplete run**: it stopped before its last configuration"
    links = f" · GPU links: {prov.get('gpu_links') or 'not recorded'}" if run["world_size"] > 1 and prov.get("cuda") else ""
    commit = prov["git_commit"]
    commit = f"commit `{commit[:12]}`" if re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", commit) else f"code: `{commit}`"
    return (f"**{run['world_size']}x {prov['device_name']}** · {first['model_source']} · "
            f"{first['settings']['height']}x{first['settings']['width']}, {first['settings']['steps']} steps · "
            f"{commit} · {prov['date_utc']} · `{run['path']}`{links}{state}")


def latents_errors(name: str, precision: str, latents, references: dict) -> dict:
    """A configuration's final latents against the run's references (each relative to the reference's norm): the
    first configuration of the same `precision` (this one, where it is the first: it becomes that reference), and,
    for FP8, the run's first bf16 configuration (precision "None"), where the run has one. `references` maps a
    precision to (name, latents) and grows as the run goes."""
    def distance(reference):
        return ((latents - reference).norm() / reference.norm()).item()

    name_ref, same = references.setdefault(precision, (name, latents))
    errors = dict(latents_rel_error=distance(same), latents_reference=name_ref)
    if precision != "None" and "None" in references:
        bf16_name, bf16 = references["None"]
        errors |= dict(latents_rel_error_bf16=distance(bf16), latents_bf16_reference=bf16_name)
    return errors


def table(run: dict) -> Markdown:
    """One row per configuration: s/image, against the run's first configuration and against the rung it adds
    to, cold start, peak memory, and the final latents' distance from the same precision's reference (and, for FP8,
    from the run's bf16 one)."""
    recs = run["records"]
    ref = recs[0]["timing"]["median_s"]
    lines = [f"| Configuration | Procs | s/image | vs `{recs[0]['name']}` | vs previous rung | Cold start (s) "
             "| Peak GB | Latents error |", "|---|---|---|---|---|---|---|---|"]
    for r in recs:
        t, before = r["timing"], previous(recs, r)
        step = "—" if before is None else f"{before['timing']['median_s'] / t['median_s']:.2f}x"
        error, bf16 = r["extras"].get("latents_rel_error"), r["extras"].get("latents_rel_error_bf16")
        error = "—" if error is None else format(error, ".1e") + ("" if bf16 is None else f" (bf16 {bf16:.1e})")
        skipped = f", {r['cache']['skipped']}/{r['cache']['steps']} skipped" if r["cache"] else ""
        lines.append(f"| `{r['name']}`: {r['label']}{skipped} | {r['processes']} | {t['median_s']:.3f} "
                     f"({t['min_s']:.3f}) | {ref / t['median_s']:.2f}x | {step} | {t['cold_start_s']:.1f} "
                     f"| {r['peak_mem_gb'] or 0:.1f} | {error} |")
    note = ("s/image: median (minimum) of the timed calls, text encoding + denoising + VAE decode. Each configuration "
            "loads a fresh pipeline and makes one untimed call first (its cold start, compilation included). "
            "Latents error: distance of the final latents from the first configuration of the same precision in "
            "this run, relative to their norm (random weights: a numerics figure, not image quality); in brackets, for "
            "FP8, from the run's first bf16 configuration, in runs that have one.")
    return Markdown(heading(run) + "\n\n" + "\n".join(lines)
                    + f"\n\n<details><summary>About this table</summary>\n\n{note}\n\n</details>")


def plot(run: dict):
    """Per configuration, process 0's GPU kernel time of one image by kind, with the wall time marked."""
    recs = [r for r in run["records"] if r["extras"].get("profile")]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(recs) + 1.6))
    names = [r["name"] for r in recs]
    left = [0.0] * len(recs)
    for kind, colour in KIND_COLOURS.items():
        widths = [r["extras"]["profile"][0]["kernel_s_by_kind"].get(kind, 0.0) for r in recs]
        if any(widths):
            ax.barh(names, widths, left=left, color=colour, label=kind)
            left = [a + b for a, b in zip(left, widths)]
    ax.plot([r["timing"]["median_s"] for r in recs], names, "k|", markersize=16, label="wall time (median)")
    ax.invert_yaxis()
    ax.set_xlabel("seconds per image (kernel times summed by kind, process 0)")
    ax.set_title(f"{run['world_size']}x {recs[0]['provenance']['device_name']}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def best(recs: list[dict], processes: int) -> dict | None:
    """The fastest configuration without First Block Cache on `processes` processes."""
    return min((r for r in recs if r["processes"] == processes and not r["cache"]),
               key=lambda r: r["timing"]["median_s"], default=None)


def verdict(run: dict, targets: dict) -> Markdown:
    """The run against `targets` ({processes: {"seconds", "speedup"}}, speedup over the best one-process
    configuration of the same run, or over the first configuration for one process), and where the best
    configuration's time goes."""
    recs = run["records"]
    procs = run["world_size"]
    top, one = best(recs, procs), best(recs, 1)
    if top is None:
        return Markdown(f"No configuration over {procs} processes finished in this run.")
    reference = recs[0] if procs == 1 else one
    speedup = reference["timing"]["median_s"] / top["timing"]["median_s"]
    lines = [f"Fastest without a cache here: **`{top['name']}`**, {top['timing']['median_s']:.3f} s per image, "
             f"{speedup:.2f}x `{reference['name']}` ({reference['timing']['median_s']:.3f} s) of the same run."]
    target = targets.get(procs)
    if target and procs == 1 and recs[0]["optimizations"]:
        lines.append(f"No speed target is judged on this run: its first configuration, `{recs[0]['name']}`, is not "
                     "the eager bf16 baseline.")
    elif target:
        met = top["timing"]["median_s"] <= target["seconds"] and speedup >= target["speedup"]
        lines.append(f"Target: <= {target['seconds']} s and >= {target['speedup']}x: **{'met' if met else 'not met'}**.")
        if not met and procs == 1 and top["extras"].get("profile"):
            lines.append(_room(top, min(target["seconds"], reference["timing"]["median_s"] / target["speedup"])))
    if any("offload" in r["optimizations"] or r["extras"].get("memory_cap_gb") for r in recs):
        lines.append("This run's rows are not rungs of one ladder: they trade time for GPU memory, and the memory "
                     "table below compares them card by card.")
        recs = []
    kept, dropped = [], []
    for r in recs:
        before = previous(recs, r)
        if before is not None:
            gain = before["timing"]["median_s"] / r["timing"]["median_s"] - 1
            (kept if gain > SAME else dropped).append(f"`{r['name']}` ({gain:+.1%} vs `{before['name']}`)")
    if recs:
        lines.append("Faster than the rung below: " + (", ".join(kept) or "none") + ". Not faster (within "
                     f"{SAME:.0%} or slower): " + (", ".join(dropped) or "none") + ".")
    for i, p in enumerate(top["extras"].get("profile") or []):
        lines.append(f"Process {i} of `{top['name']}`, one profiled image ({p['wall_s']:.3f} s under the profiler): "
                     f"compute {p['compute_s']:.3f} s, communication {p['communication_s']:.3f} s of which "
                     f"{p['exposed_communication_s']:.3f} s overlaps no compute, idle {p['idle_s']:.3f} s.")
    traffic = top["extras"].get("all_to_all")
    if traffic:
        lines.append(f"A bare all-to-all of one Ulysses tensor ({traffic['bytes_per_process'] / 1e6:.1f} MB per "
                     f"process) took {traffic['ms_median']:.3f} ms in this run ({traffic['sent_gb_s']:.0f} GB/s sent "
                     f"per process): {traffic['per_image_s']:.3f} s for one image's 4 exchanges x "
                     "blocks x steps if none overlapped compute.")
        if traffic.get("sweep"):
            lines.append("The same bare all-to-all at other sizes per process: " + ", ".join(
                f"{t['bytes_per_process'] / 1e6:.1f} MB {t['ms_median'] * 1e3:.0f} us" for t in traffic["sweep"])
                + ".")
    return Markdown("\n\n".join(lines))


def _room(top: dict, needed_s: float) -> str:
    """How much of a missed one-process target the matrix multiplies and attention leave to everything else."""
    kinds = top["extras"]["profile"][0]["kernel_s_by_kind"]
    floor = sum(seconds for kind, seconds in kinds.items() if "GEMM" in kind or kind == "attention")
    median = top["timing"]["median_s"]
    return (f"Of its {median:.3f} s, matrix multiplies and attention take {floor:.3f} s (their kernels' time in the "
            f"profiled image). Reaching the target ({needed_s:.3f} s) with those kernels as they are leaves "
            f"{needed_s - floor:.3f} s for everything else (norms, quantization, GELU, rotary embedding, VAE, text "
            f"encoders, idle), which now takes {median - floor:.3f} s.")


def findings(runs_: list[dict]) -> str:
    """What the profiles of these runs show, in sentences computed from their records: for each context-parallel
    configuration measured with and without CUDA graphs, how its processes' idle and exposed communication time
    changed; for each run's fastest configuration, what its GPU time is made of."""
    lines = []
    for run in runs_:
        recs = {r["name"]: r for r in run["records"]}
        where = f"{run['world_size']}x {run['records'][-1]['provenance']['device_name']}"
        for name, rec in recs.items():
            plain = recs.get(name.removesuffix("-graphs")) if name.endswith("-graphs") else None
            if not plain or rec["processes"] < 2 or not (rec["extras"].get("profile") and plain["extras"].get("profile")):
                continue
            before = _extremes(plain["extras"]["profile"])
            after = _extremes(rec["extras"]["profile"])
            lines.append(
                f"* {where}, `{plain['name']}` → `{name}`: {plain['timing']['median_s']:.3f} → "
                f"{rec['timing']['median_s']:.3f} s per image. Without graphs the most idle process idled "
                f"{before['idle_s']:.3f} s and the most waiting one spent {before['exposed_communication_s']:.3f} s "
                f"in NCCL with no compute beside it; with graphs {after['idle_s']:.3f} s and "
                f"{after['exposed_communication_s']:.3f} s, while compute stayed at {before['compute_s']:.3f} → "
                f"{after['compute_s']:.3f} s.")
        for name, rec in recs.items():
            nccl = recs.get(name.replace("-peer", "")) if "-peer" in name else None
            if nccl and rec["extras"].get("profile") and nccl["extras"].get("profile"):
                before, after = _extremes(nccl["extras"]["profile"]), _extremes(rec["extras"]["profile"])
                trip = rec["extras"].get("all_to_all", {})
                bare = (f" Bare, one layer's four NCCL all-to-alls took {4 * trip['ms_median'] * 1e3:.0f} us and its "
                        f"peer exchanges {trip['peer_round_trip']['ms_median'] * 1e3:.0f} us (median, outside "
                        "graphs)." if "peer_round_trip" in trip else "")
                lines.append(
                    f"* {where}, `{nccl['name']}` → `{name}` (Ulysses' exchanges as copies into the other GPU's "
                    f"memory): {nccl['timing']['median_s']:.3f} → {rec['timing']['median_s']:.3f} s per image. "
                    f"Communication not overlapped (the barriers, now) went {before['exposed_communication_s']:.3f} → "
                    f"{after['exposed_communication_s']:.3f} s and idle {before['idle_s']:.3f} → {after['idle_s']:.3f} s "
                    f"(the largest over the processes), while compute, which now holds the copies, went "
                    f"{before['compute_s']:.3f} → {after['compute_s']:.3f} s.{bare}")
        top = best(run["records"], run["world_size"])
        vae = top and top["extras"].get("vae_decode_s")
        if vae and run["world_size"] > 1:
            lines.append(f"* {where}, `{top['name']}`: the VAE decodes the whole image on every process in {vae:.3f} s, "
                         f"{vae / top['timing']['median_s']:.1%} of its {top['timing']['median_s']:.3f} s per image.")
        lines += gap(run, where)
        profile = top and top["extras"].get("profile")
        if profile:
            kinds = ", ".join(f"{k} {v:.3f} s" for k, v in profile[0]["kernel_s_by_kind"].items())
            lines.append(f"* {where}, fastest without a cache, `{top['name']}` ({top['timing']['median_s']:.3f} s): "
                         f"process 0's kernels by kind: {kinds}.")
    return "\n".join(lines) or "*No profiled benchmark records yet.*"


def gap(run: dict, where: str) -> list[str]:
    """Why a several-process run's fastest configuration is slower than the one-process time divided by the
    processes, from the profiles of both (one profiled image each): compute beyond an even share, communication
    not overlapped, and idle time by gap size (`findings` states the VAE decode every process repeats)."""
    procs, recs = run["world_size"], run["records"]
    top, one = best(recs, procs), best(recs, 1)
    if procs < 2 or not top or not one or not (top["extras"].get("profile") and one["extras"].get("profile")):
        return []
    share = one["extras"]["profile"][0]["compute_s"] / procs
    ideal = one["timing"]["median_s"] / procs
    per = []
    for i, p in enumerate(top["extras"]["profile"]):
        idle = p.get("idle", {}).get("between_kernels_s")
        split = f" ({', '.join(f'{k} {v:.3f} s' for k, v in idle.items())} between kernels, the rest before the " \
                "first and after the last kernel)" if idle else ""
        per.append(f"process {i}: compute {p['compute_s']:.3f} s ({p['compute_s'] - share:+.3f} s), communication "
                   f"not overlapped {p['exposed_communication_s']:.3f} s, idle {p['idle_s']:.3f} s{split}")
    return [f"* {where}, the gap to {procs} processes: `{top['name']}` takes {top['timing']['median_s']:.3f} s where "
            f"`{one['name']}` ({one['timing']['median_s']:.3f} s) split evenly would take {ideal:.3f} s. An even "
            f"share of one process's compute ({one['extras']['profile'][0]['compute_s']:.3f} s, profiled) is "
            f"{share:.3f} s; one profiled image per process: " + "; ".join(per) + "."]


def _extremes(profile: list[dict]) -> dict:
    """The largest idle, exposed communication and compute over a configuration's processes."""
    return {k: max(p[k] for p in profile) for k in ("idle_s", "exposed_communication_s", "compute_s")}


CARDS_GB = (12, 16, 24, 48, 80)
CONTEXT_GB = 1.0  # headroom for the CUDA context and libraries, outside PyTorch's allocator (an allowance)


def memory_table(runs_: list[dict]) -> Markdown:
    """For each card size, the fastest one-process configuration that fits: run under a cap of at most that many GB,
    or with peak reserved memory (plus `CONTEXT_GB`) within it; then every measured configuration's footprint."""
    recs = [r for run in runs_ for r in run["records"] if r["processes"] == 1 and r["peak_mem_gb"] is not None]
    if not recs:
        return Markdown("*No benchmark record with GPU memory yet.*")

    def footprint(r):
        return r["extras"].get("peak_reserved_gb") or r["peak_mem_gb"]

    lines = ["| Card | Fastest configuration that fits | s/image | Peak reserved (GB) | Run under a cap |",
             "|---|---|---|---|---|"]
    for card in CARDS_GB:
        fits = [r for r in recs if not r["cache"] and (footprint(r) + CONTEXT_GB <= card or _capped_within(r, card))]
        best_fit = min(fits, key=lambda r: r["timing"]["median_s"], default=None)
        lines.append(f"| {card} GB | " + (f"`{best_fit['name']}`: {best_fit['label']} | "
                                          f"{best_fit['timing']['median_s']:.3f} | {footprint(best_fit):.1f} | "
                                          f"{_cap(best_fit)} |" if best_fit else "nothing measured fits | — | — | — |"))
    lines += ["", "| Configuration | s/image | Peak allocated (GB) | Peak reserved (GB) | Run under a cap | Run |",
              "|---|---|---|---|---|---|"]
    for r in sorted(recs, key=footprint):
        lines.append(f"| `{r['name']}`: {r['label']} | {r['timing']['median_s']:.3f} | {r['peak_mem_gb']:.1f} "
                     f"| {footprint(r):.1f} | {_cap(r)} | `{Path(r['_path']).name}` |")
    device = recs[0]["provenance"]["device_name"]
    note = (f"Measured on {device} with flux-dev-random (1024x1024, 28 steps): peak GPU memory of the timed calls, "
            f"as PyTorch's allocator saw it. A configuration fits a card when it ran under a cap of at most the card's "
            f"size, or when its peak reserved memory plus {CONTEXT_GB:g} GB for the CUDA context fits. 'Run under a "
            "cap': from its first call on, PyTorch could hold no more than that many 10^9 bytes on the GPU "
            "(`torch.cuda.set_per_process_memory_fraction`); a card sold as N GB has N GiB, which leaves more than "
            "the allowance for the CUDA context beside the cap, so the run itself shows the configuration fits. "
            "Loading and quantizing ran uncapped. Times on a smaller card's own GPU differ from these.")
    return Markdown("\n".join(lines) + f"\n\n*{note}*")


def _capped_within(rec: dict, card: float) -> bool:
    """Whether the record ran under a memory cap of at most `card` GB."""
    return 0 < (rec["extras"].get("memory_cap_gb") or 0) <= card


def _cap(rec: dict) -> str:
    cap = rec["extras"].get("memory_cap_gb")
    return f"{cap:g} GB: completed" if cap else "—"


def memory_verdict(runs_: list[dict], targets: dict) -> Markdown:
    """`targets` ({card GB: slowdown allowed over the same run's fastest configuration, or None: it need only
    complete}) against the one-process configurations run under a cap of at most that many GB."""
    lines = []
    for card, slowdown in sorted(targets.items(), reverse=True):
        aim = f"within {slowdown:g}x of its run's fastest configuration" if slowdown else "that completes"
        capped = [(r, run) for run in runs_ for r in run["records"] if r["processes"] == 1 and _capped_within(r, card)]
        if not capped:
            lines.append(f"* {card} GB, target: a configuration {aim}: nothing was run under a cap of "
                         f"{card} GB or less.")
            continue
        r, run = min(capped, key=lambda pair: pair[0]["timing"]["median_s"])
        fastest = best(run["records"], 1)
        ratio = r["timing"]["median_s"] / fastest["timing"]["median_s"]
        met = ratio <= slowdown if slowdown else True
        lines.append(f"* {card} GB, target: a configuration {aim}. `{r['name']}` ({r['label']}) completed "
                     f"under a cap of {r['extras']['memory_cap_gb']:g} GB: {r['timing']['median_s']:.3f} s per image "
                     f"({len(r['timing']['times_s'])} timed call(s)), peak {r['peak_mem_gb']:.1f} GB allocated, "
                     f"{ratio:.2f}x `{fastest['name']}` ({fastest['timing']['median_s']:.3f} s) of the same run: "
                     f"**{'met' if met else 'not met'}**.")
    return Markdown("\n".join(lines))
