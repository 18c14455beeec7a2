"""Global-norm clipping: gradkit against torch's foreach path, and against a plain copy.

Three regimes:
- GPT-2 small's real shapes (148 tensors, 124M fp32): clipping streams over the
  gradients three times (read for the norm, read and write for the multiply), so it
  is bound by memory bandwidth, and a copy of the same bytes shows what the hardware allows;
- one element per tensor, 148 of them: only the per-call host work is left
  (grouping, checks, kernel launches), which is what remains on a GPU once the
  bandwidth is fast;
- 1000 tiny tensors (500 ``Linear(8, 8)``): the host work per tensor, as in models
  with thousands of parameter tensors (mixture of experts, per-head parameters).

The two host-bound rows also time ``gk.grad_norms`` against torch's per-tensor norms
(``torch.stack(torch._foreach_norm(grads))``), in the same interleaved rounds; the
ratio is in the row's note.
"""

from __future__ import annotations

import torch

import gradkit
from gradkit.bench.common import Row, Settings
from gradkit.bench.timing import Timing, measure

__all__ = ["run", "run_cuda", "gpt2_shapes"]

GPT2_SMALL = {"vocab": 50257, "context": 1024, "width": 768, "layers": 12}
TINY = {"vocab": 256, "context": 32, "width": 16, "layers": 2}
REFERENCE = "torch foreach"
GOAL = 0.95

# Far below the norm of random gradients (about 11,000 for GPT-2 small), so the first
# call really scales. After it the norm sits a hair below max_norm, where the
# coefficient clamps to 1: both libraries still multiply (neither branches on the
# host), and the values stop shrinking, so they never drift toward float32
# denormals, whose arithmetic is much slower on most CPUs (checked after timing).
MAX_NORM = 1.0
CLIP_PASSES = 3
LINEARS = 500  # Linear(8, 8) layers of the per-tensor overhead row: 1000 gradient tensors
TINY_LINEARS = 50


def gpt2_shapes(vocab: int, context: int, width: int, layers: int) -> list[tuple[int, ...]]:
    """Parameter shapes of GPT-2 (HF layout: Conv1D weights are in x out; lm_head tied to wte)."""
    block = [
        (width,), (width,),  # ln_1
        (width, 3 * width), (3 * width,),  # attn.c_attn
        (width, width), (width,),  # attn.c_proj
        (width,), (width,),  # ln_2
        (width, 4 * width), (4 * width,),  # mlp.c_fc
        (4 * width, width), (width,),  # mlp.c_proj
    ]  # fmt: skip
    return [(vocab, width), (context, width)] + block * layers + [(width,), (width,)]


def run(settings: Settings) -> list[Row]:
    return _rows(settings, "cpu")


def run_cuda(settings: Settings) -> list[Row]:
    """The [cuda] twins of `run`'s rows (skipped, with a note, without a GPU)."""
    return _rows(settings, "cuda")


def _rows(settings: Settings, device: str) -> list[Row]:
    shapes = gpt2_shapes(**(TINY if settings.tiny else GPT2_SMALL))
    numel = sum(torch.Size(s).numel() for s in shapes)
    size = f"{numel / 1e3:.0f}k" if numel < 1e6 else f"{numel / 1e6:.1f}M"
    model = "tiny GPT-2" if settings.tiny else "GPT-2 small"
    linears = TINY_LINEARS if settings.tiny else LINEARS
    cases = [
        (f"clip_grad_norm_, {model} ({size} fp32, {len(shapes)} tensors)", shapes, True),
        (f"clip_grad_norm_, {len(shapes)} one-element grads (per-call overhead)", [(1,)] * len(shapes), False),
        (f"clip_grad_norm_, {2 * linears} tiny grads ({linears} Linear(8,8), per-tensor overhead)",
         [(8, 8), (8,)] * linears, False),
    ]  # fmt: skip
    rows = []
    for label, case_shapes, with_copy in cases:
        if device == "cuda" and not torch.cuda.is_available():
            rows.append(Row(label, "cuda", REFERENCE, GOAL, note="skipped: torch.cuda.is_available() is False"))
        else:
            rows.append(_run_case(torch.device(device), label, case_shapes, with_copy, settings))
    return rows


def _run_case(
    device: torch.device, label: str, shapes: list[tuple[int, ...]], with_copy: bool, settings: Settings
) -> Row:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.empty(shape, device=device)) for shape in shapes]
    for param in params:
        param.grad = torch.randn(param.shape, device=device)
    candidates = {
        "gradkit": lambda: gradkit.clip_grad_norm_(params, MAX_NORM),
        "torch": lambda: torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True),
    }
    if with_copy:
        src = torch.randn(sum(p.numel() for p in params), device=device)
        dst = torch.zeros_like(src)  # zeros, not empty: the pages are touched before timing
        candidates["copy"] = lambda: dst.copy_(src)
    else:  # per-tensor norms: gradkit's against the hand-written torch equivalent
        candidates["grad_norms"] = lambda: gradkit.grad_norms(params)
        candidates["torch norms"] = lambda: torch.stack(torch._foreach_norm([p.grad for p in params]))

    cuda = device.type == "cuda"
    timings = measure(
        candidates,
        warmup=settings.warmup,
        repeats=settings.repeats,
        # Calls far shorter than a millisecond are timed in tens, so that the timer
        # and the synchronization do not count as part of them.
        number=1 if with_copy and not cuda else 10,
        sync=torch.cuda.synchronize if cuda else None,
    )
    return Row(
        label,
        torch.cuda.get_device_name(device) if cuda else "cpu",
        REFERENCE,
        GOAL,
        gradkit_time=timings["gradkit"],
        reference_time=timings["torch"],
        copy_time=timings.get("copy"),
        passes=CLIP_PASSES if with_copy else None,
        note=_value_check(params) + ("" if with_copy else _norms_note(timings)),
    )


def _norms_note(timings: dict[str, Timing]) -> str:
    ours, theirs = timings["grad_norms"].median, timings["torch norms"].median
    return (
        f"; grad_norms {ours * 1e3:.3f} ms vs torch.stack(torch._foreach_norm(grads)) {theirs * 1e3:.3f} ms "
        f"(ratio {theirs / ours:.3f})"
    )


def _value_check(params: list[torch.nn.Parameter]) -> str:
    grads = [p.grad for p in params]
    tiny = torch.finfo(torch.float32).tiny
    smallest = min(torch.where(g != 0, g.abs(), torch.inf).min().item() for g in grads)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
    verdict = "no denormals" if smallest >= tiny else "DENORMALS PRESENT, timings not representative"
    return (
        f"after timing: total norm {norm:.6f}, smallest nonzero |grad| {smallest:.1e} "
        f"({verdict}; float32 normals start at {tiny:.1e})"
    )
