"""The tiny pipeline's world: captioned images of one coloured shape on a coloured background.

Images are drawn in batches with torch (on any device) for training; `check` reads a generated image's
background colour, shape colour and shape back from its pixels, for the adherence evaluation.
"""
import dataclasses
import itertools
import random

import numpy as np
import torch

from . import cache
from .pipeline import generate

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 220, 50),
    "purple": (140, 50, 180), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (0.16, 0.24), "large": (0.28, 0.38)}  # half-width as a fraction of the image side


def caption(size: str, colour: str, shape: str, background: str) -> str:
    return f"a {size} {colour} {shape} on a {background} background"


def all_combinations() -> list[tuple[str, str, str, str]]:
    return [(s, c, sh, bg) for s, c, sh, bg in itertools.product(SIZES, COLOURS, SHAPES, COLOURS) if c != bg]


def split(seed: int = 0, held_out: float = 0.2) -> tuple[list, list]:
    """Train and evaluation prompts; evaluation holds out whole (colour, shape, background) triples."""
    triples = sorted({(c, sh, bg) for _, c, sh, bg in all_combinations()})
    random.Random(seed).shuffle(triples)
    test = set(triples[: int(len(triples) * held_out)])
    combos = all_combinations()
    return [x for x in combos if x[1:] not in test], [x for x in combos if x[1:] in test]


def draw(combos: list[tuple], size: int, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """A batch of images in [-1, 1], (B, 3, size, size), one per (size, colour, shape, background), random place."""
    n = len(combos)
    u = torch.rand(n, 3, generator=generator).to(device)
    half = torch.tensor([SIZES[s][0] + (SIZES[s][1] - SIZES[s][0]) * float(r) for (s, *_), r in zip(combos, u[:, 2])],
                        device=device)
    cx = half + (1 - 2 * half) * u[:, 0]
    cy = half + (1 - 2 * half) * u[:, 1]
    ys, xs = torch.meshgrid(*(torch.linspace(0.5 / size, 1 - 0.5 / size, size, device=device),) * 2, indexing="ij")
    dx, dy = xs[None] - cx[:, None, None], ys[None] - cy[:, None, None]
    h = half[:, None, None]
    kind = torch.tensor([SHAPES.index(c[2]) for c in combos], device=device)[:, None, None]
    circle = dx ** 2 + dy ** 2 <= h ** 2
    square = (dx.abs() <= h * 0.89) & (dy.abs() <= h * 0.89)  # same area as the circle
    triangle = (dy <= h) & (dy >= -h) & (dx.abs() <= (dy + h) / 2)  # apex up
    mask = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))
    fg = torch.tensor([COLOURS[c[1]] for c in combos], device=device, dtype=torch.float32)
    bg = torch.tensor([COLOURS[c[3]] for c in combos], device=device, dtype=torch.float32)
    img = torch.where(mask[:, None], fg[:, :, None, None], bg[:, :, None, None])
    return img / 127.5 - 1


def _nearest(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    d = ((np.array([COLOURS[n] for n in names], dtype=np.float32) - rgb) ** 2).sum(1)
    return names[int(d.argmin())]


def read(image) -> dict:
    """Background colour, shape colour and shape of an image, read from its pixels (None where nothing reads as a
    shape, e.g. a blurred or uniform image)."""
    px = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
    background = _nearest(np.median(border, 0))
    far = ((px - np.array(COLOURS[background], dtype=np.float32)) ** 2).sum(-1) > 60 ** 2
    if far.sum() < 0.01 * far.size:
        return dict(background=background, colour=None, shape=None)
    colour = _nearest(np.median(px[far], 0))
    mask = ((px - np.array(COLOURS[colour], dtype=np.float32)) ** 2).sum(-1) < 60 ** 2
    if not mask.any():  # the foreground is no colour of this world
        return dict(background=background, colour=colour, shape=None)
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    # Fill of the bounding box: triangle 0.5, circle pi/4, square 1.
    shape = "triangle" if fill < 0.64 else "circle" if fill < 0.9 else "square"
    return dict(background=background, colour=colour, shape=shape)


def check(image, combo: tuple) -> dict:
    """Which parts of the prompt `combo` = (size, colour, shape, background) the image shows."""
    seen = read(image)
    return dict(seen, background_ok=seen["background"] == combo[3], colour_ok=seen["colour"] == combo[1],
                shape_ok=seen["shape"] == combo[2])


def held_out(every: int = 1) -> list[tuple]:
    """The held-out prompts (66), or every `every`-th of them: a smaller, fixed subset for a chapter."""
    return split()[1][::every]


def adherence(pipe, settings, combos: list[tuple] | None = None) -> dict:
    """Generate one image per held-out prompt (`settings`' seed, size and steps) and check it from its pixels.

    An image adheres when its background colour, shape colour and shape all match the prompt. Where First Block
    Cache is on, also the mean number of steps it skipped per prompt."""
    combos = held_out() if combos is None else combos
    stats = cache.stats(pipe.transformer)
    before = len(stats.runs) if stats else 0
    results = [check(generate(pipe, dataclasses.replace(settings, prompt=caption(*combo))), combo) for combo in combos]
    ok = [r["background_ok"] and r["colour_ok"] and r["shape_ok"] for r in results]
    score = dict(adherent=sum(ok), prompts=len(ok), background=sum(r["background_ok"] for r in results),
                 colour=sum(r["colour_ok"] for r in results), shape=sum(r["shape_ok"] for r in results))
    if stats:
        skipped = stats.skipped_counts(before)
        score["mean_skipped_steps"] = sum(skipped) / len(skipped)
    return score


def chapter_adherence(pipe, settings) -> dict | None:
    """What a chapter records: adherence on every 6th held-out prompt (11 of 66) for the tiny source, None for the
    others (the checker knows only the shapes world). `make adherence` scores all 66."""
    return adherence(pipe, settings, held_out(every=6)) if settings.source.kind == "tiny" else None
