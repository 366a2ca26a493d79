"""The HD-map rasterizer's geometry, the ego-motion model, and the scripted drive feeding a session."""

from __future__ import annotations

import math

import pytest
import torch

import flashdreams
from flashdreams.errors import InvalidArgumentError
from flashdreams.models.hdmap import (
    Camera,
    DemoDrive,
    EgoModel,
    EgoState,
    box_scene,
    polyline_scene,
    rasterize,
    world_to_camera,
)

CAM = Camera.level(96, 128, hfov_deg=90.0, mount_height=1.5)


def _line(y0: float) -> torch.Tensor:
    xs = torch.linspace(2.0, 200.0, 100)
    return polyline_scene(torch.stack([xs, torch.full_like(xs, y0), torch.zeros_like(xs)], -1), "lane")


def _lit_columns(img: torch.Tensor, row: int) -> torch.Tensor:
    return (img[:, row].sum(0) > 0).nonzero().flatten().float() + 0.5


@pytest.mark.parametrize("y0", [1.75, -3.5])
def test_straight_lane_projects_to_its_image_line(y0):
    """A ground line at lateral offset y0 (left positive) through a level camera at height h is the image
    line u = cx - fx*y0*(v - cy)/(fy*h): it meets the horizon at the principal point; nothing above it."""
    img = rasterize(_line(y0), torch.zeros(3), CAM, line_width=2.0)
    assert img.shape == (3, 96, 128) and img.min() >= 0 and img.max() <= 1
    assert img[:, : int(CAM.cy) - 1].sum() == 0  # above the horizon (less the line width): no ground
    for row in (60, 70, 90):
        v = row + 0.5
        u = CAM.cx - CAM.fx * y0 * (v - CAM.cy) / (CAM.fy * CAM.mount_height)
        cols = _lit_columns(img, row)
        if 2 <= u < CAM.width - 2:
            assert len(cols) > 0 and (cols - u).abs().min() <= 1.5, (row, u, cols)
            assert (cols - u).abs().max() <= 2.5
        elif u < -3 or u > CAM.width + 3:
            assert len(cols) == 0  # the line has left the image at this row


def test_lane_colour_and_turned_pose():
    img = rasterize(_line(0.0), torch.zeros(3), CAM)
    cols = _lit_columns(img, 80)
    assert (cols - CAM.cx).abs().max() <= 2.0  # under the camera: the vertical line u = cx
    assert torch.allclose(img[:, 80, int(CAM.cx)], torch.ones(3))  # lanes are white
    # Yawed 45 degrees left, the line (along +x) is now to the right of the image centre.
    turned = rasterize(_line(0.0), torch.tensor([0.0, 0.0, math.pi / 4]), CAM)
    assert _lit_columns(turned, 80).mean() > CAM.cx + 10


def test_world_to_camera_axes_and_boxes():
    p = world_to_camera(torch.tensor([[10.0, 2.0, 0.0]]), torch.zeros(3), CAM)[0]
    assert torch.allclose(p, torch.tensor([-2.0, 1.5, 10.0]))  # left -> negative right; ground below the camera
    boxes = box_scene(torch.tensor([[20.0, 0.0, 0.0, 4.0, 2.0, 1.5]]))
    assert boxes.segments.shape == (12, 2, 3)
    img = rasterize(boxes, torch.zeros(3), CAM)
    assert img[2].sum() > 0 and img[0].sum() == 0  # agents are blue


def test_ego_model_straight_and_turning():
    m = EgoModel()
    s = EgoState(speed=10.0)
    for _ in range(30):
        s = m.step(s, 0.0, 0.0, 1 / 30)
    assert abs(s.x - 10.0) < 1e-9 and s.y == 0.0 and s.yaw == 0.0
    s = EgoState(speed=10.0)
    for _ in range(300):
        s = m.step(s, 0.5, 0.0, 1 / 300)
    radius = m.wheelbase / math.tan(0.5 * m.max_steer)
    assert abs(s.yaw - 10.0 / radius) < 1e-9 and s.y > 0  # turns left at speed / radius
    assert m.step(EgoState(speed=1.0), 0.0, -1.0, 1.0).speed == 0.0  # brakes to a stop, never backwards
    with pytest.raises(InvalidArgumentError):
        m.step(s, 1.5, 0.0, 0.1)


def test_demo_drive_feeds_a_tiny_session():
    engine = flashdreams.load(preset="omnidreams-sv-tiny", device="cpu", dtype="float32")
    drive = DemoDrive(64, 96)
    chunk = drive.next_chunk()
    assert chunk.shape == (1, 8, 3, 64, 96) and chunk.max() > 0 and chunk.min() >= 0
    session = engine.session(seed=0, inputs={"hdmap_video": chunk})
    frames = [r.frames for r in drive.steps(session, 2)]
    assert frames[0].shape[1:] == (5, 64, 96, 3) and frames[1].shape[1:] == (8, 64, 96, 3)
    assert drive.state.x > 0 and drive.time == pytest.approx(16 / 30)
    assert not torch.equal(session.buffers["hdmap_video"], chunk)  # the second block got the next chunk
