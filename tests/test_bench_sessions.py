"""fd-bench --sessions: the many-worlds benchmark's rows and its refusals."""

from __future__ import annotations

from toy_world import toy_engine

from flashdreams.benchmark.sessions import bench_sessions, largest_fit
from flashdreams.cli.bench import main


def test_rows_report_throughput_latency_and_memory_per_world():
    engine = toy_engine()
    rows = bench_sessions(lambda n: engine, [1, 4], blocks=3, warmup=1)
    assert [r["worlds"] for r in rows] == [1, 4] and all(r["mode"] == "worlds" for r in rows)
    for r in rows:
        assert r["frames_per_block"] == 1
        assert 0 < r["block_ms_p50"] <= r["block_ms_p99"]
        assert abs(r["per_world_fps"] * r["worlds"] - r["aggregate_fps"]) < 1e-6 * r["aggregate_fps"]
    # state per world: the toy ring (3 x 8 float32), the block index, keys and noise
    assert rows[1]["state_bytes_per_world"] == (3 * 8 * 4 + 8 + 2 * 4 * 4 + 8 * 4)
    assert rows[0]["speedup_vs_first"] == 1.0


def test_largest_fit_extrapolates_the_measured_slope():
    rows = [{"worlds": 1, "peak_bytes_above_weights": 300}, {"worlds": 4, "peak_bytes_above_weights": 900}]
    assert largest_fit(rows, 10_000) == 4 + (10_000 - 900) // 200
    assert largest_fit(rows[:1], 10_000) is None


def test_cli_refuses_bad_counts(capsys):
    assert main(["--sessions", "0,2"]) == 2
    assert "positive integers" in capsys.readouterr().err


def test_cli_keeps_the_rows_before_a_count_that_fails(tmp_path, monkeypatch, capsys):
    """results.json is written after every N: a later N that runs out of memory keeps the earlier rows."""
    import json

    from flashdreams.engine import Engine
    from flashdreams.errors import OutOfMemoryError

    real = Engine.worlds

    def worlds(self, n, *a, **k):
        if n >= 4:
            raise OutOfMemoryError(f"{n} worlds do not fit (test)")
        return real(self, n, *a, **k)

    monkeypatch.setattr(Engine, "worlds", worlds)
    out = tmp_path / "bench"
    assert (
        main(["--preset", "arena", "--device", "cpu", "--sessions", "1,2,4,8", "--blocks", "1", "--out", str(out)]) == 1
    )
    results = json.loads((out / "results.json").read_text())
    assert [r["worlds"] for r in results["rows"]] == [1, 2]
    assert results["failed"]["worlds"] == 4 and "do not fit" in results["failed"]["error"]
    assert "4 worlds failed" in capsys.readouterr().err


def test_cli_profiles_one_step_per_world_count(tmp_path):
    """--profile-block with --sessions: every row carries the kernel profile of one step of that many worlds."""
    import json

    out = tmp_path / "bench"
    argv = ["--preset", "arena", "--device", "cpu", "--sessions", "1,4", "--blocks", "1", "--out", str(out)]
    assert main([*argv, "--profile-block", "0"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    for r in rows:
        prof = r["profile"]
        assert prof["wall_ms"] > 0 and prof["kernel_ms"] > 0
        assert abs(sum(c["ms"] for c in prof["categories"].values()) - prof["kernel_ms"]) < 0.01
        assert any("linear" in k["name"] or "addmm" in k["name"] for k in prof["top_kernels"])  # the net's GEMMs
    # Four worlds are more work than one: the profiled step's device (here CPU op) time grows with N.
    assert rows[1]["profile"]["kernel_ms"] > rows[0]["profile"]["kernel_ms"]
    assert "profile" not in json.loads(main_rows(tmp_path))[0]


def main_rows(tmp_path) -> str:
    """Rows of a run without --profile-block (no profile in them)."""
    import json

    out = tmp_path / "plain"
    main(["--preset", "arena", "--device", "cpu", "--sessions", "1", "--blocks", "1", "--out", str(out)])
    return json.dumps(json.loads((out / "results.json").read_text())["rows"])


def test_a_lockstep_model_is_measured_as_its_worlds():
    """A model that is not row-independent is measured as `engine.worlds(N)` of an engine loaded at
    batch N (in step: one batch per step), what a user steps."""
    import flashdreams

    engines = {}
    rows = bench_sessions(
        lambda n: engines.setdefault(n, flashdreams.load(preset="tiny", device="cpu", batch=n)), [1, 2], 2, 1
    )
    assert [r["mode"] for r in rows] == ["lockstep worlds"] * 2
    assert [r["frames_per_block"] for r in rows] == [12, 12]  # past block 0's 9 frames: every world in step
    one, two = rows[0]["state_bytes_per_world"], rows[1]["state_bytes_per_world"]
    assert abs(two - one) < 1e-3 * one  # each world its own state (the shared position tables aside)
