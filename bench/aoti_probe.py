"""Does loading an AOTInductor package work on this GPU image? (suite part `aoti-probe`)

On the lent image (torch 2.11+cu130) loading any AOTInductor package segfaulted inside the loader
(re-probed 2026-11-25), so CUDA `aoti` engines are refused (export/backends/aoti.py) and the C ABI has
no Python-free path. This probe asks again, each step in a fresh process so a crash is a result:

1. torch alone: a two-layer MLP compiled with `aoti_compile_and_package` on CUDA, then loaded with
   `aoti_load_package` in another process and run (its output against eager);
2. ours: the tiny engine built with `fd-build --backend aoti --aoti-force` on CUDA, then loaded with
   FD_AOTI_FORCE=1 in another process, 4 blocks, latents against an eager session's.

Each step records its exit code (-11 / 139: SIGSEGV), seconds and the tail of its output.

    python bench/aoti_probe.py --out aoti.json [--work /tmp/aoti-probe]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

COMPILE_MLP = """
import sys, torch
from torch._inductor import aoti_compile_and_package
m = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).cuda().eval()
x = torch.randn(8, 256, device="cuda")
torch.save({"x": x.cpu(), "y": m(x).detach().cpu()}, sys.argv[2])
ep = torch.export.export(m, (x,))
print("packaged", aoti_compile_and_package(ep, package_path=sys.argv[1]))
"""

LOAD_MLP = """
import sys, torch
from torch._inductor import aoti_load_package
ref = torch.load(sys.argv[2], weights_only=True)
runner = aoti_load_package(sys.argv[1])
print("loaded")
y = runner(ref["x"].cuda())
y = y[0] if isinstance(y, (tuple, list)) else y
print("max_abs_diff", float((y.cpu() - ref["y"]).abs().max()))
"""

RUN_ENGINE = """
import sys, torch, flashdreams
eager = flashdreams.load(preset="tiny", device="cuda").session(seed=1)
want = [eager.step().latents.float().cpu() for _ in range(4)]
engine = flashdreams.load(sys.argv[1])
print("loaded", type(engine.backend).__name__)
s = engine.session(seed=1)
got = [s.step().latents.float().cpu() for _ in range(4)]
print("rel_l2", max(float((g - w).norm() / w.norm()) for g, w in zip(got, want)))
"""


def run(argv: list[str], limit: float, env: dict | None = None) -> dict:
    import os

    t0 = time.perf_counter()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=limit, env={**os.environ, **(env or {})})
        rc, out = p.returncode, (p.stdout + p.stderr)
    except subprocess.TimeoutExpired as exc:
        rc, out = "timeout", f"{exc.stdout or ''}{exc.stderr or ''}"
    return {"rc": rc, "s": round(time.perf_counter() - t0, 2), "tail": str(out)[-1500:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("aoti.json"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/aoti-probe"))
    a = ap.parse_args()
    import torch

    from flashdreams.benchmark.environment import environment

    if not torch.cuda.is_available():
        print("aoti_probe: needs a CUDA device", file=sys.stderr)
        return 2
    a.work.mkdir(parents=True, exist_ok=True)
    pkg, ref = str(a.work / "mlp.pt2"), str(a.work / "mlp_ref.pt")
    result: dict = {"environment": environment(torch.device("cuda"))}
    py = sys.executable
    result["mlp_compile"] = run([py, "-c", COMPILE_MLP, pkg, ref], 240)
    if result["mlp_compile"]["rc"] == 0:
        result["mlp_load"] = run([py, "-c", LOAD_MLP, pkg, ref], 120)
    engine = str(a.work / "tiny-aoti")
    build = [py, "-m", "flashdreams.cli.build", "--device", "cuda", "--backend", "aoti", "--aoti-force"]
    result["engine_build"] = run([*build, "--out", engine, "--force", "--no-progress"], 400)
    if result["engine_build"]["rc"] == 0:
        result["engine_load"] = run([py, "-c", RUN_ENGINE, engine], 180, {"FD_AOTI_FORCE": "1"})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    for step in ("mlp_compile", "mlp_load", "engine_build", "engine_load"):
        if step in result:
            r = result[step]
            print(f"{step:13s} rc {r['rc']!s:8s} {r['s']:7.1f} s  {r['tail'].strip().splitlines()[-1:]}")
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
