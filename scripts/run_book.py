"""Execute the book's chapters with papermill, in order, then render them with jupyter-book 1.x.

    python scripts/run_book.py                       # every chapter on the embedded default (tiny, CPU)
    python scripts/run_book.py -p model_source=flux-dev-random --nproc 2 --out book/published

Chapters and their needs come from book/chapters.toml. Each chapter runs into a staging folder; only when it
succeeds do its executed notebook and records replace the earlier ones under --out, so a failing chapter stops the
run with its error and leaves everything already there intact. Multi-process chapters run under torchrun: every
rank executes the notebook, rank 0's executed notebook goes into the book.
"""
import argparse
import ast
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CHAPTERS = ROOT / "book" / "chapters.toml"


def chapters() -> list[dict]:
    return tomllib.loads(CHAPTERS.read_text())["chapter"]


def parse_params(pairs: list[str]) -> dict:
    """key=value pairs; values are Python literals where they parse as one (1024, 0.12, None, [..]), else strings."""
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise SystemExit(f"error: parameter {pair!r} is not key=value")
        try:
            params[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            params[key] = value
    return params


def declared_parameters(notebook: Path) -> set[str]:
    import papermill

    return set(papermill.inspect_notebook(str(notebook)))


def validate(params: dict, selected: list[dict], nproc: int) -> None:
    """Fail on bad input before any chapter starts: unknown names, bad settings, unsplittable sequences."""
    import fluxlab
    from fluxlab import parallel

    known = set().union(*(declared_parameters(NOTEBOOKS / f"{c['name']}.ipynb") for c in chapters()))
    unknown = sorted(set(params) - known)
    if unknown:
        raise SystemExit(f"error: unknown parameter(s) {unknown}; the chapters take {sorted(known)}")
    names = ("model_source", "device", "prompt", "height", "width", "steps", "guidance", "seed")
    try:
        settings = fluxlab.settings(**{k: params[k] for k in names if k in params})
        for threshold in params.get("thresholds", []):
            fluxlab.check_options(cache=threshold)
        fluxlab.check_options(cache=params.get("cache_threshold"), fp8=params.get("fp8"),
                              compile=params.get("compile"))
        if any(c["processes"] == "torchrun" for c in selected):
            if nproc < 1:
                raise ValueError(f"--nproc {nproc}: needs at least 1 process")
            ulysses, _ = parallel.degrees(nproc, params.get("ulysses_degree"), params.get("ring_degree"))
            parallel.check_split(settings, nproc, ulysses)
            if settings.device.type == "cuda":
                import torch

                if torch.cuda.device_count() < nproc:
                    raise ValueError(f"--nproc {nproc}: only {torch.cuda.device_count()} GPU(s) here")
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    for c in selected:
        if settings.device.type not in c["devices"]:
            raise SystemExit(f"error: chapter {c['name']} runs on {c['devices']}, not {settings.device.type}")


def execute(notebook: Path, output: Path, params: dict, timeout_s: int) -> None:
    import papermill

    declared = declared_parameters(notebook)
    papermill.execute_notebook(str(notebook), str(output), parameters={k: v for k, v in params.items() if k in declared},
                               kernel_name="python3", cwd=str(NOTEBOOKS), execution_timeout=timeout_s,
                               progress_bar=False, log_output=False)


def execute_rank(notebook: Path, staging: Path, params: dict, timeout_s: int) -> None:
    """One torchrun rank: execute the notebook; rank 0 writes the executed notebook that goes into the book."""
    from torch.distributed.elastic.multiprocessing.errors import record

    # torchrun ends the other ranks with SIGTERM when one fails: exit through papermill's cleanup so the kernel
    # (blocked in a collective, perhaps) is shut down with us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rank = int(os.environ["RANK"])
    name = notebook.stem if rank == 0 else f"{notebook.stem}.rank{rank}"
    record(execute)(notebook, staging / f"{name}.ipynb", params, timeout_s)


def run_chapter(chapter: dict, params: dict, out: Path, nproc: int) -> None:
    name, timeout_s = chapter["name"], chapter["timeout_s"]
    notebook = NOTEBOOKS / f"{name}.ipynb"
    staging = out / ".staging" / name
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "results").mkdir(parents=True)
    # Paths relative to the kernel's working directory (notebooks/), so no machine's layout shows in the book.
    params = {**params, "output_dir": os.path.relpath(staging / "results", NOTEBOOKS),
              "results_dir": os.path.relpath(out / "results", NOTEBOOKS), "live_widgets": False}
    if chapter["processes"] == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               __file__, "--execute-rank", str(notebook), str(staging), json.dumps(params), str(timeout_s)]
        if subprocess.run(cmd).returncode != 0:
            raise RuntimeError(f"chapter {name} failed under torchrun ({nproc} processes); see the rank's error "
                               f"above and the executed notebooks in {staging}")
    else:
        execute(notebook, staging / f"{name}.ipynb", params, timeout_s)
    # Success: publish the chapter's records, images and executed notebook.
    (out / "results").mkdir(parents=True, exist_ok=True)
    for f in (staging / "results").iterdir():
        os.replace(f, out / "results" / f.name)
    os.replace(staging / f"{name}.ipynb", out / f"{name}.ipynb")
    shutil.rmtree(staging)


def write_toc(out: Path) -> Path:
    """The book's table of contents: the chapters executed under `out` (the status page says which are not)."""
    rel = out.resolve().relative_to(ROOT)
    toc = out / "_toc.yml"
    lines = ["format: jb-book", "root: book/intro", "chapters:"]
    lines += [f"  - file: {rel}/{c['name']}" for c in chapters() if (out / f"{c['name']}.ipynb").exists()]
    lines += [f"  - file: {rel}/status"]
    toc.write_text("\n".join(lines) + "\n")
    return toc


def write_status(out: Path, title: str) -> None:
    sys.path.insert(0, str(ROOT))
    from fluxlab import records, report

    runs = json.loads((out / "chapters.json").read_text()) if (out / "chapters.json").exists() else {}
    listed = [dict(name=c["name"], **runs.get(c["name"], dict(status="not executed"))) for c in chapters()]
    recs = records.load(out / "results") if (out / "results").exists() else []
    (out / "status.md").write_text(report.status_page(recs, listed, title))


def build(out: Path, path_output: Path) -> None:
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(ROOT), "--toc", str(write_toc(out)),
           "--config", str(ROOT / "_config.yml"), "--path-output", str(path_output), "-W", "-n", "--keep-going"]
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit("error: jupyter-book build failed (warnings are errors)")
    print(f"book: {path_output / '_build' / 'html' / 'index.html'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "book" / "local"), help="executed chapters and records go here")
    parser.add_argument("--chapters", help="comma-separated chapter names (default: all, in order)")
    parser.add_argument("--nproc", type=int, default=2, help="processes for the torchrun chapters")
    parser.add_argument("-p", "--param", action="append", default=[], help="notebook parameter key=value")
    parser.add_argument("--title", default="Status of this build", help="title of the status page")
    parser.add_argument("--path-output", default=str(ROOT), help="jupyter-book writes _build/html under this")
    parser.add_argument("--no-build", action="store_true", help="execute only")
    parser.add_argument("--build-only", action="store_true", help="render what is already executed")
    parser.add_argument("--execute-rank", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.execute_rank:
        nb, staging, params, timeout_s = args.execute_rank
        return execute_rank(Path(nb), Path(staging), json.loads(params), int(timeout_s))

    out = Path(args.out).resolve()
    if not out.is_relative_to(ROOT):
        raise SystemExit(f"error: --out must be inside the repository ({ROOT}) for the book to include it")
    all_names = [c["name"] for c in chapters()]
    wanted = args.chapters.split(",") if args.chapters else all_names
    if set(wanted) - set(all_names):
        raise SystemExit(f"error: unknown chapter(s) {sorted(set(wanted) - set(all_names))}; allowed: {all_names}")
    selected = [c for c in chapters() if c["name"] in wanted]
    params = parse_params(args.param)
    if not args.build_only:
        validate(params, selected, args.nproc)
        os.environ.setdefault("FLUXLAB_RUN_ID", uuid.uuid4().hex[:12])
        sys.path.insert(0, str(ROOT))
        from fluxlab.records import git_commit

        os.environ.setdefault("FLUXLAB_GIT_COMMIT", git_commit())
        out.mkdir(parents=True, exist_ok=True)
        status_file = out / "chapters.json"
        runs = json.loads(status_file.read_text()) if status_file.exists() else {}
        for chapter in selected:
            name = chapter["name"]
            nproc = args.nproc if chapter["processes"] == "torchrun" else 1
            print(f"== {name} ({nproc} process{'es' * (nproc > 1)})", flush=True)
            start = time.perf_counter()
            try:
                run_chapter(chapter, params, out, nproc)
            except Exception as err:  # papermill's error carries the failing cell's traceback
                print(f"error: chapter {name} failed:\n{err}", file=sys.stderr)
                write_status(out, args.title)
                raise SystemExit(1) from None
            runs[name] = dict(status="ok", duration_s=round(time.perf_counter() - start, 1), processes=nproc,
                              finished_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              run_id=os.environ["FLUXLAB_RUN_ID"])
            status_file.write_text(json.dumps(runs, indent=1))
            print(f"   ok in {runs[name]['duration_s']} s", flush=True)
    write_status(out, args.title)
    if not args.no_build:
        build(out, Path(args.path_output))


if __name__ == "__main__":
    main()
