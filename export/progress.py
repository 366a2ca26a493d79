"""fd-build's progress: a bar on a terminal, plain lines in a log.

A tqdm bar redraws itself with carriage returns; written to a file or a pipe (a CI log, a GPU
script's `| tee`), every redraw stays in the text as one long line of `\\r`-separated states.
So the bar is drawn only when the stream is a terminal; otherwise each phase is one line:

    fd-build: [3/9] compile dit (12.4 s)

with the seconds since the build started, and a last line when the build ends. A total not
known yet (before the model is loaded, the number of graphs is not) is passed as 0 and shown as
`?`, so the count never changes under the reader: `[1/?] load model`, then `[2/9] hash weights`.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def is_terminal(stream: TextIO) -> bool:
    """Whether `stream` is an interactive terminal (a closed or odd stream counts as not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class PhaseProgress:
    """`progress(phase, index, total)` for `build_engine`: a tqdm bar on a terminal, else one line a phase.
    `total` 0: not known yet.

    `bar=None` decides from the stream; `disable` prints nothing at all (`--no-progress`).
    """

    def __init__(
        self, disable: bool = False, stream: TextIO | None = None, bar: bool | None = None, prefix: str = "fd-build"
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.disable = disable
        self.use_bar = is_terminal(self.stream) if bar is None else bar
        self.prefix = prefix
        self.t0 = time.perf_counter()
        self.total = 0
        self.started = False  # a phase was shown: close() ends the log with a line
        self.bar = None
        self.closed = False

    def __call__(self, phase: str, index: int, total: int) -> None:
        if self.disable:
            return
        self.total = total
        self.started = True
        if not self.use_bar:
            elapsed = time.perf_counter() - self.t0
            shown = total if total > 0 else "?"
            print(f"{self.prefix}: [{index + 1}/{shown}] {phase} ({elapsed:.1f} s)", file=self.stream, flush=True)
            return
        if self.bar is None:
            from tqdm import tqdm

            fmt = "{l_bar}{bar}| {n}/{total} [{elapsed}]"
            self.bar = tqdm(total=total or None, unit="phase", file=self.stream, bar_format=fmt)
        self.bar.total = total or None
        self.bar.n = index
        self.bar.set_description(f"{self.prefix}: {phase}")
        self.bar.refresh()

    def close(self, ok: bool = True) -> None:
        """End the display: the bar filled (ok) or left where it stopped; in a log, a last line."""
        if self.disable or self.closed:
            return
        self.closed = True
        if self.bar is not None:
            if ok and self.bar.total:
                self.bar.n = self.bar.total
                self.bar.refresh()
            self.bar.close()
        elif not self.use_bar and self.started:
            state = "done" if ok else "stopped"
            print(f"{self.prefix}: {state} in {time.perf_counter() - self.t0:.1f} s", file=self.stream, flush=True)
