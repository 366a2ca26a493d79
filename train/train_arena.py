#!/usr/bin/env python3
"""Train the arena world model (models/families/arena) on gameplay the procedural arena renders on the fly.

Data: every step draws a batch of arenas (from a pool of world seeds, refreshed as training
goes; the tests' held-out seeds are >= 10**9 and never drawn here), random start positions,
and random key scripts in which each frame keeps the last key set with probability 0.85
(world.random_actions); the renderer plays them and gives the target frames. Everything is a
function of --data-seed and the step number, so a run is reproducible up to GPU arithmetic.

Objective: the arena is deterministic, so the model regresses the next block's frames
(weighted MSE: pixels that change between consecutive frames, i.e. the agent's old and new
places, weigh --motion-weight times more, since the agent is under 1% of the frame). To run
for hundreds of blocks without drifting, the loss is taken over rollouts of up to
--rollout blocks in which each block's context is the model's own previous last frame
(gradients flow through the whole rollout), as the plan runs it; the first --teacher-frac
of the steps use the true previous frame (teacher forcing) and shorter rollouts. There is
no sampler: inference is exactly one forward per block, the same as the last training steps.

Long sessions (--burn-max N --relabel, the shipped weights' last run): each step first plays
0..N blocks of the model's own rollout without gradients, reaching the states a long session
reaches, then --rollout graded blocks whose targets are re-rendered from where the model's own
frame shows the agent (rollout_targets), so the model learns to redraw the agent where it is
rather than hedge towards a true position it cannot see. --keep-best keeps the weights with the
best validation score (evaluate: 12 held-out arenas, none of them the CI tests').

Checkpoints are safetensors (model, AdamW moments, step); --resume continues one. --export
writes the shipped fp16 weights with the training command, data seed, steps and metrics in
their metadata.

  python train/train_arena.py --steps 200 --batch 16 --device cpu --out /tmp/arena   # a smoke run
  python train/train_arena.py --steps 12000 --batch 128 --device cuda --out ckpt --minutes 8 \
      --export models/families/arena/weights/arena.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _import_arena():
    """The arena modules from the installed package, or straight from this checkout (the GPU machine has no install)."""
    try:
        from flashdreams.models.families.arena import model, world
    except ImportError:
        for name, path in (("flashdreams", ROOT / "flashdreams"), ("flashdreams.models", ROOT / "models")):
            mod = types.ModuleType(name)
            mod.__path__ = [str(path)]
            sys.modules[name] = mod
        sys.modules["flashdreams"].models = sys.modules["flashdreams.models"]
        from flashdreams.models.families.arena import model, world
    return model, world


model_mod, world = _import_arena()
ArenaConfig, ArenaNet = model_mod.ArenaConfig, model_mod.ArenaNet
from flashdreams.models.families.arena import quality  # noqa: E402 (after the import fallback above)

CALIBRATE = 200  # steps timed before --minutes fits the schedule
MEAN_BLOCKS = 4.6  # mean rollout blocks per step over the curriculum (plan_of), relative to its first 2
# Validation arenas (model selection, the log's metrics): held out of training like the CI tests'
# seeds (10**9 + 10 .. 15), and disjoint from them, so picking a checkpoint never looks at the tests.
VAL_SEEDS = tuple([10**9, 10**9 + 1, 10**9 + 2, 10**9 + 3] + [10**9 + 100 + i for i in range(8)])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_arena.py",
        description="Train the arena world model on procedurally rendered gameplay (see the module docstring).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="checkpoint folder (ckpt.safetensors, log.jsonl)")
    p.add_argument("--steps", type=int, default=12000, help="total optimizer steps (the LR schedule's length)")
    p.add_argument(
        "--minutes",
        type=float,
        default=0.0,
        help="time limit (0: none); without --fixed-steps the schedule's --steps is fitted to it after "
        f"{200} steps (the fitted value is printed and recorded)",
    )
    p.add_argument("--fixed-steps", action="store_true", help="keep --steps even with --minutes")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--rollout", type=int, default=6, help="blocks per training rollout (own predictions as context)")
    p.add_argument("--teacher-frac", type=float, default=0.15, help="fraction of steps with teacher forcing")
    p.add_argument("--motion-weight", type=float, default=20.0, help="loss weight of pixels that change")
    p.add_argument("--pool", type=int, default=4096, help="arenas in the world pool")
    p.add_argument("--pool-every", type=int, default=1000, help="refresh the pool every N steps")
    p.add_argument("--data-seed", type=int, default=1, help="seed of every world, start and key script drawn")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.safetensors if it exists")
    p.add_argument("--init", help="start from these weights (a safetensors state dict) instead of random")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-blocks", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=500, help="validate every N steps")
    p.add_argument(
        "--eval-loop-blocks", type=int, default=100, help="blocks of the built-in loop script in each validation"
    )
    p.add_argument(
        "--persistence",
        default="0.85",
        help="comma-separated probabilities that a frame keeps the last key set; steps take them in turn "
        "(a high one gives the long holds of the built-in loop script)",
    )
    p.add_argument(
        "--burn-max",
        type=int,
        default=0,
        help="after the teacher-forced steps, each step first runs 0..N blocks of the model's own rollout "
        "without gradients (the states a long session reaches), then --rollout graded blocks",
    )
    p.add_argument(
        "--relabel",
        action="store_true",
        help="the targets after a burn-in continue from where the model's own last frame shows the agent "
        "(re-rendered clean), not from the true position (see rollout_targets)",
    )
    p.add_argument(
        "--settle", type=float, default=0.02, help="palette projection inside training rollouts, as the plan does"
    )
    p.add_argument("--keep-best", help="export the weights with the best validation score (evaluate) here, as it goes")
    p.add_argument("--export", help="write the final fp16 weights (with the training record) to this file")
    p.add_argument("--dim", type=int, default=ArenaConfig.dim)
    p.add_argument("--layers", type=int, default=ArenaConfig.layers)
    p.add_argument("--heads", type=int, default=ArenaConfig.heads)
    return p


# -- data ---------------------------------------------------------------------------------------


def world_pool(data_seed: int, refresh: int, size: int) -> list[int]:
    """World seeds of pool `refresh`: the built-in starts 0..7 and fresh seeds below 10**9."""
    base = (data_seed * 1000 + refresh) * 100_000 % (10**9 - 100_000)
    return list(range(8)) + [base + i for i in range(size - 8)]


class Pool:
    def __init__(self, seeds: list[int], device: torch.device) -> None:
        s = world.new_worlds(seeds, device)
        self.blocks, self.colors, self.floor = s.blocks, s.block_colors, s.floor

    def sample(self, batch: int, gen: torch.Generator) -> world.ArenaState:
        """`batch` arenas from the pool, each with a random free start position."""
        idx = torch.randint(self.blocks.shape[0], (batch,), generator=gen).to(self.blocks.device)
        blocks = self.blocks[idx]
        lo, hi = world.WALL, world.SIZE - world.WALL - world.AGENT
        cand = torch.randint(lo, hi + 1, (batch, 16, 2), generator=gen).to(blocks.device)
        ok = torch.stack([~world._overlaps(cand[:, i, 0], cand[:, i, 1], blocks) for i in range(16)], dim=1)
        first = torch.argmax(ok.long(), dim=1)  # a free candidate (16 tries never all fail in practice)
        pos = cand[torch.arange(batch, device=blocks.device), first]
        return world.ArenaState(pos, blocks, self.colors[idx], self.floor[idx])


def make_batch(
    pool: Pool, batch: int, blocks: int, frames: int, seed: int, device: torch.device, persistence: float = 0.85
):
    """(states, start frames [B, 3, H, W], keys [B, blocks, F, 4]); rollout_targets renders the targets."""
    gen = torch.Generator().manual_seed(seed)
    state = pool.sample(batch, gen)
    keys = world.random_actions(batch, blocks * frames, seed + 1, persistence, device=device)
    return state, world.render(state), keys.view(batch, blocks, frames, 4)


def advance(state: world.ArenaState, keys: torch.Tensor) -> world.ArenaState:
    """The true state after keys [B, R, F, 4], without rendering the frames on the way."""
    frames = keys.flatten(1, 2)
    for t in range(frames.shape[1]):
        state = world.step(state, frames[:, t])
    return state


# -- loss -----------------------------------------------------------------------------------------


def own_rollout(net, ctx, keys, palette, settle: float) -> torch.Tensor:
    """The model's last frame after playing keys [B, R, F, 4] from ctx, projected as the plan does (no gradients)."""
    with torch.no_grad():
        for r in range(keys.shape[1]):
            ctx = model_mod.project_to_palette(net(ctx, keys[:, r]).float().clamp(0, 1)[:, -1], palette, settle)
    return ctx


def rollout_targets(state, ctx, keys, relabel: bool):
    """(start of the targets [B, 3, H, W], targets [B, R, F, 3, H, W]) for graded blocks that continue from ctx.

    Without relabel the targets continue the true state. With it they continue from the agent's
    place as the model's own context `ctx` shows it (read by world.detect_agent, rounded; the true
    place where it is not found or lands on a block): the renderer's answer to the state the model
    is actually in. A model that drifted a pixel then learns to move on from there, and to redraw a
    blurred agent and erase trails, instead of hedging between its place and the true one, which is
    what blurs the agent over long sessions.
    """
    if relabel:
        seen, found = world.detect_agent(ctx)
        cand = seen.round().long()
        ok = found & ~world._overlaps(cand[:, 0], cand[:, 1], state.blocks)
        state = state.clone()
        state.pos = torch.where(ok[:, None], cand, state.pos)
    b, r, f = keys.shape[:3]
    target, _ = world.rollout(state, keys.reshape(b, r * f, 4))
    return world.render(state), target.view(b, r, f, *target.shape[2:])


def rollout_loss(net, ctx, start, keys, target, teacher: bool, motion_weight: float, palette, settle: float):
    """Weighted MSE over a rollout from ctx; later blocks' context is the model's (teacher-forced: the true) last frame.

    start: the clean frame the targets continue from (for the motion mask)."""
    total = 0.0
    blocks = keys.shape[1]
    for r in range(blocks):
        pred = net(ctx, keys[:, r]).float()
        tgt = target[:, r]
        prev = torch.cat([(start if r == 0 else target[:, r - 1, -1])[:, None], tgt[:, :-1]], dim=1)
        moved = ((tgt - prev).abs().amax(dim=2, keepdim=True) > 0.02).float()
        w = 1.0 + motion_weight * moved
        total = total + (w * (pred - tgt) ** 2).mean()
        ctx = tgt[:, -1] if teacher else model_mod.project_to_palette(pred[:, -1].clamp(0, 1), palette, settle)
    return total / blocks


# -- evaluation (the same measures as the CI tests) ---------------------------------------------------


@torch.no_grad()
def evaluate(
    net, device: torch.device, blocks: int, frames: int, palette, settle: float, loop_blocks: int = 100
) -> dict[str, float]:
    """The CI test's measures (quality.measure) on the validation arenas, rolled out as the plan runs them.

    Two scripts: a random one over `blocks` blocks (pos_err, direction, found, psnr8: the CI test's
    measures) and the built-in loop over `loop_blocks` (loop_err, loop_found: the long holds and
    wall contacts of the default `fd-run`, where an agent that blurs away shows up)."""
    net.eval()
    n = len(VAL_SEEDS)
    state = world.new_worlds(list(VAL_SEEDS), device)
    start = world.render(state)
    out = {}
    for name, keys, count in (
        ("", world.random_actions(n, blocks * frames, 4242, device=device), blocks),
        ("loop_", world.loop_actions(loop_blocks * frames).to(device)[None].expand(n, -1, -1), loop_blocks),
    ):
        target, _ = world.rollout(state, keys)
        ctx, preds = start, []
        for r in range(count):
            video = net(ctx, keys[:, r * frames : (r + 1) * frames]).float().clamp(0, 1)
            preds.append(model_mod.project_to_palette(video, palette, settle))
            ctx = preds[-1][:, -1]
        pred = torch.cat(preds, dim=1)
        per = [quality.measure(pred[i].cpu(), target[i].cpu(), start[i].cpu(), frames) for i in range(n)]
        out[name + "pos_err"] = sum(q.pos_err for q in per) / n
        out[name + "found"] = sum(q.found for q in per) / n
        if not name:
            moving = sum(q.moving_blocks for q in per)
            out["pos_err_max"] = max(q.pos_err for q in per)
            out["direction"] = sum(q.direction * q.moving_blocks for q in per) / max(1, moving)
            out["psnr8"] = sum(q.psnr for q in per) / n
    out["score"] = out["pos_err"] + out["loop_pos_err"]  # --keep-best keeps the lowest
    net.train()
    return out


# -- checkpoints ----------------------------------------------------------------------------------


def save_ckpt(path: Path, net, opt, step: int, cfg: ArenaConfig, args) -> None:
    from safetensors.torch import save_file

    names = {id(p): n for n, p in net.named_parameters()}
    out = {f"model.{k}": v.detach().float().contiguous().cpu() for k, v in net.state_dict().items()}
    moments = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:  # bfloat16 moments: the two files stay small enough to travel (16 MiB each)
                moments[f"adam_m.{names[id(p)]}"] = st["exp_avg"].bfloat16().contiguous().cpu()
                moments[f"adam_v.{names[id(p)]}"] = st["exp_avg_sq"].bfloat16().contiguous().cpu()
    meta = {"step": str(step), "steps": str(args.steps), "config": json.dumps(cfg.to_dict())}
    meta["data_seed"] = str(args.data_seed)
    for target, tensors in ((adam_path(path), moments), (path, out)):  # the model last: it names the step
        tmp = target.with_suffix(".partial")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(target)


def adam_path(path: Path) -> Path:
    return path.with_name(path.stem + "_adam.safetensors")


def load_ckpt(path: Path, net, opt, device) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        step = int(f.metadata()["step"])
        total = int(f.metadata().get("steps", step))
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    if adam_path(path).is_file():
        with safe_open(str(adam_path(path)), framework="pt") as f:
            if int(f.metadata()["step"]) == step:  # moments of another step are left out (fresh moments)
                tensors.update({k: f.get_tensor(k).float() for k in f.keys()})  # noqa: SIM118
    net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for n, p in net.named_parameters():
        if f"adam_m.{n}" in tensors:
            opt.state[p] = {
                "step": torch.tensor(float(step)),
                "exp_avg": tensors[f"adam_m.{n}"].to(device),
                "exp_avg_sq": tensors[f"adam_v.{n}"].to(device),
            }
    return step, total


def export(path: Path, net, record: dict) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().half().contiguous().cpu() for k, v in net.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={k: json.dumps(v) if not isinstance(v, str) else v for k, v in record.items()})


# -- the loop -------------------------------------------------------------------------------------


def training_record(args, argv, step: int, cfg, metrics: dict) -> dict:
    """What an exported weights file says of itself: the command, data seed, steps, config and metrics."""
    return {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "schedule_steps": args.steps,
        "data_seed": args.data_seed,
        "steps": step,
        "config": cfg.to_dict(),
        "metrics": metrics,
    }


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def plan_of(step: int, args) -> tuple[int, int, bool]:
    """(burn-in blocks, graded blocks, teacher forcing) at `step`.

    Short teacher-forced rollouts first; then either own rollouts growing to --rollout blocks, or
    (--burn-max) a burn-in of 0..N own blocks drawn per step followed by --rollout graded blocks."""
    if step < args.teacher_frac * args.steps:
        return 0, 2, True
    if args.burn_max:
        return (step * 7919 + args.data_seed) % (args.burn_max + 1), args.rollout, False
    t = (step - args.teacher_frac * args.steps) / max(1.0, (1 - args.teacher_frac) * args.steps)
    return 0, max(2, min(args.rollout, 2 + int(t * 2 * (args.rollout - 1)))), False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, checked before anything is created (argparse's usage error, exit status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.persistences = [float(x) for x in args.persistence.split(",")]
    except ValueError:
        parser.error(f"--persistence must be comma-separated numbers, got {args.persistence!r}")
    if not all(0.0 <= x < 1.0 for x in args.persistences):
        parser.error(f"--persistence values must be in [0, 1), got {args.persistence!r}")
    for name in ("burn_max", "rollout", "eval_every", "eval_loop_blocks", "eval_blocks"):
        least = 0 if name == "burn_max" else 1
        if getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    if args.settle < 0:
        parser.error(f"--settle must be >= 0, got {args.settle}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ArenaConfig(dim=args.dim, layers=args.layers, heads=args.heads)
    torch.manual_seed(args.data_seed)
    net = ArenaNet(cfg).to(device)
    if args.init:
        from safetensors.torch import load_file

        net.load_state_dict({k: v.float() for k, v in load_file(args.init).items()})
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    ckpt = out / "ckpt.safetensors"
    step = 0
    if args.resume and ckpt.is_file():
        step, saved_steps = load_ckpt(ckpt, net, opt, device)
        if not args.fixed_steps:  # keep the schedule the run started with (--fixed-steps: take --steps)
            args.steps, args.fixed_steps = saved_steps, True
        print(f"resumed from {ckpt} at step {step} of {args.steps}", flush=True)
    step0 = step
    params = sum(p.numel() for p in net.parameters())
    print(f"arena model: {params / 1e6:.2f} M parameters, {cfg}, device {device}", flush=True)
    amp = device.type == "cuda"
    palette = world.palette().to(device)
    best = float("inf")
    t_start = time.time()
    refresh = step // args.pool_every
    pool = Pool(world_pool(args.data_seed, refresh, args.pool), device)
    log = (out / "log.jsonl").open("a")
    if args.keep_best and (args.init or step):  # the starting weights are the first candidate
        metrics = evaluate(net, device, args.eval_blocks, cfg.frames, palette, args.settle, args.eval_loop_blocks)
        best = metrics["score"]
        export(Path(args.keep_best), net, training_record(args, argv, step, cfg, metrics))
        print(json.dumps({"step": step, "start": True, **metrics}), flush=True)
        log.write(json.dumps({"step": step, "start": True, **metrics}) + "\n")
    losses: list[float] = []
    metrics: dict[str, float] = {}
    while step < args.steps:
        if step // args.pool_every != refresh:
            refresh = step // args.pool_every
            pool = Pool(world_pool(args.data_seed, refresh, args.pool), device)
        burn, blocks, teacher = plan_of(step, args)
        persistence = args.persistences[step % len(args.persistences)]
        state, start, keys = make_batch(
            pool, args.batch, burn + blocks, cfg.frames, args.data_seed * 1_000_003 + step * 7 + 5, device, persistence
        )
        ctx = start
        if burn:  # the graded blocks start where the model's own rollout of the first `burn` blocks left it
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                ctx = own_rollout(net, start, keys[:, :burn], palette, args.settle)
            state = advance(state, keys[:, :burn])
            keys = keys[:, burn:]
        start, target = rollout_targets(state, ctx, keys, args.relabel and burn > 0)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = rollout_loss(net, ctx, start, keys, target, teacher, args.motion_weight, palette, args.settle)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(float(loss.detach()))
        if step % args.log_every == 0 or step == args.steps:
            mean = sum(losses) / len(losses)
            losses.clear()
            rec = {"step": step, "loss": mean, "lr": lr_at(step, args), "rollout": blocks, "teacher": teacher}
            rec["burn"] = burn
            rec["minutes"] = (time.time() - t_start) / 60
            if step % args.eval_every == 0 or step == args.steps:
                metrics = evaluate(
                    net, device, args.eval_blocks, cfg.frames, palette, args.settle, args.eval_loop_blocks
                )
                rec.update(metrics)
                if args.keep_best and metrics["score"] < best:
                    best = metrics["score"]
                    export(Path(args.keep_best), net, training_record(args, argv, step, cfg, metrics))
                    rec["kept"] = True
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if step == CALIBRATE and args.minutes and not args.fixed_steps:
            # Fit the schedule to the time limit: the steps so far ran 2-block rollouts; later steps run
            # MEAN_BLOCKS on average (the curriculum), so scale the time per step by that.
            # With a burn-in and no teacher forcing every step costs the same on average: no scaling.
            per_step = (time.time() - t_start) / (step - step0)
            if not (args.burn_max and args.teacher_frac == 0):
                per_step *= MEAN_BLOCKS / 2
            args.steps = max(step + 1, int(args.minutes * 60 * 0.97 / per_step) + step0)
            print(f"schedule fitted to {args.minutes} min: --steps {args.steps}", flush=True)
        if step % args.save_every == 0:
            save_ckpt(ckpt, net, opt, step, cfg, args)
        if args.minutes and time.time() - t_start > args.minutes * 60:
            print(f"time limit: stopping at step {step} (resume with --resume)", flush=True)
            break
    save_ckpt(ckpt, net, opt, step, cfg, args)
    metrics = evaluate(net, device, args.eval_blocks, cfg.frames, palette, args.settle, args.eval_loop_blocks)
    print(json.dumps({"final_step": step, **metrics}), flush=True)
    if args.keep_best and metrics["score"] < best:
        export(Path(args.keep_best), net, training_record(args, argv, step, cfg, metrics))
        print(f"kept the final weights in {args.keep_best}", flush=True)
    if args.export:
        export(Path(args.export), net, training_record(args, argv, step, cfg, metrics))
        print(f"exported {args.export}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
