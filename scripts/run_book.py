"""Execute the book's chapters with papermill, in order, then render them with jupyter-book 1.x.

    python scripts/run_book.py                       # every chapter on the embedded default (tiny, CPU)
    python scripts/run_book.py -p model_source=flux-dev-random --nproc 2 --out book/published

Chapters and their needs come from book/chapters.toml. Every parameter is checked before any chapter starts.
Each chapter runs into a staging folder of its own run; only when it succeeds do its executed notebook and records
replace the earlier ones under --out, so a failing chapter stops the run with its error and leaves everything
already there intact. One run at a time may write into an output folder (a second one stops at once).
Multi-process chapters run under torchrun: every rank executes the notebook, rank 0's executed notebook goes into
the book. While a chapter runs, the runner shows which cell it is in, the time so far and an estimate from the
chapter's last recorded duration.
"""
import argparse
import ast
import datetime
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
sys.path.insert(0, str(ROOT))
from fluxlab import book  # noqa: E402
from fluxlab.records import git_commit  # noqa: E402

SETTINGS = ("model_source", "device", "prompt", "height", "width", "steps", "guidance", "seed",
            "max_sequence_length")
LISTS = ("thresholds", "forced_thresholds")


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


def jupyter_book() -> str | None:
    """The jupyter-book command beside this Python, else on PATH, else None."""
    here = Path(sys.executable).parent / "jupyter-book"
    return str(here) if here.exists() else shutil.which("jupyter-book")


def check_tools(build: bool, execute: bool) -> None:
    """Fail before any chapter runs when a tool the run needs is missing, naming its package."""
    import importlib.util

    missing = [m for m in ("papermill", "nbclient", "ipykernel") if execute and importlib.util.find_spec(m) is None]
    if build and not jupyter_book():
        missing.append("jupyter-book")
    if missing:
        hint = " (or pass --no-build to execute the chapters without rendering them)" if "jupyter-book" in missing else ""
        raise SystemExit(f"error: missing package(s) {', '.join(missing)}: pip install -e '.[book]'{hint}")


def validate(params: dict, selected: list[dict], nproc: int):
    """Fail on bad input before any chapter starts: unknown names, bad settings, unsplittable sequences, a chapter
    that cannot run on this machine. Returns the checked settings."""
    import fluxlab
    from fluxlab import parallel
    from fluxlab.settings import check_int

    known = set().union(*(declared_parameters(NOTEBOOKS / f"{c['name']}.ipynb") for c in book.chapters()))
    unknown = sorted(set(params) - known)
    if unknown:
        raise SystemExit(f"error: unknown parameter(s) {unknown}; the chapters take {sorted(known)}")
    try:
        settings = fluxlab.check_settings(**{k: params[k] for k in SETTINGS if k in params})
        for name in [n for n in LISTS if n in params]:
            values = params[name]
            if not isinstance(values, list) or not values:
                raise ValueError(f"{name}={values!r}: must be a non-empty list of thresholds, e.g. [0.08, 0.12]")
            for threshold in values:
                fluxlab.check_options(cache=threshold)
        fluxlab.check_options(cache=params.get("cache_threshold"), fp8=params.get("fp8"),
                              compile=params.get("compile"), compile_mode=params.get("compile_mode"))
        for name in ("warmup", "repeats"):
            check_int(name, params.get(name, 1), 1, 1000)
        check_int("--nproc", nproc, 1, 64)
        if any(c["processes"] == "torchrun" for c in selected):
            ulysses, _ = parallel.degrees(nproc, params.get("ulysses_degree"), params.get("ring_degree"))
            parallel.check_split(settings, nproc, ulysses)
            parallel.check_gpus(settings.device, nproc)
        for c in selected:
            book.check_device(c, settings.source, settings.device)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    return settings


def check_same_source(out: Path, selected: list[dict], params: dict) -> None:
    """A chapter that only reads records (the conclusion, the performance page) shows those of its own model source:
    refuse to run it with another source than the chapters already executed into `out`, whose records it would
    leave out (the published book's ran on flux-dev-random; the notebooks' default is tiny)."""
    import papermill

    readers = [c["name"] for c in selected if not c.get("gpu_memory_gb")]
    if not readers:
        return
    default = ast.literal_eval(papermill.inspect_notebook(str(NOTEBOOKS / f"{readers[0]}.ipynb"))["model_source"]
                               ["default"])
    wanted = params.get("model_source", default)
    names = {c["name"] for c in selected}
    for chapter in book.chapters():
        path = out / f"{chapter['name']}.ipynb"
        if chapter["name"] in names or not chapter.get("gpu_memory_gb") or not path.exists():
            continue
        ran = json.loads(path.read_text())["metadata"].get("papermill", {}).get("parameters", {})
        source = ran.get("model_source", default)
        if source != wanted:
            raise SystemExit(f"error: {path.relative_to(ROOT)} ran with model_source={source!r}: "
                             f"{', '.join(readers)} would show the records of model_source={wanted!r} instead; "
                             f"pass -p model_source={source}")


class Progress:
    """Which cell of how many, time so far and an estimate: a live line on a terminal, plain lines (one per cell,
    and one every 30 s within a long cell) elsewhere."""

    def __init__(self, name: str, expected: list | None):
        """`expected`: [seconds, where the estimate comes from ("last run" or "expected")], or None."""
        self.name, self.tty = name, sys.stdout.isatty()
        self.expected_s, self.basis = expected or (None, None)
        self.start, self.cell, self.cells = time.monotonic(), 0, 0
        self.done = threading.Event()
        threading.Thread(target=self._tick, daemon=True).start()

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        text = f"   {self.name}: cell {self.cell}/{self.cells}, {_clock(elapsed)} elapsed"
        if self.expected_s:
            text += (f", about {_clock(max(0.0, self.expected_s - elapsed))} left ({self.basis} "
                     f"{_clock(self.expected_s)})")
        return text

    def enter(self, cell: int, cells: int) -> None:
        self.cell, self.cells = cell, cells
        self._show()

    def _show(self) -> None:
        print(("\r" + self.line().ljust(110)) if self.tty else self.line(), end="" if self.tty else "\n", flush=True)

    def _tick(self) -> None:
        while not self.done.wait(1 if self.tty else 30):
            if self.cells:
                self._show()

    def close(self) -> None:
        self.done.set()
        if self.tty:
            print(flush=True)


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def execute(notebook: Path, output: Path, params: dict, timeout_s: int, progress: Progress | None) -> None:
    import papermill
    from jupyter_client import KernelManager
    from papermill.engines import NBClientEngine, papermill_engines

    class IPCKernelManager(KernelManager):
        """Kernels talk to the runner over local sockets (files), not TCP ports: nothing to reach from outside,
        and no 'running over TCP without encryption' warning in every chapter's log."""

        def __init__(self, **kwargs):  # sockets in a folder of its own: torchrun's ranks start kernels at once
            folder = tempfile.mkdtemp(prefix="fluxlab-kernel-")
            super().__init__(transport="ipc", ip=os.path.join(folder, "kernel"), **kwargs)

    class ProgressEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, **kwargs):
            if progress is not None:
                start = nb_man.cell_start

                def cell_start(cell, cell_index=None, **kw):
                    progress.enter(cell_index + 1, len(nb_man.nb.cells))
                    return start(cell, cell_index, **kw)

                nb_man.cell_start = cell_start
            return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

    papermill_engines.register("fluxlab", ProgressEngine)
    declared = declared_parameters(notebook)
    papermill.execute_notebook(str(notebook), str(output), parameters={k: v for k, v in params.items() if k in declared},
                               kernel_name="python3", cwd=str(NOTEBOOKS), execution_timeout=timeout_s,
                               progress_bar=False, log_output=False, engine_name="fluxlab",
                               kernel_manager_class=IPCKernelManager)


def execute_rank(notebook: Path, staging: Path, params: dict, timeout_s: int, expected: list | None) -> None:
    """One torchrun rank: execute the notebook; rank 0 shows progress and writes the notebook that goes into the
    book."""
    from torch.distributed.elastic.multiprocessing.errors import record

    # torchrun ends the other ranks with SIGTERM when one fails: exit through papermill's cleanup so the kernel
    # (blocked in a collective, perhaps) is shut down with us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rank = int(os.environ["RANK"])
    name = notebook.stem if rank == 0 else f"{notebook.stem}.rank{rank}"
    progress = Progress(notebook.stem, expected) if rank == 0 else None
    try:
        record(execute)(notebook, staging / f"{name}.ipynb", params, timeout_s, progress)
    finally:
        if progress:
            progress.close()


def hide_injected_parameters(path: Path) -> None:
    """The page shows the chapter, not papermill's injected parameters (they stay in the notebook file)."""
    import nbformat

    nb = nbformat.read(path, 4)
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        if "injected-parameters" in tags and "remove-cell" not in tags:
            tags.append("remove-cell")
    nbformat.write(nb, path)


def run_chapter(chapter: dict, params: dict, out: Path, staging_root: Path, nproc: int, expected) -> list[str]:
    """Execute one chapter into staging; on success move its notebook and records under `out`. Returns the
    record files it wrote."""
    name, timeout_s = chapter["name"], chapter["timeout_s"]
    notebook = NOTEBOOKS / f"{name}.ipynb"
    staging = staging_root / name
    (staging / "results").mkdir(parents=True)
    # Paths relative to the kernel's working directory (notebooks/), so no machine's layout shows in the book.
    params = {**params, "output_dir": os.path.relpath(staging / "results", NOTEBOOKS),
              "results_dir": os.path.relpath(out / "results", NOTEBOOKS), "live_widgets": False}
    if chapter["processes"] == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               __file__, "--execute-rank", str(notebook), str(staging), json.dumps(params), str(timeout_s),
               json.dumps(expected)]
        if subprocess.run(cmd).returncode != 0:
            raise RuntimeError(f"chapter {name} failed under torchrun ({nproc} processes); see the rank's error "
                               f"above and the executed notebooks in {staging}")
    else:
        progress = Progress(name, expected)
        try:
            execute(notebook, staging / f"{name}.ipynb", params, timeout_s, progress)
        finally:
            progress.close()
    hide_injected_parameters(staging / f"{name}.ipynb")
    (out / "results").mkdir(parents=True, exist_ok=True)
    written = []
    for f in sorted((staging / "results").iterdir()):
        os.replace(f, out / "results" / f.name)
        written.append(f.name)
    for old in (out / "results").glob(f"{name}--*"):  # what an earlier run of the chapter wrote and this one did not
        if old.name not in written:
            old.unlink()
    os.replace(staging / f"{name}.ipynb", out / f"{name}.ipynb")
    shutil.rmtree(staging)
    return written


def write_toc(out: Path) -> Path:
    """The book's table of contents: the chapters executed under `out` (the status page says which are not)."""
    rel = out.resolve().relative_to(ROOT)
    toc = out / "_toc.yml"
    lines = ["format: jb-book", "root: book/intro", "chapters:"]
    lines += [f"  - file: {rel}/{c['name']}" for c in book.chapters() if (out / f"{c['name']}.ipynb").exists()]
    lines += [f"  - file: {rel}/status"]
    toc.write_text("\n".join(lines) + "\n")
    return toc


def write_status(out: Path, title: str) -> None:
    from fluxlab import ladder, records, report

    runs = book.runs(out)
    listed = [dict(name=c["name"], **runs.get(c["name"], dict(status="not executed"))) for c in book.chapters()]
    recs = records.read_folder(out / "results") if (out / "results").exists() else []
    bench = records.read_folder(ROOT / "book" / "results", ladder.BENCH_FILES)
    (out / "status.md").write_text(report.status_page(recs, listed, title, bench))


def build(out: Path, path_output: Path) -> Path:
    cmd = [jupyter_book(), "build", str(ROOT), "--toc", str(write_toc(out)),
           "--config", str(ROOT / "_config.yml"), "--path-output", str(path_output), "-W", "-n", "--keep-going"]
    if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:
        raise SystemExit("error: jupyter-book build failed (warnings are errors); run the command again without "
                         f"the runner to see them: {' '.join(cmd)}")
    return path_output / "_build" / "html" / "index.html"


def device_name(settings) -> str:
    if settings.device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(settings.device)
    return "CPU"


def lock(out: Path):
    """Hold `out/.lock` for this run; a second run into the same folder stops at once."""
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"error: another run is writing into {out}; wait for it to finish or pass another --out") \
            from None
    return handle


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
    parser.add_argument("--execute-rank", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.execute_rank:
        nb, staging, params, timeout_s, expected = args.execute_rank
        return execute_rank(Path(nb), Path(staging), json.loads(params), int(timeout_s), json.loads(expected))

    out = Path(args.out).resolve()
    if not out.is_relative_to(ROOT):
        raise SystemExit(f"error: --out must be inside the repository ({ROOT}) for the book to include it")
    all_names = [c["name"] for c in book.chapters()]
    wanted = args.chapters.split(",") if args.chapters else all_names
    if set(wanted) - set(all_names):
        raise SystemExit(f"error: unknown chapter(s) {sorted(set(wanted) - set(all_names))}; allowed: {all_names}")
    selected = [c for c in book.chapters() if c["name"] in wanted]
    params = parse_params(args.param)
    try:
        commit = git_commit()  # before anything runs: records carry it
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    check_tools(build=not args.no_build, execute=not args.build_only)
    summary = []
    if not args.build_only:
        settings = validate(params, selected, args.nproc)
        check_same_source(out, selected, params)
        held = lock(out)
        os.environ.setdefault("FLUXLAB_RUN_ID", uuid.uuid4().hex[:12])
        os.environ["FLUXLAB_PROGRESS"] = "0"  # no denoising progress bars in executed pages
        os.environ.setdefault("FLUXLAB_GIT_COMMIT", commit)
        staging_root = out / ".staging" / os.environ["FLUXLAB_RUN_ID"]
        runs, where = book.runs(out), device_name(settings)
        for chapter in selected:
            name = chapter["name"]
            nproc = args.nproc if chapter["processes"] == "torchrun" else 1
            print(f"== {name} ({nproc} process{'es' * (nproc > 1)})", flush=True)
            start = time.perf_counter()
            try:
                last, shipped = runs.get(name, {}).get("duration_s"), book.expected_s(chapter, settings)
                expected = [last, "last run"] if last else [shipped, "expected"] if shipped else None
                written = run_chapter(chapter, params, out, staging_root, nproc, expected)
            except Exception as err:  # papermill's error carries the failing cell's traceback
                print(f"\nerror: chapter {name} failed:\n{err}", file=sys.stderr)
                write_status(out, args.title)
                raise SystemExit(1) from None
            runs[name] = dict(status="ok", duration_s=round(time.perf_counter() - start, 1), processes=nproc,
                              device=where, run_id=os.environ["FLUXLAB_RUN_ID"],
                              git_commit=os.environ["FLUXLAB_GIT_COMMIT"],
                              finished_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
            (out / "chapters.json").write_text(json.dumps(runs, indent=1))
            summary.append((name, runs[name]["duration_s"], len([f for f in written if f.endswith(".json")])))
            print(f"   ok in {runs[name]['duration_s']} s", flush=True)
        shutil.rmtree(staging_root, ignore_errors=True)
        held.close()
    write_status(out, args.title)
    html = None if args.no_build else build(out, Path(args.path_output))
    print("\n== summary")
    for name, seconds, count in summary:
        print(f"   {name:<24} {seconds:>7.1f} s  {count} record file(s)")
    if summary:
        print(f"   executed chapters and records: {out.relative_to(ROOT)}/")
    if html:
        print(f"   book: {html}\n   serve it: python -m http.server -b 127.0.0.1 -d {html.parent} 8000  "
              "(then open http://127.0.0.1:8000)")


if __name__ == "__main__":
    main()
