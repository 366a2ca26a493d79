"""fd-parity: run one reference fixture directory and print each output's error."""

from __future__ import annotations

import argparse
import sys

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
        epilog="example: fd-parity ../shared/fixtures/causal_wan_rollout_rolling_sink --attention triton",
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
    args = build_parser().parse_args(argv)
    from flashdreams.parity import run_fixture

    try:
        fixture, checks = run_fixture(args.fixture, attention=args.attention, device=args.device)
    except FlashDreamsError as exc:
        print(f"fd-parity: {exc}", file=sys.stderr)
        return 2
    width = max(len(c.name) for c in checks)
    for c in checks:
        mark = "ok  " if c.passed else "FAIL"
        print(f"{mark} {c.name:<{width}}  rel_l2 {c.rel_l2:.3e}  tol {c.tolerance:.0e}  [{c.role}]")
    failed = [c for c in checks if not c.passed]
    summary = f"{fixture.path.name} ({fixture.kind}): {len(checks) - len(failed)}/{len(checks)} passed"
    print(summary if not failed else summary + f"; failing: {', '.join(c.name for c in failed)}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
