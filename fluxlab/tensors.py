"""Whether a tensor is still the one seen before, unchanged: caches keyed on their inputs (the modulation table, the
block graphs' shared inputs) ask this instead of comparing values."""
import weakref

import torch


def _version(t: torch.Tensor) -> int | None:
    # Every in-place change increments a tensor's version; tensors made under torch.inference_mode keep none.
    return None if t.is_inference() else t._version


def mark(t: torch.Tensor) -> tuple:
    """What identifies `t` as it is now: the tensor (weakly held) and its version."""
    return weakref.ref(t), _version(t)


def unchanged(marked: tuple | None, t: torch.Tensor) -> bool:
    """Whether `t` is the tensor `marked` was made from, alive and unchanged since."""
    return marked is not None and marked[0]() is t and marked[1] == _version(t)


def alive(marked: tuple) -> bool:
    """Whether the tensor `marked` was made from still exists."""
    return marked[0]() is not None
