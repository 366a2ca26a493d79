"""FlashAttention-4's sm90 forward at Self-Forcing's ring-attention shape, over its tile choices (issue 22).

The package picks 128x128 tiles with the PV matmul fed from registers and intra-warpgroup
overlap for head dim 128 (`select_sm90_tile`); FlashAttention-3's C++ kernel uses 128x176 for
non-causal attention at that head dim. This sweeps the tile (and the two sm90 flags) through the
package's forward entry point with the ring's length on the device (`seqused_k`), each timed as
a CUDA-graph replay (L2 wiped before each call, median), each checked against cuDNN's output on
the same data. The default row is what `ring_attention_fa4` runs today.

    python bench/fa4_sweep.py --out fa4-sweep.json      # H200, flash-attn-4 installed: ~1-2 min
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_bench import Recorder, attempt, make_timer, rms_normed  # noqa: E402

from flashdreams.benchmark.environment import environment  # noqa: E402
from flashdreams.kernels.fa4_attention import fa4_unavailable_reason  # noqa: E402
from flashdreams.numerics import rel_l2  # noqa: E402

LQ, HEADS, D, CAPACITY = 4680, 12, 128, 32760
KVS = (4680, 18720, 28080, 32760)
# (tile_m, tile_n, mma_pv_is_rs, intra_wg_overlap, num_splits); None: the package's own choice.
CONFIGS = [
    None,
    (128, 176, True, True, 1),
    (128, 192, True, True, 1),
    (128, 160, True, True, 1),
    (128, 144, True, True, 1),
    (128, 112, True, True, 1),
    (128, 128, False, True, 1),
    (128, 128, True, True, 2),
    (128, 176, True, True, 2),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON to write (rewritten after every measurement)")
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop starting new measurements after this")
    args = ap.parse_args()
    rec = Recorder(Path(args.out))
    rec.put("env", environment(torch.device("cuda")) if torch.cuda.is_available() else {})
    reason = fa4_unavailable_reason("cuda")
    if reason:
        print(f"fa4_sweep: FlashAttention-4 cannot run: {reason}", file=sys.stderr)
        rec.put("error", reason)
        return 2
    from flash_attn.cute.interface import _flash_attn_fwd

    deadline = time.time() + args.budget_s
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    q = rms_normed((1, LQ, HEADS, D), g, dev).to(torch.bfloat16)
    kc = rms_normed((1, CAPACITY, HEADS, D), g, dev).to(torch.bfloat16)
    vc = torch.randn(1, CAPACITY, HEADS, D, device=dev, generator=g).to(torch.bfloat16)
    scale = 1.0 / math.sqrt(D)
    ms = make_timer(False)
    rec.put("shape", {"lq": LQ, "heads": HEADS, "head_dim": D, "capacity": CAPACITY, "kvs": list(KVS)})

    def call(cfg, used):
        if cfg is None:
            return _flash_attn_fwd(q, kc, vc, seqused_k=used, softmax_scale=scale)[0]
        tm, tn, rs, ol, splits = cfg
        return _flash_attn_fwd(
            q, kc, vc, seqused_k=used, softmax_scale=scale, tile_mn=(tm, tn), mma_pv_is_rs=rs,
            intra_wg_overlap=ol, num_splits=splits,
        )[0]  # fmt: skip

    rows = []
    refs = {}
    for kv in KVS:
        qt = q.transpose(1, 2)
        refs[kv] = F.scaled_dot_product_attention(qt, kc[:, :kv].transpose(1, 2), vc[:, :kv].transpose(1, 2))
        refs[kv] = refs[kv].transpose(1, 2).float()
    for cfg in CONFIGS:
        row: dict = {
            "config": "default" if cfg is None else dict(zip(("tile_m", "tile_n", "rs", "overlap", "splits"), cfg))
        }
        for kv in KVS:
            if time.time() > deadline:
                row[str(kv)] = {"skipped": "time budget"}
                continue
            used = torch.tensor([kv], device=dev, dtype=torch.int32)

            def one(cfg=cfg, used=used, kv=kv) -> dict:
                err = rel_l2(call(cfg, used).float(), refs[kv])
                t = ms(lambda: call(cfg, used))
                return {
                    "ms": t,
                    "tflops": 4.0 * LQ * kv * D * HEADS / t / 1e9,
                    "rel_l2_vs_cudnn": err,
                    "ok": err < 1e-2,
                }

            row[str(kv)] = attempt(one)
        rows.append(row)
        rec.put("sweep", rows)
        cells = " ".join(
            f"{row[str(kv)].get('tflops', float('nan')):6.1f}" + ("" if row[str(kv)].get("ok", True) else "!")
            for kv in KVS
        )
        errs = [row[str(kv)]["error"] for kv in KVS if "error" in row[str(kv)]]
        print(f"{json.dumps(row['config']):<75} TFLOP/s at kv {list(KVS)}: {cells} {errs[0][:120] if errs else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
