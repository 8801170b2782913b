"""bench/train_step.py's kernel breakdown of a profiled step, on a synthetic chrome trace."""

import pytest

from bench.train_step import kernel_breakdown


def kernel(name: str, ts: float, dur: float) -> dict:
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur}


def test_kernel_breakdown_sums_by_category_and_name():
    gemm = "nvjet_sm90_tst_192x192_64x3_1x2_h_bz_coopB_NNN"
    trace = {
        "traceEvents": [
            kernel(gemm, 0, 100),
            kernel(gemm, 150, 100),
            kernel("triton_poi_fused__scaled_dot_product_cudnn_attention_backward_mul_0", 300, 50),  # inductor's
            kernel("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", 400, 40),
            kernel("_bwd_out_kernel", 500, 30),
            kernel("void at::native::reduce_kernel<128, 4>", 600, 10),
            {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1000},
        ]
    }
    k = kernel_breakdown(trace, top=2)
    assert k["span_ms"] == pytest.approx(0.61)
    assert k["kernels_ms"] == pytest.approx(0.33)
    expected = {"matmul": 0.2, "inductor": 0.05, "sdpa": 0.04, "gdn": 0.03, "other": 0.01}
    assert list(k["by_category_ms"]) == list(expected)  # largest first, empty categories left out
    assert k["by_category_ms"] == pytest.approx(expected)
    assert k["top"][0] == {"name": gemm, "ms": pytest.approx(0.2), "calls": 2}
    assert len(k["top"]) == 2


def test_kernel_breakdown_needs_kernel_events():
    with pytest.raises(ValueError, match="no kernel events"):
        kernel_breakdown({"traceEvents": [{"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1}]})
