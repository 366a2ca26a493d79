"""Starting a context-parallel engine under torchrun: the process group, the device, the engine.

    torchrun --nproc-per-node 4 my_app.py      # in my_app.py:
    engine = flashdreams.parallel.load_context_parallel(preset="self-forcing-1.3b", mode="ulysses", ...)
    session = engine.session(prompt_embeds, seed=0)    # same seed on every rank
    for _ in range(n):
        result = session.step()                        # every rank steps; rank 0 gets the frames

`context_parallel_engine(engine, mode)` wraps an engine already loaded. Either way the result
is a plain `flashdreams.Engine`: its plan is this rank's (KV rings sharded, no decoder off
rank 0), so `Session` allocates the sharded rings itself, and its backend runs the family's
graphs with the context-parallel hooks (`engine.model.parallel`) set.

NCCL is used with CUDA, gloo otherwise. NCCL's environment (e.g. NCCL_NVLS_ENABLE=0 on our
GPU machines) is left exactly as the launcher set it.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from flashdreams.engine import Engine, load
from flashdreams.errors import InvalidArgumentError
from flashdreams.parallel.context_parallel import ContextParallelBackend, check_mode, shard_plan
from flashdreams.parallel.hooks import ParallelHooks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its rank among `world_size`, its local rank, its device, the backend."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_from_env(backend: str | None = None, timeout_s: float | None = None) -> DistInfo:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    Picks NCCL when CUDA is there, else gloo (or `backend`); with CUDA, binds this process to
    GPU LOCAL_RANK. Without torchrun's variables it makes a group of one. Calling it again
    returns the existing group's info.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend is None and dist.is_initialized():
        backend = str(dist.get_backend())  # keep the group the application already made
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise InvalidArgumentError(f"distributed backend '{backend}' is not supported; choose nccl or gloo")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise InvalidArgumentError("distributed backend 'nccl' needs CUDA; torch sees no CUDA device (use gloo)")
        if local_rank >= torch.cuda.device_count():
            raise InvalidArgumentError(
                f"LOCAL_RANK {local_rank} has no GPU: this host shows {torch.cuda.device_count()}; "
                "start at most that many processes per node"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        kwargs: dict = {}
        if timeout_s is not None:
            kwargs["timeout"] = timedelta(seconds=timeout_s)
        if backend == "nccl":
            kwargs["device_id"] = device  # binds the communicator to this GPU up front
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, **kwargs)
        else:
            log.info("no torchrun environment: a context-parallel group of one process")
            dist.init_process_group(
                backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, **kwargs
            )
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, str(dist.get_backend()))


def shutdown() -> None:
    """Tear the process group down (end of a torchrun script)."""
    if dist.is_initialized():
        dist.destroy_process_group()


class ContextParallelEngine(Engine):
    """An Engine whose sessions default to eager steps (no CUDA graphs) unless asked at load.

    Whether NCCL collectives replay safely inside captured CUDA graphs through
    torch.distributed is not settled on our machines yet (see bench/context_parallel_bench.py
    --cuda-graphs); until it is, graphs are opt-in for context-parallel sessions.
    """

    def __init__(self, *args, cuda_graphs: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cuda_graphs = cuda_graphs

    def session(self, prompt_embeds=None, seed: int = 0, cuda_graphs: bool | None = None, inputs=None):
        graphs = self.cuda_graphs and self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        return super().session(prompt_embeds, seed, cuda_graphs=graphs, inputs=inputs)


def parallel_hooks(engine: Engine) -> ParallelHooks:
    """The family's context-parallel hooks of `engine`; a named error when it has none."""
    model = getattr(engine, "model", None)
    if model is None:
        raise InvalidArgumentError(
            f"context parallel runs a family's eager graphs; '{engine.source}' loaded a "
            f"'{engine.backend.name}' backend without them (built engine directories are not supported yet): "
            "load a checkpoint or a preset"
        )
    hooks = model.parallel
    if hooks is None:
        raise InvalidArgumentError(
            f"context parallel: model family '{engine.plan.family}' (preset '{engine.preset_name}') exposes no "
            "context-parallel hooks (LoadedModel.parallel is None), so it runs on one GPU only"
        )
    if not isinstance(hooks, ParallelHooks):
        raise InvalidArgumentError(
            f"context parallel: model family '{engine.plan.family}' gave LoadedModel.parallel as "
            f"{type(hooks).__name__}; it must be a flashdreams.parallel.ParallelHooks"
        )
    return hooks


def context_parallel_engine(
    engine: Engine,
    mode: str = "ulysses",
    *,
    group=None,
    ring_pass: str = "q",
    all_to_all: str = "auto",
    slice_ring: bool | None = None,
    sync_weights: bool = True,
    cuda_graphs: bool = False,
) -> ContextParallelEngine:
    """`engine` split over the ranks of `group` (default: all): every rank calls this with its own
    copy of the same engine (torch.distributed initialised, see `init_from_env`).

    Rank 0 keeps the decoder and hands out frames; the others run the plan without it.
    `sync_weights` broadcasts rank 0's weights (`engine.model.weights`), so all ranks agree.
    Every rank then creates its session with the same seed and inputs, and steps it.
    """
    hooks = parallel_hooks(engine)
    check_mode(mode, ring_pass)
    if not dist.is_available() or not dist.is_initialized():
        raise InvalidArgumentError(
            "context parallel needs torch.distributed initialised: launch with torchrun and call "
            "flashdreams.parallel.init_from_env() first"
        )
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    plan = engine.plan if rank == 0 else engine.plan.without_decoder()
    plan = shard_plan(plan, hooks, mode, size)
    backend = ContextParallelBackend(engine.backend, hooks, plan, group, mode, ring_pass, all_to_all, slice_ring)
    if sync_weights:
        backend.broadcast_weights(engine.model.weights)
    log.info("context parallel %s: rank %d of %d on %s", backend.name, rank, size, backend.device)
    return ContextParallelEngine(
        backend,
        plan,
        engine.spec.preset,
        f"{backend.name}:{engine.source}",
        engine.decoder if rank == 0 else None,
        engine.stand_in_inputs,
        engine.model,
        precision=engine.precision,
        cuda_graphs=cuda_graphs,
    )


def load_context_parallel(
    preset="tiny",
    mode: str = "ulysses",
    *,
    group=None,
    ring_pass: str = "q",
    device: str | torch.device | None = None,
    decoder: str | None = "preset",
    sync_weights: bool = True,
    all_to_all: str = "auto",
    slice_ring: bool | None = None,
    cuda_graphs: bool = False,
    **load_kwargs,
) -> ContextParallelEngine:
    """Load `preset` on every rank of `group` and split its sessions over them (`context_parallel_engine`).

    Every rank of the group calls this with the same arguments. `load_kwargs` go to
    `flashdreams.load` (source, dtype, attention, height, width, random_weights, batch, ...);
    `device` defaults to this rank's GPU (or the CPU). Only group rank 0 loads the decoder.
    `cuda_graphs` is the default of its sessions (off: see `ContextParallelEngine`).
    """
    check_mode(mode, ring_pass)
    info = init_from_env()
    rank = dist.get_rank(group)
    dev = info.device if device is None else torch.device(device)
    base = load(preset=preset, device=dev, decoder=decoder if rank == 0 else None, **load_kwargs)
    return context_parallel_engine(
        base,
        mode,
        group=group,
        ring_pass=ring_pass,
        all_to_all=all_to_all,
        slice_ring=slice_ring,
        sync_weights=sync_weights,
        cuda_graphs=cuda_graphs,
    )
