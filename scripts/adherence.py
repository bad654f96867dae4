"""Score the tiny pipeline's adherence to held-out prompts, from the pixels, with no external weights.

    python scripts/adherence.py [--configs fbcache-0.06,fbcache-0.12,fp8] [--steps 28]

For each configuration (then the plain pipeline, printed last as `adherence: K/N`): one image per held-out prompt
(colour/shape/background triples never seen in training), checked for its background colour, shape colour and
shape; First Block Cache configurations also print the steps they skipped.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fluxlab  # noqa: E402
from fluxlab import shapes  # noqa: E402


def parse(config: str) -> dict:
    if config == "fp8":
        return dict(fp8="rowwise")
    if config.startswith("fbcache-"):
        return dict(cache=float(config.removeprefix("fbcache-")))
    raise SystemExit(f"error: unknown configuration {config!r}; allowed: fp8, fbcache-<threshold>")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="", help="comma-separated: fp8, fbcache-<threshold>")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=3.5)
    args = parser.parse_args()
    configs = {c: parse(c) for c in args.configs.split(",") if c}
    try:
        settings = fluxlab.check_settings("tiny", device="cpu", steps=args.steps, guidance=args.guidance)
        for kwargs in configs.values():
            fluxlab.check_options(**kwargs)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    for name, kwargs in configs.items():
        pipe = fluxlab.load_pipeline(settings)
        fluxlab.optimize(pipe, **kwargs)
        score = shapes.adherence(pipe, settings)
        stats = fluxlab.cache.stats(pipe.transformer)
        skipped = ""
        if stats:
            counts = stats.skipped_counts()
            skipped = f", skipped {min(counts)}-{max(counts)} of {settings.steps} steps (mean {sum(counts) / len(counts):.1f})"
        print(f"{name}: {score['adherent']}/{score['prompts']} adherent (background {score['background']}, colour "
              f"{score['colour']}, shape {score['shape']}){skipped}", flush=True)
    score = shapes.adherence(fluxlab.load_pipeline(settings), settings)
    print(f"baseline: background {score['background']}, colour {score['colour']}, shape {score['shape']}")
    print(f"adherence: {score['adherent']}/{score['prompts']}")


if __name__ == "__main__":
    main()
