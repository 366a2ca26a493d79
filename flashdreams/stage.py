"""FlashVSR as a stage after any frame source: a FIFO that turns a stream of frames into VSR blocks.

A world session hands out uint8 frames [B, T, H, W, 3] per block (9, then 12 for Self-Forcing);
a FlashVSR session takes 25 LQ frames for its first block and 8 for every later one. `Upscaler`
queues the world's frames (centre-cropped or zero-padded to the VSR's LQ size, as the
release's loader fits a video), steps the VSR session whenever a block's worth is queued, and
hands back the upscaled frames in order. `flush()` ends a stream the reference's way: copies
of the last frame are appended until every real frame has come out, and the extra output is
dropped.

It only calls `set_input`, `step` and `plan.meta["frame_input"]` (the input's name, frames of
the first and later blocks, LQ size) on the session it is given, so any family whose plan takes a
frame stream (FlashVSR today) works as a stage; fd-run's --input and --upscale use it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from flashdreams.errors import InvalidArgumentError


def fit_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, T, H, W, 3] -> [B, T, height, width, 3]: centre crop where larger, centred zero pad where smaller."""
    h, w = frames.shape[2:4]
    top, left = max(0, (h - height) // 2), max(0, (w - width) // 2)
    frames = frames[:, :, top : top + height, left : left + width]
    h, w = frames.shape[2:4]
    if (h, w) != (height, width):
        pt, pl = (height - h) // 2, (width - w) // 2
        frames = F.pad(frames, (0, 0, pl, width - w - pl, pt, height - h - pt))
    return frames


class Upscaler:
    """Feed frames in with `push` (any number per call); get the upscaled frames out, in order."""

    def __init__(self, vsr_session) -> None:
        spec = vsr_session.plan.meta.get("frame_input")
        if spec is None:
            raise InvalidArgumentError("Upscaler needs a session whose plan takes a frame stream (meta 'frame_input')")
        self.vsr = vsr_session
        self.name = spec["name"]
        self.lq_hw = (spec["height"], spec["width"])
        self.first, self.steady = spec["first"], spec["steady"]
        self.queue: list[torch.Tensor] = []  # frames [B, 1, h, w, 3], oldest first
        self.pushed = 0
        self.emitted = 0
        self.last: torch.Tensor | None = None  # the newest pushed frame, repeated by flush()
        self.blocks = 0

    def _need(self) -> int:
        return self.first if self.blocks == 0 else self.steady

    def push(self, frames: torch.Tensor) -> list[torch.Tensor]:
        """Queue frames [B, T, H, W, 3] (uint8, or floats 0..255); returns the upscaled blocks now ready."""
        if frames.dim() != 5 or frames.shape[-1] != 3:
            raise InvalidArgumentError(f"Upscaler.push: frames must be [B, T, H, W, 3], got {list(frames.shape)}")
        fitted = fit_frames(frames, *self.lq_hw)
        self.queue.extend(fitted.split(1, dim=1))
        self.pushed += frames.shape[1]
        if frames.shape[1]:
            self.last = fitted[:, -1:]
        out = []
        while len(self.queue) >= self._need():
            out.append(self._step())
        return out

    def _step(self) -> torch.Tensor:
        n = self._need()
        lq = torch.cat(self.queue[:n], dim=1).float()
        del self.queue[:n]
        self.vsr.set_input(self.name, lq)
        frames = self.vsr.step().frames
        self.blocks += 1
        if frames is None:
            raise InvalidArgumentError("Upscaler: the FlashVSR session has no decoder, so it makes no frames")
        self.emitted += frames.shape[1]
        return frames

    def flush(self) -> list[torch.Tensor]:
        """End of stream: repeat the last frame until all pushed frames are out; trims the padding's output."""
        out = []
        while self.emitted < self.pushed:
            while len(self.queue) < self._need():
                self.queue.append(self.last)
            block = self._step()
            out.append(block[:, : block.shape[1] - max(0, self.emitted - self.pushed)])
        return out


def upscale(frame_blocks: Iterator[torch.Tensor], vsr_session) -> Iterator[torch.Tensor]:
    """Upscale a stream of frame blocks (e.g. a world session's `step().frames`) as they come."""
    up = Upscaler(vsr_session)
    for frames in frame_blocks:
        yield from up.push(frames)
    yield from up.flush()
