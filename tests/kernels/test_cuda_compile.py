"""Every kernel compiles for a real GPU (sm_90), even on a machine without one.

The interpreter accepts code that the compiler rejects (loop-carried type changes,
unsupported ops), so the CPU run alone would not prove the kernels build. Compiling
needs the kernels defined without TRITON_INTERPRET, hence the fresh subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _kernels_and_signatures() -> list:
    from kernels import (
        invariant_attention,
        invariant_matmul,
        logprobs,
        lora,
        mxfp4,
        penalties,
        sampling,
    )

    sample_sig = {"logits_ptr": "*fp32", "stride": "i32", "temp_ptr": "*fp32",
                  "top_k_ptr": "*i32", "top_p_ptr": "*fp32", "min_p_ptr": "*fp32",
                  "seed_ptr": "*i64", "step_ptr": "*i64", "out_ptr": "*i64", "mask_ptr": "*i8",
                  "V": "i32"}
    logprobs_sig = {"logits_ptr": "*fp32", "stride": "i32", "token_ptr": "*i64",
                    "chosen_ptr": "*fp32", "top_ids_ptr": "*i64", "top_lp_ptr": "*fp32",
                    "V": "i32", "num_top": "i32"}
    tally_sig = {"ids_ptr": "*i64", "ids_stride": "i32", "tally_ptr": "*i32", "V": "i32", "L": "i32"}
    penalize_sig = {"logits_ptr": "*fp32", "stride": "i32", "tally_ptr": "*i32", "rep_ptr": "*fp32",
                    "presence_ptr": "*fp32", "frequency_ptr": "*fp32", "V": "i32"}
    bias_sig = {"logits_ptr": "*fp32", "stride": "i32", "rows_ptr": "*i64", "tokens_ptr": "*i64",
                "values_ptr": "*fp32", "N": "i32", "V": "i32"}
    matmul_sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16",
                  "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32",
                  "stride_om": "i32"}
    matmul_tiles = {"BLOCK_M": invariant_matmul.BLOCK_M, "BLOCK_N": invariant_matmul.BLOCK_N,
                    "BLOCK_K": invariant_matmul.BLOCK_K}
    matmul_fp32 = {name: "*fp32" for name in ("x_ptr", "w_ptr", "bias_ptr", "out_ptr")}
    attention_sig = {"q_ptr": "*bf16", "cache_ptr": "*bf16", "table_ptr": "*i32", "ctx_ptr": "*i32",
                     "sinks_ptr": "*bf16", "out_ptr": "*bf16", "num_queries": "i32",
                     "table_width": "i32", "window": "i32", "scale": "fp32",
                     **{name: "i32" for name in ("q_stride_s", "q_stride_q", "q_stride_h",
                                                 "c_stride_h", "c_stride_b", "c_stride_r")}}
    attention_consts = {"KV_HEADS": 8, "GROUP": 8, "HEAD_DIM": 64, "BLOCK_SIZE": 16,
                        "HAS_SINKS": True, "HAS_WINDOW": True, "FLOAT32": False,
                        "QUERY_TILE": invariant_attention.QUERY_TILE,
                        "KEY_BLOCK": invariant_attention.KEY_BLOCK, "BLOCK_M": 32}
    mapping = {"rows_ptr": "*i64", "lens_ptr": "*i32", "slots_ptr": "*i64", "M": "i32"}
    strides = lambda *names: {f"stride_{n}": "i32" for n in names}  # noqa: E731
    shrink_sig = {"x_ptr": "*bf16", "a_ptr": "*bf16", "t_ptr": "*bf16", **mapping, "K": "i32",
                  "W": "i32", **strides("xt", "as", "ak", "aw", "tg", "tm")}
    expand_sig = {"t_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", **mapping,
                  "index_ptr": "*i64", "starts_ptr": "*i64", "sizes_ptr": "*i64", "R": "i32",
                  "tiles_per_slice": "i32",
                  **strides("tg", "tm", "bs", "bn", "br", "yt")}
    lora_fp32 = {"x_ptr": "*fp32", "a_ptr": "*fp32", "t_ptr": "*fp32"}
    lora_blocks = {"BLOCK_M": lora.BLOCK_M, "BLOCK_N": lora.BLOCK_N, "BLOCK_K": lora.BLOCK_K}
    mxfp4_sig = {"x_ptr": "*bf16", "blocks_ptr": "*u8", "scales_ptr": "*u8", "bias_ptr": "*bf16",
                 "out_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
                 "stride_om": "i32"}
    mxfp4_tiles = {"BLOCK_M": mxfp4.BLOCK_M, "BLOCK_N": mxfp4.BLOCK_N, "BLOCK_K": mxfp4.BLOCK_K}
    pivots = {"NUM_PIVOTS": sampling.NUM_PIVOTS, "BLOCK": sampling.BLOCK}
    bf16 = {"logits_ptr": "*bf16"}                                   # the sampler reads bf16 too
    return [
        (sampling._sample_kernel, sample_sig, {"WRITE_MASK": False, **pivots}),
        (sampling._sample_kernel, {**sample_sig, **bf16}, {"WRITE_MASK": False, **pivots}),
        (sampling._sample_kernel, sample_sig, {"WRITE_MASK": True, **pivots}),
        (logprobs._logprobs_kernel, logprobs_sig, {"TOP_PAD": 32, "BLOCK": logprobs.BLOCK}),
        (logprobs._logprobs_kernel, {**logprobs_sig, **bf16}, {"TOP_PAD": 2, "BLOCK": logprobs.BLOCK}),
        (penalties._tally_kernel, tally_sig, {"IS_PROMPT": True, "BLOCK": penalties.BLOCK}),
        (penalties._tally_kernel, tally_sig, {"IS_PROMPT": False, "BLOCK": penalties.BLOCK}),
        (penalties._penalize_kernel, penalize_sig, {"BLOCK": penalties.BLOCK}),
        (penalties._bias_kernel, bias_sig, {"BLOCK": penalties.BLOCK}),
        (invariant_matmul._matmul_kernel, matmul_sig,
         {"HAS_BIAS": True, "FLOAT32": False, **matmul_tiles}),
        (invariant_matmul._matmul_kernel, {**matmul_sig, **matmul_fp32},
         {"HAS_BIAS": False, "FLOAT32": True, **matmul_tiles}),
        (invariant_attention._attention_kernel, attention_sig, attention_consts),
        (invariant_attention._attention_kernel,
         {**attention_sig, "q_ptr": "*fp32", "cache_ptr": "*fp32", "out_ptr": "*fp32"},
         {**attention_consts, "FLOAT32": True, "HAS_SINKS": False, "HAS_WINDOW": False}),
        (lora._shrink_kernel, shrink_sig, lora_blocks),
        (lora._shrink_kernel, {**shrink_sig, **lora_fp32}, lora_blocks),
        (lora._expand_kernel, expand_sig, lora_blocks),
        (lora._expand_kernel, {**expand_sig, "t_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": "*fp32"},
         lora_blocks),
        (mxfp4._mxfp4_kernel, mxfp4_sig, {"HAS_BIAS": True, "FLOAT32": False, **mxfp4_tiles}),
        (mxfp4._mxfp4_kernel, {**mxfp4_sig, "x_ptr": "*fp32", "bias_ptr": "*fp32",
                               "out_ptr": "*fp32"},
         {"HAS_BIAS": False, "FLOAT32": True, **mxfp4_tiles}),
    ]


def compile_all_for_sm90() -> None:
    """Compile each kernel to a cubin for sm_90; raises on the first failure."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for fn, signature, constants in _kernels_and_signatures():
        signature = {**signature, **{name: "constexpr" for name in constants}}
        source = ASTSource(fn=fn, signature=signature, constexprs=constants)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
        assert compiled.asm["cubin"], fn.__name__


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    code = "from tests.kernels.test_cuda_compile import compile_all_for_sm90; compile_all_for_sm90()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
