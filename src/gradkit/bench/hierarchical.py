"""Two nodes of two processes on a 1 Gbit/s link: hierarchical averaging against flat.

Two fresh network namespaces (the "nodes") joined by a veth pair shaped to
1 Gbit/s (as in `network`); two gloo workers in each, which reach each other
inside their namespace through loopback (traffic to a local address never
leaves the namespace, so only the cross-node hop is shaped). Interleaved step by
step in the same four processes, on the ~17M-parameter MLP:

- gk.Average(node_size=2) against flat dense gk.Average(): each rank sends half of
  every bucket across nodes instead of a ring all-reduce's share, about 1.5x less
  traffic on the link;
- gk.Average(gk.TopK(0.01), node_size=2) against flat dense gk.Average(): 1% of a
  shard crosses the link.

Needs root, `ip` and `tc`; skipped with a message otherwise.
"""

from __future__ import annotations

import dataclasses

from gradkit.bench.averaging import BATCH, MAX_REPEATS, TINY_SIZES, step_rows
from gradkit.bench.common import Row, Settings
from gradkit.bench.network import PORT, QUICK_SIZES, TOPK_SIZES, Skip, shaped_link
from gradkit.bench.processes import run_workers

__all__ = ["run"]

NODE_SIZE = 2
DENSE_GOAL = 1.4  # the traffic ratio is 1.5: hierarchical dense at least 1.4x faster than flat dense
TOPK_GOAL = 10.0
TIMEOUT = 600.0


def run(settings: Settings) -> list[Row]:
    where = "2 namespaces x 2 processes, veth shaped to 1 Gbit/s"
    try:
        with shaped_link() as sides:
            if settings.tiny:
                sizes = TINY_SIZES
            elif settings.repeats < 20:  # --quick
                sizes = QUICK_SIZES
            else:
                sizes = TOPK_SIZES
            result = _run_nodes(sides, sizes, settings)
    except Skip as reason:
        return [
            Row(f"Average(node_size={NODE_SIZE}) across a 1 Gbit/s link", "cpu", "flat Average()", DENSE_GOAL,
                note=f"skipped: {reason}"),
            Row(f"Average(TopK(0.01), node_size={NODE_SIZE}) across a 1 Gbit/s link", "cpu", "flat Average()",
                TOPK_GOAL, note=f"skipped: {reason}"),
        ]  # fmt: skip
    topk = {**result, "samples": {**result["samples"], "gradkit": result["samples"]["topk"]}}
    topk["bytes_sent"] = {**result["bytes_sent"], "gradkit": result["bytes_sent"]["topk"]}
    dense_goal = f"<= 1/{DENSE_GOAL:g}"
    rows = step_rows(result, where, "cpu", "flat Average()", DENSE_GOAL, "hierarchical / flat", dense_goal)
    rows += step_rows(
        topk, where, "cpu", "flat Average()", TOPK_GOAL, "hierarchical TopK / flat", f"<= 1/{TOPK_GOAL:g}"
    )
    rows[0] = _renamed(rows[0], f"Average(node_size={NODE_SIZE})")
    rows[1] = _renamed(rows[1], f"Average(TopK(0.01), node_size={NODE_SIZE})")
    return rows


def _renamed(row: Row, name: str) -> Row:
    _, _, rest = row.benchmark.partition(", MLP")
    return dataclasses.replace(row, benchmark=f"{name}, MLP{rest}")


def _run_nodes(sides, sizes: tuple[int, ...], settings: Settings) -> dict:
    (_, _, address0), _ = sides
    init = f"tcp://{address0}:{PORT}"
    commands = []
    for rank in range(NODE_SIZE * len(sides)):
        ns, dev, _ = sides[rank // NODE_SIZE]
        args = [
            "ip", "netns", "exec", ns, "--", "average", "--rank", str(rank), "--world", str(NODE_SIZE * len(sides)),
            "--init", init, "--pair", "hier", "--node-size", str(NODE_SIZE), "--sizes", ",".join(map(str, sizes)),
            "--batch", str(BATCH), "--warmup", str(min(settings.warmup, 2)),
            "--repeats", str(min(settings.repeats, MAX_REPEATS // 2)),
        ]  # fmt: skip
        commands.append((args, {"GLOO_SOCKET_IFNAME": dev}))
    return run_workers(commands, TIMEOUT)[0]
