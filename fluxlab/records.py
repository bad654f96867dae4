"""Result records: one schema for a timed configuration, written by `write` and read by `read`.

A record (a dict, stored as JSON) is one configuration timed in one run:

| field | what |
|---|---|
| `schema` | `SCHEMA` |
| `name`, `chapter` | what the run called it, and which chapter (or `bench`, `serve`) ran it |
| `label` | a short description for tables, e.g. "FBCache 0.12 + FP8 DQ rowwise + compile (regional)" |
| `model_source`, `model_weights`, `random_weights`, `dtype` | what ran: the source's label, the tiny pipeline's weights fingerprint (None for other sources), whether its weights are random, the transformer's dtype |
| `settings` | the request: prompt, size, steps, guidance, seed, T5 length, device |
| `optimizations` | what was applied to the pipeline, read off the pipeline itself (`fluxlab.applied`) |
| `processes` | how many processes made each image together |
| `timing` | `warmup_s` (the first is the cold start), `times_s`, `min_s`, `median_s`, `cold_start_s` |
| `cache` | First Block Cache's decisions in the last timed call, or None |
| `peak_mem_gb` | peak GPU memory allocated during the timed calls (this process), or None |
| `image` | the image file beside the record, or None |
| `extras` | further measurements by name: `adherence`, `step_costs`, `profile`, `latents_rel_error[_bf16]`, ... |
| `provenance` | commit, package versions, device, driver, world size, date, run id |

A results file holds a list of records: a chapter writes one file per configuration, `scripts/bench.py` one file per
run (`bench-<N>gpu.json`). A benchmark file also lists the configurations that failed in that run (`failed`: name,
label, the stage it failed in, the error's first line, provenance), which `failures` reads.
"""
import datetime
import functools
import hashlib
import importlib.metadata
import json
import os
import re
import platform
import subprocess
import tomllib
import uuid
from pathlib import Path

import torch

from .settings import TINY_DIR

SCHEMA = 2
FIELDS = ("schema", "name", "chapter", "label", "model_source", "model_weights", "random_weights", "dtype",
          "settings", "optimizations", "processes", "timing", "cache", "peak_mem_gb", "image", "extras", "provenance")
TIMING = ("warmup_s", "times_s", "min_s", "median_s", "cold_start_s")
PACKAGES = ("torch", "diffusers", "transformers", "torchao", "accelerate", "safetensors", "fluxlab")
PROVENANCE = ("git_commit", "versions", "device_name", "device_count", "world_size", "date_utc", "run_id")
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# One id per runner invocation (set by scripts/run_book.py), else per process: ratios only within one run.
RUN_ID = os.environ.get("FLUXLAB_RUN_ID") or uuid.uuid4().hex[:12]


class RecordError(ValueError):
    """A record file that does not follow the schema."""


def check(record: dict, where: str) -> dict:
    """Raise RecordError naming `where` and the first missing or malformed field; return the record."""
    if not isinstance(record, dict):
        raise RecordError(f"{where}: a record must be a JSON object, not {type(record).__name__}")
    if record.get("schema") != SCHEMA:
        raise RecordError(f"{where}: record schema {record.get('schema')!r}, this code reads schema {SCHEMA}; "
                          "re-run what wrote it")
    for field in FIELDS:
        if field not in record:
            raise RecordError(f"{where}: record {record.get('name')!r} lacks the field {field!r}")
    for field in TIMING:
        if field not in record["timing"]:
            raise RecordError(f"{where}: record {record['name']!r} lacks timing.{field}")
    for field in PROVENANCE:
        value = record["provenance"].get(field)
        if value is None or value == "":
            raise RecordError(f"{where}: record {record['name']!r} lacks provenance.{field}")
    return record


FAILURE = ("name", "label", "stage", "error", "provenance")


def write(path: str | Path, records: list[dict], failed: list[dict] = ()) -> Path:
    """Check every record (and failure) and write the lists atomically: a crash mid-write never leaves a half
    file."""
    for record in records:
        check(record, str(path))
    for failure in failed:
        check_failure(failure, str(path))
    data = dict(records=records) | (dict(failed=list(failed)) if failed else {})
    return replace_atomically(Path(path), json.dumps(data, indent=1, sort_keys=True).encode())


def check_failure(failure: dict, where: str) -> dict:
    """Raise RecordError naming `where` and the first missing field of a failed configuration; return it."""
    for field in FAILURE:
        if not failure.get(field):
            raise RecordError(f"{where}: failed configuration {failure.get('name')!r} lacks the field {field!r}")
    return failure


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RecordError(f"{path}: not JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("records"), list) \
            or not isinstance(data.get("failed", []), list):
        raise RecordError(f"{path}: expected an object with a list 'records' (and optionally a list 'failed')")
    return data


def read_run(path: str | Path) -> tuple[list[dict], list[dict]]:
    """One file's records, each with `_path` (the file) set, and the configurations that failed in the run that
    wrote it; all checked, the file parsed once."""
    path = Path(path)
    data = _load(path)
    return ([dict(check(r, str(path)), _path=str(path)) for r in data["records"]],
            [check_failure(f, str(path)) for f in data.get("failed", [])])


def read(path: str | Path) -> list[dict]:
    """The records of one file, checked, each with `_path` (the file) set."""
    return read_run(path)[0]


def failures(path: str | Path) -> list[dict]:
    """The configurations that failed in the run that wrote this file, checked."""
    return read_run(path)[1]


def read_folder(folder: str | Path, pattern: str = "*.json") -> list[dict]:
    """Every record in the folder's files matching `pattern`, oldest first."""
    found = [r for path in sorted(Path(folder).glob(pattern)) for r in read(path)]
    return sorted(found, key=lambda r: r["provenance"]["date_utc"])


def replace_atomically(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def git_commit() -> str:
    """The commit the code ran at ('+dirty' if the tree had changes); FLUXLAB_GIT_COMMIT where git is absent, which
    must be a full commit id (records are matched to commits by it)."""
    given = os.environ.get("FLUXLAB_GIT_COMMIT")
    if given:
        if not re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", given):
            raise ValueError(f"FLUXLAB_GIT_COMMIT={given!r}: give the full 40-character commit id "
                             "(git rev-parse HEAD), not an abbreviation.")
        return given
    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:  # fluxlab run from its source tree (PYTHONPATH), not installed
        return tomllib.loads(PYPROJECT.read_text())["project"]["version"] if name == "fluxlab" else None


def _nvidia_smi(*args: str) -> str:
    try:
        return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


@functools.cache
def nvidia_driver() -> str | None:
    """The NVIDIA driver version as nvidia-smi reports it (torch does not expose it)."""
    out = _nvidia_smi("--query-gpu=driver_version", "--format=csv,noheader")
    return out.splitlines()[0].strip() if out.strip() else None


@functools.cache
def gpu_topology() -> str:
    """`nvidia-smi topo -m`'s matrix ('' where nvidia-smi is missing), read once per process."""
    return _nvidia_smi("topo", "-m")


def gpu_links(topology: str, count: int) -> str | None:
    """How GPUs 0..count-1 reach each other, from `nvidia-smi topo -m`'s matrix: e.g. 'NV18' (18 bonded NVLinks),
    'SYS' or 'PHB' (PCIe); None where the matrix is missing. Context parallelism's speed depends on it."""
    names = {f"GPU{i}" for i in range(count)}
    links = set()
    for line in topology.splitlines():
        cells = line.split()
        if cells and line.startswith("GPU") and cells[0] in names:  # the header row starts with a tab
            links.update(c for c in cells[1:1 + count] if c != "X")
    return ", ".join(sorted(links)) or None


@functools.cache
def tiny_weights() -> str:
    """SHA-256 (first 12 hex digits) of the bundled tiny pipeline's weight files: which training a tiny record used,
    since `model_source` alone stays 'tiny' across retrainings."""
    digest = hashlib.sha256()
    for path in sorted(TINY_DIR.rglob("*.safetensors")):
        digest.update(path.relative_to(TINY_DIR).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def model_weights(source) -> str | None:
    """The weights fingerprint a record of `source` carries: the tiny pipeline's (other sources are named by their
    hub id or folder, and hashing FLUX.1-dev's 30 GB per record is not worth it)."""
    return tiny_weights() if source.kind == "tiny" else None


def provenance(device: torch.device, world_size: int) -> dict:
    if device.type == "cuda":
        device_name, device_count = torch.cuda.get_device_name(device), torch.cuda.device_count()
        accel = dict(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), driver=nvidia_driver())
        if world_size > 1:
            accel["gpu_links"] = gpu_links(gpu_topology(), world_size)
    else:
        device_name, device_count, accel = f"CPU ({platform.processor() or platform.machine()})", 0, {}
    versions = {p: _version(p) for p in PACKAGES} | {"python": platform.python_version()}
    return dict(git_commit=git_commit(), versions=versions, device_name=device_name, device_count=device_count,
                world_size=world_size, **accel, run_id=RUN_ID,
                date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
