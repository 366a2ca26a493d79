"""The procedural arena: a deterministic top-down world the arena model is trained on and tested against.

A 64x64 frame shows a checkered floor (two tints picked by the world seed), a 3-pixel wall
around it, a few colored blocks (obstacles, placed by the seed) and the agent: a yellow 6x6
square the player moves 2 pixels per video frame with W/A/S/D (w up, s down, a left, d right;
opposite keys cancel). The agent stops at walls and blocks (each axis on its own, x first),
so it never covers anything and the next frame is a function of this frame and the keys.
Positions are whole pixels, so the frames show the exact state.

Everything is batched torch: `ArenaState` holds B worlds, `step` advances them by one video
frame, `render` draws them, so training (thousands of worlds on a GPU) and the tests (one world
on a CPU) use the same code. `render` also gives the ground truth the tests compare against:
the agent's position (`state.pos`, its top-left corner) for every frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SIZE = 64  # frame height and width in pixels
WALL = 3  # wall thickness; the agent moves inside [WALL, SIZE - WALL - AGENT]
AGENT = 6  # the agent's side
SPEED = 2  # pixels per video frame
NUM_BLOCKS = 4  # obstacles per world
KEYS = ("w", "s", "a", "d")  # the keyboard input's columns (Matrix-Game's universal order)
AGENT_COLOR = (1.0, 0.9, 0.1)  # the only yellow in the world: the detector looks for it
WALL_COLOR = (0.35, 0.35, 0.38)
FLOOR_TINTS = (
    ((0.20, 0.42, 0.24), (0.26, 0.50, 0.30)),  # grass
    ((0.45, 0.34, 0.24), (0.52, 0.40, 0.29)),  # dirt
    ((0.22, 0.30, 0.45), (0.28, 0.36, 0.52)),  # slate
    ((0.40, 0.40, 0.40), (0.47, 0.47, 0.47)),  # concrete
)
BLOCK_COLORS = (
    (0.85, 0.15, 0.15),  # red
    (0.15, 0.35, 0.90),  # blue
    (0.70, 0.20, 0.80),  # purple
    (0.10, 0.80, 0.80),  # cyan
    (0.95, 0.95, 0.95),  # white
)
TILE = 8  # floor checker size


@dataclass
class ArenaState:
    """B worlds: the agent's top-left corner, the obstacles and the floor (all int64 except colors)."""

    pos: torch.Tensor  # [B, 2] (x, y) of the agent's top-left pixel
    blocks: torch.Tensor  # [B, N, 4] (x0, y0, x1, y1), end exclusive
    block_colors: torch.Tensor  # [B, N, 3] float
    floor: torch.Tensor  # [B, 2, 3] float: the checker's two tints

    @property
    def batch(self) -> int:
        return self.pos.shape[0]

    def clone(self) -> ArenaState:
        return ArenaState(self.pos.clone(), self.blocks.clone(), self.block_colors.clone(), self.floor.clone())


def _overlaps(x: torch.Tensor, y: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """[B] whether an agent at (x, y) overlaps any block or leaves the floor."""
    x, y = x[:, None], y[:, None]
    hit = (x < blocks[..., 2]) & (x + AGENT > blocks[..., 0]) & (y < blocks[..., 3]) & (y + AGENT > blocks[..., 1])
    out = (x < WALL) | (y < WALL) | (x > SIZE - WALL - AGENT) | (y > SIZE - WALL - AGENT)
    return (hit | out).any(dim=1)


def new_worlds(seeds: list[int] | torch.Tensor, device: torch.device | str = "cpu") -> ArenaState:
    """One world per seed: floor tints, obstacles and the agent's start, each a function of its seed alone."""
    seeds = [int(s) for s in (seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds)]
    pos, blocks, colors, floors = [], [], [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed * 7919 + 17)
        tint = FLOOR_TINTS[int(torch.randint(len(FLOOR_TINTS), (1,), generator=g))]
        rects: list[list[int]] = []
        while len(rects) < NUM_BLOCKS:
            w, h = (int(v) for v in torch.randint(5, 11, (2,), generator=g))
            x0 = int(torch.randint(WALL + 4, SIZE - WALL - 4 - w, (1,), generator=g))
            y0 = int(torch.randint(WALL + 4, SIZE - WALL - 4 - h, (1,), generator=g))
            r = [x0, y0, x0 + w, y0 + h]
            # Keep a gap of an agent's width between blocks so no corridor traps it.
            if all(
                r[0] >= q[2] + AGENT or q[0] >= r[2] + AGENT or r[1] >= q[3] + AGENT or q[1] >= r[3] + AGENT
                for q in rects
            ):
                rects.append(r)
        pick = torch.randperm(len(BLOCK_COLORS), generator=g)[:NUM_BLOCKS]
        rect_t = torch.tensor(rects, dtype=torch.int64)
        while True:
            p = torch.randint(WALL, SIZE - WALL - AGENT + 1, (2,), generator=g)
            if not bool(_overlaps(p[:1], p[1:], rect_t[None])[0]):
                break
        pos.append(p)
        blocks.append(rect_t)
        colors.append(torch.tensor([BLOCK_COLORS[int(i)] for i in pick]))
        floors.append(torch.tensor(tint))
    return ArenaState(
        torch.stack(pos).to(device),
        torch.stack(blocks).to(device),
        torch.stack(colors).float().to(device),
        torch.stack(floors).float().to(device),
    )


def step(state: ArenaState, keys: torch.Tensor) -> ArenaState:
    """Advance one video frame: keys [B, 4] (w, s, a, d as 0/1); x moves first, then y; blocked moves stay."""
    k = (keys > 0.5).long()
    dx = (k[:, 3] - k[:, 2]) * SPEED
    dy = (k[:, 1] - k[:, 0]) * SPEED
    x, y = state.pos[:, 0], state.pos[:, 1]
    nx = x + dx
    x = torch.where(_overlaps(nx, y, state.blocks), x, nx)
    ny = y + dy
    y = torch.where(_overlaps(x, ny, state.blocks), y, ny)
    out = state.clone()
    out.pos = torch.stack([x, y], dim=1)
    return out


def render(state: ArenaState) -> torch.Tensor:
    """[B, 3, 64, 64] float32 frames in [0, 1]."""
    dev = state.pos.device
    b = state.batch
    ys = torch.arange(SIZE, device=dev).view(1, SIZE, 1)
    xs = torch.arange(SIZE, device=dev).view(1, 1, SIZE)
    checker = (((ys // TILE) + (xs // TILE)) % 2).expand(b, SIZE, SIZE)  # [B, H, W]
    img = torch.where(
        checker[:, None].bool(), state.floor[:, 1, :, None, None], state.floor[:, 0, :, None, None]
    ).clone()
    wall = (ys < WALL) | (ys >= SIZE - WALL) | (xs < WALL) | (xs >= SIZE - WALL)
    img = torch.where(wall[:, None], torch.tensor(WALL_COLOR, device=dev).view(1, 3, 1, 1), img)

    def rect(x0, y0, x1, y1):  # each [B]
        return (
            (xs >= x0.view(-1, 1, 1)) & (xs < x1.view(-1, 1, 1)) & (ys >= y0.view(-1, 1, 1)) & (ys < y1.view(-1, 1, 1))
        )

    for n in range(state.blocks.shape[1]):
        r = state.blocks[:, n]
        m = rect(r[:, 0], r[:, 1], r[:, 2], r[:, 3])
        img = torch.where(m[:, None], state.block_colors[:, n, :, None, None], img)
    x, y = state.pos[:, 0], state.pos[:, 1]
    agent = rect(x, y, x + AGENT, y + AGENT)
    img = torch.where(agent[:, None], torch.tensor(AGENT_COLOR, device=dev).view(1, 3, 1, 1), img)
    # A dark eye in the agent's middle: a feature the model must move with it, not only a color blob.
    eye = rect(x + 2, y + 2, x + 4, y + 4)
    img = torch.where(eye[:, None], torch.zeros(1, 3, 1, 1, device=dev), img)
    return img.float()


def rollout(state: ArenaState, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Play keys [B, T, 4] from `state`: frames [B, T, 3, 64, 64] after each frame's keys, positions [B, T, 2]."""
    frames, pos = [], []
    for t in range(keys.shape[1]):
        state = step(state, keys[:, t])
        frames.append(render(state))
        pos.append(state.pos)
    return torch.stack(frames, 1), torch.stack(pos, 1)


def palette() -> torch.Tensor:
    """[P, 3] every color the renderer draws: the agent's two (yellow, its black eye) first, then the static ones."""
    static = [WALL_COLOR] + [c for pair in FLOOR_TINTS for c in pair] + list(BLOCK_COLORS)
    return torch.tensor([AGENT_COLOR, (0.0, 0.0, 0.0), *static], dtype=torch.float32)


# Key sets an action script chooses from: none, single keys, and the four diagonals.
KEY_SETS = ((), ("w",), ("s",), ("a",), ("d",), ("w", "a"), ("w", "d"), ("s", "a"), ("s", "d"))
_KEY_SET_WEIGHTS = (1.0, 2.0, 2.0, 2.0, 2.0, 0.75, 0.75, 0.75, 0.75)


def random_actions(
    batch: int, frames: int, seed: int, persistence: float = 0.85, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Random key scripts [B, T, 4]: each frame keeps the last key set with probability `persistence`."""
    g = torch.Generator().manual_seed(seed)
    table = torch.zeros(len(KEY_SETS), 4)
    for i, ks in enumerate(KEY_SETS):
        for k in ks:
            table[i, KEYS.index(k)] = 1.0
    weights = torch.tensor(_KEY_SET_WEIGHTS)
    choice = torch.multinomial(weights, batch * frames, replacement=True, generator=g).view(batch, frames)
    keep = torch.rand(batch, frames, generator=g) < persistence
    keep[:, 0] = False
    idx = choice.clone()
    for t in range(1, frames):
        idx[:, t] = torch.where(keep[:, t], idx[:, t - 1], choice[:, t])
    return table[idx].to(device)


def loop_actions(frames: int, side_frames: int = 20) -> torch.Tensor:
    """The built-in script [T, 4]: d, s, a, w for `side_frames` frames each, round and round (a loop)."""
    out = torch.zeros(frames, 4)
    order = (KEYS.index("d"), KEYS.index("s"), KEYS.index("a"), KEYS.index("w"))
    for t in range(frames):
        out[t, order[(t // side_frames) % 4]] = 1.0
    return out


def detect_agent(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The agent's top-left corner read from frames [..., 3, H, W] by its color: (pos [..., 2] float, found [...] bool).

    Pixels close to the agent's yellow (the eye excluded) are averaged; the corner is their
    centroid minus half the agent's side. `found` is False where too few pixels look like it.
    """
    f = frames.float()
    col = torch.tensor(AGENT_COLOR, device=f.device).view(3, 1, 1)
    dist = (f - col).abs().amax(dim=-3)  # [..., H, W]
    w = (dist < 0.25).float()
    n = w.sum(dim=(-1, -2))
    ys = torch.arange(f.shape[-2], device=f.device, dtype=torch.float32).view(-1, 1)
    xs = torch.arange(f.shape[-1], device=f.device, dtype=torch.float32).view(1, -1)
    cx = (w * xs).sum(dim=(-1, -2)) / n.clamp(min=1)
    cy = (w * ys).sum(dim=(-1, -2)) / n.clamp(min=1)
    # The eye (2x2 at offset 2..3) is centered in the square, so the centroid of the rest is the square's center.
    half = (AGENT - 1) / 2
    pos = torch.stack([cx - half, cy - half], dim=-1)
    return pos, n >= 8
