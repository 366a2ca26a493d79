"""fd-parity: run one reference fixture directory and print each output's error."""

from __future__ import annotations

import argparse
import sys

from flashdreams.cli.options import flag_message
from flashdreams.errors import FlashDreamsError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fd-parity",
        description=(
            "Run a parity fixture (a directory with fixture.json, io.safetensors and the weights, "
            "made from the public reference implementations) through FlashDreams and compare every "
            "expected and debug tensor by rel. L2 error against the fixture's tolerance. Exits 0 "
            "only if all pass."
        ),
        epilog='example: fd-parity "$FD_FIXTURES/causal_wan_rollout_rolling_sink" --attention triton',
    )
    p.add_argument("fixture", help="fixture directory")
    p.add_argument(
        "--attention",
        default="sdpa",
        choices=["sdpa", "triton"],
        help="attention/norm implementation for DiT fixtures (triton on CPU needs TRITON_INTERPRET=1)",
    )
    p.add_argument("--device", default="cpu", help="device to run on (fixtures are float32 references; default cpu)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from flashdreams.parity import run_fixture

    try:
        fixture, checks = run_fixture(args.fixture, attention=args.attention, device=args.device)
    except FlashDreamsError as exc:
        print(f"fd-parity: {flag_message(str(exc), parser)}", file=sys.stderr)
        return 2
    if not checks:
        print(
            f"fd-parity: {args.fixture}: the runner compared nothing (no checks); that is a failure, not a pass",
            file=sys.stderr,
        )
        return 1
    print(report(checks))
    failed = [c for c in checks if not c.passed]
    summary = f"{fixture.path.name} ({fixture.kind}): {len(checks) - len(failed)}/{len(checks)} passed"
    print(summary if not failed else summary + f"; failing: {', '.join(c.name for c in failed)}")
    return 0 if not failed else 1


def report(checks) -> str:
    """One line per check: ok/FAIL, name, rel. L2 against its tolerance, role, and why it failed if it says."""
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for c in checks:
        mark = "ok  " if c.passed else "FAIL"
        line = f"{mark} {c.name:<{width}}  rel_l2 {c.rel_l2:.3e}  tol {c.tolerance:.0e}  [{c.role}]"
        if c.reason:
            line += f"  {c.reason}"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
