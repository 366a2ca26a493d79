"""Multi-GPU sessions on one host: context parallel (Ulysses or ring attention) over torch.distributed.

A family opts in by filling `LoadedModel.parallel` with `ParallelHooks` (hooks.py); the
wrapper (`context_parallel_engine`, `load_context_parallel`) then works for it without knowing it.
Launch with torchrun; see launch.py. The names resolve lazily, so a family importing
`flashdreams.parallel.hooks` pulls in neither torch.distributed nor the runtime.
"""

from __future__ import annotations

import importlib as _importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "AttendFn": "flashdreams.parallel.hooks",
    "ParallelHooks": "flashdreams.parallel.hooks",
    "TokenShard": "flashdreams.parallel.hooks",
    "Comm": "flashdreams.parallel.comm",
    "MODES": "flashdreams.parallel.context_parallel",
    "RING_PASSES": "flashdreams.parallel.context_parallel",
    "ContextParallelBackend": "flashdreams.parallel.context_parallel",
    "attention_lse": "flashdreams.parallel.context_parallel",
    "check_head_shardable": "flashdreams.parallel.context_parallel",
    "check_token_shardable": "flashdreams.parallel.context_parallel",
    "merge_partials": "flashdreams.parallel.context_parallel",
    "shard_plan": "flashdreams.parallel.context_parallel",
    "ContextParallelEngine": "flashdreams.parallel.launch",
    "DistInfo": "flashdreams.parallel.launch",
    "context_parallel_engine": "flashdreams.parallel.launch",
    "init_from_env": "flashdreams.parallel.launch",
    "load_context_parallel": "flashdreams.parallel.launch",
    "parallel_hooks": "flashdreams.parallel.launch",
    "shutdown": "flashdreams.parallel.launch",
}

if TYPE_CHECKING:
    from flashdreams.parallel.comm import Comm
    from flashdreams.parallel.context_parallel import (
        MODES,
        RING_PASSES,
        ContextParallelBackend,
        attention_lse,
        check_head_shardable,
        check_token_shardable,
        merge_partials,
        shard_plan,
    )
    from flashdreams.parallel.hooks import AttendFn, ParallelHooks, TokenShard
    from flashdreams.parallel.launch import (
        ContextParallelEngine,
        DistInfo,
        context_parallel_engine,
        init_from_env,
        load_context_parallel,
        parallel_hooks,
        shutdown,
    )

__all__ = [
    "AttendFn",
    "Comm",
    "ContextParallelBackend",
    "ContextParallelEngine",
    "DistInfo",
    "MODES",
    "ParallelHooks",
    "RING_PASSES",
    "TokenShard",
    "attention_lse",
    "check_head_shardable",
    "check_token_shardable",
    "context_parallel_engine",
    "init_from_env",
    "load_context_parallel",
    "merge_partials",
    "parallel_hooks",
    "shard_plan",
    "shutdown",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flashdreams.parallel' has no attribute '{name}'")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
