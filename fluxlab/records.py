"""Result records: one JSON file per measured configuration, with the provenance of the run that wrote it."""
import datetime
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import uuid
from pathlib import Path

import torch

from .settings import TINY_DIR

PACKAGES = ("torch", "diffusers", "transformers", "torchao", "accelerate", "safetensors", "fluxlab")
PROVENANCE_KEYS = ("git_commit", "versions", "device_name", "device_count", "world_size", "date_utc", "run_id")
# One id per runner invocation (set by scripts/run_book.py), else per process: ratios only within one run.
RUN_ID = os.environ.get("FLUXLAB_RUN_ID") or uuid.uuid4().hex[:12]


def git_commit() -> str:
    """The commit the code ran at ('+dirty' if the tree had changes); FLUXLAB_GIT_COMMIT where git is absent."""
    if os.environ.get("FLUXLAB_GIT_COMMIT"):
        return os.environ["FLUXLAB_GIT_COMMIT"]
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
    except importlib.metadata.PackageNotFoundError:
        return None


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
    return dict(git_commit=git_commit(), versions={p: _version(p) for p in PACKAGES} | {"python": platform.python_version()},
                device_name=device_name, device_count=device_count, world_size=world_size, **accel,
                date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), run_id=RUN_ID)


def missing_provenance(record: dict) -> list[str]:
    prov = record.get("provenance", {})
    missing = [k for k in PROVENANCE_KEYS if not prov.get(k) and prov.get(k) != 0]
    missing += [k for k in ("model_source", "settings", "optimizations") if k not in record]
    return missing


def replace_atomically(path: Path, data: bytes) -> Path:
    """Write `data` to `path` so that a crash mid-write never leaves a half file in place of a good one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def write(record: dict, path: Path) -> Path:
    """Write a record atomically, refusing one without provenance."""
    missing = missing_provenance(record)
    if missing:
        raise ValueError(f"record {record.get('name')!r} lacks provenance: {missing}")
    return replace_atomically(path, json.dumps(record, indent=1, sort_keys=True).encode())


def load(folder: Path, pattern: str = "*.json") -> list[dict]:
    """All records in a folder, each with `_path` set, oldest first."""
    records = []
    for path in sorted(Path(folder).glob(pattern)):
        record = json.loads(path.read_text())
        record["_path"] = str(path)
        records.append(record)
    return sorted(records, key=lambda r: r["provenance"]["date_utc"])
