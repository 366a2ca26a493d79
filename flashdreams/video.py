"""Writing frames to a video file through PyAV (FFmpeg), H.264 in an MP4 by default."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from flashdreams.errors import InvalidArgumentError


class VideoWriter:
    """Append uint8 RGB frames [T, H, W, 3] block by block; `close()` finishes the file.

    Writes to a temporary name and renames at close, so an interrupted run leaves no
    half-written file that looks finished.
    """

    def __init__(self, path: str | os.PathLike, fps: float = 16.0, codec: str = "libx264", crf: int = 18) -> None:
        try:
            import av
        except ImportError:
            raise InvalidArgumentError("writing video needs PyAV: pip install 'flashdreams[video]'") from None
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.partial{self.path.suffix}")
        self._av = av
        self._container = av.open(str(self._tmp), mode="w")
        self._codec, self._crf, self._fps = codec, crf, fps
        self._stream = None
        self.frames_written = 0

    def _open_stream(self, height: int, width: int) -> None:
        if height % 2 or width % 2:
            raise InvalidArgumentError(f"H.264 needs even frame sizes; got {height}x{width}")
        try:
            stream = self._container.add_stream(self._codec, rate=round(self._fps))
        except (ValueError, self._av.error.FFmpegError):
            stream = self._container.add_stream("mpeg4", rate=round(self._fps))  # FFmpeg without x264
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if stream.codec_context.name == "libx264":
            stream.options = {"crf": str(self._crf)}
        self._stream = stream

    def write(self, frames: torch.Tensor | np.ndarray) -> None:
        """frames: uint8 [T, H, W, 3] (or one frame [H, W, 3])."""
        arr = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise InvalidArgumentError(f"frames must be uint8 [T, H, W, 3]; got {arr.dtype} {tuple(arr.shape)}")
        if self._stream is None:
            self._open_stream(arr.shape[1], arr.shape[2])
        for frame in arr:
            vf = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            for packet in self._stream.encode(vf):
                self._container.mux(packet)
            self.frames_written += 1

    def close(self) -> Path:
        if self._stream is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
        self._container.close()
        if self.frames_written == 0:
            self._tmp.unlink(missing_ok=True)
            raise InvalidArgumentError(f"no frames were written to '{self.path}'")
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._container.close()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_video(path: str | os.PathLike, blocks: Iterable[torch.Tensor], fps: float = 16.0) -> Path:
    """Write an iterable of uint8 [T, H, W, 3] blocks to `path`."""
    with VideoWriter(path, fps) as w:
        for frames in blocks:
            w.write(frames)
    return Path(path)


def read_video(path: str | os.PathLike) -> np.ndarray:
    """All frames of a video as uint8 [T, H, W, 3] (for tests and comparisons)."""
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
