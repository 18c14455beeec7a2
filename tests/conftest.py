"""Shared by every test: tests marked `cuda` run only where CUDA is available.

`pytest -m cuda` selects exactly those tests (tests/test_cuda.py); without a GPU
they are reported as skipped, never as failed.
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
