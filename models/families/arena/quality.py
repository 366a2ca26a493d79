"""How well a generated arena rollout follows the renderer: the measures the CI tests and the training log report.

The agent's place is read from the frames by its color (world.detect_agent), in generated and
rendered frames alike, at the last frame of every block. Per block:
  * position error: |detected - true| / the span the agent can move in (52 px), averaged;
  * direction: in blocks where the true agent moved, the detected move points the same way
    (cosine between the two moves > 0.5, i.e. within 60 degrees);
  * PSNR of the generated frames against the rendered ones (first `psnr_blocks` blocks);
  * frame statistics (mean, std) for the stability band.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashdreams.models.families.arena import world

SPAN = world.SIZE - 2 * world.WALL - world.AGENT  # how far the agent's corner can travel along an axis


@dataclass
class Quality:
    pos_err: float  # mean over blocks, fraction of SPAN
    direction: float  # fraction of moving blocks with the right direction
    moving_blocks: int
    found: float  # fraction of block-end frames where the agent was detected
    psnr: float  # dB over the first psnr_blocks blocks

    def to_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def measure(
    generated: torch.Tensor, rendered: torch.Tensor, start: torch.Tensor, frames_per_block: int, psnr_blocks: int = 8
) -> Quality:
    """generated/rendered: float [T, 3, H, W] in [0, 1] (T = blocks * F); start: the start frame [3, H, W]."""
    f = frames_per_block
    gen_pos, found = world.detect_agent(generated[f - 1 :: f])
    true_pos, _ = world.detect_agent(rendered[f - 1 :: f])
    start_pos, _ = world.detect_agent(start[None])
    err = (gen_pos - true_pos).norm(dim=-1) / SPAN
    d_true = true_pos - torch.cat([start_pos, true_pos[:-1]])
    d_gen = gen_pos - torch.cat([start_pos, gen_pos[:-1]])
    moving = d_true.norm(dim=-1) > 0.5
    cos = (d_true * d_gen).sum(-1) / (d_true.norm(dim=-1) * d_gen.norm(dim=-1)).clamp(min=1e-6)
    right = (cos > 0.5) & moving
    n = min(psnr_blocks * f, generated.shape[0])
    mse = ((generated[:n].float() - rendered[:n].float()) ** 2).mean(dim=(1, 2, 3)).clamp(min=1e-10)
    return Quality(
        pos_err=float(err.mean()),
        direction=float(right.sum()) / max(1, int(moving.sum())),
        moving_blocks=int(moving.sum()),
        found=float(found.float().mean()),
        psnr=float((10 * torch.log10(1.0 / mse)).mean()),
    )


def frame_stats(frames: torch.Tensor) -> tuple[float, float]:
    """(mean, std) of float frames in [0, 1]: the stability band compares these with the renderer's."""
    x = frames.float()
    return float(x.mean()), float(x.std())
