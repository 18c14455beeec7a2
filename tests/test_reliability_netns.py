"""Bad links: two gloo ranks in two network namespaces joined by a veth pair shaped with
netem (50 ms delay, 1 % loss each way; a token-bucket rate limit where the kernel has no
netem, with a warning) train with gk.Average and end with exactly the parameters of the
same run on loopback. Needs root, `ip` and `tc`; skips otherwise."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
LIMIT = 180  # seconds for both runs together


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(rank: int, init_method: str, interface: str, out: Path, namespace: str | None) -> subprocess.Popen:
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    env = {**os.environ, "GLOO_SOCKET_IFNAME": interface, "OMP_NUM_THREADS": "1"}
    command = [*prefix, sys.executable, str(HERE / "netns_worker.py"), str(rank), init_method, str(out)]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


NETEM = ("netem", "delay", "50ms", "loss", "1%")
TBF = ("tbf", "rate", "8mbit", "burst", "16kbit", "latency", "50ms")  # where the kernel lacks netem


def _shape(namespace: str, device: str) -> tuple[str, ...]:
    """Shape the device's egress with netem, or with a token bucket where netem is missing."""
    for shaping in (NETEM, TBF):
        try:
            _run("ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", device, "root", *shaping)
            return shaping
        except subprocess.CalledProcessError as error:
            if shaping is TBF or "unknown" not in error.stderr:
                raise
    raise AssertionError("unreachable")


@pytest.fixture
def namespaces():
    """Two fresh namespaces with a shaped veth pair between them; always removed."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("bad-link test needs root on Linux (network namespaces)")
    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("bad-link test needs `ip` and `tc` (apt-get install iproute2)")
    tag = f"{os.getpid() % 100000}{random.randrange(100)}"
    subnet = f"10.213.{random.randrange(1, 250)}"
    sides = [(f"gkrelA{tag}", f"gkvA{tag}", f"{subnet}.1"), (f"gkrelB{tag}", f"gkvB{tag}", f"{subnet}.2")]
    created = []
    try:
        try:
            for ns, _, _ in sides:
                _run("ip", "netns", "add", ns)
                created.append(ns)
            _run("ip", "link", "add", sides[0][1], "type", "veth", "peer", "name", sides[1][1])
            for ns, dev, address in sides:
                _run("ip", "link", "set", dev, "netns", ns)
                _run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", dev)
                _run("ip", "-n", ns, "link", "set", dev, "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                shaping = _shape(ns, dev)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as error:
            detail = getattr(error, "stderr", "") or error
            pytest.skip(f"cannot set up network namespaces here: {detail}")
        if shaping != NETEM:
            warnings.warn(
                f"this kernel has no netem qdisc: the link was shaped with `{' '.join(shaping)}` instead (rate and "
                "queueing, no loss)",
                stacklevel=1,  # the fixture itself is where the shaping was chosen
            )
        yield sides
    finally:
        for ns in created:  # deleting a namespace deletes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def test_shaped_link_gives_the_loopback_result(namespaces, tmp_path):
    (ns0, dev0, address0), (ns1, dev1, _) = namespaces
    shaped_init = f"tcp://{address0}:29517"
    loop_init = f"tcp://127.0.0.1:{_free_port()}"
    processes = [
        _start(0, shaped_init, dev0, tmp_path / "shaped-0.pt", ns0),
        _start(1, shaped_init, dev1, tmp_path / "shaped-1.pt", ns1),
        _start(0, loop_init, "lo", tmp_path / "loop-0.pt", None),
        _start(1, loop_init, "lo", tmp_path / "loop-1.pt", None),
    ]
    outputs = []
    try:
        for process in processes:
            try:
                outputs.append(process.communicate(timeout=LIMIT)[0])
            except subprocess.TimeoutExpired:
                raise AssertionError(f"a worker did not finish in {LIMIT} s") from None
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    loop = [torch.load(tmp_path / f"loop-{r}.pt", weights_only=True) for r in (0, 1)]
    shaped = [torch.load(tmp_path / f"shaped-{r}.pt", weights_only=True) for r in (0, 1)]
    for rank in (0, 1):
        for a, b in zip(shaped[rank], loop[rank]):
            assert torch.equal(a, b)
    for a, b in zip(shaped[0], shaped[1]):
        assert torch.equal(a, b)
