"""Triton kernels compiled for a Hopper GPU (sm_90) without one: the compiler, not the interpreter, accepts
them. For kernels changed since they last ran on a GPU (the rotary kernel that writes the KV cache, the norm with
the predictor's projection, the predictor's decision raising the host flag); their numbers are checked under the
interpreter (test_triton_interpreter.py) and by the CUDA tests."""

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


def test_lowrank_decide_kernel_with_tail_compiles_for_sm90():
    from powerinfer.kernels.triton_gpu import _lowrank_decide_kernel

    signature = {"hidden_ptr": "*fp32", "w2_ptr": "*fp16", "b2_ptr": "*fp16", "threshold_ptr": "*fp32",
                 "mask_ptr": "*i1", "tail_ptr": "*i1", "n": "i32", "rank": "i32", "n_always": "i32",
                 "tail_from": "i32", "BLOCK_N": "constexpr", "BLOCK_R": "constexpr", "TAIL": "constexpr"}
    source = ASTSource(fn=_lowrank_decide_kernel, signature=signature,
                       constexprs={"BLOCK_N": 128, "BLOCK_R": 32, "TAIL": True})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert kernel.asm["cubin"] and ".entry _lowrank_decide_kernel" in kernel.asm["ptx"]


def test_l2_prefetch_kernel_compiles_for_sm90():
    from powerinfer.kernels.triton_fused import _L2_PREFETCH_BLOCK, _l2_prefetch_kernel

    source = ASTSource(fn=_l2_prefetch_kernel, signature={"source_ptr": "*i32", "sink_ptr": "*i32", "n_words": "i32",
                                                          "BLOCK": "constexpr"},
                       constexprs={"BLOCK": _L2_PREFETCH_BLOCK})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert "evict_last" in kernel.asm["ptx"]


def test_add_rms_norm_kernel_with_projection_compiles_for_sm90():
    from powerinfer.kernels.triton_fused import _add_rms_norm_kernel

    signature = {"x_ptr": "*fp16", "delta1_ptr": "*fp16", "delta2_ptr": "*fp16", "weight_ptr": "*fp16",
                 "sum_ptr": "*fp16", "normed_ptr": "*fp16", "copy_ptr": "*fp32", "project_ptr": "*fp16",
                 "hidden_ptr": "*fp32", "width": "i32", "rank": "i32", "eps": "fp32", "N_DELTAS": "constexpr",
                 "COPY": "constexpr", "PROJECT": "constexpr", "BLOCK": "constexpr", "VOLATILE1": "constexpr",
                 "VOLATILE2": "constexpr"}
    source = ASTSource(fn=_add_rms_norm_kernel, signature=signature,
                       constexprs={"N_DELTAS": 1, "COPY": True, "PROJECT": True, "BLOCK": 4096, "VOLATILE1": False,
                                   "VOLATILE2": False})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 16})
    assert kernel.asm["cubin"] and ".entry _add_rms_norm_kernel" in kernel.asm["ptx"]
