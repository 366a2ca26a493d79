"""A bounded loopback load test: N concurrent client sessions for a fixed time; every session receives
every frame of its blocks, in order, and none starves while the others run."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("aiohttp", reason="fd-serve needs aiohttp: pip install -e '.[serve]'")

import flashdreams  # noqa: E402
from flashdreams.client import Client  # noqa: E402
from flashdreams.serve import protocol  # noqa: E402
from flashdreams.serve.manager import Limits, SessionManager  # noqa: E402
from flashdreams.serve.server import ServerThread  # noqa: E402
from flashdreams.serve.stepper import SessionStepper  # noqa: E402

SESSIONS = 4
SECONDS = 4.0  # each session's fixed run
CAP = 120.0  # on a slow or busy machine a session runs on until it has two whole blocks, at most this long


def test_concurrent_sessions_each_get_every_frame_in_order():
    preset = "arena" if "arena" in flashdreams.preset_names() else "tiny"
    engine = flashdreams.load(preset=preset, device="cpu")
    manager = SessionManager(SessionStepper(engine), Limits(max_sessions=SESSIONS), protocol.FrameCodec.choose())
    srv = ServerThread(manager)
    got: dict[int, list] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            with Client(srv.url, seed=i) as c:
                frames = []
                t0 = time.monotonic()
                need = 2 * manager.frames_per_block + 1
                while time.monotonic() - t0 < SECONDS or (len(frames) < need and time.monotonic() - t0 < CAP):
                    frames.append(c.next_frame(timeout=60))
                got[i] = frames
        except BaseException as exc:  # reported below, with the session's number
            errors.append(exc)

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(SESSIONS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(CAP + 60)
        assert not errors, errors
        assert sorted(got) == list(range(SESSIONS))
        fpb = manager.frames_per_block
        counts = []
        for i, frames in got.items():
            idx = [f.index for f in frames]
            assert idx == list(range(len(idx))), f"session {i}: frames missing or out of order"
            blocks = [f.block for f in frames]
            assert blocks == sorted(blocks), f"session {i}: blocks out of order"
            # every block but the last one seen arrived whole (its frame numbers 0..n-1)
            for b in set(blocks[:-1]) - {blocks[-1]}:
                js = [f for f in frames if f.block == b]
                assert [f.frame for f in js] == list(range(len(js))), f"session {i}: block {b} arrived partly"
            assert len(idx) > fpb, f"session {i} got less than one block"
            counts.append(len(idx))
        # turn-taking: no session starves while the others run
        assert min(counts) * 2 >= max(counts) or max(counts) - min(counts) <= 2 * fpb, counts
        assert not manager.sessions or all(s.ended is None for s in manager.sessions.values())
    finally:
        srv.stop()
    # every session was ended and freed when its client left
    assert not manager.stepper.sessions
