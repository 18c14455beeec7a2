"""Gradient averaging: how the gradients (or parameters) of several processes meet.

- `sync`: the `SyncControl` protocol the pipeline drives, and `LocalSync` (one process).
- `ddp`: `DDPSync`, for a model wrapped in ``DistributedDataParallel``.
- `fsdp`: `FSDPSync`, for a model sharded with FSDP2's ``fully_shard``.
- `average`: `Average`, gradkit's own bucketed all-reduce overlapped with backward.
- `buckets`: gradients packed into flat buckets, planned as DDP plans them, launched in order.
- `reducers`: the `Reducer` interface and `DenseReducer` (what a bucket sends, how sums come back).
- `compressed`: `CompressedReducer`, which compressor averaging uses (error feedback by default), its state.
- `payloads`: how compressed payloads meet (all-reduce if linear, all-gather otherwise).
- `collectives`: what every sync control shares: the item-count all-reduce, flat sums,
  the setup broadcast, timeouts.
- `local_sgd`: `ModelAverager`, parameters averaged every few steps.
- `ema`: `EMA`, parameters averaged over time (Polyak averaging), for evaluation.
- `choose`: `sync_control_for`, the sync control that fits a model.
"""

from gradkit.averaging.average import Average
from gradkit.averaging.choose import sync_control_for
from gradkit.averaging.collectives import as_timeout, replicate
from gradkit.averaging.compressed import effective_compressor, load_compressor_state
from gradkit.averaging.ddp import DDPSync
from gradkit.averaging.ema import EMA
from gradkit.averaging.fsdp import FSDPSync
from gradkit.averaging.local_sgd import ModelAverager
from gradkit.averaging.payloads import start_reduce
from gradkit.averaging.sync import LocalSync, SyncControl

__all__ = [
    "Average",
    "DDPSync",
    "EMA",
    "FSDPSync",
    "LocalSync",
    "ModelAverager",
    "SyncControl",
    "as_timeout",
    "effective_compressor",
    "load_compressor_state",
    "replicate",
    "start_reduce",
    "sync_control_for",
]
