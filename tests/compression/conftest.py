"""Shared by the compression tests: one intra-op thread."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Nearly every tensor here is tiny: intra-op threads only add barrier waits, and
    # those grow to milliseconds per op when other processes share the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
