"""Run a module as __main__ and print its main thread's whole stack every N seconds (stderr).

faulthandler prints at most 100 frames per thread, innermost first, so a deep recursion hides the
caller that started it; this prints the outermost frames and the innermost ones, with the depth.

    python bench/stack_watch.py SECONDS MODULE [ARGS...]
"""

from __future__ import annotations

import runpy
import sys
import threading
import time
import traceback


def _watch(period_s: float, main_id: int) -> None:
    while True:
        time.sleep(period_s)
        frame = sys._current_frames().get(main_id)
        if frame is None:
            return
        stack = traceback.extract_stack(frame)
        lines = [f"== stack_watch: {len(stack)} frames at {time.strftime('%H:%M:%S')}; outermost 45:"]
        lines += [f"  {f.filename}:{f.lineno} in {f.name}" for f in stack[:45]]
        lines.append("  innermost 8:")
        lines += [f"  {f.filename}:{f.lineno} in {f.name}" for f in stack[-8:]]
        print("\n".join(lines), file=sys.stderr, flush=True)


def main() -> None:
    period_s, module = float(sys.argv[1]), sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    threading.Thread(target=_watch, args=(period_s, threading.get_ident()), daemon=True).start()
    runpy.run_module(module, run_name="__main__")


if __name__ == "__main__":
    main()
