"""Multi-GPU sessions on one host: context parallel (Ulysses or ring attention) over torch.distributed.

Launch with torchrun; see `launch.load_context_parallel` and `context_parallel`'s module doc.
"""

from flashdreams.parallel.comm import Comm
from flashdreams.parallel.context_parallel import (
    MODES,
    RING_PASSES,
    ContextParallelBackend,
    attention_lse,
    check_head_shardable,
    check_token_shardable,
    merge_partials,
)
from flashdreams.parallel.launch import (
    ContextParallelEngine,
    DistInfo,
    init_from_env,
    load_context_parallel,
    shutdown,
)

__all__ = [
    "MODES",
    "RING_PASSES",
    "Comm",
    "ContextParallelBackend",
    "ContextParallelEngine",
    "DistInfo",
    "attention_lse",
    "check_head_shardable",
    "check_token_shardable",
    "init_from_env",
    "load_context_parallel",
    "merge_partials",
    "shutdown",
]
