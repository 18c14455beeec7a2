"""The training engine's choices: optimizer, learning-rate schedule and compressor settings from the config."""

from __future__ import annotations

import math

import pytest
import torch

import gradkit as gk
from gradkit.train.config import ConfigError, config_from
from gradkit.train.engine import lr_at, make_clip, make_compressor, make_optimizer


def params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(3))]


def test_adamw_is_the_default_optimizer():
    optimizer = make_optimizer(config_from({"lr": 0.01}), params())
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["lr"] == 0.01


@pytest.mark.parametrize("compressor, momentum", [("topk", 0.8), ("none", 0.8), ("dgc", 0.0)])
def test_sgd_momentum_moves_into_dgc(compressor, momentum):
    config = config_from({"optimizer": "sgd", "momentum": 0.8, "compressor": compressor, "density": 0.001})
    optimizer = make_optimizer(config, params())
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["momentum"] == momentum
    if compressor == "dgc":
        assert make_compressor(config).momentum == 0.8  # DGC accumulates it (momentum correction)


def test_cosine_schedule_falls_from_lr_to_zero():
    config = config_from({"lr": 0.5, "steps": 100, "schedule": "cosine"})
    rates = [lr_at(config, step) for step in range(100)]
    assert rates[0] == 0.5
    assert rates[50] == pytest.approx(0.25)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert 0 < rates[-1] < 0.5 * (1 - math.cos(math.pi / 100)) + 1e-12
    assert lr_at(config_from({"lr": 0.5}), 77) == 0.5  # constant


def test_dgc_warmup_and_sparse_value_dtype_come_from_the_config():
    config = config_from({"compressor": "dgc", "density": 0.001, "steps": 400, "dgc_warmup": 0.025, "sparse_values": "float16"})
    dgc = make_compressor(config)
    assert isinstance(dgc, gk.DGC)
    assert dgc.warmup_steps == 10 and dgc.value_dtype == torch.float16
    assert dgc.density_at(9) > 0.001 and dgc.density_at(10) == 0.001
    topk = make_compressor(config_from({"compressor": "topk", "sparse_values": "bfloat16"}))
    assert topk.value_dtype == torch.bfloat16


def test_local_clipping_moves_into_dgc_scaled_by_the_square_root_of_the_workers():
    config = config_from({"compressor": "dgc", "density": 0.001, "clip": "local", "max_norm": 2.0})
    assert make_compressor(config, workers=4).clip_norm == pytest.approx(1.0)
    assert make_clip(config) == []  # no stage after averaging: the clip happened before compression
    assert make_compressor(config_from({"compressor": "dgc", "density": 0.001}), workers=4).clip_norm is None


def test_local_clipping_needs_dgc():
    with pytest.raises(ConfigError, match="clip = 'local' clips before compression.*compressor = 'topk'"):
        config_from({"compressor": "topk", "clip": "local"})
