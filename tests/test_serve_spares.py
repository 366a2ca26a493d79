"""fd-serve keeps closed sessions for the next players: a renewed session plays exactly what a new one
would, the spares stay within their cap, and a refused open leaves the spare as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from toy_world import FRAMES, KEYS, toy_engine

from flashdreams.errors import InvalidArgumentError
from flashdreams.serve.stepper import SessionStepper


def _frames(stepper: SessionStepper, sid: str, blocks: int) -> list[np.ndarray]:
    return [stepper.step([sid])[sid].frames for _ in range(blocks)]


def _fresh(engine, seed: int, blocks: int) -> list[np.ndarray]:
    single = SessionStepper(engine, spares=0)
    single.open("x", seed)
    return _frames(single, "x", blocks)


def test_the_next_player_gets_the_parked_session_renewed_and_sees_a_new_world():
    engine = toy_engine()
    st = SessionStepper(engine)
    assert st.session_bytes() > 0 and st.parked() == 1  # the probe is the first spare
    probe = st.spares[0]
    st.open("a", 4)
    assert st.sessions["a"] is probe and st.parked() == 0 and st.renewed == 1
    st.set_input("a", "keyboard", torch.ones(1, FRAMES, KEYS))  # a's keys: the next player must not inherit them
    _frames(st, "a", 3)
    st.close("a")
    assert st.parked() == 1 and "a" not in st.sessions
    st.open("b", 5)
    assert st.sessions["b"] is probe and st.renewed == 2
    got, want = _frames(st, "b", 4), _fresh(engine, 5, 4)
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))


def test_spares_stay_within_their_cap_and_zero_keeps_none():
    engine = toy_engine()
    none = SessionStepper(engine, spares=0)
    none.session_bytes()
    none.open("a", 1)
    none.close("a")
    assert none.parked() == 0
    one = SessionStepper(engine, spares=1)
    for sid in ("a", "b", "c"):
        one.open(sid, 1)
    for sid in ("a", "b", "c"):
        one.close(sid)
    assert one.parked() == 1
    one.open("d", 1)
    one.sessions["d"]._failed = "an illegal memory access inside a replayed graph"  # as Session._run_block sets it
    one.spares.clear()
    one.close("d")
    assert one.parked() == 0  # a session that failed in a replayed graph is freed, not handed on
    with pytest.raises(InvalidArgumentError, match="spares must be >= 0"):
        SessionStepper(engine, spares=-1)


def test_a_refused_open_leaves_the_spare_parked_and_untouched():
    engine = toy_engine()
    st = SessionStepper(engine)
    st.open("a", 2)
    _frames(st, "a", 2)
    st.close("a")
    spare = st.spares[0]
    before = {n: t.clone() for n, t in spare.buffers.items()}
    with pytest.raises(InvalidArgumentError, match="non-finite"):
        st.open("b", 3, {"keyboard": torch.full((1, FRAMES, KEYS), float("nan"))})
    assert st.parked() == 1 and st.spares[0] is spare and "b" not in st.sessions
    assert all(torch.equal(spare.buffers[n], t) for n, t in before.items())
    st.open("b", 3)
    assert all(np.array_equal(g, w) for g, w in zip(_frames(st, "b", 3), _fresh(engine, 3, 3), strict=True))


@pytest.mark.parametrize("argv, cap", [([], None), (["--spare-sessions", "2"], 2), (["--spare-sessions", "0"], 0)])
def test_fd_serve_spare_sessions_option(argv, cap):
    from flashdreams.cli.serve import build_manager, build_parser

    args = build_parser().parse_args(["--preset", "tiny", "--device", "cpu", *argv])
    stepper = build_manager(args).stepper
    assert isinstance(stepper, SessionStepper) and stepper.max_spares == cap


@pytest.mark.parametrize("spares, want", [(None, 4), (0, 3)])
def test_capacity_counts_a_parked_session_on_top_of_free_memory_but_not_of_a_given_budget(monkeypatch, spares, want):
    """Free memory is measured with the parked probe already in place, so it counts on top; a --memory-budget
    is the sessions' memory, parked ones included."""
    pytest.importorskip("aiohttp", reason="fd-serve needs aiohttp")
    import flashdreams
    from flashdreams.serve import manager as mgr
    from flashdreams.serve.protocol import FrameCodec

    stepper = SessionStepper(flashdreams.load(preset="arena", device="cpu"), spares=spares)
    per = stepper.session_bytes()
    monkeypatch.setattr(mgr, "memory_available_bytes", lambda: 2 * 3 * per)  # half of it is the budget
    m = mgr.SessionManager(stepper, mgr.Limits(), FrameCodec.choose("raw"))
    m.per_session_bytes = per
    assert m._capacity() == want
    m = mgr.SessionManager(stepper, mgr.Limits(memory_budget=3 * per), FrameCodec.choose("raw"))
    m.per_session_bytes = per
    assert m._capacity() == 3
