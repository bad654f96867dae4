"""Which records may be compared: ratios only within one run, and the article's rows matched by what was applied."""

ARTICLE_TECHNIQUES = ("cache", "fp8", "compile", "parallel")  # what the article's rows are made of
SETTINGS_KEYS = ("height", "width", "steps", "prompt", "seed", "guidance", "max_sequence_length")


def same_run(a: dict, b: dict) -> bool:
    """One run of one chapter (or of the benchmark) measured both, on the same kind of device, source and request:
    their times may be divided. (The runner gives all chapters of one invocation one run id.)"""
    pa, pb = a["provenance"], b["provenance"]
    return (pa["run_id"] == pb["run_id"] and a["chapter"] == b["chapter"] and pa["device_name"] == pb["device_name"]
            and a["model_source"] == b["model_source"] and a.get("model_weights") == b.get("model_weights")
            and all(a["settings"][k] == b["settings"][k] for k in SETTINGS_KEYS))


def speedup(baseline: dict, rec: dict) -> dict:
    """`rec`'s speedup over `baseline` (ratio of medians), its range over the timed calls (slowest baseline call /
    fastest call of `rec`, and the reverse), and whether that range includes 1.0 (a difference within noise)."""
    b, r = baseline["timing"], rec["timing"]
    low, high = min(b["times_s"]) / max(r["times_s"]), max(b["times_s"]) / min(r["times_s"])
    return dict(ratio=b["median_s"] / r["median_s"], low=low, high=high, noise=low <= 1.0 <= high)


def is_baseline(rec: dict) -> bool:
    return rec["processes"] == 1 and not rec["optimizations"] and "pool" not in rec["extras"]


def baseline_for(rec: dict, records: list[dict]) -> dict | None:
    """The plain one-process pipeline measured in `rec`'s run (the newest, if several), or None."""
    return next((b for b in reversed(records) if is_baseline(b) and same_run(rec, b)), None)


def matches(rec: dict, needs: dict, processes: int) -> bool:
    """`rec` applied exactly the article's techniques in `needs` ({"cache": 0.12, "fp8": True, ...}) on `processes`
    processes; the book's own additions (CUDA graphs, attention backends) may come on top, and FP8 is what the
    device could run (weight-only where it has no FP8 tensor cores; the row's label says which)."""
    done = rec["optimizations"]
    if rec["processes"] != processes or "pool" in rec["extras"]:
        return False
    if {t for t in ARTICLE_TECHNIQUES if t in done} != set(needs):
        return False
    return "cache" not in needs or done["cache"]["threshold"] == needs["cache"]


def find(records: list[dict], needs: dict, processes: int = 1) -> dict | None:
    """The fastest record of the newest run that matches (`matches`), or None."""
    found = [r for r in records if matches(r, needs, processes)]
    if not found:
        return None
    newest = max(r["provenance"]["date_utc"] for r in found)
    run = next(r["provenance"]["run_id"] for r in found if r["provenance"]["date_utc"] == newest)
    return min((r for r in found if r["provenance"]["run_id"] == run), key=lambda r: r["timing"]["median_s"])
