"""The book's table of chapters (`book/chapters.toml`): what each chapter needs, and how long it took where it ran."""
import json
import tomllib
from pathlib import Path

from .report import markdown
from .settings import check_full_size

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ROOT / "book" / "chapters.toml"
PUBLISHED = ROOT / "book" / "published"


def chapters() -> list[dict]:
    return tomllib.loads(CHAPTERS.read_text())["chapter"]


def chapter(name: str) -> dict:
    found = [c for c in chapters() if c["name"] == name]
    if not found:
        raise ValueError(f"unknown chapter {name!r}; allowed: {[c['name'] for c in chapters()]}")
    return found[0]


def expected_s(ch: dict, settings) -> float | None:
    """How long the chapter took for this source on this kind of device where the book was made (`expected_s` in
    chapters.toml), for a progress estimate before any local run; None where unknown."""
    return ch.get("expected_s", {}).get(f"{settings.source.kind}-{settings.device.type}")


def runs(out: Path) -> dict:
    """The runner's log of chapters executed into `out` (name -> status, duration, processes, device)."""
    path = Path(out) / "chapters.json"
    return json.loads(path.read_text()) if path.exists() else {}


def check_device(ch: dict, source, device) -> None:
    """Refuse a chapter that cannot run here: the full-size model on a CPU, or on a GPU with too little memory."""
    check_full_size(ch.get("gpu_memory_gb"), source, device, f"chapter {ch['name']}")


def needs(name: str, results_dir: str | Path):
    """What the chapter needs and how long it took: the published GPU run and this folder's last run (Markdown for
    the notebook)."""
    ch = chapter(name)
    if ch.get("gpu_memory_gb"):
        hardware = (f"a CPU (the bundled `tiny` pipeline) or, for the full-size model, a CUDA GPU with "
                    f"{ch['gpu_memory_gb']} GB")
    else:
        hardware = "any machine: this page only reads the records of earlier runs"
    if ch["processes"] == "torchrun":
        hardware += "; it runs under `torchrun`, one process per GPU (2 CPU processes by default)"
    lines = [f"**What you need:** {hardware}."]
    here = Path(results_dir).resolve().parent
    if here == PUBLISHED.resolve():  # this run is the published one: its time is known only once it ends
        lines.append("**Run time, device and commit:** on the [status page](status.md).")
        return markdown("  \n".join(lines))
    for label, out in (("Published run", PUBLISHED), ("Last run here", here)):
        run = runs(out).get(name)
        if run and run.get("status") == "ok":
            where = f" on {run.get('processes', 1)}x {run['device']}" if run.get("device") else ""
            lines.append(f"**{label}:** {run['duration_s']:.0f} s{where}.")
    return markdown("  \n".join(lines))
