"""A small HD-map rasterizer and ego-motion model: an HD-map video for OmniDreams without external assets.

World frame: x forward along the road, y to the left, z up, metres; the ground is z = 0. The ego
pose is (x, y, yaw). A pinhole camera sits `mount_height` above the ego origin looking along the
yaw, level (no pitch), with intrinsics (fx, fy, cx, cy) in pixels. The map is a set of 3-D line
segments (lane lines, road edges, agent box edges) drawn as lines `line_width` pixels wide; each
pixel takes the colour of the nearest segment within half that width. Everything is torch on the
device of the segments (no host sync inside), so a simulator loop can render chunk after chunk.

Colours are ours (lane lines white, road edges red, agents blue): the release renders with its
own renderer and its colour scheme is not documented here. A user with a real simulator passes
its own rendered HD map instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flashdreams.errors import InvalidArgumentError

COLORS = {"lane": (1.0, 1.0, 1.0), "edge": (1.0, 0.0, 0.0), "agent": (0.0, 0.5, 1.0)}
NEAR = 0.5  # metres: segments are clipped to the part at least this far in front of the camera
BOX_EDGES = ((0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7))


@dataclass(frozen=True)
class Camera:
    height: int
    width: int
    fx: float
    fy: float
    cx: float
    cy: float
    mount_height: float = 1.5

    @classmethod
    def level(cls, height: int, width: int, hfov_deg: float = 90.0, mount_height: float = 1.5) -> Camera:
        """A level camera with square pixels and the principal point at the image centre."""
        if not 0 < hfov_deg < 180:
            raise InvalidArgumentError(f"camera: horizontal field of view must be in (0, 180) degrees; got {hfov_deg}")
        f = (width / 2) / math.tan(math.radians(hfov_deg) / 2)
        return cls(height, width, f, f, width / 2, height / 2, mount_height)


@dataclass
class Scene:
    """Map segments [S, 2, 3] (world metres) and their RGB colours [S, 3] in [0, 1]."""

    segments: torch.Tensor
    colors: torch.Tensor

    def __add__(self, other: Scene) -> Scene:
        return Scene(torch.cat([self.segments, other.segments]), torch.cat([self.colors, other.colors]))


def polyline_scene(points: torch.Tensor, kind: str) -> Scene:
    """A polyline [P, 3] as P-1 segments of colour `kind` ("lane", "edge" or "agent")."""
    if kind not in COLORS:
        raise InvalidArgumentError(f"map element kind '{kind}' is unknown; known: {sorted(COLORS)}")
    seg = torch.stack([points[:-1], points[1:]], dim=1)
    color = torch.tensor(COLORS[kind], dtype=points.dtype, device=points.device).expand(seg.shape[0], 3)
    return Scene(seg, color.clone())


def box_scene(boxes: torch.Tensor) -> Scene:
    """Agent boxes [N, 6] = (x, y, yaw, length, width, height) on the ground, as their 12 edges each."""
    x, y, yaw, length, width, height = boxes.unbind(-1)
    sx = torch.tensor([1, 1, -1, -1, 1, 1, -1, -1], dtype=boxes.dtype, device=boxes.device) * 0.5
    sy = torch.tensor([1, -1, -1, 1, 1, -1, -1, 1], dtype=boxes.dtype, device=boxes.device) * 0.5
    sz = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1], dtype=boxes.dtype, device=boxes.device)
    lx, ly = sx * length[:, None], sy * width[:, None]
    c, s = torch.cos(yaw)[:, None], torch.sin(yaw)[:, None]
    corners = torch.stack([x[:, None] + c * lx - s * ly, y[:, None] + s * lx + c * ly, sz * height[:, None]], -1)
    idx = torch.tensor(BOX_EDGES, device=boxes.device)
    seg = corners[:, idx].reshape(-1, 2, 3)
    color = torch.tensor(COLORS["agent"], dtype=boxes.dtype, device=boxes.device).expand(seg.shape[0], 3)
    return Scene(seg, color.clone())


def straight_road(
    length: float = 400.0, lanes: int = 3, lane_width: float = 3.5, step: float = 50.0, device=None
) -> Scene:
    """A straight road along +x starting at x = -10: `lanes` lanes centred on y = 0, edges at the sides."""
    xs = torch.arange(-10.0, length, step, device=device)
    half = lanes * lane_width / 2
    scene = None
    for i in range(lanes + 1):
        y = -half + i * lane_width
        pts = torch.stack([xs, torch.full_like(xs, y), torch.zeros_like(xs)], -1)
        part = polyline_scene(pts, "edge" if i in (0, lanes) else "lane")
        scene = part if scene is None else scene + part
    return scene


def world_to_camera(points: torch.Tensor, pose: torch.Tensor, camera: Camera) -> torch.Tensor:
    """World points [..., 3] -> camera coordinates [..., 3] = (right, down, forward) for pose (x, y, yaw)."""
    dx, dy = points[..., 0] - pose[0], points[..., 1] - pose[1]
    c, s = torch.cos(pose[2]), torch.sin(pose[2])
    forward = c * dx + s * dy
    left = -s * dx + c * dy
    up = points[..., 2] - camera.mount_height
    return torch.stack([-left, -up, forward], dim=-1)


def rasterize(scene: Scene, pose: torch.Tensor, camera: Camera, line_width: float = 3.0, chunk: int = 256):
    """One frame [3, H, W] in [0, 1]: the scene seen from `pose` (float tensor [3]), black background."""
    cam = world_to_camera(scene.segments, pose.to(scene.segments.dtype), camera)  # [S, 2, 3]
    a, b = cam[:, 0], cam[:, 1]
    za, zb = a[:, 2], b[:, 2]
    visible = (za >= NEAR) | (zb >= NEAR)
    # Clip each segment to the part in front of the near plane (the parameter where z = NEAR).
    t = ((NEAR - za) / (zb - za).where((zb - za).abs() > 1e-9, torch.ones_like(za))).clamp(0, 1)
    a_c = torch.where((za < NEAR)[:, None], a + t[:, None] * (b - a), a)
    b_c = torch.where((zb < NEAR)[:, None], a + t[:, None] * (b - a), b)

    def project(p):
        z = p[:, 2].clamp(min=NEAR)
        return torch.stack([camera.fx * p[:, 0] / z + camera.cx, camera.fy * p[:, 1] / z + camera.cy], -1)

    pa, pb = project(a_c), project(b_c)
    h, w = camera.height, camera.width
    dev, dt = scene.segments.device, scene.segments.dtype
    ys, xs = torch.meshgrid(
        torch.arange(h, device=dev, dtype=dt) + 0.5, torch.arange(w, device=dev, dtype=dt) + 0.5, indexing="ij"
    )
    pix = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)  # [HW, 2] pixel centres (u, v)
    best = torch.full((h * w,), float("inf"), device=dev, dtype=dt)
    color = torch.zeros(h * w, 3, device=dev, dtype=dt)
    for i in range(0, pa.shape[0], chunk):
        sa, sb, vis = pa[i : i + chunk], pb[i : i + chunk], visible[i : i + chunk]
        d = sb - sa
        den = (d * d).sum(-1).clamp(min=1e-9)
        u = (((pix[:, None] - sa[None]) * d[None]).sum(-1) / den).clamp(0, 1)  # [HW, s]
        dist = (pix[:, None] - (sa[None] + u[..., None] * d[None])).norm(dim=-1)
        dist = dist.masked_fill(~vis[None], float("inf"))
        m, j = dist.min(dim=1)
        closer = m < best
        best = torch.where(closer, m, best)
        color = torch.where(closer[:, None], scene.colors[i : i + chunk][j], color)
    lit = (best <= line_width / 2)[:, None]
    return (color * lit).T.reshape(3, h, w).clamp(0, 1)


@dataclass
class EgoState:
    """Ego pose and speed: x, y (m), yaw (rad), speed (m/s)."""

    x: float = 0.0
    y: float = 0.0
    yaw: float = 0.0
    speed: float = 8.0


@dataclass(frozen=True)
class EgoModel:
    """Kinematic bicycle: steer in [-1, 1] (left positive) -> front-wheel angle, throttle in [-1, 1] -> accel."""

    wheelbase: float = 2.8
    max_steer: float = 0.5  # rad at steer = 1
    max_accel: float = 3.0  # m/s^2 at throttle = 1 (braking at -1)
    max_speed: float = 30.0

    def step(self, s: EgoState, steer: float, throttle: float, dt: float) -> EgoState:
        if not (-1 <= steer <= 1 and -1 <= throttle <= 1):
            raise InvalidArgumentError(f"ego controls must lie in [-1, 1]; got steer {steer}, throttle {throttle}")
        speed = min(max(s.speed + throttle * self.max_accel * dt, 0.0), self.max_speed)
        yaw_rate = speed * math.tan(steer * self.max_steer) / self.wheelbase
        yaw = s.yaw + yaw_rate * dt
        mid = s.yaw + 0.5 * yaw_rate * dt
        return EgoState(s.x + speed * math.cos(mid) * dt, s.y + speed * math.sin(mid) * dt, yaw, speed)


# The scripted demo route: (seconds, steer, throttle), held in turn, then repeated.
DEMO_ROUTE = ((2.0, 0.0, 0.3), (1.5, 0.12, 0.0), (1.5, -0.12, 0.0), (2.0, 0.0, -0.2), (1.0, 0.0, 0.5))


HDMAP_INPUT = "hdmap_video"  # the input of an HD-map-conditioned plan that a drive feeds


class DemoDrive:
    """A scripted drive on a straight 3-lane road with a few agents: HD-map chunks for an OmniDreams session.

    `controls(t)` gives the route's (steer, throttle) at time t; `next_chunk()` advances the ego over
    the chunk's frames at `fps` and returns the rendered HD map [1, frames, 3, H, W] in [0, 1].
    `set_controls` overrides the route (an interactive host's steer/throttle).
    """

    def __init__(self, height: int, width: int, fps: float = 30.0, frames: int = 8, device=None) -> None:
        self.camera = Camera.level(height, width)
        self.fps, self.frames = float(fps), int(frames)
        self.model = EgoModel()
        self.state = EgoState()
        self.time = 0.0
        agents = torch.tensor(
            [[25.0, 3.5, 0.0, 4.5, 1.9, 1.6], [45.0, -3.5, 0.0, 4.5, 1.9, 1.6], [80.0, 0.0, 0.0, 12.0, 2.5, 3.2]],
            device=device,
        )
        self.scene = straight_road(device=device) + box_scene(agents)
        self.override: tuple[float, float] | None = None

    @classmethod
    def for_plan(cls, plan, device=None, who: str = "the model") -> DemoDrive:
        """A drive rendering the chunks of `plan`'s `hdmap_video` input (its size, frames per chunk, fps);
        InvalidArgumentError naming `who` for a plan without that input."""
        spec = plan.inputs.get(HDMAP_INPUT)
        if spec is None:
            raise InvalidArgumentError(f"{who} takes no {HDMAP_INPUT} input (an omnidreams preset does)")
        meta = plan.meta
        return cls(meta["height"], meta["width"], fps=meta.get("fps", 30), frames=spec.shape[1], device=device)

    def controls(self, t: float) -> tuple[float, float]:
        if self.override is not None:
            return self.override
        period = sum(d for d, _, _ in DEMO_ROUTE)
        t = t % period
        for duration, steer, throttle in DEMO_ROUTE:
            if t < duration:
                return steer, throttle
            t -= duration
        return DEMO_ROUTE[-1][1:]

    def set_controls(self, steer: float, throttle: float) -> None:
        self.model.step(self.state, steer, throttle, 0.0)  # validates the range
        self.override = (float(steer), float(throttle))

    def next_chunk(self) -> torch.Tensor:
        out = []
        dt = 1.0 / self.fps
        dev = self.scene.segments.device
        for _ in range(self.frames):
            steer, throttle = self.controls(self.time)
            self.state = self.model.step(self.state, steer, throttle, dt)
            self.time += dt
            pose = torch.tensor([self.state.x, self.state.y, self.state.yaw], device=dev)
            out.append(rasterize(self.scene, pose, self.camera))
        return torch.stack(out)[None]

    def steps(self, session, blocks: int):
        """`blocks` steps of an OmniDreams session, each fed the drive's next HD-map chunk (`hdmap_video`).

        The first block uses the chunk the session already holds (give `next_chunk()` when creating
        it: the input is required), so the route and the chunks stay in step.
        """
        for k in range(blocks):
            if k:
                session.set_input("hdmap_video", self.next_chunk())
            yield session.step()
