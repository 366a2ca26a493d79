"""The arena world's block plan: one graph call per block, row-independent.

Per block: `step` reads each row's context (its start at block 0, else the last frame; the
row's `block_index` decides, on the device) and the row's keys, and writes the block's F
frames; the frames leave, then the commit copies the block's last frame into `last_frame`,
the only state besides `block_index`. No ring, no positions: the state is the same size and
means the same thing at every block, so a session runs forever.
"""

from __future__ import annotations

from flashdreams.models.families.arena.model import ArenaConfig
from flashdreams.models.families.arena.world import KEYS
from flashdreams.models.family import BlockPlan, GraphSig, InputSpec, TensorDecl, call

STEP_SIG = GraphSig(
    "step",
    ("last_frame", "block_index", "keyboard", "start_frame", "start_noise"),
    ("video", "last", "latents"),
)


def build_plan(cfg: ArenaConfig, batch: int, fps: float, decoder: bool = True) -> BlockPlan:
    b, f, s = batch, cfg.frames, cfg.size
    frame_ops = [{"op": "frames", "src": "video", "out": "frames"}] if decoder else []
    plan = BlockPlan(
        family="arena",
        batch=b,
        graphs={"step": STEP_SIG},
        state={
            "last_frame": TensorDecl("last_frame", (b, 3, s, s), "float32", "each row's last frame: the next context"),
            "block_index": TensorDecl("block_index", (b,), "int64", "each row's block index (written by the runtime)"),
        },
        inputs={
            "keyboard": InputSpec(
                "keyboard",
                (b, f, len(KEYS)),
                "float32",
                "key states per video frame of the block: columns w (up), s (down), a (left), d (right)",
                units="keys",
                low=0.0,
                high=1.0,
                labels=KEYS,
            ),
            "start_frame": InputSpec(
                "start_frame",
                (b, 3, s, s),
                "float32",
                "the arena's first frame (RGB in [0, 1], e.g. world.render of a seed's world); all zeros: "
                "a built-in arena picked by the session seed",
                units="image",
                low=0.0,
                high=1.0,
                when="reset",
            ),
        },
        constants={},
        draws={
            "start_noise": TensorDecl(
                "start_noise", (b, 1), "float32", "picks the built-in start at block 0", first_block_only=True
            )
        },
        programs={
            "step": [
                call(
                    "step",
                    {a: a for a in STEP_SIG.args},
                    {"video": "video", "last": "next_frame", "latents": "latents"},
                ),
                {"op": "mark", "name": "denoise"},
                *frame_ops,
                {"op": "emit", "latents": "latents", "frames": "frames" if decoder else None},
                {"op": "mark", "name": "decode"},
                {"op": "copy", "src": "next_frame", "out": "last_frame"},
                {"op": "mark", "name": "commit"},
            ]
        },
        sequence=[],
        steady="step",
        latents=TensorDecl("latents", (b, 3, f, s, s), "float32", "the block's frames as [B, 3, F, H, W]"),
        meta={
            "rows": "independent",
            "height": s,
            "width": s,
            "fps": fps,
            "video_frames_steady": f,
            "decoder": "pixels" if decoder else None,
            "decoder_graphs": [],
            "decoder_state": [],
        },
    )
    plan.validate()
    return plan
