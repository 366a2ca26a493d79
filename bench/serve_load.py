"""fd-serve on this machine: frames per second per session for 1, 2 and 4 concurrent Python-client
sessions, and input-to-present latency (p50/p99) measured in a headless browser.

    python bench/serve_load.py                       # the default world -> bench/results/serve-cpu/<preset>.json
    python bench/serve_load.py --preset tiny --seconds 20
    python bench/serve_load.py --device cuda --preset self-forcing-1.3b --no-browser --client-latency \
        --serve-args "--random-weights --attention triton --decoder taehv" --out bench/results/serve-h200

The server is a separate `fd-serve` process (as in use: clients do not share its interpreter). Clients
acknowledge frames on arrival, so the fps numbers are the server's pace (stepping all sessions in turn
on one worker thread), not the page's playback rate. The browser latency is the page's own
measure: from sending an input (a key press, a new prompt) to showing the first frame whose block saw it,
with the page playing at the model's frame rate and the server one block ahead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from flashdreams.cli.serve import default_world
from flashdreams.client import Client

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
CHROMIUM_ARGS += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(p * len(s)))], 1)


class Served:
    """`fd-serve` in a subprocess; `.url` from its first line of output."""

    def __init__(self, preset: str, max_sessions: int, device: str = "cpu", extra: list[str] | None = None) -> None:
        argv = [sys.executable, "-m", "flashdreams.cli.serve", "--preset", preset, "--device", device]
        argv += ["--port", "0", "--max-sessions", str(max_sessions), *(extra or [])]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self.proc.kill()
            raise RuntimeError(f"fd-serve did not start (first line {self.url!r})")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def raw_block_ms(preset: str, blocks: int = 4, device: str = "cpu", load_kw: dict | None = None) -> float:
    """The model's own block time here and now (no server): this machine's load moves it a lot."""
    import flashdreams

    session = flashdreams.load(preset=preset, device=device, **(load_kw or {})).session(seed=0)
    session.step()
    times = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        session.step().frames_cpu()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 1)


def client_fps(srv: Served, n: int, seconds: float) -> dict:
    """n concurrent sessions for `seconds`: frames/s each, after each one's first frame."""
    out: dict[int, dict] = {}

    def run(i: int) -> None:
        with Client(srv.url, seed=i) as c:
            first = c.next_frame(timeout=120)
            count, t0 = 0, first.received
            end = time.monotonic() + seconds
            last = first
            while time.monotonic() < end:
                last = c.next_frame(timeout=120)
                count += 1
                assert last.index == first.index + count, "frames out of order"
            out[i] = {"frames": count, "fps": round(count / max(1e-9, last.received - t0), 2)}

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fps = [v["fps"] for v in out.values()]
    return {"sessions": n, "fps_per_session": fps, "fps_mean": round(statistics.mean(fps), 2)}


def client_latency(srv: Served, seconds: float) -> dict:
    """Input to frame at a Python client (no browser here): every ~0.5 s a new random value of the first
    per-block input (0/1 pattern where it has a range, e.g. keys; normal draws otherwise, e.g. a prompt);
    the time from sending it to receiving the first frame of a block that applied it."""
    import numpy as np

    lat = []
    with Client(srv.url, seed=0) as c:
        spec = next(s for s in c.specs if s["when"] == "block")
        rng = np.random.default_rng(0)
        c.next_frame(timeout=300)
        end, k = time.monotonic() + seconds, 0
        while time.monotonic() < end:
            if spec.get("low") is not None and spec.get("high") is not None:
                value = np.where(rng.random(spec["shape"]) > 0.5, spec["high"], spec["low"]).astype(np.float32)
            else:
                value = rng.standard_normal(spec["shape"]).astype(np.float32)
            t0 = time.monotonic()
            seq = c.send_input(spec["name"], value)
            f = c.next_frame(timeout=300)
            while f.seq < seq:
                f = c.next_frame(timeout=300)
            lat.append((f.received - t0) * 1e3)
            k += 1
            wait = t0 + 0.5 - time.monotonic()
            while wait > 0:  # keep reading frames (the server paces itself on acknowledgements)
                c.next_frame(timeout=300)
                wait = t0 + 0.5 - time.monotonic()
    return {
        "inputs_sent": k,
        "latency_ms_p50": pct(lat, 0.5),
        "latency_ms_p99": pct(lat, 0.99),
        "input": f"{spec['name']} ({spec['units']})",
        "measured_at": "python client on the server's machine: input sent -> first frame reflecting it received",
    }


def browser_latency(srv: Served, seconds: float) -> dict:
    """One page: inputs every ~0.3 s through its own controls; the page's latency samples."""
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("FD_CHROMIUM") or shutil.which("chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(srv.url)
        page.wait_for_function("window.fdStats.hello !== null")
        hello = page.evaluate("window.fdStats.hello")
        page.click("#start")
        page.wait_for_function("window.fdStats.presented > 0", timeout=120_000)
        spec = next(s for s in hello["specs"] if s["when"] == "block")
        end = time.monotonic() + seconds
        k = 0
        while time.monotonic() < end:
            if spec["units"] == "keys":
                key = spec["labels"][k % len(spec["labels"])]
                page.keyboard.down(key)
                page.wait_for_timeout(300)
                page.keyboard.up(key)
            else:
                page.click(f"#standin-{spec['name']}")
                page.wait_for_timeout(300)
            k += 1
        page.wait_for_timeout(2000)
        lat = page.evaluate("window.fdStats.latencies")
        presented = page.evaluate("window.fdStats.presented")
        browser.close()
    return {
        "inputs_sent": k * (2 if spec["units"] == "keys" else 1),
        "samples": len(lat),
        "latency_ms_p50": pct(lat, 0.5),
        "latency_ms_p99": pct(lat, 0.99),
        "frames_presented": presented,
        "input": f"{spec['name']} ({spec['units']})",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=None, help="world to serve (default: the default world)")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds per measurement (default 10)")
    p.add_argument("--sessions", default="1,2,4", help="concurrent session counts (default 1,2,4)")
    p.add_argument("--no-browser", action="store_true", help="skip the browser latency")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the server and the raw measurement (default 1: a shared 2-core machine "
        "oversubscribed by 2-thread torch runs 5-10x slower)",
    )
    p.add_argument("--device", default="cpu", help="device of the server (default cpu)")
    p.add_argument(
        "--serve-args",
        default="",
        help='extra fd-serve options, e.g. "--random-weights --attention triton --decoder taehv"',
    )
    p.add_argument(
        "--client-latency", action="store_true", help="input-to-frame latency through a Python client as well"
    )
    p.add_argument("--out", default="bench/results/serve-cpu", help="folder for <preset>.json")
    args = p.parse_args()
    extra = args.serve_args.split()
    load_kw = {"random_weights": True} if "--random-weights" in extra else {}
    for flag in ("--attention", "--decoder"):
        if flag in extra:
            load_kw[flag[2:]] = extra[extra.index(flag) + 1]
    preset = args.preset or default_world()
    counts = [int(x) for x in args.sessions.split(",")]
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the fd-serve subprocess inherits it
    import torch

    torch.set_num_threads(args.threads)
    raw_before = raw_block_ms(preset, device=args.device, load_kw=load_kw)
    srv = Served(preset, max(counts), args.device, extra)
    try:
        with Client(srv.url) as c:
            hello = c.info
        result = {
            "preset": preset,
            "device": args.device,
            "serve_args": extra,
            "resolution": [hello["height"], hello["width"]],
            "frames_per_block": hello["frames_per_block"],
            "model_fps": hello["fps"],
            "encoding": hello["encoding"],
            "max_sessions": hello["max_sessions"],
            "seconds": args.seconds,
            "server": "fd-serve subprocess, clients in this process",
            "machine": {
                "cpus": os.cpu_count(),
                "torch_threads": args.threads,
                "loadavg_before": os.getloadavg(),
                "python": platform.python_version(),
            },
            "clients": [],
        }
        for n in counts:
            r = client_fps(srv, n, args.seconds)
            print(f"{preset}: {n} sessions: {r['fps_per_session']} frames/s each", flush=True)
            result["clients"].append(r)
        if args.client_latency:
            r = client_latency(srv, args.seconds)
            print(f"{preset}: client latency p50 {r['latency_ms_p50']} ms, p99 {r['latency_ms_p99']} ms", flush=True)
            result["client"] = r
        if not args.no_browser:
            r = browser_latency(srv, args.seconds)
            print(f"{preset}: browser latency p50 {r['latency_ms_p50']} ms, p99 {r['latency_ms_p99']} ms", flush=True)
            result["browser"] = r
        result["machine"]["loadavg_after"] = os.getloadavg()
    finally:
        srv.stop()
    raw = [raw_before, raw_block_ms(preset, device=args.device, load_kw=load_kw)]
    result["raw_block_ms_before_after"] = raw
    result["raw_fps_one_session"] = round(result["frames_per_block"] / (statistics.mean(raw) / 1e3), 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{preset}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / f'{preset}.json'}")


if __name__ == "__main__":
    main()
