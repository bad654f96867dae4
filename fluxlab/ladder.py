"""The performance page from `scripts/bench.py`'s records: fluxlab's fastest beside other tools per GPU, the ladder,
what did not help, what fits a smaller card, one verdict per process count against the page's targets, and the
records' appendix."""
import re
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt

from . import records
from .report import markdown

if TYPE_CHECKING:
    from IPython.display import Markdown

KIND_COLOURS = {"FP8 GEMM": "#c44e52", "GEMM (bf16)": "#dd8452", "attention": "#4c72b0",
                "fused elementwise / quantization (triton)": "#55a868", "fluxlab's kernels (triton)": "#64b5cd",
                "communication": "#8172b3",
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
    first, each process count's untagged run before its tagged ones. `complete` is False for a progress file
    (bench-<N>gpu[-<tag>].partial.json) of a run that stopped early."""
    found = []
    for path in sorted(Path(folder).glob(BENCH_FILES)):
        recs, failed = records.read_run(path)
        found.append(dict(path=path.name, complete=not path.name.endswith(".partial.json"), records=recs,
                          failed=failed, world_size=max(r["processes"] for r in recs)))
    return sorted(found, key=lambda r: (r["world_size"], tag(r["path"]) != "", not r["complete"], r["path"]))


def is_peer(rec: dict) -> bool:
    """A record of another tool's recipe (`fluxlab.peers`), not a fluxlab configuration."""
    return "peer" in rec["extras"]


def _flat(optimizations: dict, prefix: str = "") -> dict:
    """Nested optimizations as {"compile.options.conv_1x1_as_mm": True, ...}."""
    flat = {}
    for key, value in optimizations.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


def _adds_one(before: dict, after: dict) -> bool:
    """Whether `after` keeps everything `before` applied and adds to (or sets otherwise) one optimization only."""
    b, a = _flat(before), _flat(after)
    changed = {k.split(".")[0] for k in a if b.get(k) != a[k]}
    return set(b) <= set(a) and len(changed) == 1


def previous(recs: list[dict], rec: dict) -> dict | None:
    """The configuration `rec` builds on, in the same run: the nearest earlier fluxlab record of the same processes
    that it adds one optimization to (or sets one otherwise), or a later one where it ran first; else, for one
    process, the row above (unless that row builds on `rec`: `rec` is then its base, not a step), and for context
    parallelism, the one-process record with the same other optimizations; else None. Other tools' records build on
    nothing."""
    if is_peer(rec):
        return None
    i = recs.index(rec)
    ours = [r for r in recs[:i] if not is_peer(r) and r["processes"] == rec["processes"]]
    later = [r for r in recs[i + 1:] if not is_peer(r) and r["processes"] == rec["processes"]]
    found = next((r for r in [*reversed(ours), *later] if _adds_one(r["optimizations"], rec["optimizations"])), None)
    if found or "parallel" not in rec["optimizations"]:
        above = ours[-1] if ours else None
        if found or above is None or _adds_one(rec["optimizations"], above["optimizations"]):
            return found
        return above
    rest = {k: v for k, v in rec["optimizations"].items() if k != "parallel"}
    return next((r for r in recs if r["processes"] == 1 and r["optimizations"] == rest), None)


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


def best(recs: list[dict], processes: int) -> dict | None:
    """The fastest fluxlab configuration without First Block Cache on `processes` processes."""
    return min((r for r in recs if r["processes"] == processes and not r["cache"] and not is_peer(r)),
               key=lambda r: r["timing"]["median_s"], default=None)


def headline_runs(runs_: list[dict]) -> list[dict]:
    """The complete one-process runs that measured other tools beside the bf16 baseline, one per GPU (the newest)."""
    found = {}
    for run in runs_:
        recs = run["records"]
        if run["complete"] and run["world_size"] == 1 and not recs[0]["optimizations"] \
                and (any(map(is_peer, recs)) or any(f["name"].startswith("peer-") for f in run["failed"])):
            device = recs[0]["provenance"]["device_name"]
            if device not in found or recs[0]["provenance"]["date_utc"] > found[device]["records"][0]["provenance"][
                    "date_utc"]:
                found[device] = run
    return sorted(found.values(), key=lambda run: run["records"][0]["provenance"]["device_name"])


def _added(before: dict, after: dict) -> str:
    """What `after`'s label adds to `before`'s: its ' + '-separated parts that `before` lacks."""
    return " + ".join(p for p in after["label"].split(" + ") if p not in before["label"].split(" + "))


def _seconds(rec: dict) -> str:
    t = rec["timing"]
    return f"{t['median_s']:.3f} ({t['min_s']:.3f})"


def short(error: str, limit: int = 160) -> str:
    """An error for a Markdown table cell: without memory addresses, cut at a word within `limit` characters, as
    code (`__eq__` is not bold)."""
    error = re.sub(r" at 0x[0-9a-f]+", "", error).replace("`", "'").replace("|", "\\|")
    return f"`{error if len(error) <= limit else error[:limit].rsplit(' ', 1)[0] + ' …'}`"


def headline(runs_: list[dict]) -> "Markdown":
    """Per GPU, from one run each: the bf16 baseline, fluxlab's fastest configuration and each other tool's recipe
    (or the error it failed with): s/image, ratio to the baseline, cold start, peak memory, latents error."""
    lines = ["| GPU | Configuration | s/image | vs bf16 | Cold start (s) | Peak GB | Latents vs bf16 |",
             "|---|---|---|---|---|---|---|"]
    for run in headline_runs(runs_):
        recs = run["records"]
        base, top = recs[0], best(recs, 1)
        gpu = base["provenance"]["device_name"].removeprefix("NVIDIA ")
        for r in [base, *([top] if top is not base else []), *filter(is_peer, recs)]:
            who = f"{r['extras']['peer']['tool']} {r['extras']['peer']['version'].split(';')[0]}" if is_peer(r) \
                else ("diffusers bf16" if r is base else "fluxlab fastest")
            error = r["extras"].get("latents_rel_error_bf16")
            lines.append(f"| {gpu} | **{who}**: `{r['name']}` | {_seconds(r)} | "
                         f"{base['timing']['median_s'] / r['timing']['median_s']:.2f}x | "
                         f"{r['timing']['cold_start_s']:.1f} | {r['peak_mem_gb'] or 0:.1f} | "
                         f"{'—' if error is None else format(error, '.1e')} |")
        for f in run["failed"]:
            lines.append(f"| {gpu} | **failed**: `{f['name']}` | — | — | — | — | {f['stage']}: {short(f['error'])} |")
    if len(lines) == 2:
        return markdown("*No benchmark run has measured other tools yet.*")
    note = ("s/image: median (minimum) of 3 timed calls after one untimed call (the cold start, compilation "
            "included); text encoding, 28 steps and VAE decode at 1024x1024 on flux-dev-random; each row loads a "
            "fresh pipeline; ratios within one run. Latents vs bf16: distance of the final latents from the run's bf16 "
            "baseline, relative to its norm (random weights: numerics, not image quality). Each tool's recipe as run, "
            "and what it leaves out here, is in the appendix.")
    return markdown("\n".join(lines) + f"\n\n*{note}*")


def plot(runs_: list[dict]):
    """One panel per run: each profiled configuration's GPU kernel time of one image by kind, the wall time marked."""
    fig, axes = plt.subplots(len(runs_), 1, squeeze=False,
                             figsize=(8, sum(0.45 * len(run["records"]) + 1.0 for run in runs_) + 0.6))
    for ax, run in zip(axes[:, 0], runs_):
        recs = [r for r in run["records"] if r["extras"].get("profile")]
        names = [r["name"] for r in recs]
        left = [0.0] * len(recs)
        for kind, colour in KIND_COLOURS.items():
            widths = [r["extras"]["profile"][0]["kernel_s_by_kind"].get(kind, 0.0) for r in recs]
            if any(widths):
                ax.barh(names, widths, left=left, color=colour, label=kind)
                left = [a + b for a, b in zip(left, widths)]
        ax.plot([r["timing"]["median_s"] for r in recs], names, "k|", markersize=16, label="wall time (median)")
        ax.invert_yaxis()
        ax.set_title(f"{run['world_size']}x {run['records'][0]['provenance']['device_name']} · {run['path']}",
                     fontsize=9)
    axes[-1, 0].set_xlabel("seconds per image (kernel time by kind, process 0; black: wall time)")
    axes[0, 0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def steps(recs: list[dict]) -> "Markdown":
    """A chapter's newest run as a ladder: each configuration without a cache or offload, in the order it ran,
    against the run's first (the bf16 baseline) and the row above."""
    run_id = recs[-1]["provenance"]["run_id"] if recs else None
    rows = [r for r in recs if r["provenance"]["run_id"] == run_id and not r["cache"] and r["processes"] == 1
            and "offload" not in r["optimizations"] and not r["name"].startswith("tiny-")]
    if not rows:
        return markdown("*No ladder recorded yet.*")
    base = rows[0]
    lines = ["| Step (what it adds to the row above) | s/image | vs bf16 | This step |", "|---|---|---|---|"]
    for before, r in zip([None, *rows], rows):
        step = "—" if before is None else f"{before['timing']['median_s'] / r['timing']['median_s'] - 1:+.1%}"
        what = r["label"] if before is None else "+ " + _added(before, r)
        lines.append(f"| {what} | {_seconds(r)} | {base['timing']['median_s'] / r['timing']['median_s']:.2f}x "
                     f"| {step} |")
    prov = base["provenance"]
    return markdown(f"*{prov['device_name']}, {base['model_source']}, chapter `{base['chapter']}`, commit "
                    f"`{prov['git_commit'][:12]}`, {prov['date_utc'][:10]}; s/image: median (minimum).*\n\n"
                    + "\n".join(lines))


def not_helped(runs_: list[dict]) -> "Markdown":
    """Every fluxlab configuration measured within `SAME` of, or slower than, the one it changes in one optimization
    (`previous`), in the same run: what changed, by how much, and the record file."""
    lines = ["| Change | Configuration, against | Change in s/image | GPUs | Record |", "|---|---|---|---|---|"]
    for run in runs_:
        for r in run["records"]:
            before = previous(run["records"], r)
            if before is None or any("offload" in x["optimizations"] or x["extras"].get("memory_cap_gb")
                                     for x in (r, before)):  # memory trades, in the memory table
                continue
            gain = before["timing"]["median_s"] / r["timing"]["median_s"] - 1
            if gain <= SAME:
                lines.append(f"| {_added(before, r) or 'the same'} | `{r['name']}` against `{before['name']}` | "
                             f"{gain:+.1%} ({before['timing']['median_s']:.3f} → {r['timing']['median_s']:.3f} s) | "
                             f"{r['processes']}x {r['provenance']['device_name'].removeprefix('NVIDIA ')} | "
                             f"`{run['path']}` |")
    return markdown("\n".join(lines) + f"\n\n*A change counts as no gain within {SAME:.0%}: the spread of repeated "
                    "runs of one configuration.*" if len(lines) > 2 else "*Every measured change helped.*")


def verdicts(runs_: list[dict], targets: dict) -> "Markdown":
    """One verdict per process count that has a complete record: its fastest configuration without a cache over
    every run whose reference suits the target (one process: the bf16 baseline; several: the same run's best
    one-process configuration), against `targets` ({processes: {"seconds", "speedup"}})."""
    lines = []
    for procs, target in sorted(targets.items()):
        candidates = []
        for run in runs_:
            top, one = best(run["records"], procs), best(run["records"], 1)
            reference = run["records"][0] if procs == 1 else one
            if run["complete"] and top and reference and (procs > 1 or not reference["optimizations"]):
                candidates.append((top["timing"]["median_s"], top, reference, run))
        if not candidates:
            lines.append(f"* **{procs} GPU(s)**: no complete record yet.")
            continue
        _, top, reference, run = min(candidates, key=lambda c: c[0])
        speedup = reference["timing"]["median_s"] / top["timing"]["median_s"]
        met = top["timing"]["median_s"] <= target["seconds"] and speedup >= target["speedup"]
        line = (f"* **{procs} GPU(s)**, target <= {target['seconds']} s and >= {target['speedup']}x: `{top['name']}` "
                f"on {top['provenance']['device_name']}, {top['timing']['median_s']:.3f} s, {speedup:.2f}x "
                f"`{reference['name']}` of the same run (`{run['path']}`): **{'met' if met else 'not met'}**.")
        if not met and procs == 1 and top["extras"].get("profile"):
            line += " " + _room(top, min(target["seconds"], reference["timing"]["median_s"] / target["speedup"]))
        lines.append(line)
    return markdown("\n".join(lines))


def _room(top: dict, needed_s: float) -> str:
    """How much of a missed one-process target the matrix multiplies and attention leave to everything else."""
    kinds = top["extras"]["profile"][0]["kernel_s_by_kind"]
    floor = sum(seconds for kind, seconds in kinds.items() if "GEMM" in kind or kind == "attention")
    median = top["timing"]["median_s"]
    return (f"Of its {median:.3f} s, matrix multiplies and attention take {floor:.3f} s (their kernels' time in the "
            f"profiled image). Reaching the target ({needed_s:.3f} s) with those kernels as they are leaves "
            f"{needed_s - floor:.3f} s for everything else (norms, quantization, GELU, rotary embedding, VAE, text "
            f"encoders, idle), which now takes {median - floor:.3f} s.")


def command(run: dict) -> str:
    """The command line that makes a run like this one (its configurations, tag, repeats, profiling)."""
    recs, t = run["records"], tag(run["path"])
    ran = sorted(recs + run["failed"], key=lambda r: r["provenance"]["date_utc"])  # in the order they ran
    names = [r["name"] for r in ran]
    repeats = max(len(r["timing"]["times_s"]) for r in recs)
    launcher = f"torchrun --nproc_per_node {run['world_size']} " if run["world_size"] > 1 else "python "
    return (launcher + "scripts/bench.py" + (f" --tag {t}" if t else "") + f" --repeats {repeats}"
            + (" --profile" if any(r["extras"].get("profile") for r in recs) else "") + " --configs " + ",".join(names))


def appendix(runs_: list[dict]) -> "Markdown":
    """Every benchmark file: its command, commit, date, device, whether it completed, what failed in it; and the
    recipe each other tool ran with."""
    lines = ["| Record | Device | Commit | Date (UTC) | Complete | Command |", "|---|---|---|---|---|---|"]
    for run in runs_:
        prov = run["records"][0]["provenance"]
        failed = "".join(f"; `{f['name']}` failed" for f in run["failed"])
        lines.append(f"| `{run['path']}` | {run['world_size']}x {prov['device_name']} | `{prov['git_commit'][:12]}` "
                     f"| {prov['date_utc'][:16]} | {'yes' if run['complete'] else 'no: stopped early'}{failed} "
                     f"| `{command(run)}` |")
    peers = {r["name"]: r["extras"]["peer"] for run in runs_ for r in run["records"] if is_peer(r)}
    if peers:
        lines += ["", "| Other tool | Version | Recipe as run | Left out here |", "|---|---|---|---|"]
        lines += [f"| `{name}` | {p['version']} | {p['recipe']} | {p['without']} |" for name, p in peers.items()]
    return markdown("\n".join(lines))


def gap(run: dict) -> str:
    """Why a several-process run's fastest configuration is slower than the one-process time divided by the
    processes, from the profiles of both (one profiled image each): compute beyond an even share, communication
    not overlapped, and idle time by gap size."""
    procs, recs = run["world_size"], run["records"]
    top, one = best(recs, procs), best(recs, 1)
    if procs < 2 or not top or not one or not (top["extras"].get("profile") and one["extras"].get("profile")):
        return ""
    share = one["extras"]["profile"][0]["compute_s"] / procs
    ideal = one["timing"]["median_s"] / procs
    per = []
    for i, p in enumerate(top["extras"]["profile"]):
        idle = p.get("idle", {}).get("between_kernels_s")
        split = f" ({', '.join(f'{k} {v:.3f} s' for k, v in idle.items())} between kernels, the rest before the " \
                "first and after the last kernel)" if idle else ""
        per.append(f"process {i}: compute {p['compute_s']:.3f} s ({p['compute_s'] - share:+.3f} s), communication "
                   f"not overlapped {p['exposed_communication_s']:.3f} s, idle {p['idle_s']:.3f} s{split}")
    vae = top["extras"].get("vae_decode_s")
    vae = f" Every process also decodes the whole image in the VAE ({vae:.3f} s)." if vae else ""
    return (f"`{top['name']}` takes {top['timing']['median_s']:.3f} s where `{one['name']}` "
            f"({one['timing']['median_s']:.3f} s) split evenly would take {ideal:.3f} s. An even share of one "
            f"process's compute ({one['extras']['profile'][0]['compute_s']:.3f} s, profiled) is {share:.3f} s; one "
            "profiled image per process: " + "; ".join(per) + "." + vae)


def fastest_run(runs_: list[dict], processes: int) -> dict | None:
    """The complete run holding the fastest configuration without a cache on `processes` processes."""
    found = [(best(run["records"], processes), run) for run in runs_ if run["complete"]]
    found = [(top, run) for top, run in found if top]
    return min(found, key=lambda pair: pair[0]["timing"]["median_s"])[1] if found else None


CARDS_GB = (12, 16, 24, 48, 80)
CONTEXT_GB = 1.0  # headroom for the CUDA context and libraries, outside PyTorch's allocator (an allowance)


def memory_table(runs_: list[dict]) -> "Markdown":
    """For each card size and each GPU measured, the fastest one-process configuration that fits: run under a cap of
    at most that many GB, or with peak reserved memory (plus `CONTEXT_GB`) within it; then the footprint of every
    configuration that trades time for memory. Times of different GPUs are never compared: one row per GPU."""
    recs = [r for run in runs_ for r in run["records"] if r["processes"] == 1 and r["peak_mem_gb"] is not None]
    if not recs:
        return markdown("*No benchmark record with GPU memory yet.*")

    def footprint(r):
        return r["extras"].get("peak_reserved_gb") or r["peak_mem_gb"]

    devices = sorted({r["provenance"]["device_name"] for r in recs})
    lines = ["| Card | Measured on | Fastest configuration that fits | s/image | Peak reserved (GB) "
             "| Run under a cap |",
             "|---|---|---|---|---|---|"]
    for card in CARDS_GB:
        fits = [r for r in recs if not r["cache"] and (footprint(r) + CONTEXT_GB <= card or _capped_within(r, card))]
        best = [min((r for r in fits if r["provenance"]["device_name"] == device),
                    key=lambda r: r["timing"]["median_s"], default=None) for device in devices]
        lines += [f"| {card} GB | {device} | `{b['name']}`: {b['label']} | {b['timing']['median_s']:.3f} | "
                  f"{footprint(b):.1f} | {_cap(b)} |" for device, b in zip(devices, best) if b] or [
                  f"| {card} GB | — | nothing measured fits | — | — | — |"]
    lines += ["", "The configurations that trade time for memory (offload, or a cap):", "",
              "| Configuration | Measured on | s/image | Peak allocated (GB) | Peak reserved (GB) | Run under a cap "
              "| Run |",
              "|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in recs if "offload" in r["optimizations"] or r["extras"].get("memory_cap_gb")),
                    key=lambda r: (r["provenance"]["device_name"], footprint(r))):
        lines.append(f"| `{r['name']}`: {r['label']} | {r['provenance']['device_name']} | "
                     f"{r['timing']['median_s']:.3f} | {r['peak_mem_gb']:.1f} | {footprint(r):.1f} | {_cap(r)} "
                     f"| `{Path(r['_path']).name}` |")
    note = (f"Measured on {' and '.join(devices)} with flux-dev-random (1024x1024, 28 steps): peak GPU memory of the "
            "timed calls, as PyTorch's allocator saw it. A configuration fits a card when it ran under a cap of at "
            f"most the card's size, or when its peak reserved memory plus {CONTEXT_GB:g} GB for the CUDA context "
            "fits. 'Run under a cap': from its first call on, PyTorch could hold no more than that many 10^9 bytes on "
            "the GPU (`torch.cuda.set_per_process_memory_fraction`); a card sold as N GB has N GiB, which leaves more "
            "than the allowance for the CUDA context beside the cap, so the run itself shows the configuration fits. "
            "Loading and quantizing ran uncapped. Times on a smaller card's own GPU differ from these.")
    return markdown("\n".join(lines) + f"\n\n*{note}*")


def _capped_within(rec: dict, card: float) -> bool:
    """Whether the record ran under a memory cap of at most `card` GB."""
    return 0 < (rec["extras"].get("memory_cap_gb") or 0) <= card


def _cap(rec: dict) -> str:
    cap = rec["extras"].get("memory_cap_gb")
    return f"{cap:g} GB: completed" if cap else "—"


def memory_verdict(runs_: list[dict], targets: dict) -> "Markdown":
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
    return markdown("\n".join(lines))
