"""fd-serve's batched stepper: sessions of a row-independent model stepped as worlds of one batch
give the frames the one-session-per-id stepper gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from toy_world import FRAMES, KEYS, toy_engine

from flashdreams.errors import InvalidArgumentError, OutOfMemoryError
from flashdreams.serve.stepper import SessionStepper
from flashdreams.serve.worlds_stepper import WorldsStepper


def test_batched_stepper_equals_one_session_per_id():
    engine = toy_engine()
    batched, single = WorldsStepper(engine, capacity=4), SessionStepper(engine)
    for st in (batched, single):
        for sid, seed in (("a", 1), ("b", 2), ("c", 3)):
            st.open(sid, seed)
        st.set_input("b", "keyboard", torch.ones(1, FRAMES, KEYS))
    rounds = [["a", "b", "c"], ["a", "c"], ["b"], ["a", "b", "c"]]  # b is held in round 2
    for sids in rounds:
        got, want = batched.step(sids), single.step(sids)
        assert sorted(got) == sorted(sids)
        for sid in sids:
            assert got[sid].error is None and got[sid].block == want[sid].block
            assert np.abs(got[sid].frames.astype(int) - want[sid].frames.astype(int)).max() <= 1
    batched.reset("a", 9)
    single.reset("a", 9)
    assert np.array_equal(batched.step(["a"])["a"].frames, single.step(["a"])["a"].frames)


def test_open_close_and_refusals():
    st = WorldsStepper(toy_engine(), capacity=2)
    st.open("a", 0)
    st.open("b", 0)
    with pytest.raises(OutOfMemoryError):
        st.open("c", 0)
    with pytest.raises(InvalidArgumentError, match="already open"):
        st.open("a", 1)
    with pytest.raises(InvalidArgumentError, match="non-finite"):
        st.check_input("a", "keyboard", torch.full((1, FRAMES, KEYS), float("nan")))
    st.close("a")
    assert st.worlds.n == 1 and list(st.step(["b", "a"])) == ["b"]
    st.open("c", 5)
    assert st.session_bytes() > 0


@pytest.mark.parametrize("choice, batched", [("on", True), ("off", False), ("auto", False)])
def test_fd_serve_batching_choice(choice, batched):
    """--batching on steps the arena's sessions as one batch; auto is off on a CPU (a batch gains nothing there)."""
    from flashdreams.cli.serve import build_manager, build_parser

    args = build_parser().parse_args(
        ["--preset", "arena", "--device", "cpu", "--max-sessions", "3", "--batching", choice]
    )
    stepper = build_manager(args).stepper
    assert isinstance(stepper, WorldsStepper) is batched
    if batched:
        assert stepper.worlds.capacity == 3
    args = build_parser().parse_args(["--preset", "arena", "--device", "cpu", "--batching", choice])
    manager = build_manager(args)
    if batched:  # admission stops at the batch's rows, whatever memory would hold
        assert manager.limits.max_sessions == manager.stepper.worlds.capacity == 64
    else:
        assert manager.limits.max_sessions is None


def test_fd_serve_refuses_batching_a_lockstep_model():
    from flashdreams.cli.serve import build_manager, build_parser

    args = build_parser().parse_args(["--preset", "tiny", "--device", "cpu", "--batching", "on"])
    with pytest.raises(InvalidArgumentError, match="cannot share a batch"):
        build_manager(args)
    args = build_parser().parse_args(["--preset", "tiny", "--device", "cpu"])
    assert isinstance(build_manager(args).stepper, SessionStepper)
