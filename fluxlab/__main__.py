"""`python -m fluxlab serve ...`: the persistent inference server."""
import sys


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] != "serve":
        raise SystemExit("usage: python -m fluxlab serve [--model-source tiny] [--nproc N] [--port 8000] ...")
    from .app import main as serve_main

    serve_main(sys.argv[2:])


if __name__ == "__main__":
    main()
