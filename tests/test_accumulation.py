"""Accumulation against the outside reference: one full-batch step on all items."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradkit as gk


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def token_batches(lengths: list[int], seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Micro-batches of very different lengths (as with variable-length sequences)."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64))
        for n in lengths
    ]


def sum_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).sum()


def full_batch_step(model: nn.Module, batches, lr: float) -> None:
    """The reference: one SGD step on the mean loss over every item of `batches`."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    model.zero_grad()
    (sum_loss(model, x, y) / x.shape[0]).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad


def assert_same_params(a: nn.Module, b: nn.Module, atol: float = 1e-12) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, rtol=0, atol=atol), f"{name} differs by {(pa - pb).abs().max().item():.3e}"


def test_item_mode_equals_full_batch_for_very_different_lengths():
    lengths = [1, 29, 3, 17]
    model, reference = make_model(), make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pipe = gk.GradientPipeline(model, accumulation_steps=len(lengths))
    batches = token_batches(lengths)
    for x, y in batches:
        pipe.backward(sum_loss(model, x, y), num_items=x.shape[0])
        stepped = pipe.step(optimizer)
    assert stepped
    full_batch_step(reference, batches, lr=0.1)
    assert_same_params(model, reference)
    assert int(pipe.last.items) == sum(lengths)


def test_mean_of_micro_batch_means_is_not_the_full_batch_gradient():
    """Why item mode exists: the classic mean-of-means differs for uneven lengths."""
    lengths = [1, 29, 3, 17]
    model, reference = make_model(), make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pipe = gk.GradientPipeline(model, accumulation_steps=len(lengths))
    batches = token_batches(lengths)
    for x, y in batches:
        pipe.backward(sum_loss(model, x, y) / x.shape[0])  # mean loss, mean mode
        pipe.step(optimizer)
    full_batch_step(reference, batches, lr=0.1)
    worst = max((a - b).abs().max().item() for a, b in zip(model.parameters(), reference.parameters()))
    assert worst > 1e-4


def test_mean_mode_equals_full_batch_for_equal_lengths():
    model, reference = make_model(), make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pipe = gk.GradientPipeline(model, accumulation_steps=3)
    batches = token_batches([8, 8, 8])
    for x, y in batches:
        pipe.backward(sum_loss(model, x, y) / x.shape[0])
        pipe.step(optimizer)
    full_batch_step(reference, batches, lr=0.1)
    assert_same_params(model, reference)
    assert int(pipe.last.items) == 3  # micro-batches, in mean mode


def test_uneven_last_window_through_flush():
    lengths = [4, 9, 2, 11, 7, 1, 5, 3, 12, 6]  # K=4: windows of 4, 4 and a flushed 2
    model, reference = make_model(), make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    pipe = gk.GradientPipeline(model, accumulation_steps=4)
    batches = token_batches(lengths, seed=3)
    steps = 0
    for x, y in batches:
        pipe.backward(sum_loss(model, x, y), num_items=x.shape[0])
        steps += pipe.step(optimizer)
    assert steps == 2 and pipe.window.micro_steps == 2
    assert pipe.flush(optimizer)
    assert pipe.last.micro_steps == 2 and int(pipe.last.items) == 12 + 6
    for window in (batches[0:4], batches[4:8], batches[8:10]):
        full_batch_step(reference, window, lr=0.05)
    assert_same_params(model, reference)
    assert not pipe.flush(optimizer)  # nothing left: a no-op, not an error


def test_tensor_num_items_equals_int_num_items():
    lengths = [3, 10, 6]
    results = []
    for as_tensor in (False, True):
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        pipe = gk.GradientPipeline(model, accumulation_steps=3)
        for x, y in token_batches(lengths):
            n = torch.tensor(x.shape[0]) if as_tensor else x.shape[0]
            pipe.backward(sum_loss(model, x, y), num_items=n)
            pipe.step(optimizer)
        results.append(copy.deepcopy(model))
    assert_same_params(results[0], results[1], atol=0)


@pytest.mark.parametrize(
    "dtype, per", [(torch.uint8, 200), (torch.int16, 20000), (torch.int32, 2**30)], ids=["uint8", "int16", "int32"]
)
def test_small_integer_num_items_are_counted_without_wrapping_around(dtype, per):
    # Two micro-batches of `per` items each: their sum does not fit the count's own dtype (400 > 255,
    # 40000 > 32767, 2**31 > 2**31 - 1). The window counts in int64, so the step divides by 2 * per.
    w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    pipe = gk.GradientPipeline([w], accumulation_steps=2)
    for _ in range(2):
        pipe.backward((w * 1.0).sum() * per, num_items=torch.tensor(per, dtype=dtype))  # a mean gradient of 1
    assert pipe.step(torch.optim.SGD([w], lr=1.0))
    assert pipe.last.items.dtype == torch.int64 and pipe.last.items.item() == 2 * per
    assert w.item() == -1.0


def test_one_num_items_buffer_refilled_for_every_micro_batch_counts_each_fill():
    # A loop that keeps one count tensor and refills it in place for each micro-batch (as a collate buffer
    # might): the window must count what each fill held (2 + 5), not the buffer's last value twice.
    batches = token_batches([2, 5])
    model, reference = make_model(), make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pipe = gk.GradientPipeline(model, accumulation_steps=2)
    buffer = torch.zeros((), dtype=torch.int64)
    for x, y in batches:
        buffer.fill_(x.shape[0])
        pipe.backward(sum_loss(model, x, y), num_items=buffer)
        pipe.step(optimizer)
    buffer.fill_(99)
    assert pipe.last.items.item() == 7
    full_batch_step(reference, batches, lr=0.1)
    assert_same_params(model, reference)


def test_masked_tokens_counted_by_mask():
    """The transformers case: padded sequences, loss summed over real tokens only."""
    model, reference = make_model(), make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pipe = gk.GradientPipeline(model, accumulation_steps=2)
    g = torch.Generator().manual_seed(7)
    real_x, real_y = [], []
    for real in (2, 15):
        x = torch.randn(16, 5, generator=g, dtype=torch.float64)
        y = torch.randn(16, 3, generator=g, dtype=torch.float64)
        mask = torch.arange(16) < real
        loss = (((model(x) - y) ** 2).sum(dim=1) * mask).sum()
        pipe.backward(loss, num_items=mask.sum())
        pipe.step(optimizer)
        real_x.append(x[mask])
        real_y.append(y[mask])
    full_batch_step(reference, list(zip(real_x, real_y)), lr=0.1)
    assert_same_params(model, reference)


def test_gradients_are_zeroed_after_each_step_and_kept_between_micro_steps():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pipe = gk.GradientPipeline(model, accumulation_steps=2)
    (x, y), (x2, y2) = token_batches([4, 4])
    pipe.backward(sum_loss(model, x, y) / 4)
    assert not pipe.step(optimizer)
    assert all(p.grad is not None for p in model.parameters())
    pipe.backward(sum_loss(model, x2, y2) / 4)
    assert pipe.step(optimizer)
    assert all(p.grad is None for p in model.parameters())


def test_step_before_backward_is_an_error():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pipe = gk.GradientPipeline(model, accumulation_steps=2)
    with pytest.raises(RuntimeError, match="before any backward"):
        pipe.step(optimizer)
    x, y = token_batches([3])[0]
    pipe.backward(sum_loss(model, x, y), num_items=3)
    pipe.backward(sum_loss(model, x, y), num_items=3)
    assert pipe.step(optimizer)
    with pytest.raises(RuntimeError, match="before any backward"):
        pipe.step(optimizer)


@pytest.mark.parametrize(
    "bad, error, words",
    [
        (0, ValueError, "num_items must be > 0"),
        (-3, ValueError, "num_items must be > 0"),
        (2.5, TypeError, "num_items must be an int"),
        (True, TypeError, "num_items must be an int"),
        ("7", TypeError, "num_items must be an int"),
        (torch.tensor(3.0), TypeError, "integer tensor"),
        (torch.tensor([1, 2]), TypeError, "1-element"),
    ],
)
def test_bad_num_items_is_rejected_before_backward(bad, error, words):
    model = make_model()
    pipe = gk.GradientPipeline(model, accumulation_steps=2)
    x, y = token_batches([3])[0]
    with pytest.raises(error, match=words):
        pipe.backward(sum_loss(model, x, y), num_items=bad)
    assert pipe.window.micro_steps == 0
    assert all(p.grad is None for p in model.parameters())


def test_tensor_items_adding_up_to_zero_is_an_error_at_the_step():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pipe = gk.GradientPipeline(model)
    x, y = token_batches([3])[0]
    pipe.backward(sum_loss(model, x, y), num_items=torch.tensor(0))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="add up to 0"):
        pipe.step(optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("first, second", [(5, None), (None, 5)])
def test_mixing_item_and_mean_mode_in_one_window_is_rejected(first, second):
    model = make_model()
    pipe = gk.GradientPipeline(model, accumulation_steps=3)
    x, y = token_batches([5])[0]
    pipe.backward(sum_loss(model, x, y), num_items=first)
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="num_items on every micro-step"):
        pipe.backward(sum_loss(model, x, y), num_items=second)
    assert pipe.window.micro_steps == 1
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


@pytest.mark.parametrize(
    "bad, error", [(0, ValueError), (-1, ValueError), (1.5, TypeError), ("4", TypeError), (True, TypeError)]
)
def test_bad_accumulation_steps(bad, error):
    with pytest.raises(error, match="accumulation_steps"):
        gk.GradientPipeline(make_model(), accumulation_steps=bad)


def test_bad_loss_is_rejected():
    model = make_model()
    pipe = gk.GradientPipeline(model)
    x, y = token_batches([3])[0]
    with pytest.raises(TypeError, match="scalar"):
        pipe.backward((model(x) - y) ** 2)
    with pytest.raises(TypeError, match="scalar"):
        pipe.backward(1.0)
    with torch.no_grad():
        frozen = sum_loss(model, x, y)
    with pytest.raises(ValueError, match="does not require grad"):
        pipe.backward(frozen)
    assert pipe.window.micro_steps == 0
