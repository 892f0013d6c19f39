"""Every (kernel, config) the gate's launch code can choose, for the gpu-report."""

from __future__ import annotations

import torch

from ..configs import (
    BWD,
    MAX_K_PAD,
    MERGE_BLOCK_N,
    MERGE_NUM_WARPS,
    MIN_K_PAD,
    dense_config,
    fwd_config,
)
from ..dtypes import accumulator_dtype, dot_precision
from ..registry import KernelBuild
from .kernels import (
    _gate_bwd_dw_kernel,
    _gate_bwd_dw_reduce_kernel,
    _gate_bwd_dx_kernel,
    _gate_dense_fwd_kernel,
    _gate_pairs_bwd_kernel,
    _gate_topk_fwd_kernel,
    _gate_topk_merge_kernel,
)

# (x, W) dtype pairs the launchers pass to the kernels: 16-bit inputs (fp16 compiles as bf16 does,
# with the same configs), fp32 parameters under 16-bit x (read and cast per tile), fp32, fp64.
_REPORT_DTYPES = (
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
)
_SIG_NAME = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def _report_k_pads() -> list[int]:
    return [1 << i for i in range(MIN_K_PAD.bit_length() - 1, MAX_K_PAD.bit_length())]


def gpu_report_builds() -> list[KernelBuild]:
    """Every (kernel, config) the launchers above can choose, for molt_kernels.gpu_report.

    d_in, T and the row strides carry the ':16' hint the JIT specialises on in the common case
    (d_in, T multiples of 16), which is also the case that pipelines the d loop and so holds the
    most shared memory. Activations compile as jumprelu, the superset of the three.
    """
    builds: list[KernelBuild] = []
    for x_dtype, w_dtype in _REPORT_DTYPES:
        xs, ws = _SIG_NAME[x_dtype], _SIG_NAME[w_dtype]
        acc = _SIG_NAME[accumulator_dtype(x_dtype)]
        tag = xs if x_dtype == w_dtype else f"{xs},W={ws}"
        tile = {"x_ptr": f"*{xs}", "w_ptr": f"*{ws}", "b_ptr": f"*{acc}", "theta_ptr": f"*{acc}",
                "gates_ptr": f"*{acc}", "N": "i32", "D": "i32:16", "T": "i32:16",
                "stride_xn": "i32:16", "stride_wt": "i32:16", "ACTIVATION": "constexpr",
                "DOT_FP32": "constexpr", "PRECISION": "constexpr", "BLOCK_N": "constexpr",
                "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"}
        # fp32 x compiles both ways: true fp32 (the default) and TF32 (allow_tf32).
        for tf32 in (False, True) if x_dtype == torch.float32 else (False,):
            precision = dot_precision(x_dtype, tf32)
            fwd_tag = f"{tag},tf32" if tf32 else tag
            dot = {"dot_input": "tf32" if tf32 else xs}
            for k_pad in _report_k_pads():
                cfg = fwd_config(k_pad, x_dtype)
                if cfg is None:  # fp64 selects on the dense activations
                    continue
                builds.append(KernelBuild(
                    name="gate_topk_fwd", config=f"{fwd_tag},{cfg.label}",
                    fn=_gate_topk_fwd_kernel,
                    signature=tile | {"idx_ptr": "*i64", "part_ptr": "*i64", "K": "i32",
                                      "t_per_split": "i32:16", "stride_part": "i32",
                                      "K_PAD": "constexpr"},
                    constexprs={"ACTIVATION": "jumprelu", "DOT_FP32": False,
                                "PRECISION": precision, "BLOCK_N": cfg.block_n,
                                "BLOCK_T": cfg.block_t, "BLOCK_D": cfg.block_d,
                                "K_PAD": cfg.k_pad},
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                    dot_rows=cfg.block_n, **dot,
                ))
            dense = dense_config(x_dtype)
            builds.append(KernelBuild(
                name="gate_dense_fwd", config=f"{fwd_tag},{dense.label}",
                fn=_gate_dense_fwd_kernel, signature=tile,
                constexprs={"ACTIVATION": "jumprelu", "DOT_FP32": False,
                            "PRECISION": precision, "BLOCK_N": dense.block_n,
                            "BLOCK_T": dense.block_t, "BLOCK_D": dense.block_d},
                num_warps=dense.num_warps, num_stages=dense.num_stages,
                dot_rows=dense.block_n, **dot,
            ))
        pairs = {"x_ptr": f"*{xs}", "w_ptr": f"*{ws}", "b_ptr": f"*{acc}",
                 "theta_ptr": f"*{acc}", "idx_ptr": "*i64", "gates_ptr": f"*{acc}", "P": "i32",
                 "K": "i32", "D": "i32:16", "stride_xn": "i32:16", "stride_wt": "i32:16",
                 "ACTIVATION": "constexpr", "BLOCK_P": "constexpr", "BLOCK_D": "constexpr"}
        pair_consts = {"ACTIVATION": "jumprelu", "BLOCK_P": BWD.pair_block_p,
                       "BLOCK_D": BWD.pair_block_d}
        bwd_label = f"{tag},BP={BWD.pair_block_p},BD={BWD.pair_block_d},w{BWD.num_warps}"
        builds.append(KernelBuild(
            name="gate_pairs_bwd", config=bwd_label, fn=_gate_pairs_bwd_kernel,
            signature=pairs | {"dgates_ptr": f"*{acc}", "dpre_ptr": f"*{acc}",
                               "dthr_ptr": f"*{acc}", "bandwidth": "fp32",
                               "THRESHOLD_GRAD": "constexpr"},
            constexprs=pair_consts | {"THRESHOLD_GRAD": True}, num_warps=BWD.num_warps,
        ))
        builds.append(KernelBuild(
            name="gate_bwd_dx", config=f"{tag},BN={BWD.dx_block_n},BD={BWD.dx_block_d},"
            f"w{BWD.num_warps}", fn=_gate_bwd_dx_kernel,
            signature={"dpre_ptr": f"*{acc}", "idx_ptr": "*i64", "w_ptr": f"*{ws}",
                       "dx_ptr": f"*{xs}", "N": "i32", "K": "i32", "D": "i32:16",
                       "stride_wt": "i32:16", "stride_dxn": "i32:16", "BLOCK_N": "constexpr",
                       "BLOCK_D": "constexpr"},
            constexprs={"BLOCK_N": BWD.dx_block_n, "BLOCK_D": BWD.dx_block_d},
            num_warps=BWD.num_warps,
        ))
        dw_label = f"{tag},BM={BWD.dw_block_m},BD={BWD.dw_block_d},G={BWD.dw_group}," \
            f"w{BWD.num_warps}"
        builds.append(KernelBuild(
            name="gate_bwd_dw", config=dw_label, fn=_gate_bwd_dw_kernel,
            signature={"x_ptr": f"*{xs}", "dpre_ptr": f"*{acc}", "dthr_ptr": f"*{acc}",
                       "pair_of_row_ptr": "*i64", "transform_of_block_ptr": "*i64",
                       "first_block_ptr": "*i64", "n_blocks_ptr": "*i64",
                       "chunk_base_ptr": "*i64", "dw_ptr": f"*{ws}", "db_ptr": f"*{acc}",
                       "dthr_out_ptr": f"*{acc}", "part_ptr": f"*{acc}",
                       "part_s_ptr": f"*{acc}", "K": "i32", "D": "i32:16", "stride_xn": "i32:16",
                       "stride_dwt": "i32:16", "THRESHOLD_GRAD": "constexpr",
                       "BLOCK_M": "constexpr", "BLOCK_D": "constexpr", "GROUP": "constexpr"},
            constexprs={"THRESHOLD_GRAD": True, "BLOCK_M": BWD.dw_block_m,
                        "BLOCK_D": BWD.dw_block_d, "GROUP": BWD.dw_group},
            num_warps=BWD.num_warps,
        ))
    for acc in ("fp32", "fp64"):
        builds.append(KernelBuild(
            name="gate_bwd_dw_reduce", config=f"{acc},BD={BWD.dw_block_d},w{BWD.num_warps}",
            fn=_gate_bwd_dw_reduce_kernel,
            signature={"part_ptr": f"*{acc}", "part_s_ptr": f"*{acc}", "hot_ptr": "*i64",
                       "chunk_base_ptr": "*i64", "n_chunks_ptr": "*i64", "dw_ptr": f"*{acc}",
                       "db_ptr": f"*{acc}", "dthr_out_ptr": f"*{acc}", "D": "i32:16",
                       "stride_dwt": "i32:16", "THRESHOLD_GRAD": "constexpr",
                       "BLOCK_D": "constexpr"},
            constexprs={"THRESHOLD_GRAD": True, "BLOCK_D": BWD.dw_block_d},
            num_warps=BWD.num_warps,
        ))
    for acc in ("fp32",):  # the gates of the fused selection (fp64 selects densely)
        for k_pad in _report_k_pads():
            builds.append(KernelBuild(
                name="gate_topk_merge",
                config=f"{acc},K_PAD={k_pad},BN={MERGE_BLOCK_N},w{MERGE_NUM_WARPS}",
                fn=_gate_topk_merge_kernel,
                signature={"part_ptr": "*i64", "gates_ptr": f"*{acc}", "idx_ptr": "*i64",
                           "N": "i32", "K": "i32", "n_split": "i32", "stride_part": "i32",
                           "BLOCK_N": "constexpr", "K_PAD": "constexpr"},
                constexprs={"BLOCK_N": MERGE_BLOCK_N, "K_PAD": k_pad},
                num_warps=MERGE_NUM_WARPS,
            ))
    return builds
