"""fd-bench on the CPU: the JSON it writes has the promised fields, and its numbers are consistent."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    # The table: every column named in its header, one meaning each. On the CPU the first run of
    # the process has a process-start figure and its load-to-first-frame figure.
    from flashdreams.benchmark.report import COLUMNS

    header = next(line for line in printed.splitlines() if line.startswith("backend"))
    for name, _ in COLUMNS:
        assert name in header, name
    assert "cold s" not in header and "peak GB" not in header
    row = printed.splitlines()[printed.splitlines().index(header) + 1].split()
    med, best = run["dit_tflops_median"], run["dit_tflops_best"]
    assert 0 < med <= best and best == max(b["dit_tflops"] for b in run["blocks"])
    assert row[-5:-3] == [f"{med:.1f}", f"{best:.1f}"]
    assert row[-2] == f"{run['cold_start']['process_start_to_first_frame_s']:.1f}"
    assert row[-1] == f"{run['cold_start']['load_to_first_frame_s']:.1f}"
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
    second = json.loads((tmp_path / "b2" / "results.json").read_text())["runs"][0]
    assert second["cold_start"]["process_start_to_first_frame_s"] is not None  # a new invocation: first again


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
    assert kernel_category("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)") == "communication"
    assert kernel_category("c10d::alltoall_") == "communication"
    assert kernel_category("triton_poi_fused__to_copy_convert_element_type_7") == "elementwise/norm/rope"
    assert kernel_category("Memcpy DtoD (Device -> Device)") == "copy/fill"
    assert kernel_category("void at::native::elementwise_kernel<128, 2>") == "elementwise/norm/rope"
    assert kernel_category("aten::view") == "other"
    s = summarise_kernels([("a_gemm", 3000.0), ("flash_fwd", 6000.0), ("a_gemm", 1000.0)], wall_ms=12.5)
    assert s["kernel_ms"] == 10.0 and s["kernel_coverage"] == 0.8
    assert list(s["categories"]) == ["attention", "gemm"] and s["categories"]["gemm"]["count"] == 2
    assert s["top_kernels"][0] == {"name": "flash_fwd", "category": "attention", "ms": 6.0, "count": 1}


def test_fd_bench_warm_up_times_the_first_rollout_after_it(tmp_path, capsys):
    """--warm-up: the session runs its block kinds (Session.warm_up) before the first block; the cold start
    names that time and the first rollout's per-block times are kept (with and without it)."""
    runs = {}
    for flag in ([], ["--warm-up"]):
        out = tmp_path / ("warm" if flag else "plain")
        args = ["--blocks", "3", "--rollouts", "1", "--decoder", "none", "--quick-ceilings", "--out", str(out)]
        assert bench_main(args + flag) == 0
        res = json.loads((out / "results.json").read_text())
        assert res["config"]["warm_up"] == bool(flag)
        runs[bool(flag)] = res["runs"][0]["cold_start"]
    assert runs[False]["warm_up_s"] is None and runs[True]["warm_up_s"] > 0
    for cold in runs.values():
        assert len(cold["first_rollout_block_ms"]) == 3 and all(ms > 0 for ms in cold["first_rollout_block_ms"])
    assert runs[True]["load_to_first_frame_s"] >= runs[True]["warm_up_s"] + runs[True]["first_block_s"]
    assert "first rollout after load (ms per block, after warm_up)" in capsys.readouterr().out


def test_each_run_records_the_cublaslt_workspace_its_load_left(tmp_path, capsys, monkeypatch):
    """An FP8 load sets CUBLASLT_WORKSPACE_SIZE=0 after the environment was recorded: each run records the value
    its load left, so that an FP8 run does not read as torch's default (FD_FP8_WORKSPACE_FREE=0, which keeps
    torch's default, is held to that in tests/test_fp8_engine.py)."""
    monkeypatch.setenv("CUBLASLT_WORKSPACE_SIZE", "unset")  # (so that monkeypatch restores the original)
    monkeypatch.delenv("CUBLASLT_WORKSPACE_SIZE")
    monkeypatch.delenv("FD_FP8_WORKSPACE_FREE", raising=False)
    args = ["--blocks", "2", "--rollouts", "1", "--decoder", "none", "--quick-ceilings", "--out", str(tmp_path)]
    assert bench_main(args + ["--precision", "bf16,fp8", "--attention", "triton"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["environment"]["cublaslt_workspace_kib"] is None
    by_precision = {r["precision_option"]: r["cublaslt_workspace_kib"] for r in res["runs"]}
    assert by_precision == {"bf16": None, "fp8": "0"}


def test_fd_bench_refuses_bad_options(tmp_path, capsys):
    assert bench_main(["--blocks", "1", "--out", str(tmp_path)]) == 2
    assert bench_main(["--profile-block", "-1", "--out", str(tmp_path)]) == 2
    assert bench_main(["--preset", "nope", "--out", str(tmp_path)]) == 2
    assert "preset 'nope' is unknown" in capsys.readouterr().err
    assert bench_main(["--cudnn-benchmark", "yes", "--out", str(tmp_path / "cb")]) == 2
    assert "--cudnn-benchmark takes off, on or off,on; got 'yes'" in capsys.readouterr().err
    assert not (tmp_path / "cb").exists()  # refused before anything was written


def test_fd_bench_cudnn_benchmark_runs_both_modes(tmp_path, capsys):
    """off,on: one run each, the second marked in results.json and in the table's backend column."""
    import torch

    before = torch.backends.cudnn.benchmark
    argv = ["--blocks", "2", "--rollouts", "1", "--quick-ceilings", "--decoder", "none"]
    try:
        assert bench_main([*argv, "--cudnn-benchmark", "off,on", "--out", str(tmp_path)]) == 0
        assert torch.backends.cudnn.benchmark is True  # the last mode stays set in fd-bench's process
    finally:
        torch.backends.cudnn.benchmark = before
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [r["cudnn_benchmark"] for r in runs] == [False, True]
    lines = capsys.readouterr().out.splitlines()
    assert any(ln.startswith("eager+cudnn-bm  ") for ln in lines) and any(ln.startswith("eager  ") for ln in lines)


def _bench_run(backend: str, attention: str, p50_ms: float, precision: str = "bf16") -> dict:
    """One entry of results.json's `runs`, with only what `compare` reads."""
    stages = ("total_ms", "to_frames_ms", "denoise_ms", "commit_ms", "decode_ms")
    return {
        "backend": backend,
        "attention": attention,
        "precision": precision,
        "latency": {s: {"p50": p50_ms} for s in stages},
        "peak_memory_gib": 2.0,
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


def test_table_names_the_load_column_apart_from_process_start():
    """A run that is not the first in its process shows '-' under proc->frame s, its load time apart."""
    from flashdreams.benchmark.report import COLUMNS, table

    def run(backend: str, proc: float | None, load: float) -> dict:
        r = _bench_run(backend, "triton", 100.0)
        r["latency"] = {s: {"p50": 100.0, "p90": 110.0, "p99": 120.0} for s in r["latency"]}
        r["cold_start"] = {"process_start_to_first_frame_s": proc, "load_to_first_frame_s": load}
        r["blocks"] = [{"dit_tflops": t} for t in (300.0, 500.0, 400.0)]
        r["per_block_index"] = []
        return r

    results = {
        "environment": {"device_name": "x"},
        "config": {"preset": "p", "height": 1, "width": 2, "blocks": 3, "decoder": "none"},
        "runs": [run("eager", 18.4, 12.0), run("engine", None, 5.6)],
    }
    lines = table(results).splitlines()
    header = lines[2]
    assert [h for h, _ in COLUMNS][-5:] == ["TFLOP/s med", "TFLOP/s best", "peak GiB", "proc->frame s", "load->frame s"]
    assert header.rstrip().endswith("load->frame s") and "peak GiB" in header
    first, second = lines[3].split(), lines[4].split()
    assert first[-5:] == ["400.0", "500.0", "2.00", "18.4", "12.0"]  # median 400 of 300/400/500, best 500
    assert second[-5:] == ["400.0", "500.0", "2.00", "-", "5.6"]
    legend = " ".join(line.strip() for line in lines[5:])
    assert "proc->frame s = process start to first frame" in legend and "peak GiB = peak allocated" in legend


# ----------------------------------------------------------------------------- the GPU suite (bench/gpu_suite.sh)

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "bench" / "gpu_suite.sh"


def _suite(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SUITE), *args], capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}
    )


def test_gpu_suite_help_lists_every_part_it_defines():
    """Each `part_<name>` function is listed by --help and each listed part has its function."""
    out = _suite("--help")
    assert out.returncode == 0
    defined = set(re.findall(r"^part_([\w-]+)\(\) \{$", SUITE.read_text(), re.M))
    listed = set(re.findall(r"^  ([a-z0-9-]+)\s+\d+ s  ", out.stdout, re.M))
    assert defined == listed and {"env", "attention", "sf-fp8", "engine", "cold", "rolling"} <= defined
    assert "issue22          attention sf-fp8" in out.stdout


def test_gpu_suite_dry_run_prints_the_issue22_commands_and_writes_nothing(tmp_path):
    env = {"FD_SUITE_OUT": str(tmp_path / "o"), "FD_SUITE_WORK": str(tmp_path / "w")}
    out = _suite("--dry-run", "--name", "x", "issue22", env=env)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    lines = [ln for ln in out.stdout.splitlines() if "[dry-run]" in ln]
    assert any(
        "bench/attention_bench.py" in ln and "--out " + str(tmp_path / "o" / "x" / "attention.json") in ln
        for ln in lines
    )
    assert any(
        "flashdreams.cli.bench" in ln and "--precision bf16,fp8" in ln and "--profile-block 5" in ln for ln in lines
    )
    assert any("bench/fp8_quality.py" in ln and "--blocks 7" in ln for ln in lines)
    # each command's limit stays inside the part's cap and the whole budget
    limits = [int(m) for m in re.findall(r"\(limit (\d+) s\)", out.stdout)]
    assert limits and max(limits) <= 330
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()


def test_gpu_suite_refuses_unknown_parts_and_odd_names(tmp_path):
    assert _suite("nope").returncode == 2
    assert _suite("--name", "a/b", "attention").returncode == 2
    assert _suite().returncode == 2


def _bench_smoke(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run `bench/<script> --smoke ARGS` on the CPU (one thread, as the suite's smoke mode does)."""
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--smoke", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_attention_bench_smoke(tmp_path):
    """The suite's attention part on the CPU (Triton interpreter, tiny shapes): every variant runs and
    is checked against exact attention; the ring's fp8 shadow gives the per-call fp8 result bit for bit."""
    out = tmp_path / "attention.json"
    proc = _bench_smoke("attention_bench.py", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["env"]["torch"] and r["check_failures"] == []
    q = r["quality"]
    assert q["fp8_shadow_equals_fp8"] is True
    for name in ("cudnn", "bf16", "bf16_split2", "fp8", "fp8_shadow", "fp8_kernel"):
        assert q[name]["ok"] and q[name]["rel_l2_vs_exact"] > 0, name
    assert q["bf16"]["rel_l2_vs_exact"] < 1e-2 < q["fp8"]["rel_l2_vs_exact"] < 0.08  # fp8 costs ~5%, bf16 ~0.3%
    for name, rows in r["timings"].items():
        assert [e["kv"] for e in rows] == r["shapes"]["kvs"] and all(e["ms"] > 0 for e in rows), name
    assert r["summary"]["variants"]["fp8"]["tflops_at_block5_kv"] > 0
    warps = r["sweeps"]["prepass_warps"]  # the pre-pass knob is reached (it once failed on the H200)
    assert [w.get("warps") for w in warps] == [4, 8] and all(w.get("ms", 0) > 0 for w in warps), warps
    assert "attention TFLOP/s" in proc.stdout and "CHECKS: all passed" in proc.stdout


def test_attention_bench_only_times_the_named_rows(tmp_path):
    """--only REGEX (the suite's attention-forms part): the rows it names beside cuDNN, in the quality check and the
    timings alike, and no sweeps."""
    out = tmp_path / "attention.json"
    proc = _bench_smoke("attention_bench.py", "--only", "^bf16$|fp8_kernel", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["only"] == {"pattern": "^bf16$|fp8_kernel", "rows": ["cudnn", "bf16", "fp8_kernel"]}
    assert {k for k in r["quality"] if isinstance(r["quality"][k], dict)} == {"cudnn", "bf16", "fp8_kernel"}
    variants = {k for k in r["timings"] if not k.startswith("fp8_prepass") and not k.startswith("fp8_shadow_update")}
    assert variants == {"cudnn", "bf16", "fp8_kernel"} and "sweeps" not in r
    bad = _bench_smoke("attention_bench.py", "--only", "fp8_(", "--out", str(tmp_path / "bad.json"))
    assert bad.returncode == 2 and "not a regular expression" in bad.stderr and not (tmp_path / "bad.json").exists()


def test_a_run_that_breaks_costs_only_itself(tmp_path, capsys, monkeypatch):
    """One run raising (a kernel fault, a compiler error) is recorded under failed_runs and named in the
    table; the other runs are still measured and written, and the exit code says something failed."""
    from flashdreams.benchmark import runner

    real = runner.run_config

    def flaky(cfg, backend, attention, first):
        if attention == "triton":
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")
        return real(cfg, backend, attention, first)

    monkeypatch.setattr(runner, "run_config", flaky)
    out = tmp_path / "b"
    argv = ["--attention", "triton,sdpa", "--blocks", "2", "--rollouts", "1", "--quick-ceilings", "--decoder", "none"]
    assert bench_main([*argv, "--out", str(out)]) == 1
    res = json.loads((out / "results.json").read_text())
    assert [(r["backend"], r["attention"]) for r in res["runs"]] == [("eager", "sdpa")]
    (f,) = res["failed_runs"]
    assert (f["attention"], f["error"]) == (
        "triton",
        "RuntimeError: CUDA error: an illegal memory access was encountered",
    )
    # the failed run came first in the process: the measured one is not credited with process start
    assert res["runs"][0]["cold_start"]["process_start_to_first_frame_s"] is None
    assert "eager/triton/fp32 FAILED: RuntimeError" in capsys.readouterr().out


def test_results_json_is_written_after_each_run(tmp_path, monkeypatch):
    """A fd-bench killed during its second run (a time limit) leaves the first run's results."""
    from flashdreams.benchmark import runner

    real = runner.run_config
    seen = []

    def second_is_killed(cfg, backend, attention, first):
        if seen:
            partial = json.loads((tmp_path / "b" / "results.json").read_text())
            assert partial["complete"] is False and [r["attention"] for r in partial["runs"]] == ["sdpa"]
            assert partial["environment"]["torch"] and partial["ceilings"] == {}
            raise KeyboardInterrupt  # what a kill would leave: the file as it is now
        seen.append(attention)
        return real(cfg, backend, attention, first)

    monkeypatch.setattr(runner, "run_config", second_is_killed)
    argv = ["--attention", "sdpa,triton", "--blocks", "2", "--rollouts", "1", "--quick-ceilings", "--decoder", "none"]
    with pytest.raises(KeyboardInterrupt):
        bench_main([*argv, "--out", str(tmp_path / "b")])
    assert json.loads((tmp_path / "b" / "results.json").read_text())["runs"][0]["latency"]["total_ms"]["p50"] > 0


@pytest.mark.parametrize("preset", ["arena", "matrix-game-2-tiny", "lingbot-world-fast-tiny", "omnidreams-sv-tiny"])
def test_varying_inputs_are_valid_and_change_every_block(preset):
    """fd-bench --steady-inputs / --input-latency feed every per-block input a new valid value each block."""
    import flashdreams
    from flashdreams.benchmark.runner import varying_inputs

    engine = flashdreams.load(preset=preset, device="cpu", decoder=None)
    session = engine.session(seed=0)
    inputs = varying_inputs(engine)
    first, second = inputs(1), inputs(2)
    assert set(first) == {s.name for s in engine.input_specs() if s.when == "block"}
    for name, value in first.items():
        session.check_input(name, value)  # raises when a value breaks its spec
    assert any(not torch.equal(first[n], second[n]) for n in first)
    assert all(torch.equal(a, b) for a, b in zip(inputs(1).values(), first.values()))  # seeded by the block


def test_fd_bench_reports_input_latency_and_memory_with_changing_inputs(tmp_path):
    import json

    out = tmp_path / "b"
    argv = ["--preset", "arena", "--device", "cpu", "--blocks", "2", "--rollouts", "1", "--steady-blocks", "5"]
    assert bench_main([*argv, "--steady-inputs", "--input-latency", "4", "--out", str(out)]) == 0
    run = json.loads((out / "results.json").read_text())["runs"][0]
    lat = run["input_to_frames_ms"]
    assert lat["blocks"] == 4 and lat["n"] == 3 and 0 < lat["p50"] <= lat["p99"] and lat["over_block_p50"] > 0
    assert run["steady_state"]["blocks"] == 5 and run["steady_state"]["inputs_changed_every_block"] is True
    assert bench_main([*argv[:-2], "--steady-inputs", "--out", str(out)]) == 2  # --steady-inputs needs --steady-blocks


def test_the_steady_rollout_keeps_no_frames_when_it_tracks_memory():
    """The memory series is the session's: the long rollout drops each block's copies of its frames and
    latents (1000 Matrix-Game blocks would otherwise hold 8.8 GB), keeping shapes and stage marks."""
    import flashdreams
    from flashdreams.benchmark.runner import _block_entry, _rollout

    engine = flashdreams.load(preset="arena", device="cpu")
    session = engine.session(seed=0)
    session.timing = True
    results, _ = _rollout(session, 3, memory=[])
    assert all(r.frames.is_meta and r.latents.is_meta and r.frames_buffer is None for r in results)
    assert [_block_entry(r, engine.spec, engine)["frames"] for r in results] == [4, 4, 4]


def test_block_fusion_bench_smoke(tmp_path):
    """The suite's block-fusion part on the CPU: each fused step is timed beside its unfused form and
    computes the same values (bit-equal here, where the bf16 FFN keeps torch's GELU)."""
    out = tmp_path / "fusion.json"
    proc = _bench_smoke("block_fusion_bench.py", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["shapes"]["tiny"]["rows"]
    assert set(rows) == {
        "ffn bf16",
        "ffn fp8",
        "self residual + pre-norm",
        "ffn residual + next block's norm",
        "cross residual + ffn norm",
        "fp8 qkv: norm quantizes",
        "fp8 cross q: norm quantizes",
        "fp8 ffn.0: norm quantizes",
    }
    for name, row in rows.items():
        assert row["unfused_ms"] > 0 and row["fused_ms"] > 0, name
        assert row["rel_l2_fused_vs_unfused"] < 1e-2, name
    assert rows["ffn bf16"]["rel_l2_fused_vs_unfused"] == 0.0
    # fp32 residual stream: the quantized h is h itself, so the FP8 linears see the same operands
    assert all(rows[f"fp8 {r}: norm quantizes"]["rel_l2_fused_vs_unfused"] == 0.0 for r in ("qkv", "cross q", "ffn.0"))


def test_frames_out_counts_every_stage_before_the_commit():
    """OmniDreams encodes the chunk's HD map inside the block program before the denoise: the frames are
    handed out after encode + denoise + decode, so fd-bench's frames@ms must count the encode too."""
    from types import SimpleNamespace

    from flashdreams.benchmark.runner import _block_entry

    stages = {"encode": 5.0, "denoise": 10.0, "decode": 2.0, "commit": 7.0}
    result = SimpleNamespace(block=3, stage_ms=lambda: stages, frames=None)
    spec = SimpleNamespace(block_flops=lambda block: 1e12)
    entry = _block_entry(result, spec, None)
    assert entry["encode_ms"] == 5.0 and entry["total_ms"] == 24.0
    assert entry["to_frames_ms"] == 17.0
    assert entry["dit_tflops"] == pytest.approx(1e12 / 17.0 / 1e9)  # the DiT's rate: denoise + commit only


def test_hdmap_encoder_bench_smoke(tmp_path):
    """The suite's hdmap-encoder part on the CPU: one 8-frame pass and its channels_last_3d form code the
    same latents as two 4-frame passes."""
    out = tmp_path / "hdmap.json"
    proc = _bench_smoke("hdmap_encoder_bench.py", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = result["encoders"]["lightvae (dim 24)"]
    assert set(rows) == {
        "two passes",
        "one pass",
        "one pass, channels_last_3d",
        "one pass, channels_last_3d, fused norms",
        "narrow forms, pad <= 31",
        "narrow forms, pad <= 48",
    }
    for name, row in rows.items():
        assert row["ms"] > 0 and row["rel_l2_vs_two_passes"] < 1e-5, name
    # 16: the decoder's first conv (the bench builds the whole VAE; the engine's encoder has 24 and 48)
    assert rows["narrow forms, pad <= 31"]["padded_inputs"] == [16, 24]
    assert rows["narrow forms, pad <= 48"]["padded_inputs"] == [16, 24, 48]
    decode = result["decoder"]["rows"]
    assert decode["ncdhw"]["ms"] > 0 and decode["channels_last_3d"]["ms"] > 0
    assert decode["channels_last_3d"]["rel_l2_vs_ncdhw"] < 1e-5
    assert decode["ncdhw, fused norms"]["ms"] > 0 and decode["ncdhw, fused norms"]["rel_l2_vs_ncdhw"] < 1e-5


def test_hdmap_conv_forms_bench_smoke(tmp_path):
    """The suite's hdmap-conv-forms part on the CPU: every recorded conv of the encode, in every form tried,
    gives that conv's own output, the calls counted add up to the encoder's convs, and the encode with the
    narrow forms codes the same latents."""
    out = tmp_path / "forms.json"
    proc = _bench_smoke("hdmap_conv_forms.py", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert sum(row["count"] for row in result["calls"]) == 31  # LightVAE's encoder: 31 conv3d calls a chunk
    names = {name for row in result["calls"] for name in row["forms"]}
    assert {"as is", "fold to 16", "cin to 32", "conv2d", "3 conv2d"} <= names
    for row in result["calls"]:
        for name, form in row["forms"].items():
            assert form["ms"] > 0 and form["rel_l2"] < 1e-5, (row["input"], name)
    assert result["narrow_rel_l2"] < 1e-5 and result["narrow_encode_ms"] > 0
    assert set(result["rel_l2_vs_fp32"]) == {"before", "narrow"} and max(result["rel_l2_vs_fp32"].values()) < 1e-5
    assert result["convs_best_ms"] <= result["convs_as_is_ms"]


def test_taehv_upsample_bench_smoke(tmp_path):
    """The suite's taehv-upsample part on the CPU: both upsampling forms decode bit-equal frames and upsample
    alike; each form's time is measured."""
    out = tmp_path / "up.json"
    proc = _bench_smoke("taehv_upsample_bench.py", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["workloads"]
    assert rows
    for row in rows.values():
        assert row["frames_equal"] and row["upsample_alone_equal"]
        assert min(row["decode_ms"]["torch kernel"], row["decode_ms"]["broadcast copy"]) > 0
        assert row["decode_speedup"] > 0 and min(row["upsample_alone_ms"].values()) > 0


def test_row_chunks_bench_smoke(tmp_path):
    """bench/row_chunks_bench.py on the CPU: both row forms run on the same tensors, their codes agree bit for
    bit, and the chunks recorded are row_chunks' (111 -> 64 + 32 + 16)."""
    out = tmp_path / "chunks.json"
    proc = _bench_smoke("row_chunks_bench.py", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    shapes = json.loads(out.read_text())["shapes"]
    assert shapes["tiny hidden"]["chunks"] == [64, 32, 16] and shapes["tiny out"]["chunks"] == [64, 32, 0]
    for row in shapes.values():
        assert row["bit_equal"] is True and row["one_tile"]["ms"] > 0 and row["chunked"]["ms"] > 0


def test_gelu_quantize_bench_smoke(tmp_path):
    """bench/gelu_quantize_bench.py on the CPU: every form of the pass is timed on one tensor and the two exact
    GELU forms (libdevice erf, the erfc fit) are compared code by code."""
    out = tmp_path / "gelu.json"
    proc = _bench_smoke("gelu_quantize_bench.py", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text())["shapes"]["tiny hidden"]
    for form in ("exact, libdevice erf", "exact, erfc fit", "tanh", "no gelu"):
        assert row[form]["ms"] > 0 and row[form]["gbps"] > 0, form
    assert row["fit_vs_libdevice"]["of"] == 6 * 111 and row["fit_vs_libdevice"]["codes_differing"] <= 2
    assert row["fit_vs_libdevice"]["scale_max_rel_diff"] < 1e-6 and row["speedup_fit"] > 0


def test_row_tiles_bench_smoke(tmp_path):
    """bench/row_tiles_bench.py on the CPU: each AdaLN pass runs under the default tile, equals itself, and its
    bytes and time are recorded."""
    out = tmp_path / "tiles.json"
    proc = _bench_smoke("row_tiles_bench.py", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["shapes"]["tiny"]
    passes = [name for name in rows if name.endswith(("fp8", "norm"))]
    assert len(passes) == 3
    for name in passes:
        assert (
            rows[name]["default"]["bit_equal"] and rows[name]["default"]["us"] > 0 and rows[name]["default"]["gbps"] > 0
        )


def test_narrow_conv_bench_smoke(tmp_path):
    """bench/narrow_conv_bench.py on the CPU: the padded forms give the plain conv's real channels, the
    narrow kernel gives torch's ReLU + conv, and the decode is timed with the switch off and on (left on)."""
    from flashdreams.models import taehv

    out = tmp_path / "convs.json"
    proc = _bench_smoke("narrow_conv_bench.py", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    for case in result["cases"].values():
        forms = [v for k, v in case.items() if k.startswith("in") and "_out" in k]
        assert forms and all(f["max_abs_diff"] < 1e-4 and f["ms"] > 0 for f in forms)
    assert result["taehv"]["last_conv_alone"]["rel_l2"] < 1e-5
    decode = result["taehv"]["decode"]
    assert decode and all(row["frames_rel_l2"] < 1e-5 and row["decode_ms_on"] > 0 for row in decode.values())
    assert taehv.NARROW_LAST_CONV is True
    fused = result["taehv"]["decode_fused_bias_act"]
    assert fused and all(row["frames_equal"] and row["decode_ms_on"] > 0 for row in fused.values())
    assert taehv.FUSED_BIAS_ACT is True
    split = result["taehv"]["decode_upsample_frames"]
    assert split and all(row["frames_rel_l2"] < 1e-5 and row["decode_ms_on"] > 0 for row in split.values())
    assert taehv.UPSAMPLE_FRAMES_KERNEL is True


def test_op_sources_smoke(tmp_path):
    """bench/op_sources.py on the CPU: the ops of one step with their calling frames in this repository."""
    out = tmp_path / "ops.txt"
    proc = _bench_smoke("op_sources.py", "--rows", "5", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = out.read_text().splitlines()
    ops = [line for line in lines if " ms " in line and "::" in line]
    assert len(ops) == 5 and ".py(" in "\n".join(lines)
    bad = _bench_smoke("op_sources.py", "--rows", "0", "--out", str(tmp_path / "x.txt"))
    assert bad.returncode == 2 and "--rows" in bad.stderr and not (tmp_path / "x.txt").exists()


@pytest.mark.parametrize(
    "script",
    [
        "block_fusion_bench.py",
        "hdmap_encoder_bench.py",
        "attention_splits_bench.py",
        "row_chunks_bench.py",
        "row_tiles_bench.py",
        "narrow_conv_bench.py",
    ],
)
def test_micro_benches_refuse_bad_options_by_name(script, tmp_path):
    """The shared command line (flashdreams.benchmark.micro): no timed call is no measurement."""
    proc = _bench_smoke(script, "--reps", "0", "--out", str(tmp_path / "x.json"))
    assert proc.returncode == 2 and "--reps must be >= 1" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_fp8_layer_study_keeps_the_named_linears_out_of_fp8(tmp_path):
    """bench/fp8_layer_study.py on the tiny model: each variant quantizes the model's FP8 set but its matches,
    and a variant's name or pattern that cannot be read is refused before anything runs."""

    def study(*args: str) -> subprocess.CompletedProcess:
        script = REPO / "bench" / "fp8_layer_study.py"
        return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)

    out = tmp_path / "study.json"
    proc = study("--preset", "tiny", "--blocks", "2", "--variant", "all=", "--variant", r"cross_bf16=cross_attn\.",
                 "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    variants = json.loads(out.read_text())["variants"]
    assert variants["all"]["fp8_linears"] == 16 and variants["cross_bf16"]["fp8_linears"] == 12  # 2 blocks
    for v in variants.values():
        assert 1e-4 < v["latents_rel_l2_all"] < 0.1 and len(v["latents_rel_l2_per_block"]) == 2
    for bad, why in (("nameless", "NAME=REGEX"), ("x=[", "not a regular expression")):
        proc = study("--variant", bad, "--out", str(tmp_path / "no.json"))
        assert proc.returncode == 2 and why in proc.stderr
    assert not (tmp_path / "no.json").exists()


def test_results_record_the_fd_switches_a_run_was_made_under(monkeypatch):
    """environment() lists the FD_* variables set (FD_FP8_FAST_ACCUM, FD_FP8_ATTN_SPLITS, ...) and nothing else
    from the environment: two runs of one command differ by them."""
    from flashdreams.benchmark.environment import environment

    monkeypatch.setenv("FD_FP8_FAST_ACCUM", "1")
    monkeypatch.setenv("NOT_OURS", "x")
    env = environment(torch.device("cpu"))
    assert env["fd_env"]["FD_FP8_FAST_ACCUM"] == "1" and all(k.startswith("FD_") for k in env["fd_env"])
    monkeypatch.delenv("FD_FP8_FAST_ACCUM")
    assert "FD_FP8_FAST_ACCUM" not in environment(torch.device("cpu"))["fd_env"]


def test_snapshot_bench_on_the_cpu(tmp_path):
    """bench/snapshot_bench.py (suite part `snapshot`) at the tiny model: every timing is there, and the
    block after a restore (from pageable and page-locked host memory and from the device) is the original's
    bit for bit."""
    out = tmp_path / "snapshot.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "snapshot_bench.py"), "--preset", "tiny", "--repeats", "2"]
        + ["--warm-blocks", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["snapshot_bytes"] > 0 and r["environment"]
    for what in ("block", "take_device", "take_host", "take_pinned_into", "restore_device", "restore_host"):
        assert len(r[f"{what}_ms"]) == 2 and all(t > 0 for t in r[f"{what}_ms"]), what
    assert len(r["take_pinned_first_ms"]) == 1 and len(r["restore_pinned_ms"]) == 2
    assert r["restored_block_max_abs_diff"] == {
        "from_host": {"latents": 0.0, "frames": 0.0},
        "from_pinned": {"latents": 0.0, "frames": 0.0},
        "from_device": {"latents": 0.0, "frames": 0.0},
    }


def test_fp8_quality_judges_only_self_forcing_by_issue_22s_targets():
    """bench/fp8_quality.py: Self-Forcing (causal_wan) is held to rel. L2 <= 3% and >= 38 dB; another family
    (OmniDreams, whose issue asks for the quality to be measured) gets no verdict instead of a false "NOT met"."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fp8_quality", Path(__file__).parents[1] / "bench" / "fp8_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.judge("causal_wan", 0.0235, 43.3)[0] is True
    assert mod.judge("causal_wan", 0.031, 43.3)[0] is False and "NOT met" in mod.judge("causal_wan", 0.031, 43.3)[1]
    assert mod.judge("causal_wan", 0.02, 37.9)[0] is False
    assert mod.judge("causal_wan", 0.02, None)[0] is True  # no decoder: the latents decide
    meets, words = mod.judge("omnidreams", 0.0457, 36.8)
    assert meets is None and "NOT met" not in words
