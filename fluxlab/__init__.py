"""fluxlab: the lab around the book's chapters (settings, model sources, measuring, records, tables, figures) and the
book's own contributions (one First Block Cache decision for every rank, CUDA graphs beneath diffusers' hooks, FP8
attention, Ulysses' exchanges as copies into the other GPUs' memory)."""
import logging
import os
import warnings

# Import-time noise of the stack that says nothing about a run (torchao's optional CUDA extensions, pytree
# registrations, torchvision-less image processors, hub progress bars).
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
for _name in ("torch.utils._pytree", "torchao"):
    logging.getLogger(_name).setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*torch_dtype.*")
warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")
# torch's AOT-autograd cache asks every tensor subclass for a hash that torchao's Float8Tensor lacks: the graph is
# recompiled instead of read from the on-disk cache, nothing else changes.
warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")

from . import (book, cache, compare, figures, fp8_attention, gelu, graphs, ladder, mlp_fp8,  # noqa: E402
               parallel, peer_exchange, profiling, quant, records, report, shapes)
from .applied import applied, describe  # noqa: E402
from .measuring import measure, step_costs, vae_decode_seconds  # noqa: E402
from .optimize import check as check_options  # noqa: E402
from .optimize import optimize  # noqa: E402
from .pipeline import ModelUnavailable, free_memory, generate, load_pipeline  # noqa: E402
from .settings import Limits, Settings  # noqa: E402
from .settings import check as check_settings  # noqa: E402

__all__ = ["Limits", "ModelUnavailable", "Settings", "applied", "book", "cache", "check_options", "check_settings",
           "compare", "describe", "figures", "fp8_attention", "free_memory", "gelu", "generate", "graphs", "ladder",
           "load_pipeline", "measure", "mlp_fp8", "optimize", "parallel", "peer_exchange", "profiling", "quant",
           "records", "report", "shapes", "step_costs", "vae_decode_seconds"]
