"""The Triton selection kernels, checked on a CPU by Triton's interpreter in a child pytest.

``TRITON_INTERPRET=1`` must be set before Triton is imported, and it would also send a GPU's
own kernels through the interpreter, so the checks (triton_interpreted.py) run in a child
process of their own. Skipped where Triton is not installed; tests/test_cuda.py runs the
kernels on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from gradkit.compression import triton_select  # noqa: E402


def test_triton_kernels_match_torch_under_the_interpreter():
    checks = Path(__file__).with_name("triton_interpreted.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(checks)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]


# Pointer types of the kernels' tensors, by torch dtype, as Triton's signatures name them.
_POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("on_device", [False, True])
def test_the_kernels_compile_for_a_cuda_gpu(dtype, on_device):
    # The interpreter runs Python, not Triton's compiler, which refuses code the interpreter takes (e.g. a name
    # re-bound to another type inside a branch taken at run time). Triton compiles for a GPU it is not running
    # on: the kernels go through its front end and down to PTX for an H100/H200 (sm_90) here, with no GPU.
    try:  # where these move in another Triton, the test cannot run: skipped, not failed
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as error:
        pytest.skip(f"Triton {triton.__version__} has no ASTSource/GPUTarget here: {error}")

    _, threshold_kernel, select_kernel, pad_kernel = triton_select._kernels()
    as_int, magnitude, inf, rounds = triton_select._BITS[dtype]
    bits = "*i32" if as_int == torch.int32 else "*i16"
    common = {"MAGNITUDE": magnitude, "INF": inf}
    kernels = [
        (threshold_kernel, {"bits_ptr": bits, "offset_ptr": "*i64", "offset": "i32", "out_ptr": bits,
                            "count_ptr": "*i32", "n": "i32", "m": "i32", "step": "i32", "top": "i32"},
         dict(common, ROUNDS=rounds, BLOCK=16_384, OFFSET_ON_DEVICE=on_device, ZERO_COUNT=True)),
        (select_kernel, {"bits_ptr": bits, "values_ptr": _POINTER[dtype], "threshold_ptr": bits, "index_ptr": "*i64",
                         "value_ptr": "*fp32", "count_ptr": "*i32", "n": "i32", "capacity": "i32"},
         dict(common, ROWS=32)),
        (pad_kernel, {"index_ptr": "*i32", "value_ptr": _POINTER[dtype], "valid_ptr": "*i1", "count_ptr": "*i32",
                      "capacity": "i32", "pad": "i32"}, {"BLOCK": 1024}),
    ]  # fmt: skip
    for kernel, signature, constants in kernels:
        signature = dict(signature, **{name: "constexpr" for name in constants})
        try:
            source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
        except (TypeError, KeyError, AttributeError) as error:  # another Triton's way of naming a signature
            pytest.skip(f"Triton {triton.__version__} takes signatures otherwise: {type(error).__name__}: {error}")
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        except FileNotFoundError as error:  # no PTX assembler beside this Triton; every compile error still fails
            pytest.skip(f"Triton {triton.__version__} cannot assemble for sm_90 here: {error}")
        assert "ptx" in compiled.asm
