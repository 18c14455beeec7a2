"""The pipeline's step: post-backward work against one copy, and host work per tensor against torch's loop.

Two regimes on CPU:
- GPT-2 small's gradient shapes (124M fp32): what the pipeline does after backward
  (normalize by the window, global norm, clip) against one copy of all gradients. With
  the scale folded into the clip that is one read (the norm) and one read-write (the
  multiply); a separate normalization pass adds another read-write. Both are timed;
  the separate pass is in the note.
- N tiny tensors (N/2 ``Linear(8, 8)``): the pipeline step with ``ClipByGlobalNorm`` and
  foreach SGD against torch's hand loop (``clip_grad_norm_(foreach=True)``,
  ``SGD(foreach=True).step()``, ``zero_grad()``), at N = 10, 100, 1000, 3000. Both get
  the same gradients and run the same trivial backward (a scalar leaf), so the rows
  measure the host work per tensor around the kernels.

`run_cuda` times a GPT-style step (bf16 autocast, fused AdamW, 4 micro-batches,
``ClipByGlobalNorm``) against the hand-written torch loop.
"""

from __future__ import annotations

import torch
from torch import nn

import gradkit
from gradkit.bench import gpu
from gradkit.bench.clipping import GPT2_SMALL, TINY, gpt2_shapes
from gradkit.bench.common import Row, Settings
from gradkit.bench.timing import measure

__all__ = ["run", "run_cuda"]

POST_GOAL = 1 / 1.7  # copy / post-backward work: at most 1.7x one copy
STEP_GOAL = 1 / 1.05  # hand loop / pipeline step: at most 1.05x torch
TENSOR_COUNTS = (10, 100, 1000, 3000)
TINY_COUNTS = (10, 100)
# Below the norm of random gradients, so the first call clips; afterwards the norm sits at
# max_norm and the coefficient clamps to 1, so values never drift toward denormals.
MAX_NORM = 1.0


class _Restore:
    """The same gradient tensors handed back to the parameters before each timed call."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.grads = [torch.randn(p.shape, device=p.device) for p in params]

    def __call__(self) -> None:
        for p, g in zip(self.params, self.grads):
            p.grad = g


def _leaf(device: torch.device) -> torch.Tensor:
    return torch.zeros((), device=device, requires_grad=True)


def run(settings: Settings) -> list[Row]:
    counts = TINY_COUNTS if settings.tiny else TENSOR_COUNTS
    return [_post_backward(settings), *[_tiny_step(settings, count) for count in counts]]


def _post_backward(settings: Settings) -> Row:
    shapes = gpt2_shapes(**(TINY if settings.tiny else GPT2_SMALL))
    numel = sum(torch.Size(s).numel() for s in shapes)
    model = "tiny GPT-2" if settings.tiny else "GPT-2-small"
    label = f"post-backward work (normalize, norm, clip), {len(shapes)} {model} grads ({numel / 1e6:.1f}M fp32)"
    torch.manual_seed(0)
    candidates = {}
    restores = []
    for name, fold in (("folded", True), ("separate", False)):
        params = [nn.Parameter(torch.empty(s)) for s in shapes]
        pipe = gradkit.GradientPipeline(params, clip=gradkit.ClipByGlobalNorm(MAX_NORM))
        pipe._fold = fold
        restore, leaf = _Restore(params), _leaf(torch.device("cpu"))
        restores.append(restore)
        optimizer = _NoStep(params)

        def call(pipe=pipe, restore=restore, leaf=leaf, optimizer=optimizer) -> None:
            restore()
            pipe.backward(leaf * 1.0)  # the window's bookkeeping; no parameter gradient changes
            pipe.step(optimizer)

        candidates[name] = call
    src = torch.randn(numel)
    dst = torch.zeros_like(src)
    candidates["copy"] = lambda: dst.copy_(src)
    timings = measure(candidates, warmup=settings.warmup, repeats=settings.repeats)
    folded, separate, copy = timings["folded"], timings["separate"], timings["copy"]
    note = (
        f"folded {folded.median / copy.median:.2f}x one copy, separate normalization pass "
        f"{separate.median / copy.median:.2f}x (traffic in copies: folded 1.5, separate 2.5)"
    )
    return Row(label, "cpu", "one copy of all gradients", POST_GOAL, folded, copy, copy, 3, note=note)


class _NoStep(torch.optim.Optimizer):
    """An optimizer that does nothing: the post-backward row times the gradient path alone."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__(params, {})

    def step(self, closure: object = None) -> None:
        return None


def _linears(count: int, device: torch.device) -> list[nn.Parameter]:
    torch.manual_seed(0)
    layers = nn.Sequential(*[nn.Linear(8, 8) for _ in range(count // 2)]).to(device)
    return list(layers.parameters())


def _tiny_step(settings: Settings, count: int) -> Row:
    label = f"pipeline step (ClipByGlobalNorm + foreach SGD + zero), {count} tiny grads ({count // 2} Linear(8,8))"
    device = torch.device("cpu")
    ours, theirs = _linears(count, device), _linears(count, device)
    restore_ours, restore_theirs = _Restore(ours), _Restore(theirs)
    leaf_ours, leaf_theirs = _leaf(device), _leaf(device)
    opt_ours = torch.optim.SGD(ours, lr=1e-6, foreach=True)
    opt_theirs = torch.optim.SGD(theirs, lr=1e-6, foreach=True)
    pipe = gradkit.GradientPipeline(ours, clip=gradkit.ClipByGlobalNorm(MAX_NORM))

    def gradkit_step() -> None:
        restore_ours()
        pipe.backward(leaf_ours * 1.0)
        pipe.step(opt_ours)

    def torch_step() -> None:
        restore_theirs()
        (leaf_theirs * 1.0).backward()
        torch.nn.utils.clip_grad_norm_(theirs, MAX_NORM, foreach=True)
        opt_theirs.step()
        opt_theirs.zero_grad()

    number = 10 if count <= 1000 else 3
    timings = measure(
        {"gradkit": gradkit_step, "torch": torch_step}, warmup=settings.warmup, repeats=settings.repeats, number=number
    )
    per = (timings["gradkit"].median - timings["torch"].median) / count * 1e6
    return Row(
        label, "cpu", "torch hand loop", STEP_GOAL, timings["gradkit"], timings["torch"],
        note=f"{count} tensors: gradkit {per:+.2f} us per tensor over torch",
    )  # fmt: skip


# -- CUDA ----------------------------------------------------------------------------------------

GPT_CUDA = {"vocab": 8192, "width": 512, "heads": 8, "layers": 6, "context": 256, "batch": 8}
GPT_TINY = {"vocab": 64, "width": 32, "heads": 2, "layers": 1, "context": 8, "batch": 2}
ACCUMULATION = 4


class _GPT(nn.Module):
    """A small decoder-only transformer (token + position embedding, causal blocks, tied head)."""

    def __init__(self, vocab: int, width: int, heads: int, layers: int, context: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tokens(x) + self.positions.weight[: x.shape[1]]
        h = self.blocks(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True)
        return self.norm(h) @ self.tokens.weight.t()


def gpt_step_timings(settings: Settings, device: torch.device, shape: dict[str, int]) -> dict[str, object]:
    """Time one optimizer step (ACCUMULATION micro-batches) through the pipeline and by hand."""
    sizes = {k: shape[k] for k in ("vocab", "width", "heads", "layers", "context")}
    torch.manual_seed(0)
    models = [_GPT(**sizes).to(device), _GPT(**sizes).to(device)]
    models[1].load_state_dict(models[0].state_dict())
    fused = device.type in ("cuda", "cpu")
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4, fused=fused) for m in models]
    pipe = gradkit.GradientPipeline(models[0], accumulation_steps=ACCUMULATION, clip=gradkit.ClipByGlobalNorm(1.0))
    generator = torch.Generator().manual_seed(1)
    data = torch.randint(0, shape["vocab"], (ACCUMULATION, shape["batch"], shape["context"] + 1), generator=generator)
    data = data.to(device)
    amp = device.type

    def loss_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        with torch.autocast(amp, dtype=torch.bfloat16):
            logits = model(tokens[:, :-1])
        return nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")

    def gradkit_step() -> None:
        for tokens in data:
            pipe.backward(loss_of(models[0], tokens), num_items=tokens[:, 1:].numel())
            pipe.step(opts[0])

    def torch_step() -> None:
        items = data[:, :, 1:].numel()
        for tokens in data:
            (loss_of(models[1], tokens) / items).backward()
        torch.nn.utils.clip_grad_norm_(models[1].parameters(), 1.0, foreach=True)
        opts[1].step()
        opts[1].zero_grad()

    sync = torch.cuda.synchronize if device.type == "cuda" else None
    return measure(
        {"gradkit": gradkit_step, "torch": torch_step}, warmup=max(2, settings.warmup),
        repeats=settings.repeats, sync=sync,
    )  # fmt: skip


def run_cuda(settings: Settings) -> list[Row]:
    """[cuda] a GPT-style step (bf16 autocast, fused AdamW, accumulation 4, global clip) against torch's loop."""
    shape = GPT_TINY if settings.tiny else GPT_CUDA
    label = (
        f"GPT-style step, {shape['layers']} layers x {shape['width']} wide, bf16 autocast, fused AdamW, "
        f"accumulation {ACCUMULATION}, ClipByGlobalNorm"
    )
    if not gpu.available():
        return gpu.skipped([label], "torch hand loop", STEP_GOAL)
    timings = gpt_step_timings(settings, torch.device("cuda"), shape)
    return [Row(label, gpu.device_name(), "torch hand loop", STEP_GOAL, timings["gradkit"], timings["torch"])]
