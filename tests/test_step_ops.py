"""A plain clipped step dispatches the operators torch's own loop does, and its report costs nothing unread.

The pipeline step with ``ClipByGlobalNorm`` and a foreach optimizer is counted, operator by
operator, against torch's hand-written loop (backward, ``clip_grad_norm_(foreach=True)``,
``optimizer.step()``, ``zero_grad()``) on the same gradients; on a GPU each operator is a
launch, so an operator added to the step must show up here. The step's report (``pipe.last``)
is made on its first read, and holds what making it at the step gives.
"""

from __future__ import annotations

import collections
import copy
import pickle

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradkit as gk
from gradkit.step_report import StepReport

# What the pipeline step may dispatch beyond torch's loop: the step's one host read (of the
# norm), the cached per-parameter norms following the clip's multiply, and the dtype
# promotion of the norms (a query that launches nothing).
EXTRA = collections.Counter(
    {"aten._local_scalar_dense.default": 1, "aten.mul.Tensor": 1, "aten.promote_types.default": 1}
)


class CountOps(TorchDispatchMode):
    """Counts the operators dispatched, leaving out views (they launch nothing) and the profiler's markers."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if not func.is_view and not name.startswith("profiler."):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def linears(count: int) -> list[nn.Parameter]:
    torch.manual_seed(0)
    return list(nn.Sequential(*[nn.Linear(4, 4) for _ in range(count // 2)]).parameters())


def give_grads(params: list[nn.Parameter], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)


def pipeline_step_ops(count: int) -> collections.Counter[str]:
    params, leaf = linears(count), torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD(params, lr=1e-3, foreach=True)
    pipe = gk.GradientPipeline(params, clip=gk.ClipByGlobalNorm(1.0))
    for seed in range(3):  # the groupings found and kept, the optimizer's state made
        give_grads(params, seed)
        pipe.backward(leaf * 1.0)
        counter = CountOps()
        with counter:
            pipe.step(opt)
    return counter.ops


def torch_loop_ops(count: int) -> collections.Counter[str]:
    params = linears(count)
    opt = torch.optim.SGD(params, lr=1e-3, foreach=True)
    for seed in range(3):
        give_grads(params, seed)
        counter = CountOps()
        with counter:
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()
            opt.zero_grad()
    return counter.ops


@pytest.mark.parametrize("count", [10, 200])
def test_a_plain_clipped_step_dispatches_what_torchs_loop_does_and_its_one_read(count):
    ours, theirs = pipeline_step_ops(count), torch_loop_ops(count)
    assert ours - theirs <= EXTRA, f"the step dispatches {dict(ours - theirs)} beyond torch's loop"
    assert not theirs - ours, f"torch's loop dispatches {dict(theirs - ours)} the step does not"
    assert sum(ours.values()) <= sum(theirs.values()) + sum(EXTRA.values())


def test_the_step_count_does_not_grow_with_the_tensors():
    assert pipeline_step_ops(10) == pipeline_step_ops(200)


class DecayingSGD(torch.optim.SGD):
    """SGD that adds weight decay into ``p.grad`` in place, as many hand-written optimizers do: a report
    made from the gradients after the step would read other values than the step's."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.add_(p.detach(), alpha=100.0)
        return super().step(closure)


class Observer:
    """A tracker that keeps the report it observes (the pipeline then makes the report at the step)."""

    def wants(self, step):
        return False

    def observe(self, ctx, report):
        self.report = report
        self.held = dict(vars(report))

    def after_step(self, ctx, report):
        pass


def clipped_pipeline(num_items: bool, tracker=None):
    params = linears(6)
    pipe = gk.GradientPipeline(params, accumulation_steps=2, clip=gk.ClipByGlobalNorm(0.5), tracker=tracker)
    opt = DecayingSGD(params, lr=1e-2, foreach=True)
    leaf = torch.ones((), requires_grad=True)

    def step(seed: int, nan: bool = False) -> gk.GradientPipeline:
        give_grads(params, seed)  # the window's gradient; its backward calls add nothing to it
        for micro in range(2):
            if nan and micro == 1:
                params[0].grad[0, 0] = float("nan")
            pipe.backward(leaf * 1.0, num_items=3 + micro if num_items else None)
            pipe.step(opt)
        return pipe

    return params, step


FIELDS = ("items", "total_norm", "norm_after", "clip_coef", "skipped")


@pytest.mark.parametrize("num_items", [False, True], ids=["mean", "items"])
def test_a_report_read_late_holds_the_values_of_its_step(num_items):
    # Made at the step (a tracker's pipeline, before the optimizer) on one pipeline; read after the optimizer
    # added weight decay into the gradients in place on another that does the same work.
    _, step_now = clipped_pipeline(num_items, tracker=Observer())
    _, step_late = clipped_pipeline(num_items)
    now = []
    for seed in range(3):
        held = step_now(seed, nan=seed == 1).tracker.held
        now.append({name: held[name].clone() for name in FIELDS})
    late = [step_late(seed, nan=seed == 1).last for seed in range(3)]
    for expected, report in zip(now, late):
        for name in FIELDS:
            value = getattr(report, name)
            assert isinstance(value, torch.Tensor), name
            assert torch.equal(value, expected[name]) or (value.isnan().all() and expected[name].isnan().all()), name
    assert [bool(r["skipped"]) for r in now] == [False, True, False]
    assert now[0]["items"].item() == (7 if num_items else 2)
    assert torch.allclose(now[0]["norm_after"], torch.tensor(0.5))  # clipped: the decay would show


def test_the_report_is_made_on_its_first_read_only():
    _, step = clipped_pipeline(num_items=False)
    step(0)
    pipe = step(1)
    counter = CountOps()
    with counter:
        report = pipe.last
    assert counter.ops["aten.linalg_vector_norm.default"] == 1 and counter.ops["aten.where.self"] == 1
    assert counter.ops["aten.full.default"] == 2  # the item count and the skip decision, as tensors
    counter = CountOps()
    with counter:
        again = pipe.last
        values = [getattr(again, name) for name in FIELDS]
    assert again is report and not counter.ops
    items, total_norm, after, coef, skipped = values
    # The values: random gradients of norm above 0.5, clipped to 0.5.
    assert total_norm > 0.5 and torch.allclose(after, torch.tensor(0.5))
    assert torch.equal(coef, after / total_norm)
    assert items.item() == 2 and skipped.dtype == torch.bool and not skipped


def test_a_report_holds_plain_tensors_on_the_norms_device_whatever_the_read_sees():
    # Read under inference mode and another default device, the report is what the step would have made.
    _, step = clipped_pipeline(num_items=False)
    pipe = step(0)
    with torch.inference_mode(), torch.device("meta"):
        report = pipe.last
    for name in FIELDS:
        value = getattr(report, name)
        assert value.device == report.total_norm.device, name
        assert not value.is_inference() and not value.requires_grad, name
    assert {name: type(value) for name, value in vars(report).items() if name in FIELDS} == dict.fromkeys(
        FIELDS, torch.Tensor
    )
    assert getattr(StepReport.__new__(StepReport), "items", "unset") == "unset"


def test_the_report_holds_a_copy_of_the_callers_item_count():
    # A caller that refills its num_items tensor for the next batch leaves the step's report as it was.
    params, leaf = linears(2), torch.zeros((), requires_grad=True)
    pipe = gk.GradientPipeline(params, clip=gk.ClipByGlobalNorm(1.0))
    opt = torch.optim.SGD(params, lr=1e-3)
    num_items = torch.tensor(4)
    for read_at_once in (True, False):
        give_grads(params, 0)
        pipe.backward(leaf * 1.0, num_items=num_items)
        pipe.step(opt)
        report = pipe.last if read_at_once else None
        num_items.fill_(99)
        report = report if read_at_once else pipe.last
        assert report.items.item() == 4, read_at_once
        num_items.fill_(4)


def test_copies_and_pickles_of_a_report_hold_values():
    _, step = clipped_pipeline(num_items=True)
    report = step(0).last
    for other in (copy.deepcopy(report), pickle.loads(pickle.dumps(report)), copy.copy(report)):
        for name in FIELDS:
            assert torch.equal(getattr(other, name), getattr(report, name)), name


def test_with_a_tracker_the_report_is_made_at_the_step():
    # The tracker reads the clip coefficient and the skip flag every step: they are the step's work.
    params, leaf, observer = linears(4), torch.zeros((), requires_grad=True), Observer()
    pipe = gk.GradientPipeline(params, clip=gk.ClipByGlobalNorm(1.0), tracker=observer)
    give_grads(params, 0)
    pipe.backward(leaf * 1.0)
    pipe.step(torch.optim.SGD(params, lr=1e-3))
    assert all(isinstance(observer.held[name], torch.Tensor) for name in FIELDS)
    counter = CountOps()
    with counter:
        assert pipe.last is observer.report
    assert not counter.ops
