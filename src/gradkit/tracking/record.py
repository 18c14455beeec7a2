"""One logged step's record: device values read in one named host transfer, assembled into the JSONL dict.

A logging step reads everything it writes in one transfer: the per-parameter
table, the step's scalars, the noise sample and, with ``gather=True``, every
rank's table. `host_read.HostRead` collects them under names and hands them back
under the same names, so no code slices a flat list by offset. The transfer does
not stall the step: `HostRead.start` copies the values into pinned host memory
with a non-blocking copy and records an event (`InFlight`); the values are
decoded once the event has completed. The update-to-weight ratios need the
weights after ``optimizer.step``: their norms are computed then, on the device
(`WeightCopy`), and read the same way.
"""

from __future__ import annotations

import datetime
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradkit import _dtensor, _foreach
from gradkit import distributed as gdist
from gradkit._scalars import on_device
from gradkit.context import GradContext, kinds
from gradkit.step_report import StepReport
from gradkit.tracking import stats as _stats
from gradkit.tracking import summary as _summary
from gradkit.tracking.host_read import READY, HostRead, InFlight
from gradkit.tracking.noise_scale import NoiseScale, batch_advice
from gradkit.tracking.writers import SCHEMA, clean

__all__ = [
    "StepRecord",
    "assemble",
    "gather_tables",
    "histograms",
    "norm_columns",
    "param_table",
    "rank_norms",
    "read_step",
    "standalone_report",
    "start_step",
    "step_record",
    "trainable",
    "WeightCopy",
]


def param_table(
    ctx: GradContext, device: torch.device, *, detail: bool, layout: _stats.FusedStats | None = None
) -> Tensor:
    """The (P, len(COLUMNS)) statistics of the step's gradients (P, 2 without `detail`: the norms before and
    after clipping), of the full parameters when sharded. `layout`: the gradients' kept `stats.FusedStats`."""
    norms = ctx.norms() if len(ctx) else torch.zeros(0, device=device)
    if not len(ctx):
        width = len(_stats.COLUMNS) if detail else 2
        return torch.zeros(0, width, device=norms.device, dtype=_stats.host_dtype(norms.device))
    if not detail:  # the two norm columns: the step's cached norms, nothing read from the tensors
        return _stats.param_stats((), (), norms, ctx.pre_clip_norms, detail=False)
    grads, weights = _dtensor.locals_of(ctx.grads), _dtensor.locals_of(ctx.params)
    table = _stats.param_stats(
        grads, weights, norms, ctx.pre_clip_norms, detail=detail, groups=ctx.groups(), layout=layout
    )
    return _full_table(table, ctx) if ctx.sharded and detail else table


def norm_columns(ctx: GradContext) -> list[Tensor]:
    """An ordinary step's table by column: the norms before and after clipping (the step's cached norms), as
    they are (`start_step` reads them with no table made of them). Only for a context with gradients."""
    norms = ctx.norms()
    return [ctx.pre_clip_norms if ctx.pre_clip_norms is not None else norms, norms]


def _full_table(table: Tensor, ctx: GradContext) -> Tensor:
    """The detail columns of a table computed from this rank's shards, made those of the full
    parameters: max |g| as the max, counts and squared weight norms as sums (two collectives)."""
    columns = list(_stats.COLUMNS)
    at = {name: columns.index(name) for name in ("max_abs", "nonzero", "weight_norm", "nan", "inf")}
    p = len(ctx)
    counted = [at["nonzero"], at["nan"], at["inf"]]
    sums = _dtensor.reduce_sums(
        torch.cat([table[:, counted].T.reshape(-1), table[:, at["weight_norm"]].square()]), ctx.grads * 3 + ctx.params
    )
    table = table.clone()
    table[:, at["max_abs"]] = _dtensor.reduce_max(table[:, at["max_abs"]].contiguous(), ctx.grads)
    table[:, counted] = sums[: 3 * p].reshape(3, p).T
    table[:, at["weight_norm"]] = sums[3 * p :].sqrt()
    return table


def read_step(
    table: Tensor, report: StepReport, counters: dict[str, Tensor], noise: NoiseScale, ranks: Tensor | None
) -> dict[str, Any]:
    """The step's table, scalars, noise sample and rank tables, read at once (waiting for the device)."""
    flight = start_step(table, report, counters, noise, ranks, new_event=lambda device: READY)
    flight.wait()
    return flight.values()


def start_step(
    table: Tensor | Sequence[Tensor], report: StepReport, counters: dict[str, Tensor], noise: NoiseScale,
    ranks: Tensor | None, *, extra: dict[str, Tensor] | None = None,
    new_event: Callable[[torch.device], Any] | None = None,
) -> InFlight:  # fmt: skip
    """Start the one host read of a logging step: the step's table, scalars, noise sample, rank
    tables and any `extra` named values; no host sync (see `HostRead.start`).

    `table` is the (P, C) table (`param_table`), or its columns as 1-D tensors (`norm_columns`: an
    ordinary step's, read as they are, with no table made of them)."""
    if isinstance(table, Tensor):
        read = HostRead(table.device, table.dtype)
        read.add("columns", table.T)  # read by column: the entries are built column by column (`summary`)
    else:
        device = table[0].device
        read = HostRead(device, _stats.host_dtype(device))
        read.add_rows("columns", table)
    for name in ("total_norm", "norm_after", "clip_coef", "skipped", "items"):
        read.add(name, getattr(report, name), scalar=True)
    for name, counter in counters.items():
        read.add(name, counter, scalar=True)
    g2, trace, b_simple = noise.estimate()
    read.add("g2", g2)
    read.add("trace", trace)
    read.add("b_simple", b_simple)
    read.add("measured", noise.measured())
    sample = report.noise
    if sample is not None:
        read.add_stack("sample", (sample.small_sq, sample.small_batch, sample.big_sq, sample.big_batch))
    if ranks is not None:
        read.add("ranks", ranks.transpose(1, 2))
    for name, value in (extra or {}).items():
        read.add(name, value)
    return read.start(new_event)


def step_record(
    got: dict[str, Any], report: StepReport, *, step: int, since: int, bytes_since: int, detail: bool,
    ranks: list[dict[str, float]] | None,
) -> dict[str, Any]:  # fmt: skip
    """The JSONL step record but its "params" and "modules" (alerts empty), strict JSON."""
    dense = getattr(report, "dense_bytes", None)  # reports of foreign boundaries may not carry it
    head = {
        "type": "step",
        "schema": SCHEMA,
        "step": step,
        "time": time.time(),
        "steps_since_log": since,
        "detail": detail,
        "global": {
            "norm_pre_clip": got["total_norm"],
            "norm": got["norm_after"],
            "clip_coef": got["clip_coef"],
            "clipped_steps": int(got["clipped"]),
            "clip_rate": got["clipped"] / max(since, 1),
            "skipped": bool(got["skipped"]),
            "skipped_steps": int(got["skipped_steps"]),
            "items": got["items"],
            "bytes_sent": int(report.bytes_sent),
            "bytes_since_log": bytes_since,
            "dense_bytes": None if dense is None else int(dense),
            "compression_ratio": dense / report.bytes_sent if dense is not None and report.bytes_sent else None,
        },  # fmt: skip
        "noise": _noise_record(got) if got["measured"] else None,
        "alerts": [],
        "ranks": ranks,
    }
    return {key: clean(value) for key, value in head.items()}


# The record's keys before and after its two tables of entries (`writers.STEP_FIELDS` order).
_BEFORE = ("type", "schema", "step", "time", "steps_since_log", "detail", "global")
_AFTER = ("noise", "alerts", "ranks")


# json.dumps(..., allow_nan=False) makes an encoder per call; one kept encoder writes the same text.
_ENCODE = json.JSONEncoder(allow_nan=False).encode
# The record's tail on a step with no noise sample, no alert and no gathered ranks: the same text every step.
_QUIET = _ENCODE({"noise": None, "alerts": [], "ranks": None})


class StepRecord:
    """A logged step's record: the step's own values (`head`, a dict) and its entries as columns.

    Written to the JSONL file as one line encoded from the columns (`line`); made a dict
    (`to_dict`, the record of `Tracker.history`) only when asked for.

    Example:
        >>> record = assemble(got, report, layout=layout, ...)
        >>> json.loads(record.line()) == record.to_dict()
        True
    """

    __slots__ = ("head", "params", "modules", "_dict")

    def __init__(self, head: dict[str, Any], params: _summary.Entries, modules: _summary.Entries) -> None:
        self.head, self.params, self.modules = head, params, modules
        self._dict: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as a dict (made once)."""
        if self._dict is None:
            head = self.head
            self._dict = {key: head[key] for key in _BEFORE}
            self._dict["modules"], self._dict["params"] = self.modules.to_dict(), self.params.to_dict()
            self._dict.update((key, head[key]) for key in _AFTER)
        return self._dict

    def line(self) -> str:
        """The record's JSON text: ``json.dumps(self.to_dict(), allow_nan=False)``, but that the tables of a
        float32-measured step write 9 significant digits (`entries.short_text`); `to_dict` reads the same values."""
        head = self.head
        before = _ENCODE({key: head[key] for key in _BEFORE})
        quiet = head["noise"] is None and not head["alerts"] and head["ranks"] is None  # gathered ranks may be []
        after = _QUIET if quiet else _ENCODE({key: head[key] for key in _AFTER})
        # One join: the tables are most of the text (hundreds of kB at thousands of tensors), copied once here.
        parts = (before[:-1], ', "modules": ', self.modules.encode(), ', "params": ', self.params.encode(), ", ")
        return "".join((*parts, after[1:]))


def assemble(
    got: dict[str, Any], report: StepReport, *, step: int, layout: _summary.Layout, numels: Sequence[int],
    counts: dict[int, tuple[int, int]], since: int, bytes_since: int, detail: bool, gathered: bool,
    deltas: list[float] | None = None, short: bool = False,
) -> StepRecord:  # fmt: skip
    """The record of a logged step from its read values `got` (`start_step`): per-parameter and
    per-module statistics (with host-counted NaN/Inf `counts`, and ||Δw||/||w|| from the read ||Δw|| per
    parameter `deltas`: zeros for a skipped step, None when the weights were not copied), the step's
    scalars and, if `gathered`, every rank's module norms. Alerts empty. `short`: the statistics were measured
    in float32, and are written with 9 significant digits (`entries.short_text`).

    The record is strict JSON as built (non-finite numbers are None), so no pass cleans it again."""
    if got["skipped"]:
        deltas = [0.0] * len(layout.names)  # a skipped step does not move the weights
    params, modules = _summary.summarize_columns(
        layout, numels, got["columns"], counts, deltas=deltas, detail=detail, short=short
    )
    ranks = rank_norms(layout, numels, got["ranks"]) if gathered else None
    head = step_record(got, report, step=step, since=since, bytes_since=bytes_since, detail=detail, ranks=ranks)
    return StepRecord(head, params, modules)


def standalone_report(ctx: GradContext, step: int, items: int | None) -> StepReport:
    """The `StepReport` of a step observed without a pipeline: no clipping, skipped when non-finite.

    Sets ``ctx.pre_clip_norms`` (the norms before and after clipping are the same); no host sync."""
    ctx.pre_clip_norms = ctx.norms() if len(ctx) else None
    total = ctx.total_norm()
    # In the host's widest dtype (float64 but on MPS), where a count above 2**24 is exact.
    count = on_device(math.nan if items is None else items, total.device, _stats.host_dtype(total.device))
    return StepReport(
        step=step, micro_steps=1, items=count, total_norm=total, norm_after=total, clip_coef=torch.ones_like(total),
        skipped=~torch.isfinite(total),
    )  # fmt: skip


def trainable(model: nn.Module | Sequence[tuple[str, Tensor]]) -> tuple[nn.Module | None, list[str], list[Tensor]]:
    """The module (None for ``named_parameters()`` pairs) and the names and tensors of its trainable parameters."""
    pairs = list(model.named_parameters()) if isinstance(model, nn.Module) else list(model)
    kept = [(n, p) for n, p in pairs if p.requires_grad]
    return (model if isinstance(model, nn.Module) else None), [n for n, _ in kept], [p for _, p in kept]


def histograms(ctx: GradContext, flight: InFlight, bins: int) -> dict[str, dict]:
    """TensorBoard histograms of the step's gradients per module. Their ranges are host values: this waits
    for the step's read (`flight`)."""
    flight.wait()
    layout, numels = _summary.Layout.of(ctx.names), list(map(Tensor.numel, ctx.grads))
    modules = _summary.summarize_columns(layout, numels, flight.values()["columns"], {}, strict=False)[1]
    return _stats.histograms(ctx.names, _dtensor.locals_of(ctx.grads), modules.to_dict(), bins)


def _noise_record(got: dict[str, Any]) -> dict[str, Any]:
    small_sq, small_batch, big_sq, big_batch = got.get("sample", (math.nan,) * 4)
    b_simple = got["b_simple"]
    estimate = b_simple if math.isfinite(b_simple) else None
    return {
        "small_sq": small_sq, "small_batch": small_batch, "big_sq": big_sq, "big_batch": big_batch,
        "g2": got["g2"], "trace": got["trace"], "b_simple": estimate,
        "advice": batch_advice(estimate, _batch_of_step(got["items"], big_batch)),
    }  # fmt: skip


def _batch_of_step(items: float, big_batch: float) -> float | None:
    """The batch the advice speaks of: the step's items over all ranks (the measured big
    batch can be one rank's window, when compressed averaging made the global one lossy)."""
    for value in (items, big_batch):
        if math.isfinite(value) and value > 0:
            return value
    return None


def gather_tables(table: Tensor, timeout: datetime.timedelta | None = None) -> Tensor | None:
    """Every rank's table, stacked (R, P, C), by one all-gather; None outside torch.distributed.

    Raises:
        gk.CollectiveError: a peer did not join within `timeout` (None: the process group's), naming the gather.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    out = [torch.empty_like(table) for _ in range(dist.get_world_size())]
    what = "Tracker(gather=True): all_gather of per-rank gradient statistics"
    gdist.run(dist.all_gather, what, timeout, out, table.contiguous())
    return torch.stack(out)


def rank_norms(
    layout: _summary.Layout, numels: Sequence[int], tables: list[list[list[float]]]
) -> list[dict[str, float]]:
    """Per rank, module -> pre-clip gradient norm, from the gathered tables (each read by column)."""
    if not layout.names:
        return []
    out = []
    for columns in tables:
        modules = _summary.summarize_columns(layout, numels, columns, {}, strict=False)[1]
        out.append(dict(zip(modules.names, modules.column("norm_pre_clip"))))
    return out


class WeightCopy:
    """The weights (this rank's shards) before a step, kept to measure ||Δw|| per parameter after it; no host sync.

    Laid out as `stats.FusedStats` lays out the gradients: the small weights (`stats.small_limit`) of a
    (device, dtype) group in one flat buffer (one concatenation, and after the step one subtraction and one
    float64 segment sum of squares), the others copied and measured with one foreach op per group. With
    thousands of tiny tensors on a CPU that is several times faster than a copy, a difference and a norm per
    tensor.

    Args:
        params: the parameters (DTensor shards: the norms are of the full updates, one all-reduce).
        groups: their grouping, if known.
        layout: their `stats.FusedStats` layout, if kept (their gradients' one: dense gradients have their
            weight's kind and size); else found from `params`.

    Example:
        >>> before = WeightCopy(params)
        >>> optimizer.step()
        >>> deltas = before.norms(params)      # ||Δw|| per parameter, one 1-D tensor
    """

    def __init__(
        self, params: Sequence[Tensor], groups: _foreach.Groups | None = None, layout: _stats.FusedStats | None = None
    ) -> None:
        local = _dtensor.locals_of(params)
        if layout is None:
            layout = _stats.FusedStats.of(local, groups if groups is not None else _foreach.Groups.of(local))
        self.layout = layout
        self.device = local[0].device if local else torch.device("cpu")
        self.copies: list[Tensor] | None = self.layout.snapshot(local)
        self._kinds = kinds(local)

    def norms(self, params: Sequence[Tensor]) -> Tensor | None:
        """||Δw|| per parameter from the weights now, on the first weight's device (float64 but on MPS); None if
        a weight changed shape, dtype or device since the copy (resized through ``.data``, a model converted in
        place), as a difference is then not defined. The copy is consumed (it becomes the differences): call once."""
        if self.copies is None:
            raise RuntimeError("WeightCopy.norms was already called: the copy became the differences; copy again")
        copies, self.copies = self.copies, None
        local = _dtensor.locals_of(params)
        if kinds(local) != self._kinds:
            return None
        dtype = _stats.host_dtype(self.device)
        deltas = self.layout.norms(local, self.device, dtype, minus=copies)
        if _dtensor.any_dtensor(params):  # norms of the full updates, from the shards'
            deltas = _dtensor.reduce_sums(deltas.square(), params).sqrt()
        return deltas
