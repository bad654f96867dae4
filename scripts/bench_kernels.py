"""Time fluxlab's one-GPU kernels against candidates that would replace them, at FLUX.1-dev's shapes (1024x1024:
4096 image and 512 text tokens, 28 steps), without loading a model.

    python scripts/bench_kernels.py [--out book/results]

- GELU + join + FP8 (`fluxlab.mlp_fp8_triton`): today's kernel (one program per row, the whole row in registers, 8
  warps) against the same kernel with 4 and 16 warps, and a two-pass kernel over chunks of the row (maximum first,
  then GELU again and the FP8 write; the second read mostly from L2). A candidate counts only if its output is
  bit-identical to today's. Reported as time per call and bandwidth (bytes read and written over time), at the
  single blocks' shape (attention output joined) and the double blocks' image feed-forward.
- q or k from its projections to FP8 (`fluxlab.qk_fp8`): the one-pass Triton kernel (2 warps) against itself with
  1, 4 and 8 warps, and against what FP8 attention's processor did before it (per-head RMSNorm, the double blocks'
  text tokens joined in front, rotary embedding, FP8 on a bound, compiled by inductor as inside the compiled
  blocks); the share of FP8 values that differ from the kernel's is reported.
- LayerNorm + modulation + FP8 before the blocks' linears (`fluxlab.norm_fp8`): the kernel that holds each row in
  registers (4 warps; one read, one FP8 write for all the linears that read it) against itself with 8 and 16 warps,
  and against what the compiled blocks did before it (LayerNorm without weights, `* (1 + scale) + shift`, torchao's
  rowwise quantization of a linear's input, once per linear, compiled by inductor).
The q/k and LayerNorm rows give each its bandwidth next to its bound: the time a device-to-device copy (measured in
the same run) takes to read and write the same bytes.
- adaLN modulation products (`fluxlab.modulation`): one step's 77 one-row FP8 products (`torch._scaled_mm`, rowwise
  scales; the activations already quantized) against the same 77 products of 28 rows, one step's share.
Each is timed on the GPU from a CUDA graph (`triton.testing.do_bench_cudagraph`: no launch overhead, as inside the
block graphs), min and median; today's kernels also with the L2 cache emptied before each call (`cold_...`).
Writes `<out>/kernels-<gpu>.json` with provenance.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fluxlab import fp8_attention, norm_fp8, qk_fp8, records  # noqa: E402
from fluxlab.gelu import TWO_SQRT_2_OVER_PI  # noqa: E402
from fluxlab.mlp_fp8_triton import _gelu_join_fp8  # noqa: E402
from fluxlab.quant import E4M3_MAX  # noqa: E402

DIM, MLP, IMAGE, TEXT, STEPS = 3072, 12288, 4096, 512, 28
DOUBLE, SINGLE = 19, 38
ADALN = [6 * DIM] * (2 * DOUBLE) + [3 * DIM] * SINGLE + [2 * DIM]  # out_features of every modulation layer


@triton.jit
def _gelu_join_fp8_two_pass(attn_ptr, mlp_ptr, out_ptr, scale_ptr, A: tl.constexpr, H: tl.constexpr,
                            BLOCK: tl.constexpr, C: tl.constexpr, FP8_MAX: tl.constexpr):
    """`_gelu_join_fp8` over chunks of BLOCK: the row's maximum in a first pass, GELU again and the write in a
    second (the same arithmetic per element, so the same bits)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in tl.range(0, A, BLOCK):
        a = tl.load(attn_ptr + row * A + start + offs, mask=start + offs < A, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(a))
    for start in tl.range(0, H, BLOCK):
        x = tl.load(mlp_ptr + row * H + start + offs, mask=start + offs < H, other=0.0).to(tl.float32)
        g = (x / (1.0 + tl.exp(-C * (x + 0.044715 * x * x * x)))).to(tl.bfloat16).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(g))
    scale = tl.maximum((tl.max(amax, 0) / FP8_MAX).to(tl.bfloat16).to(tl.float32), 1e-30)
    for start in tl.range(0, A, BLOCK):
        a = tl.load(attn_ptr + row * A + start + offs, mask=start + offs < A, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * (A + H) + start + offs, tl.clamp(a / scale, -FP8_MAX, FP8_MAX).to(tl.float8e4nv),
                 mask=start + offs < A)
    for start in tl.range(0, H, BLOCK):
        x = tl.load(mlp_ptr + row * H + start + offs, mask=start + offs < H, other=0.0).to(tl.float32)
        g = (x / (1.0 + tl.exp(-C * (x + 0.044715 * x * x * x)))).to(tl.bfloat16).to(tl.float32)
        tl.store(out_ptr + row * (A + H) + A + start + offs,
                 tl.clamp(g / scale, -FP8_MAX, FP8_MAX).to(tl.float8e4nv), mask=start + offs < H)
    tl.store(scale_ptr + row, scale)


def outputs(attn, mlp) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 rows and their scales, allocated once (a CUDA graph of many calls then allocates nothing)."""
    rows = attn.shape[0]
    return (torch.empty(rows, attn.shape[1] + mlp.shape[1], device=mlp.device, dtype=torch.float8_e4m3fn),
            torch.empty(rows, 1, device=mlp.device, dtype=torch.float32))


def gelu_join(attn, mlp, out, scale, warps: int = 8, two_pass_block: int | None = None):
    """One call of today's kernel with `warps` warps, or of the two-pass kernel with chunks of `two_pass_block`."""
    (rows, a), h = attn.shape, mlp.shape[1]
    if two_pass_block:
        _gelu_join_fp8_two_pass[(rows,)](attn, mlp, out, scale, a, h, two_pass_block, TWO_SQRT_2_OVER_PI, E4M3_MAX,
                                         num_warps=warps)
    else:
        _gelu_join_fp8[(rows,)](attn, mlp, out, scale, a, h, max(triton.next_power_of_2(a), 16),
                                triton.next_power_of_2(h), TWO_SQRT_2_OVER_PI, E4M3_MAX, num_warps=warps)


def timed(fn, cold: bool = False) -> dict:
    """`fn`'s milliseconds per call, replayed from a CUDA graph, min and median. Each replay finds what the one before
    left in the L2 cache (50 MB on an H100: a q/k or LayerNorm call's 42 MB fit). `cold` adds the median with the L2
    emptied before each call (a 256 MiB write first in the graph; that write's own time, timed alone, taken off), as
    when the inputs come from memory."""
    median, low = do_bench_cudagraph(fn, rep=200, quantiles=[0.5, 0.0])
    t = dict(median_ms=round(median, 5), min_ms=round(low, 5))
    if cold:
        evict = torch.empty(256 * 2 ** 20, device="cuda", dtype=torch.uint8)
        alone = do_bench_cudagraph(evict.zero_, rep=200, quantiles=[0.5])
        both = do_bench_cudagraph(lambda: (evict.zero_(), fn()), rep=200, quantiles=[0.5])
        t["cold_median_ms"] = round(both - alone, 5)
    return t


def gelu_candidates(device) -> list[dict]:
    rows = []
    for shape, tokens, a in (("single blocks: attention + GELU(MLP)", IMAGE + TEXT, DIM),
                             ("double blocks: GELU(image feed-forward)", IMAGE, 0)):
        attn = torch.randn(tokens, a, device=device, dtype=torch.bfloat16)
        mlp = 3 * torch.randn(tokens, MLP, device=device, dtype=torch.bfloat16)
        reference = outputs(attn, mlp)
        gelu_join(attn, mlp, *reference)
        moved = tokens * (a + MLP) * 3 + tokens * 4  # bf16 in, FP8 out, one float32 scale per row
        for name, kwargs in (("today: row in registers, 8 warps", {}), ("row in registers, 4 warps", dict(warps=4)),
                             ("row in registers, 16 warps", dict(warps=16)),
                             ("two passes, chunks of 1024, 4 warps", dict(warps=4, two_pass_block=1024)),
                             ("two passes, chunks of 2048, 8 warps", dict(warps=8, two_pass_block=2048)),
                             ("two passes, chunks of 4096, 16 warps", dict(warps=16, two_pass_block=4096))):
            out, scale = outputs(attn, mlp)
            gelu_join(attn, mlp, out, scale, **kwargs)
            same = torch.equal(out.view(torch.uint8), reference[0].view(torch.uint8)) and torch.equal(scale,
                                                                                                     reference[1])
            t = timed(lambda: gelu_join(attn, mlp, out, scale, **kwargs), cold=name.startswith("today"))
            rows.append(dict(kernel="gelu_join_fp8", shape=shape, candidate=name, bit_identical=same, **t,
                             tb_per_s=round(moved / (t["min_ms"] * 1e-3) / 1e12, 3)) | cold_bandwidth(t, moved))
            print(rows[-1], flush=True)
    return rows


def copy_bandwidth(device) -> float:
    """Bytes per second a device-to-device copy of 1 GiB moves (read and written): the bound of a kernel whose work
    is to read its input and write its output once."""
    src = torch.empty(2 ** 29, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / (timed(lambda: dst.copy_(src))["min_ms"] * 1e-3)


def cold_bandwidth(t: dict, moved: int, bound_ms: float | None = None) -> dict:
    """The bandwidth (and share of the bound) of a `timed(..., cold=True)` call's cold median; nothing without one."""
    if "cold_median_ms" not in t:
        return {}
    cold = dict(cold_tb_per_s=round(moved / (t["cold_median_ms"] * 1e-3) / 1e12, 3))
    return cold | ({} if bound_ms is None else dict(cold_of_bound=round(bound_ms / t["cold_median_ms"], 3)))


def against_today(kernel: str, shape: str, candidates: list, moved: int, bandwidth: float,
                  fp8=lambda out: out) -> list[dict]:
    """Each (name, function) timed, with the share of its FP8 values (`fp8` of its output) that differ from the first
    candidate's (today's), the bandwidth its `moved` bytes make and the time a copy of them takes (the bound)."""
    today = fp8(candidates[0][1]()).float()
    bound_ms = moved / bandwidth * 1e3
    rows = []
    for name, fn in candidates:
        differ = (fp8(fn()).float() != today).float().mean().item()
        t = timed(fn, cold=fn is candidates[0][1])
        rows.append(dict(kernel=kernel, shape=shape, candidate=name, share_differing_from_today=round(differ, 6), **t,
                         tb_per_s=round(moved / (t["min_ms"] * 1e-3) / 1e12, 3), bound_ms=round(bound_ms, 5),
                         bound_tb_per_s=round(bandwidth / 1e12, 3), of_bound=round(bound_ms / t["min_ms"], 3))
                    | cold_bandwidth(t, moved, bound_ms))
        print(rows[-1], flush=True)
    return rows


def qk_candidates(device, bandwidth: float) -> list[dict]:
    heads, head_dim = DIM // 128, 128
    angles = torch.rand(IMAGE + TEXT, head_dim // 2, device=device) * 100
    cos, sin = angles.cos().repeat_interleave(2, 1), angles.sin().repeat_interleave(2, 1)
    compiled = torch.compile(qk_fp8.reference)  # as in the blocks: inductor fuses norm, join, rotation, FP8
    rows = []
    for shape, tokens in (("double blocks: text + image tokens, two norms", (TEXT, IMAGE)),
                          ("single blocks: 4608 tokens, one norm", (TEXT + IMAGE,))):
        streams = []
        for n in tokens:
            norm = torch.nn.RMSNorm(head_dim, eps=1e-6).to(device, torch.bfloat16)
            with torch.no_grad():
                norm.weight.uniform_(0.5, 1.5)
            streams.append((3 * torch.randn(1, n, DIM, device=device, dtype=torch.bfloat16), norm))
        scale = torch.tensor(E4M3_MAX / fp8_attention.norm_bound(*(norm for _, norm in streams)), device=device)
        (first, first_norm), *rest = streams
        second, second_norm = rest[0] if rest else (None, None)

        def one_pass(warps):  # the op `qk_fp8.norm_rope_fp8` calls, with `warps` warps
            return lambda: torch.ops.fluxlab.norm_rope_fp8(
                first, first_norm.weight, second, None if second_norm is None else second_norm.weight, cos, sin,
                heads, 1e-6, scale, warps)

        rows += against_today("q/k norm + rotary + FP8", shape, [
            ("today: one pass (Triton), 2 warps", one_pass(2)), ("one pass, 1 warp", one_pass(1)),
            ("one pass, 4 warps", one_pass(4)), ("one pass, 8 warps", one_pass(8)),
            ("inductor (before the kernel)", lambda: compiled(streams, cos, sin, heads, scale))],
            moved=sum(tokens) * DIM * 3, bandwidth=bandwidth)  # bf16 in, FP8 out
    return rows


def layernorm_candidates(device, bandwidth: float) -> list[dict]:
    compiled = torch.compile(norm_fp8.reference)  # as in the blocks: LayerNorm, modulation, torchao's quantization
    rows = []
    for shape, tokens in (("single blocks: 4608 tokens", IMAGE + TEXT), ("double blocks: 4096 image tokens", IMAGE)):
        x = 4 * torch.randn(1, tokens, DIM, device=device, dtype=torch.bfloat16)
        shift, scale = (torch.randn(1, DIM, device=device, dtype=torch.bfloat16) for _ in range(2))

        def one_pass(warps):  # the op `norm_fp8.layernorm_modulate_fp8` calls, with `warps` warps
            return lambda: norm_fp8.Quantized(*torch.ops.fluxlab.layernorm_modulate_fp8(x, shift, scale, 1e-6, warps))

        rows += against_today("LayerNorm + modulation + FP8", shape, [
            ("today: row in registers (Triton), 4 warps", one_pass(4)), ("row in registers, 8 warps", one_pass(8)),
            ("row in registers, 16 warps", one_pass(16)),
            ("inductor (before the kernel)", lambda: compiled(x, shift, scale, 1e-6))],
            moved=tokens * DIM * 3 + tokens * 4, bandwidth=bandwidth, fp8=lambda out: out.data)
    return rows


def adaln_products(device) -> list[dict]:
    """One step's modulation products, as 77 one-row products or as one step's share of 77 products of 28 rows."""
    weights = [(torch.randn(n, DIM, device=device).to(torch.float8_e4m3fn),
                torch.rand(1, n, device=device) / 100) for n in ADALN]
    rows = []
    for steps in (1, STEPS):
        x = torch.randn(steps, DIM, device=device).to(torch.float8_e4m3fn)
        sx = torch.rand(steps, 1, device=device) / 100

        def products():
            for w, sw in weights:
                torch._scaled_mm(x, w.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16, use_fast_accum=True)

        t = timed(products)
        per_step = {k: round(v / steps, 5) for k, v in t.items()}
        rows.append(dict(kernel="adaLN modulation products", shape=f"{len(ADALN)} layers, {steps} row(s) each",
                         candidate="today: every step" if steps == 1 else f"all {STEPS} steps at the first",
                         per_step_ms=per_step, **t,
                         tb_per_s=round(sum(ADALN) * DIM / (t["min_ms"] * 1e-3) / 1e12, 3)))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "book" / "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py times CUDA kernels: run it on a GPU machine.")
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    print(f"device-to-device copy: {bandwidth / 1e12:.2f} TB/s (read + written)", flush=True)
    found = (qk_candidates(device, bandwidth) + layernorm_candidates(device, bandwidth) + gelu_candidates(device)
             + adaln_products(device))
    gpu = torch.cuda.get_device_name(device).removeprefix("NVIDIA ").split()[0].lower()
    path = Path(args.out) / f"kernels-{gpu}.json"
    records.replace_atomically(path, json.dumps(dict(provenance=records.provenance(device, 1),
                                                     copy_tb_per_s=round(bandwidth / 1e12, 3), kernels=found),
                                                indent=1).encode())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
