"""gk.EMA: equal to torch's AveragedModel EMA, the warmup ramp, buffers, swapping, state and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import gradkit as gk
from dist_helpers import run_workers


def _model(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).to(dtype)


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    F.mse_loss(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()


def _assert_params_close(ours: nn.Module, theirs: nn.Module, tol: float = 1e-12) -> None:
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert (a - b).abs().max().item() <= tol, name


def test_equals_torch_averaged_model_by_hand():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = gk.EMA(model, decay=0.9, warmup=False)
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    reference.update_parameters(model)  # its first update copies the model, as gk.EMA's construction does
    for step in range(12):
        _train_step(model, optimizer, step)
        ema.update()
        reference.update_parameters(model)
    _assert_params_close(ema.module, reference.module)
    # The average lags the model: the comparison is not trivially between two copies of it.
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(ema.module.parameters(), model.parameters()))


def test_equals_torch_averaged_model_through_the_pipeline_and_skips_nonfinite_steps():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = gk.EMA(model, decay=0.8, warmup=False)
    pipe = gk.GradientPipeline(model, accumulation_steps=2, ema=ema)
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8))
    reference.update_parameters(model)
    for step in range(6):
        for micro in range(2):
            g = torch.Generator().manual_seed(10 * step + micro)
            x = torch.randn(4, 6, generator=g, dtype=torch.float64)
            y = torch.randn(4, 3, generator=g, dtype=torch.float64)
            loss = F.mse_loss(model(x), y, reduction="sum")
            if step == 3:
                loss = loss * float("nan")  # a skipped step must not move the average
            pipe.backward(loss, num_items=y.numel())
            stepped = pipe.step(optimizer)
        if stepped:
            reference.update_parameters(model)
    assert pipe.skipped_steps == 1 and ema.updates == 5
    _assert_params_close(ema.module, reference.module)


def test_warmup_ramp_and_every():
    model = nn.Linear(3, 2, dtype=torch.float64)
    ema = gk.EMA(model, decay=0.99, warmup=True, every=2)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    updates = 0
    for call in range(1, 9):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(float(call))
        ema.update()
        if call % 2 == 0:
            d = min(0.99, (1 + updates) / (10 + updates))
            for n, p in model.named_parameters():
                expected[n] = d * expected[n] + (1 - d) * p.detach()
            updates += 1
    assert ema.updates == 4 and ema.calls == 8
    for n, p in ema.module.named_parameters():
        torch.testing.assert_close(p, expected[n], rtol=0, atol=1e-12)
    assert ema.current_decay() == pytest.approx(min(0.99, 5 / 14))


@pytest.mark.parametrize("buffers", ["copy", "average"])
def test_buffers_copied_or_averaged(buffers):
    model = _model()
    ema = gk.EMA(model, decay=0.5, warmup=False, buffers=buffers)
    before = ema.module[1].running_mean.clone()
    model.train()
    model(torch.randn(8, 6, dtype=torch.float64))  # moves the BatchNorm statistics
    ema.update()
    bn, ema_bn = model[1], ema.module[1]
    if buffers == "copy":
        torch.testing.assert_close(ema_bn.running_mean, bn.running_mean, rtol=0, atol=0)
    else:
        torch.testing.assert_close(ema_bn.running_mean, 0.5 * before + 0.5 * bn.running_mean, rtol=0, atol=1e-15)
    assert ema_bn.num_batches_tracked.item() == bn.num_batches_tracked.item() == 1  # integers are copied


def test_swapped_puts_average_in_and_restores_exactly():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = gk.EMA(model, decay=0.7)
    for step in range(3):
        _train_step(model, optimizer, step)
        ema.update()
    trained = copy.deepcopy(model.state_dict())
    with ema.swapped() as swapped:
        assert swapped is model
        for name, value in model.state_dict().items():
            torch.testing.assert_close(value, ema.module.state_dict()[name], rtol=0, atol=0)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0)
    with pytest.raises(KeyError), ema.swapped():
        raise KeyError("restored even when the block raises")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0)


def test_state_dict_resume_is_exact():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = gk.EMA(model, decay=0.95)
    for step in range(3):
        _train_step(model, optimizer, step)
        ema.update()
    saved = ema.state_dict()
    resumed = gk.EMA(copy.deepcopy(model), decay=0.95)
    resumed.load_state_dict(saved)
    resumed.model = model  # follow the same training run from here
    for step in range(3, 6):
        _train_step(model, optimizer, step)
        ema.update()
        resumed.update()
    assert resumed.updates == ema.updates == 6
    for a, b in zip(ema.module.state_dict().values(), resumed.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_state_dict_from_another_model_names_first_mismatch():
    ema = gk.EMA(_model(), decay=0.9)
    other = gk.EMA(nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).double())
    before = copy.deepcopy(ema.state_dict())
    with pytest.raises(ValueError, match=r"'3.weight' is \(4, 16\) float64 in the state but \(3, 16\) float64 here"):
        ema.load_state_dict(other.state_dict())
    state = ema.state_dict()
    del state["module"]["1.running_var"]
    with pytest.raises(ValueError, match="'1.running_var' is missing"):
        ema.load_state_dict(state)
    with pytest.raises(ValueError, match="missing keys"):
        ema.load_state_dict({"module": {}})
    for name, value in ema.state_dict()["module"].items():  # nothing changed
        torch.testing.assert_close(value, before["module"][name], rtol=0, atol=0)


def test_update_raises_when_model_changed_shape():
    model = _model()
    ema = gk.EMA(model)
    model[3] = nn.Linear(16, 5).double()
    with pytest.raises(RuntimeError, match=r"'3.weight' is \(5, 16\) float64 in the model but \(3, 16\) float64"):
        ema.update()
    assert ema.calls == 0 and ema.updates == 0
    model.extra = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="'extra.bias' is only in the model"):
        ema.update()


@pytest.mark.parametrize("decay", [0, 1, 1.5, -0.1, float("nan"), True, "0.9"])
def test_bad_decay_refused(decay):
    with pytest.raises(ValueError, match=r"decay must be in \(0, 1\)"):
        gk.EMA(nn.Linear(2, 2), decay=decay)


def test_bad_arguments_refused():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        gk.EMA([nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="every must be >= 1"):
        gk.EMA(nn.Linear(2, 2), every=0)
    with pytest.raises(ValueError, match="buffers must be one of"):
        gk.EMA(nn.Linear(2, 2), buffers="mean")
    with pytest.raises(TypeError, match="ema must be gk.EMA"):
        gk.GradientPipeline(nn.Linear(2, 2), ema=0.999)


def test_module_is_an_independent_copy_without_grad():
    model = nn.Linear(3, 2)
    ema = gk.EMA(model)
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(ema.module.parameters(), model.parameters()))


def _fsdp_worker(rank: int, world_size: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    plain = copy.deepcopy(model)
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.1)
    ema = gk.EMA(model, decay=0.8, warmup=False)
    reference = AveragedModel(plain, multi_avg_fn=get_ema_multi_avg_fn(0.8))
    reference.update_parameters(plain)
    for step in range(4):
        # Every rank sees the whole batch: the sharded model follows the plain one exactly.
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        F.mse_loss(plain(x), y).backward()
        plain_optimizer.step()
        plain_optimizer.zero_grad()
        ema.update()
        reference.update_parameters(plain)
    sharded = ema.state_dict()["module"]
    errors, swapped_errors = {}, {}
    with ema.swapped():
        in_model = {n: p.full_tensor() for n, p in model.named_parameters()}
    for name, p in reference.module.named_parameters():
        errors[name] = (sharded[name].full_tensor() - p).abs().max().item()
        swapped_errors[name] = (in_model[name] - p).abs().max().item()
    restored = max((p.full_tensor() - q).abs().max().item() for p, q in zip(model.parameters(), plain.parameters()))
    with pytest.raises(RuntimeError, match="FSDP2"):
        _ = ema.module
    local_sizes = [sharded[n].to_local().numel() for n in sharded]
    full_sizes = [p.numel() for p in reference.module.parameters()]
    return {"errors": errors, "swapped": swapped_errors, "restored": restored, "local": local_sizes, "full": full_sizes}


def test_fsdp2_sharded_parameters_are_averaged_shard_wise():
    results = run_workers(_fsdp_worker, 2, timeout=120)
    for result in results:
        assert max(result["errors"].values()) <= 1e-12, result["errors"]
        assert max(result["swapped"].values()) <= 1e-12, result["swapped"]
        assert result["restored"] <= 1e-12  # the trained shards came back after swapped()
        assert sum(result["local"]) < sum(result["full"])  # each rank holds only its shards
