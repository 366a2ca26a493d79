"""FlashVSR (issue 20) and OmniDreams / Cosmos (issue 16) measurements, item by item, for a GPU call with a hard limit.

Runs the measurement functions of bench/flashvsr_bench.py and bench/omnidreams_bench.py (the same code,
not a copy), one item at a time, in the order given: each item under its own time cap (SIGALRM; the
shell's `timeout` is the hard stop), a failing item recorded and skipped, and the JSON rewritten after
every item, so a crash or a kill keeps what was measured before it.

items:
  vsr-stream:PRESET   steady output FPS of one FlashVSR session (flashvsr, flashvsr-faster,
                      flashvsr-dense, flashvsr-1080p, flashvsr-tiny)
  vsr-attn:PRESET     the block-sparse kernel vs dense SDPA at the preset's steady shape
  vsr-chain           Self-Forcing 1.3B -> FlashVSR 2x, combined FPS
  omnidreams          OmniDreams single view at 704x1280: frames-out and whole-chunk ms (tiny: omnidreams-sv-tiny)
  cosmos              Cosmos-Predict2.5 2B: one CFG evaluation, TFLOP/s vs the matmul peak measured here

    python bench/family_parts.py --out $OUT/x/fam.json --budget-s 400 vsr-stream:flashvsr vsr-attn:flashvsr omnidreams
    python bench/family_parts.py --device cpu --tiny --out /tmp/fam.json vsr-stream:flashvsr-tiny omnidreams cosmos
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
import traceback
from pathlib import Path

CAPS = {"vsr-stream": 110, "vsr-attn": 60, "vsr-chain": 120, "omnidreams": 150, "cosmos": 240}


class ItemTimeout(Exception):
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise ItemTimeout("item cap reached")


def _clean(x):
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("items", nargs="+")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny presets (CPU smoke)")
    ap.add_argument("--attention", default="triton", help="FlashVSR attention (triton|sdpa)")
    ap.add_argument("--omni-attention", default="sdpa", help="OmniDreams / Cosmos attention (sdpa|triton|fa4)")
    ap.add_argument("--blocks", type=int, default=12, help="FlashVSR steady blocks; chain world blocks")
    ap.add_argument("--chunks", type=int, default=12, help="OmniDreams timed chunks")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=1e9)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t_start = time.perf_counter()
    sys.path.insert(0, str(Path(__file__).resolve().parent))

    import torch

    from flashdreams.benchmark.environment import environment, measure_ceilings

    device = torch.device(args.device)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    res: dict = {
        "measured_by": "bench/family_parts.py (functions of bench/flashvsr_bench.py, bench/omnidreams_bench.py)",
        "args": vars(args),
        "environment": environment(device),
        "items": {},
        "failed": {},
        "skipped": [],
    }

    def write() -> None:
        out_path.write_text(json.dumps(_clean(res), indent=1))

    def ceilings() -> dict:
        if "ceilings" not in res:
            res["ceilings"] = measure_ceilings(device, dtype, quick=args.tiny)
        return res["ceilings"]

    def run_item(item: str):
        kind, _, arg = item.partition(":")
        cg = device.type == "cuda"
        if kind.startswith("vsr"):
            import flashvsr_bench as fb

            preset = None
            if arg:
                if arg == "flashvsr-dense":
                    preset = fb.PRESET["flashvsr"].replace(name="flashvsr-dense", attention_mode="dense")
                else:
                    preset = fb.PRESET[arg]
            if kind == "vsr-stream":
                return fb.stream_fps(preset, device, dtype, args.attention, args.blocks, cg)
            if kind == "vsr-attn":
                return fb.attention_rate(preset, device, dtype, args.reps)
            if kind == "vsr-chain":
                return fb.chain_fps(device, dtype, args.attention, args.blocks)
        import omnidreams_bench as ob

        if kind == "omnidreams":
            preset = "omnidreams-sv-tiny" if args.tiny else "omnidreams-sv"
            return ob.omnidreams(preset, device, dtype, args.omni_attention, args.chunks, cg)
        if kind == "cosmos":
            preset = "cosmos-predict2.5-tiny" if args.tiny else "cosmos-predict2.5-2b"
            return ob.cosmos(preset, device, dtype, args.omni_attention, args.reps, ceilings()["matmul_tflops"])
        raise ValueError(f"unknown item {item!r}")

    signal.signal(signal.SIGALRM, _alarm)
    write()
    for item in args.items:
        cap = CAPS.get(item.partition(":")[0], 120)
        left = args.budget_s - (time.perf_counter() - t_start)
        if left < min(cap, 45):
            res["skipped"].append({"item": item, "seconds_left": left})
            print(f"family_parts: {item} skipped ({left:.0f} s left)", flush=True)
            continue
        t = time.perf_counter()
        signal.alarm(int(max(5, min(cap, left - 5))))
        try:
            r = run_item(item)
            signal.alarm(0)
            r = dict(r)
            r["item_wall_s"] = time.perf_counter() - t
            res["items"][item] = r
            print(f"family_parts: {item} ({r['item_wall_s']:.0f} s): {json.dumps(_clean(r))[:1500]}", flush=True)
        except BaseException as exc:  # noqa: BLE001 - an item that breaks or overruns costs only itself
            signal.alarm(0)
            if isinstance(exc, KeyboardInterrupt):
                raise
            res["failed"][item] = {
                "error": f"{type(exc).__name__}: {exc}"[:2000],
                "trace": traceback.format_exc()[-3000:],
                "seconds": time.perf_counter() - t,
            }
            print(
                f"family_parts: {item} FAILED after {time.perf_counter() - t:.0f} s: {type(exc).__name__}: "
                f"{str(exc)[:400]}",
                flush=True,
            )
        if device.type == "cuda":
            import gc

            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        write()
    write()
    print(
        f"family_parts: wrote {out_path} ({len(res['items'])} measured, {len(res['failed'])} failed, "
        f"{len(res['skipped'])} skipped) in {time.perf_counter() - t_start:.0f} s"
    )
    return 0 if not res["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
