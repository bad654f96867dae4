"""An offline wheelhouse for a GPU machine without internet: what the chapters need beyond torch.

    python scripts/wheelhouse.py download .whl [--python-version 3.12] [--skip have.txt] [--pin torchao==0.17.0]
                                               [--no-serve]
    python scripts/wheelhouse.py install .whl [--target /tmp/site]                         # on the GPU machine

`download` resolves fluxlab's dependencies, the chapter runner's (papermill, ipykernel; the book is rendered
elsewhere), the server's (the `serve` extra) and FP8 attention's (the `hopper` extra) for the target Python on manylinux x86_64, leaves out the GPU machine's own torch stack (torch, triton,
nvidia-*, cuda-*) and any name listed in `--skip` (one per line: what the target already has, e.g. from
`pip list --format freeze` there), and downloads exactly those wheels. Left out always: what a kernel that
papermill runs never imports (`HEADLESS_UNUSED`); with `--no-serve`, the server's extra (a GPU machine that runs
the chapters and the benchmark: the wheels travel with the tree, within its size limit). `install` installs them
without an index; with `--target`, add that folder to PYTHONPATH.
"""
import argparse
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux1_x86_64"]
GPU_STACK = re.compile(r"^(torch|triton|nvidia-(?!cudnn-frontend).*|cuda-.*)$")  # the frontend is ours to bring
RUNNER = ("papermill", "nbclient", "ipykernel")
# ipykernel's debugger and IPython's completion: optional imports, never made by a kernel papermill runs (9 MiB)
HEADLESS_UNUSED = {"debugpy", "jedi", "parso"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(serve: bool = True) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    book = [r for r in project["optional-dependencies"]["book"] if r.split("=")[0].strip() in RUNNER]
    extras = project["optional-dependencies"]
    return project["dependencies"] + book + (extras["serve"] if serve else []) + extras["hopper"]


def select(report: dict, skip: set[str]) -> list[str]:
    """name==version of every resolved package except the GPU stack and what the target already has."""
    pins = []
    for item in report["install"]:
        name, version = normalise(item["metadata"]["name"]), item["metadata"]["version"]
        if not GPU_STACK.match(name) and name not in skip | HEADLESS_UNUSED:
            pins.append(f"{name}=={version}")
    return sorted(pins)


def target_flags(python_version: str) -> list[str]:
    flags = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for platform in PLATFORMS:
        flags += ["--platform", platform]
    return flags


def with_pins(reqs: list[str], pins: list[str]) -> list[str]:
    """Replace the requirement of each pinned package (e.g. torchao==0.17.0 for a machine with torch 2.11)."""
    pinned = {normalise(re.split(r"[=<>!~ ]", p)[0]) for p in pins}
    return [r for r in reqs if normalise(re.split(r"[=<>!~ \[]", r)[0]) not in pinned] + pins


def download(folder: Path, python_version: str, skip_file: Path | None, pins: list[str], serve: bool = True) -> None:
    skip = {normalise(n) for n in skip_file.read_text().split()} if skip_file else set()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                        "--report", str(report), "--target", str(Path(tmp) / "t"), *target_flags(python_version),
                        *with_pins(requirements(serve), pins)], check=True)
        pins = select(json.loads(report.read_text()), skip)
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(folder),
                    *target_flags(python_version), *pins], check=True)
    size = sum(f.stat().st_size for f in folder.glob("*.whl"))
    print(f"{len(pins)} wheels, {size / 2**20:.0f} MiB in {folder}")


def install(folder: Path, target: Path | None) -> None:
    wheels = sorted(str(w) for w in folder.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"error: no wheels in {folder}")
    where = ["--target", str(target), "--upgrade"] if target else []
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                    *where, *wheels], check=True)
    print(f"installed {len(wheels)} wheels" + (f" into {target} (add it to PYTHONPATH)" if target else ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download")
    d.add_argument("folder", type=Path)
    d.add_argument("--python-version", default="3.12")
    d.add_argument("--skip", type=Path, help="file of package names the target machine already has")
    d.add_argument("--pin", action="append", default=[], help="NAME==VERSION replacing fluxlab's requirement")
    d.add_argument("--no-serve", action="store_true", help="leave out the server's extra (fastapi, uvicorn)")
    i = sub.add_parser("install")
    i.add_argument("folder", type=Path)
    i.add_argument("--target", type=Path)
    args = parser.parse_args()
    if args.command == "download":
        download(args.folder, args.python_version, args.skip, args.pin, serve=not args.no_serve)
    else:
        install(args.folder, args.target)


if __name__ == "__main__":
    main()
