"""Summarise a cProfile file: the functions that took the most time, by cumulative and by own time.

    python bench/profile_summary.py PROFILE [--top N]

Used by the suite's cold-profile part to say where a cold start's seconds go (imports, kernel
loading, first calls) without carrying the raw profile back from the device machine.
"""

from __future__ import annotations

import argparse
import io
import pstats


def summary(path: str, top: int, callees: list[str], callers: list[str] = ()) -> str:
    """The profile's total, its top functions by cumulative and by own time, what the functions
    matching each `callees` pattern spent their time in and who called those matching `callers`,
    as text."""
    out = io.StringIO()
    stats = pstats.Stats(path, stream=out)
    out.write(f"total {stats.total_tt:.2f} s in {stats.total_calls} calls\n\n== by cumulative time\n")
    stats.sort_stats("cumulative").print_stats(top)
    out.write("\n== by own time\n")
    stats.sort_stats("tottime").print_stats(top)
    for pattern in callees:
        out.write(f"\n== what {pattern!r} called\n")
        stats.sort_stats("cumulative").print_callees(pattern)
    for pattern in callers:
        out.write(f"\n== who called {pattern!r}\n")
        stats.sort_stats("cumulative").print_callers(pattern)
    return out.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", help="a file written by python -m cProfile -o FILE")
    ap.add_argument("--top", type=int, default=60, help="how many functions in each list (default 60)")
    ap.add_argument(
        "--callees", action="append", default=[], metavar="REGEX", help="also list what the matching functions called"
    )
    ap.add_argument(
        "--callers", action="append", default=[], metavar="REGEX", help="also list who called the matching functions"
    )
    args = ap.parse_args()
    print(summary(args.profile, args.top, args.callees, args.callers))


if __name__ == "__main__":
    main()
