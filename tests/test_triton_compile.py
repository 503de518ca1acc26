"""Triton kernels compiled for a Hopper GPU (sm_90) without one: the compiler, not the interpreter, accepts
them. For kernels changed since they last ran on a GPU (today: the rotary kernel that writes the KV cache);
their numbers are checked under the interpreter (test_triton_interpreter.py) and by the CUDA tests."""

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


@pytest.mark.parametrize("to_cache", [True, False])
@pytest.mark.parametrize("dtype", ["*fp16", "*bf16", "*fp32"])
def test_rotary_kernel_compiles_for_sm90(dtype, to_cache):
    from powerinfer.kernels.triton_fused import _rotary_kernel

    signature = {"qkv_ptr": dtype, "cos_ptr": "*fp32", "sin_ptr": "*fp32", "q_ptr": dtype, "k_ptr": dtype,
                 "v_ptr": dtype, "slots_ptr": "*i64" if to_cache else dtype, "seq": "i32", "n_heads": "i32",
                 "n_kv_heads": "i32", "k_seq": "i32", "HALF": "constexpr", "BLOCK": "constexpr",
                 "TO_CACHE": "constexpr"}
    source = ASTSource(fn=_rotary_kernel, signature=signature,
                       constexprs={"HALF": 64, "BLOCK": 64, "TO_CACHE": to_cache})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})  # ptxas: in the wheel
    assert kernel.asm["cubin"] and ".entry _rotary_kernel" in kernel.asm["ptx"]
