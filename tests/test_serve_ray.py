"""fd-serve --ray on a CPU: a local Ray instance, two Ray Serve workers; sessions are admitted on the
least-loaded worker with room, stay on it (sticky), are refused when every worker is full, and are
drained with a reason when the gateway stops."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("aiohttp", reason="fd-serve needs aiohttp: pip install -e '.[serve]'")
pytest.importorskip("ray.serve", reason="the Ray test needs ray[serve] (pip install -e '.[serve]'; CI installs it)")

import flashdreams  # noqa: E402
from flashdreams.cli.serve import build_parser  # noqa: E402
from flashdreams.client import Client, ServerBusy, SessionEnded  # noqa: E402
from flashdreams.serve.ray_app import RayHub, deploy_workers, start_ray, stop_ray  # noqa: E402
from flashdreams.serve.server import ServerThread  # noqa: E402


def test_two_workers_sticky_sessions_admission_and_drain():
    preset = "arena" if "arena" in flashdreams.preset_names() else "tiny"
    t0 = time.monotonic()
    start_ray(None, num_cpus=2)
    try:
        args = build_parser().parse_args(["--preset", preset, "--device", "cpu", "--max-sessions", "1"])
        handles = deploy_workers(args, 2, gpus=False)
        hub = RayHub(handles)
        srv = ServerThread(hub)
        started = time.monotonic() - t0
        try:
            a, b = Client(srv.url, seed=1), Client(srv.url, seed=2)
            assert a.info["workers"] == 2 and a.info["max_sessions"] == 2
            assert {r.worker for r in hub.routes.values()} == {0, 1}  # least-loaded first: one on each
            with pytest.raises(ServerBusy, match="all 2 workers are full"):
                Client(srv.url)
            for c in (a, b):
                frames = [c.next_frame(timeout=60) for _ in range(2 * c.info["frames_per_block"])]
                assert [f.index for f in frames] == list(range(len(frames)))
            # messages reach the session's own worker: its spec check answers, the session goes on
            spec = next(s for s in a.specs if s["when"] == "block")
            seq = a.send_input(spec["name"], np.zeros([1, 2], np.float32))
            err = a.next_error(timeout=60)
            assert err["seq"] == seq and "must have shape" in err["message"]
            good = np.zeros(spec["shape"], np.float32)
            seq = a.send_input(spec["name"], good)
            for _ in range(200):
                if a.next_frame(timeout=60).seq == seq:
                    break
            else:
                pytest.fail("the input never reached its session's worker")
            b.close()  # a client leaves: its worker frees the slot for the next session
            deadline = time.monotonic() + 30
            while len(hub.routes) > 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            with Client(srv.url) as c:
                assert c.next_frame(timeout=60).index == 0
        finally:
            srv.stop()  # drains: every live client is told why
        with pytest.raises(SessionEnded, match="shutting down"):
            while True:
                a.next_frame(timeout=60)
        a.close()
        print(f"ray + 2 workers up in {started:.1f} s, test {time.monotonic() - t0:.1f} s")
    finally:
        stop_ray()
