"""Where a process's time goes: unions of kernel intervals, not sums."""
import pytest

from fluxlab import profiling


def test_union_counts_overlaps_once():
    assert profiling.union_length([(0, 2), (1, 3), (5, 6)]) == pytest.approx(4.0)
    assert profiling.union_length([(0, 10), (2, 3)]) == pytest.approx(10.0)
    assert profiling.union_length([]) == 0.0


def test_breakdown_separates_compute_exposed_communication_and_idle():
    kernels = [("nvjet_sm90_qqtst_gemm", 0.0, 1.0),          # FP8 GEMM
               ("ncclDevKernel_SendRecv", 0.5, 2.0),          # overlaps the GEMM for 0.5 s, then alone for 1.0 s
               ("triton_poi_fused_mul_0", 2.5, 3.0),
               ("ncclDevKernel_AllGather", 2.6, 2.9)]         # hidden entirely behind the triton kernel
    b = profiling.breakdown(kernels, wall_s=4.0)
    assert b["compute_s"] == pytest.approx(1.5)
    assert b["communication_s"] == pytest.approx(1.8)
    assert b["exposed_communication_s"] == pytest.approx(1.0)
    assert b["idle_s"] == pytest.approx(4.0 - 2.5)
    assert b["kernel_s_by_kind"]["communication"] == pytest.approx(1.8)  # the sum, for ranking kinds
    assert b["kernel_s_by_kind"]["FP8 GEMM"] == pytest.approx(1.0) and b["kernels"] == 4
    again = profiling.breakdown(kernels + [("nvjet_sm90_qqtst_gemm", 3.0, 3.5)], wall_s=4.0)
    assert again["top_kernels_s"]["nvjet_sm90_qqtst_gemm"] == pytest.approx(1.5)
    assert again["top_kernels_calls"] == {"nvjet_sm90_qqtst_gemm": 2, "ncclDevKernel_SendRecv": 1,
                                          "triton_poi_fused_mul_0": 1, "ncclDevKernel_AllGather": 1}


@pytest.mark.parametrize("name, kind", [
    ("triton_red_fused__scaled_mm_abs_amax_0", "fused elementwise / quantization (triton)"),
    ("_gelu_join_fp8", "fluxlab's kernels (triton)"), ("_norm_rope_fp8", "fluxlab's kernels (triton)"),
    ("_layernorm_modulate_fp8", "fluxlab's kernels (triton)"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "attention"),
    ("nvjet_sm90_qqtst_128x128", "FP8 GEMM"), ("ncclDevKernel_SendRecv", "communication"),
    ("sm90_xmma_gemm_bf16", "GEMM (bf16)"), ("void at::native::elementwise_kernel", "other"),
    ("c10d::symmetric_memory::barrier_kernel(unsigned int**, int, int, int, unsigned long)", "communication")])
def test_kernel_kinds(name, kind):
    assert profiling.kind(name) == kind


def test_idle_gaps_are_sized_and_named_by_their_neighbours():
    kernels = [("gemm", 0.0, 1.0), ("nccl:all_to_all", 0.5, 1.5), ("norm", 1.500005, 2.0), ("attention", 2.0005, 3.0),
               ("copy", 3.003, 3.5)]
    idle = profiling.idle_gaps(kernels, top=2)
    assert idle["span_s"] == 3.5
    gaps = idle["between_kernels_s"]
    assert abs(gaps["under 10 us"] - 5e-6) < 1e-9 and abs(gaps["10 us to 1 ms"] - 5e-4) < 1e-9
    assert abs(gaps["1 ms and over"] - 3e-3) < 1e-9
    assert [(g["after"], g["before"]) for g in idle["largest"]] == [("attention", "copy"), ("norm", "attention")]
    assert profiling.breakdown(kernels, 4.0)["idle"] == profiling.idle_gaps(kernels)
