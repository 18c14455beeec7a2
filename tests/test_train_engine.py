"""The training engine's choices from the config (optimizer, schedule, compressor, device) and its checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

import gradkit as gk
from gradkit.train.config import ConfigError, config_from, load_config
from gradkit.train.device import backend_for, describe_device, local_workers, resolve_device, worker_device
from gradkit.train.engine import (
    choose_device,
    load_checkpoint,
    lr_at,
    make_clip,
    make_compressor,
    make_optimizer,
    save_checkpoint,
)
from gradkit.train.launch import check_setup
from gradkit.train.model import build_model


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
    config = config_from(
        {"compressor": "dgc", "density": 0.001, "steps": 400, "dgc_warmup": 0.025, "sparse_values": "float16"}
    )
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


# -- the device ------------------------------------------------------------------------

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without CUDA")


@pytest.fixture
def gpus(monkeypatch):
    """Pretend to see `n` GPUs (only for the decisions made before any worker starts; nothing runs on them)."""

    def see(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return see


def test_auto_is_cuda_when_available_else_cpu():
    assert resolve_device("auto", 1) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu", 64) == "cpu"
    assert config_from({}).device == "auto"


@needs_no_cuda
def test_cuda_without_cuda_names_what_was_found():
    with pytest.raises(ConfigError) as caught:
        resolve_device("cuda", 1)
    message = str(caught.value)
    assert message.startswith("--device cuda: torch.cuda.is_available() is False (")
    assert f"torch {torch.__version__}" in message and "--device cpu" in message and "\n" not in message
    if torch.version.cuda is None:
        assert "a CPU build" in message and "install a CUDA build of torch" in message


def test_more_workers_than_gpus(gpus):
    gpus(2)
    assert resolve_device("cuda", 2) == "cuda" and resolve_device("auto", 2) == "cuda"
    wanted = r"--device cuda with 3 workers on this machine needs 3 GPUs \(one per worker\), found 2; pass --workers 2 "
    with pytest.raises(ConfigError, match=wanted + ".*or --device cpu"):
        resolve_device("cuda", 3)
    assert resolve_device("auto", 3) == "cpu"  # NCCL cannot share a GPU between ranks: auto falls back
    assert "pass --workers 2 to train on CUDA" in describe_device("auto", "cpu", 3)
    assert describe_device("cpu", "cpu", 3) == "cpu"


def test_torchrun_counts_the_workers_of_this_machine(gpus, monkeypatch):
    gpus(4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert local_workers(2) == 8
    with pytest.raises(ConfigError, match="needs 8 GPUs"):
        resolve_device("cuda", local_workers(2))
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert local_workers(2) == 2


def test_a_local_rank_without_a_gpu_is_refused(gpus, monkeypatch):
    gpus(1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match="local rank 1 has no GPU of its own"):
        worker_device("cuda")


def test_the_device_key_of_the_config(tmp_path):
    assert config_from({"device": "cpu"}).device == "cpu"
    with pytest.raises(ConfigError, match="device must be one of auto, cpu, cuda; got 'gpu'"):
        config_from({"device": "gpu"})
    path = tmp_path / "run.toml"
    path.write_text('[run]\ndevice = "cpu"\n')
    assert load_config(path).device == "cpu" and load_config(path, device="auto").device == "auto"


def test_check_setup_resolves_auto(tmp_path):
    config = config_from({"device": "auto", "run_dir": str(tmp_path), "workers": 1})
    resolved = check_setup(config)
    assert resolved.device == ("cuda" if torch.cuda.is_available() else "cpu") and config.device == "auto"


def test_each_worker_gets_its_device_and_backend():
    assert worker_device("cpu") == torch.device("cpu") and backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 0)) == "nccl"
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert choose_device(config_from({"device": "auto"}), distributed=False) == expected


def test_a_cpu_checkpoint_resumes_onto_the_device_of_the_run(tmp_path):
    """Save after two steps, load into a fresh model: weights, optimizer state, pipeline state and RNG return;
    AdamW's step counts stay on the CPU where torch keeps them."""
    config = config_from({"width": 16, "layers": 1, "context": 8, "compressor": "none"})

    def parts():
        torch.manual_seed(0)
        model = build_model("transformer", 11, config.width, config.layers, config.context)
        optimizer = make_optimizer(config, model.parameters())
        pipe = gk.GradientPipeline(model, accumulation_steps=2, clip=make_clip(config))
        return model, optimizer, pipe

    model, optimizer, pipe = parts()
    for _ in range(5):  # two steps and a half: the pipeline holds a partial window
        x = torch.randint(11, (3, 8))
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, 11), x.reshape(-1), reduction="sum")
        pipe.backward(loss, num_items=24)
        pipe.step(optimizer)
    save_checkpoint(tmp_path, 2, 0, model, optimizer, pipe, False, {"workers": 1})
    rng = torch.get_rng_state()
    torch.manual_seed(123)
    fresh, fresh_optimizer, fresh_pipe = parts()
    assert load_checkpoint(tmp_path, 0, 1, fresh, fresh_optimizer, fresh_pipe, torch.device("cpu")) == 2
    assert torch.equal(torch.get_rng_state(), rng)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    for state, loaded in zip(optimizer.state.values(), fresh_optimizer.state.values()):
        assert loaded["step"].device.type == "cpu" and torch.equal(state["exp_avg"], loaded["exp_avg"])
    assert fresh_pipe.steps == pipe.steps == 2 and fresh_pipe.window.micro_steps == 1
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a.grad, b.grad)
    with pytest.raises(ConfigError, match="resume with workers = 1"):
        load_checkpoint(tmp_path, 0, 2, fresh, fresh_optimizer, fresh_pipe)
