"""fd-serve --drive demo: an OmniDreams session steered with steer/throttle from the page; the HD map the
model takes is rendered along the car's path, block by block, as a Python loop with DemoDrive makes it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flashdreams
from flashdreams.errors import InvalidArgumentError
from flashdreams.models.hdmap import DemoDrive
from flashdreams.serve.drive import DriveStepper
from flashdreams.serve.stepper import SessionStepper

PRESET = "omnidreams-sv-tiny"


@pytest.fixture(scope="module")
def engine():
    return flashdreams.load(preset=PRESET, device="cpu")


def _python_frames(engine, seed: int, controls: dict[int, tuple[float, float]], blocks: int) -> list[np.ndarray]:
    meta, frames = engine.plan.meta, engine.plan.inputs["hdmap_video"].shape[1]
    drive = DemoDrive(meta["height"], meta["width"], fps=meta["fps"], frames=frames)
    session = engine.session(seed=seed, inputs={"hdmap_video": drive.next_chunk()})
    out = []
    for k in range(blocks):
        if k in controls:
            drive.set_controls(*controls[k])
        if k:
            session.set_input("hdmap_video", drive.next_chunk())
        out.append(session.step().frames_cpu()[0].numpy())
    return out


def test_steering_from_a_client_equals_the_python_drive(engine):
    st = DriveStepper(SessionStepper(engine))
    st.open("a", 3)
    got = []
    for k in range(3):
        if k == 1:
            st.set_input("a", "drive", st.check_input("a", "drive", torch.tensor([[0.8, -0.5]])))
        got.append(st.step(["a"])["a"].frames)
    want = _python_frames(engine, 3, {1: (0.8, -0.5)}, 3)
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    route = _python_frames(engine, 3, {}, 3)  # the scripted route: another HD map, other frames
    assert np.array_equal(got[0], route[0]) and not np.array_equal(got[2], route[2])
    st.reset("a", 3)  # a new drive from the start of the road
    assert np.array_equal(st.step(["a"])["a"].frames, route[0])


def test_the_drive_owns_the_hd_map_and_checks_the_controls(engine):
    st = DriveStepper(SessionStepper(engine))
    names = [s.name for s in st.input_specs()]
    assert "drive" in names and "hdmap_video" not in names
    st.open("a", 0)
    with pytest.raises(InvalidArgumentError, match="comes from the demo drive"):
        st.check_input("a", "hdmap_video", torch.zeros(engine.plan.inputs["hdmap_video"].shape))
    for bad in (torch.tensor([[1.5, 0.0]]), torch.tensor([[float("nan"), 0.0]]), torch.zeros(3)):
        with pytest.raises(InvalidArgumentError, match="drive"):
            st.check_input("a", "drive", bad)
    # the drive's pose lives outside the model's state, so a snapshot would miss it: saving is refused
    with pytest.raises(InvalidArgumentError, match="cannot save"):
        st.save("a", 1 << 30)
    with pytest.raises(InvalidArgumentError, match="cannot load"):
        st.load("a", None)
    st.close("a")
    assert st.step(["a"]) == {}


def test_fd_serve_drive_option():
    from flashdreams.cli.serve import build_manager, build_parser

    args = build_parser().parse_args(["--preset", PRESET, "--device", "cpu", "--drive", "demo"])
    manager = build_manager(args)
    assert isinstance(manager.stepper, DriveStepper) and "drive" in manager.specs
    assert manager.info()["save_limit_bytes"] == 0  # the page keeps its Save button off
    args = build_parser().parse_args(["--preset", "arena", "--device", "cpu", "--drive", "demo"])
    with pytest.raises(InvalidArgumentError, match="takes no hdmap_video"):
        build_manager(args)
