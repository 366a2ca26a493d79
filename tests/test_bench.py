"""fd-bench on the CPU: the JSON it writes has the promised fields, and its numbers are consistent."""

from __future__ import annotations

import json

import pytest

from flashdreams.cli.bench import main as bench_main
from flashdreams.models.wan_config import WanConfig
from flashdreams.models.wan_flops import dit_forward_flops


def test_flops_match_the_published_block_counts():
    # Issue figures: block 5 is 182 TFLOP over 5 forwards (11.7 linear + 24.2 attention + 0.4 cross
    # per forward), block 6 is 202 TFLOP, block 0 is 81.
    f = dit_forward_flops(WanConfig(), 4680, 28080)
    assert f["linear"] / 1e12 == pytest.approx(11.7, abs=0.05)
    assert f["attention"] / 1e12 == pytest.approx(24.2, abs=0.05)
    assert f["cross_attention"] / 1e12 == pytest.approx(0.44, abs=0.01)
    assert 5 * f["total"] / 1e12 == pytest.approx(182, abs=0.5)
    assert 5 * dit_forward_flops(WanConfig(), 4680, 32760)["total"] / 1e12 == pytest.approx(202, abs=0.5)
    assert 5 * dit_forward_flops(WanConfig(), 4680, 4680)["total"] / 1e12 == pytest.approx(81, abs=0.5)


def test_fd_bench_cpu_smoke(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = bench_main(
        [
            "--blocks",
            "3",
            "--rollouts",
            "2",
            "--steady-blocks",
            "4",
            "--profile-block",
            "2",
            "--out",
            str(out),
            "--quick-ceilings",
            "--decoder",
            "none",
        ]
    )
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == "fd-bench/1"
    assert res["environment"]["torch"] and res["environment"]["device_type"] == "cpu"
    assert res["ceilings"]["matmul_tflops"] > 0 and res["ceilings"]["copy_gbps"] > 0
    (run,) = res["runs"]
    assert (run["backend"], run["attention"]) == ("eager", "sdpa")
    for stage, p in run["latency"].items():
        assert 0 <= p["min"] <= p["p50"] <= p["p90"] <= p["p99"] <= p["max"], stage
        assert p["n"] == 2 * 3
    lat = run["latency"]
    assert lat["total_ms"]["p50"] > 0 and lat["denoise_ms"]["p50"] > 0 and lat["commit_ms"]["p50"] > 0
    # A block is its stages: the sum of the per-stage medians is close to the median total.
    assert lat["to_frames_ms"]["p50"] <= lat["total_ms"]["max"]
    assert [b["block"] for b in run["per_block_index"]] == [0, 1, 2]
    assert len(run["blocks"]) == 2 * 3
    for b in run["blocks"]:
        assert b["total_ms"] == pytest.approx(b["denoise_ms"] + b["decode_ms"] + b["commit_ms"], rel=1e-9)
        assert b["to_frames_ms"] == pytest.approx(b["denoise_ms"] + b["decode_ms"], rel=1e-9)
        assert b["dit_tflop"] > 0
    # The cache grows over the first blocks, so the DiT does more work per block.
    flops = [b["dit_tflop"] for b in run["per_block_index"]]
    assert flops[0] < flops[1] < flops[2]
    assert run["cold_start"]["load_s"] > 0 and run["cold_start"]["load_to_first_frame_s"] >= run["cold_start"]["load_s"]
    assert run["fps_steady"] > 0 and run["jitter_ms"] >= 0
    assert run["steady_state"]["blocks"] == 4 and run["steady_state"]["p99_over_p50"] >= 1.0
    assert run["warm_first_frame_ms"]["p50"] > 0
    assert (out / "latency_per_block.png").stat().st_size > 1000
    # The profile of block 2: the tiny model's time is mostly attention and GEMMs, the categories
    # add up to the kernel total, which cannot exceed the block's wall time.
    prof = run["profile"]
    assert prof["block"] == 2 and prof["stage_ms"] and prof["stage_ms"]["denoise"] > 0
    cats = prof["categories"]
    assert sum(c["ms"] for c in cats.values()) == pytest.approx(prof["kernel_ms"], abs=0.01)
    assert 0 < prof["kernel_ms"] <= prof["wall_ms"] * 1.01
    assert cats["attention"]["ms"] > 0 and cats["gemm"]["ms"] > 0
    assert prof["top_kernels"][0]["ms"] >= prof["top_kernels"][-1]["ms"]
    printed = capsys.readouterr().out
    assert "profile of block 2" in printed and "eager" in printed
    # --compare against itself gives ratios of 1.00x.
    assert (
        bench_main(
            [
                "--blocks",
                "2",
                "--rollouts",
                "1",
                "--out",
                str(tmp_path / "b2"),
                "--quick-ceilings",
                "--decoder",
                "none",
                "--compare",
                str(out / "results.json"),
            ]
        )
        == 0
    )
    assert "ratios against" in capsys.readouterr().out


def test_kernel_categories():
    from flashdreams.benchmark.profile import kernel_category, summarise_kernels

    assert kernel_category("_ring_attention_fwd_kernel") == "attention"
    assert kernel_category("ring_attention_fp8_kernel") == "attention"
    assert kernel_category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "gemm"
    assert kernel_category("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_TNT") == "gemm"
    assert kernel_category("triton_tem_fused_addmm_0") == "gemm"
    assert kernel_category("triton_per_fused_add_native_layer_norm_3") == "elementwise/norm/rope"
    assert kernel_category("_adaln_modulate_kernel") == "elementwise/norm/rope"
    assert kernel_category("cudnn::conv2d_fprop_kernel") == "conv"
    assert kernel_category("triton_poi_fused__to_copy_convert_element_type_7") == "elementwise/norm/rope"
    assert kernel_category("Memcpy DtoD (Device -> Device)") == "copy/fill"
    assert kernel_category("void at::native::elementwise_kernel<128, 2>") == "elementwise/norm/rope"
    assert kernel_category("aten::view") == "other"
    s = summarise_kernels([("a_gemm", 3000.0), ("flash_fwd", 6000.0), ("a_gemm", 1000.0)], wall_ms=12.5)
    assert s["kernel_ms"] == 10.0 and s["kernel_coverage"] == 0.8
    assert list(s["categories"]) == ["attention", "gemm"] and s["categories"]["gemm"]["count"] == 2
    assert s["top_kernels"][0] == {"name": "flash_fwd", "category": "attention", "ms": 6.0, "count": 1}


def test_fd_bench_refuses_bad_options(tmp_path, capsys):
    assert bench_main(["--blocks", "1", "--out", str(tmp_path)]) == 2
    assert bench_main(["--profile-block", "-1", "--out", str(tmp_path)]) == 2
    assert bench_main(["--preset", "nope", "--out", str(tmp_path)]) == 2
    assert "preset 'nope' is unknown" in capsys.readouterr().err


def _bench_run(backend: str, attention: str, p50_ms: float, precision: str = "bf16") -> dict:
    """One entry of results.json's `runs`, with only what `compare` reads."""
    stages = ("total_ms", "to_frames_ms", "denoise_ms", "commit_ms", "decode_ms")
    return {
        "backend": backend,
        "attention": attention,
        "precision": precision,
        "latency": {s: {"p50": p50_ms} for s in stages},
        "peak_memory_gb": 2.0,
    }


def test_compare_prints_ratios_for_several_backends(tmp_path, capsys):
    # Two or more runs used to crash: the stage loop rebound the run-key function to a string.
    from flashdreams.benchmark.report import compare

    this = {
        "runs": [
            _bench_run("eager", "sdpa", 100.0),
            _bench_run("inductor", "triton", 50.0),
            _bench_run("inductor", "triton", 40.0, precision="fp8"),
        ]
    }
    other = {"runs": [_bench_run("eager", "sdpa", 200.0), _bench_run("inductor", "triton", 25.0)]}
    other_path = tmp_path / "other.json"
    other_path.write_text(json.dumps(other))
    print(compare(this, other_path))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"ratios against {other_path}")
    assert lines[1].startswith("  eager/sdpa/bf16: total 2.00x, to_frames 2.00x") and "memory 1.00x" in lines[1]
    assert lines[2].startswith("  inductor/triton/bf16: total 0.50x")
    assert lines[3] == "  inductor/triton/fp8: not in the other run"


def test_the_plan_carries_the_block_flops_fd_bench_reports():
    """fd-bench reads FLOPs from the plan: block 0, 5 and 6 of Self-Forcing 1.3B at 480x832."""
    from flashdreams import registry
    from flashdreams.models.families.causal_wan.plan import build_plan

    p = registry.get_preset("self-forcing-1.3b")
    flops = build_plan(p, p.model, 1, 480, 832, "bfloat16", None).meta["block_flops"]
    assert len(flops) == 7  # the full 21-frame cache is full after block 6; later blocks repeat it
    assert [round(flops[i] / 1e12) for i in (0, 5, 6)] == [81, 182, 202]
