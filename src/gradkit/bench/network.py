"""Two hosts on a 1 Gbit/s link: averaging steps across a shaped veth pair between two network namespaces.

One gloo worker runs in each of two fresh network namespaces joined by a veth
pair whose both ends are shaped with a token bucket (``tbf rate 1gbit burst
256kb latency 50ms``), the bandwidth of an ordinary data-centre or office link.
Measured, interleaved step by step in the same two processes:

- a gradkit dense-averaging step against a DDP step (the ~25M-parameter MLP);
- a step with gk.Average(gk.TopK(0.01)) against dense gk.Average() on a
  ~17M-parameter MLP: on a slow link, sending 1% of the entries should win
  even though selecting them costs time.

Needs root, `ip` and `tc` (iproute2); skipped with a message otherwise. The
namespaces are created with unique names and always removed.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator

from gradkit.bench.averaging import BATCH, FULL_SIZES, GOAL, MAX_REPEATS, TINY_SIZES, step_rows
from gradkit.bench.common import Row, Settings
from gradkit.bench.processes import run_workers

__all__ = ["run"]

SHAPING = ("tbf", "rate", "1gbit", "burst", "256kb", "latency", "50ms")
TOPK_SIZES = (1024, 4096, 2304, 1024, 1024)  # 17.1M parameters
TOPK_GOAL = 4.0  # issue 17: the compressed step at least 4x faster than dense on this link
# Quick runs use a ~4M-parameter MLP: the link still dominates, and the whole part stays well under a minute.
QUICK_SIZES = (512, 2048, 1024, 512)
PORT = 29531  # the namespaces are fresh, so no other process holds it
TIMEOUT = 420.0


class Skip(Exception):
    """The link cannot be built here; the message says why."""


def run(settings: Settings) -> list[Row]:
    label_ddp = "Average() step across a 1 Gbit/s link"
    label_topk = "Average(TopK(0.01)) across a 1 Gbit/s link"
    try:
        with shaped_link() as sides:
            if settings.tiny:
                sizes_ddp = sizes_topk = TINY_SIZES
            elif settings.repeats < 20:  # --quick
                sizes_ddp = sizes_topk = QUICK_SIZES
            else:
                sizes_ddp, sizes_topk = FULL_SIZES, TOPK_SIZES
            where = "2 namespaces, veth shaped to 1 Gbit/s"
            ddp = _run_pair(sides, "ddp", sizes_ddp, settings)
            rows = step_rows(ddp, where, "cpu", "DDP", GOAL, "gradkit / DDP", "<= 1.05")
            topk = _run_pair(sides, "topk", sizes_topk, settings)
            rows += step_rows(topk, where, "cpu", "dense Average()", TOPK_GOAL, "TopK / dense", f"<= 1/{TOPK_GOAL:g}")
            return rows
    except Skip as reason:
        return [
            Row(label_ddp, "cpu", "DDP", GOAL, note=f"skipped: {reason}"),
            Row(label_topk, "cpu", "dense Average()", TOPK_GOAL, note=f"skipped: {reason}"),
        ]


def _run_pair(sides, pair: str, sizes: tuple[int, ...], settings: Settings) -> dict:
    (ns0, dev0, address0), _ = sides
    init = f"tcp://{address0}:{PORT}"
    commands = []
    for rank, (ns, dev, _) in enumerate(sides):
        args = [
            "ip", "netns", "exec", ns, "--", "average", "--rank", str(rank), "--world", "2", "--init", init,
            "--pair", pair, "--sizes", ",".join(map(str, sizes)), "--batch", str(BATCH),
            "--warmup", str(min(settings.warmup, 2)), "--repeats", str(min(settings.repeats, MAX_REPEATS // 2)),
        ]  # fmt: skip
        commands.append((args, {"GLOO_SOCKET_IFNAME": dev}))
    return run_workers(commands, TIMEOUT)[0]


@contextlib.contextmanager
def shaped_link() -> Iterator[list[tuple[str, str, str]]]:
    """Two namespaces with a veth pair between them, both ends shaped; yields (namespace, device, address) per side."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        raise Skip("needs root on Linux (network namespaces)")
    if shutil.which("ip") is None or shutil.which("tc") is None:
        raise Skip("needs `ip` and `tc` (apt-get install iproute2)")
    tag = f"{os.getpid() % 100000}{random.randrange(100)}"  # interface names are at most 15 characters
    subnet = f"10.214.{random.randrange(1, 250)}"
    sides = [(f"gkbenchA{tag}", f"gkbA{tag}", f"{subnet}.1"), (f"gkbenchB{tag}", f"gkbB{tag}", f"{subnet}.2")]
    created = []
    try:
        try:
            for ns, _, _ in sides:
                _ip("netns", "add", ns)
                created.append(ns)
            _ip("link", "add", sides[0][1], "type", "veth", "peer", "name", sides[1][1])
            for ns, dev, address in sides:
                _ip("link", "set", dev, "netns", ns)
                _ip("-n", ns, "addr", "add", f"{address}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                _command("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", *SHAPING)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as error:
            detail = (getattr(error, "stderr", "") or str(error)).strip()
            raise Skip(f"cannot set up network namespaces here: {detail}") from None
        yield sides
    finally:
        for ns in created:  # deleting a namespace deletes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def _ip(*args: str) -> None:
    _command("ip", *args)


def _command(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=30)
