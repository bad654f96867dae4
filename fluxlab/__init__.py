"""fluxlab: the helpers behind the book's chapters (load, optimize, measure, report)."""
import logging
import os
import warnings

# Import-time noise of the stack that says nothing about a run (torchao's optional CUDA extensions, pytree
# registrations, torchvision-less image processors, progress bars).
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
for _name in ("torch.utils._pytree", "torchao"):
    logging.getLogger(_name).setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*torch_dtype.*")
warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")

import diffusers  # noqa: E402

diffusers.utils.logging.disable_progress_bar()

from . import ladder, parallel, records, report, serve  # noqa: E402
from .optimize import applied, cache_stats, clear_cache, optimize
from .optimize import check as check_options  # noqa: E402
from .settings import Settings, settings  # noqa: E402
from .sources import ModelUnavailable, free_memory, load  # noqa: E402
from .timing import generate, measure, measure_pool  # noqa: E402

__all__ = ["ModelUnavailable", "Settings", "applied", "cache_stats", "check_options", "clear_cache", "generate", "load", "measure", "ladder", "optimize",
           "parallel", "records", "report", "settings"]
