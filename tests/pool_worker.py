"""A serving-pool worker that fails inside the pipeline on cue: fluxlab.serve's own worker, with `generate` raising
for the prompt "explode" (on every rank) or "explode on rank 1" (on rank 1 only, the others wait in a collective)."""
from fluxlab import serve


def failing_worker(rank, port, config, requests, results):
    real = serve.generate

    def generate(pipe, settings, output_type="pil"):
        if settings.prompt == "explode" or (settings.prompt == "explode on rank 1" and rank == 1):
            raise RuntimeError("the pipeline failed on purpose")
        return real(pipe, settings, output_type)

    serve.generate = generate
    serve._worker(rank, port, config, requests, results)
