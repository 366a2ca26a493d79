"""Writing frames to a video file through PyAV (FFmpeg), H.264 in an MP4 by default; reading one as a stream."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from flashdreams.errors import InvalidArgumentError, NotFoundError

# Containers the writer knows, by suffix, with the codecs it tries in order (the first FFmpeg has).
CODECS: dict[str, tuple[str, ...]] = {
    ".mp4": ("libx264", "mpeg4"),
    ".m4v": ("libx264", "mpeg4"),
    ".mov": ("libx264", "mpeg4"),
    ".mkv": ("libx264", "mpeg4"),
    ".avi": ("libx264", "mpeg4"),
    ".webm": ("libvpx-vp9", "libvpx"),
}


def frame_rate(fps: float | Fraction) -> Fraction:
    """`fps` as an exact Fraction (7.5 -> 15/2, 29.97 -> 2997/100, 24000/1001 stays); refuses <= 0, NaN, inf."""
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)):
        raise InvalidArgumentError(f"frame rate must be a number, got {type(fps).__name__}")
    if isinstance(fps, float) and not math.isfinite(fps) or fps <= 0:
        raise InvalidArgumentError(f"frame rate must be a positive number of frames per second, got {fps}")
    rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise InvalidArgumentError(f"frame rate {fps} is too small to write (under 1 frame per 1001 s)")
    return rate


def check_video_path(path: str | os.PathLike) -> Path:
    """Refuse, before any work, a video path that cannot be written: an unknown suffix, a
    missing or read-only folder, or a directory in the way. Creates nothing."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in CODECS:
        raise InvalidArgumentError(
            f"cannot write a video to '{p}': use one of the suffixes {', '.join(CODECS)} (the suffix picks the format)"
        )
    check_writable(p)
    return p


def check_writable(path: str | os.PathLike) -> Path:
    """Refuse a file path whose folder is missing or not writable, or that names a directory."""
    p = Path(path)
    folder = p.parent
    if p.is_dir():
        raise InvalidArgumentError(f"'{p}' is a directory; give a file name")
    if not folder.is_dir():
        raise InvalidArgumentError(f"the folder '{folder}' of '{p}' does not exist; create it or pick another path")
    try:  # a real write, since os.access says yes to root on read-only file systems
        import tempfile

        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{p.name}.probe-"):
            pass
    except OSError as exc:
        raise InvalidArgumentError(
            f"cannot write into the folder '{folder}' ({exc.strerror or exc}); pick another path"
        ) from None
    return p


class VideoWriter:
    """Append uint8 RGB frames [T, H, W, 3] block by block; `close()` finishes the file.

    Writes to a temporary name and renames at close, so an interrupted run leaves no
    half-written file that looks finished.
    """

    def __init__(
        self, path: str | os.PathLike, fps: float | Fraction = 16.0, codec: str | None = None, crf: int = 18
    ) -> None:
        """`fps` is kept exactly (7.5 writes a 15/2 stream); `codec` defaults to the suffix's (H.264 for
        .mp4/.mkv/.mov, VP9 for .webm)."""
        try:
            import av
        except ImportError:
            raise InvalidArgumentError("writing video needs PyAV: pip install 'flashdreams[video]'") from None
        self.path = Path(path)
        self.rate = frame_rate(fps)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.partial{self.path.suffix}")
        self._av = av
        self._container = av.open(str(self._tmp), mode="w")
        default = CODECS.get(self.path.suffix.lower(), ("libx264", "mpeg4"))
        self._codecs = (codec,) if codec else default
        self._crf = crf
        self._stream = None
        self.frames_written = 0

    def _open_stream(self, height: int, width: int) -> None:
        if height % 2 or width % 2:
            raise InvalidArgumentError(f"video frames need even sizes (yuv420p); got {height}x{width}")
        stream, errors = None, []
        for name in self._codecs:  # e.g. mpeg4 on an FFmpeg built without x264
            try:
                stream = self._container.add_stream(name, rate=self.rate)
                break
            except (ValueError, self._av.error.FFmpegError) as exc:
                errors.append(f"{name}: {exc}")
        if stream is None:
            raise InvalidArgumentError(f"cannot encode '{self.path.name}' here: {'; '.join(errors)}")
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if stream.codec_context.name in ("libx264", "libvpx-vp9", "libvpx"):
            opts = {"crf": str(self._crf)}
            if stream.codec_context.name != "libx264":
                opts["b"] = "0"  # VP8/9: constant quality
            stream.options = opts
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


def _open_input(path: str | os.PathLike):
    try:
        import av
    except ImportError:
        raise InvalidArgumentError("reading video needs PyAV: pip install 'flashdreams[video]'") from None
    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"input video '{p}' does not exist")
    try:
        return av.open(str(p))
    except av.error.FFmpegError as exc:
        raise InvalidArgumentError(f"cannot read '{p}' as a video: {exc}") from None


def video_rate(path: str | os.PathLike, default: float = 16.0) -> Fraction:
    """The average frame rate of a video file's first video stream (`default` if it states none)."""
    with _open_input(path) as c:
        if not c.streams.video:
            raise InvalidArgumentError(f"'{path}' has no video stream")
        rate = c.streams.video[0].average_rate
    return Fraction(rate) if rate else frame_rate(default)


def video_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of a video file's first video stream."""
    with _open_input(path) as c:
        if not c.streams.video:
            raise InvalidArgumentError(f"'{path}' has no video stream")
        stream = c.streams.video[0]
        return stream.height, stream.width


def iter_video(path: str | os.PathLike, frames_per_block: int = 8) -> Iterator[torch.Tensor]:
    """The frames of a video file as uint8 [1, n, H, W, 3] blocks of `frames_per_block` (the last may be
    shorter), decoded as they are read, so a long video never sits in memory whole."""
    with _open_input(path) as c:
        if not c.streams.video:
            raise InvalidArgumentError(f"'{path}' has no video stream")
        block: list[torch.Tensor] = []
        for frame in c.decode(video=0):
            block.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
            if len(block) == frames_per_block:
                yield torch.stack(block)[None]
                block = []
        if block:
            yield torch.stack(block)[None]
