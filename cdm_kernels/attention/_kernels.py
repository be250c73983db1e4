"""Triton kernels and launcher of the FP8 attention forward (imported on first use).

Three kernels per call:

1. ``_k_colsum_kernel``: per (batch, head, block of keys) the column sums of K (fp32), so that
   the mean K smoothing needs is known before any K block is quantised, without one program
   walking a whole head (that serial walk was the quantisation pass's critical path: 35-70
   blocks per head at S = 4429 on a handful of programs).
2. ``_quantize_qkv_kernel`` (one launch, one block per program): Q, K, V -> float8 e4m3 with one
   scale per (batch, head, block of tokens). Q is pre-multiplied by ``softmax_scale * log2(e)``
   (exp2 softmax with the scale folded into Q's scale), K is smoothed by subtracting its
   per-(batch, head) mean over tokens (from step 1's sums, added in block order), V is written
   transposed, (D, S), so that both MMA B operands are K-major (what Hopper's FP8 wgmma wants).
3. ``_fp8_attention_fwd_kernel``: flash attention over the float8 tensors, fp32 scores and
   accumulator, base-2 online softmax, P quantised to float8 per row and key block against
   the block's own row maximum, native FP8 ``tl.dot`` for QK^T and PV; P.V accumulates two-level
   (a fresh fp32 product per key block, rescaled and added into the fp32 accumulator: Hopper's
   FP8 wgmma accumulator keeps ~22 bits).

Launch configs are stored per (arch, head dim) (``CONFIGS``; the first is the default, the rest
the candidate set to time on a new GPU: ``bench_attention.py --fp8-configs``); sm_90 takes 128 x 128 tiles
with 8 warps, its candidates 128 x 64, another stage count, and TMA tensor descriptors (``USE_TMA``). The key
loop can be warp-specialised (``WARP_SPECIALIZE``, config key ``warp_specialize``), but triton 3.6/3.9 do not
partition it on sm_90, so that variant is only compiled and reported (``PROBE_CONFIGS``); 192-row tiles are not
expressible (power-of-two ``tl.arange``). See the comment above ``CONFIGS``.

A NaN (or inf) in Q, K or V makes its quantisation block's scale NaN, so it reaches the output as in the twin
(Triton's max reductions and min/max clamps drop NaN by default; a finite but wrong output would be worse).

The quantisation scheme is specified by ``reference.fp8_attention_reference`` (same blocks,
same roundings). Plain pointer arithmetic (tl.make_block_ptr is gone in triton 3.9) and an
explicit ``out_dtype`` on every ``tl.dot`` (its default changed between 3.6 and 3.9).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import config_override
from ._common import output_like as _output_like
from .reference import LOG2E

# triton.jit reads TRITON_INTERPRET when it decorates, i.e. when this module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"



@triton.jit
def _to_e4m3(x, SOFT_ROUND: tl.constexpr):
    """float32 -> float8e4nv, round-to-nearest-even, saturating at +-448.

    The interpreter's fp32 -> fp8 cast drops the carry into the exponent, so with
    SOFT_ROUND the value is first rounded onto the e4m3 grid with integer bit operations
    (after which the cast is exact). On the GPU the hardware cast rounds correctly.
    """
    # NaN stays NaN (the twin's torch.clamp keeps it too): Triton's min/max default to dropping NaN, which would
    # saturate a NaN input to +-448 and hand back a finite, wrong attention output. Finite values: unchanged.
    x = tl.minimum(tl.maximum(x, -448.0, propagate_nan=tl.PropagateNan.ALL), 448.0, propagate_nan=tl.PropagateNan.ALL)
    if SOFT_ROUND:
        bits = x.to(tl.int32, bitcast=True)
        mag = bits & 0x7FFFFFFF
        sign = bits ^ mag
        # Normal range: keep 3 of the 23 mantissa bits, ties to even.
        lsb = (mag >> 20) & 1
        rounded = (mag + 0x7FFFF + lsb) & -1048576  # -1048576 == 0xFFF00000 as int32
        normal = (rounded | sign).to(tl.float32, bitcast=True)
        # Subnormal range (|x| < 2^-6): a fixed grid of 2^-9, ties to even.
        a = tl.abs(x) * 512.0
        fl_i = a.to(tl.int32)
        fl = fl_i.to(tl.float32)
        frac = a - fl
        up = (frac > 0.5) | ((frac == 0.5) & ((fl_i & 1) == 1))
        sub = tl.where(up, fl + 1.0, fl) * 0.001953125
        sub = tl.where(x < 0, -sub, sub)
        x = tl.where(tl.abs(x) < 0.015625, sub, normal)
        return x.to(tl.float8e4nv)
    else:
        return x.to(tl.float8e4nv, fp_downcast_rounding="rtne")

@triton.jit
def _quantize_block_store(x, valid, dst_ptrs, scale_ptr, SOFT_ROUND: tl.constexpr):
    x = tl.where(valid, x, 0.0)
    amax = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), 1e-30)
    # A NaN (or inf) in the block makes its scale NaN, as in the twin (torch's amax keeps NaN): max reductions on the
    # GPU drop NaN, and a finite scale would quantise the NaN to +-448 and return a finite, wrong output.
    amax += tl.sum(tl.sum(x * 0.0, axis=1), axis=0)
    x8 = _to_e4m3(x * (448.0 / amax), SOFT_ROUND)
    tl.store(dst_ptrs, x8)
    tl.store(scale_ptr, amax * (1.0 / 448.0))

@triton.jit
def _k_colsum_kernel(
    k_ptr, s_kb, s_kh, s_ks, s_kd, part_ptr, S, H, N_BLK_N,
    D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    x = tl.load(k_ptr + b * s_kb + h * s_kh + rows.to(tl.int64)[:, None] * s_ks + offs_d[None, :] * s_kd,
                mask=(rows < S)[:, None], other=0.0).to(tl.float32)
    tl.store(part_ptr + (bh * N_BLK_N + pid) * D + offs_d, tl.sum(x, axis=0))


@triton.jit
def _quantize_qkv_kernel(
    q_ptr, k_ptr, v_ptr,
    s_qb, s_qh, s_qs, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_vb, s_vh, s_vs, s_vd,
    q8_ptr, k8_ptr, v8t_ptr, q_scale_ptr, k_scale_ptr, v_scale_ptr, k_part_ptr,
    S, H, q_mult, S_PAD_M, S_PAD_N, N_BLK_M, N_BLK_N,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SOFT_ROUND: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: long video sequences overflow int32
    which = tl.program_id(2)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D)
    if which == 0:
        # Q: one block per program, softmax scale and log2(e) folded in.
        if pid < N_BLK_M:
            rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
            valid = (rows < S)[:, None]
            # rows x stride in 64 bits: a (B, S, H, D) view with long S passes 2**31 inside one head
            src = q_ptr + b * s_qb + h * s_qh + rows.to(tl.int64)[:, None] * s_qs + offs_d[None, :] * s_qd
            x = tl.load(src, mask=valid, other=0.0).to(tl.float32) * q_mult
            dst = q8_ptr + bh * S_PAD_M * D + rows[:, None] * D + offs_d[None, :]
            _quantize_block_store(x, valid, dst, q_scale_ptr + bh * N_BLK_M + pid, SOFT_ROUND)
    elif which == 1:
        # K: one block per program, smoothed by the head's mean (every program adds the head's block sums in
        # the same order, so all blocks subtract the same mean).
        if pid < N_BLK_N:
            col_sum = tl.zeros([D], dtype=tl.float32)
            for blk in range(0, N_BLK_N):
                col_sum += tl.load(k_part_ptr + (bh * N_BLK_N + blk) * D + offs_d)
            mean = col_sum / S
            rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
            valid = (rows < S)[:, None]
            x = tl.load(k_ptr + b * s_kb + h * s_kh + rows.to(tl.int64)[:, None] * s_ks + offs_d[None, :] * s_kd,
                        mask=valid, other=0.0).to(tl.float32)
            dst = k8_ptr + bh * S_PAD_N * D + rows[:, None] * D + offs_d[None, :]
            _quantize_block_store(x - mean[None, :], valid, dst, k_scale_ptr + bh * N_BLK_N + pid, SOFT_ROUND)
    else:
        # V: one block per program, stored transposed as (D, S_PAD_N).
        if pid < N_BLK_N:
            rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
            valid = (rows < S)[:, None]
            src = v_ptr + b * s_vb + h * s_vh + rows.to(tl.int64)[:, None] * s_vs + offs_d[None, :] * s_vd
            x = tl.load(src, mask=valid, other=0.0).to(tl.float32)
            dst = v8t_ptr + bh * D * S_PAD_N + offs_d[None, :] * S_PAD_N + rows[:, None]
            _quantize_block_store(x, valid, dst, v_scale_ptr + bh * N_BLK_N + pid, SOFT_ROUND)

@triton.jit
def _attend_block(
    acc, m_i, l_i, q, q_scale, kt_ptrs, vt_ptrs, k_desc, vt_desc, k_row, vt_row, key0, k_scale, v_scale, key_idx, S,
    MASK_KEYS: tl.constexpr, SOFT_ROUND: tl.constexpr, USE_TMA: tl.constexpr,
):
    # (D, BLOCK_N) float8 tiles of K^T and V^T, through TMA tensor descriptors or plain pointers. V is loaded after
    # the softmax: loaded up front it stays live across the QK^T MMA (sm_89 + triton 3.6 then spills at D=128).
    if USE_TMA:
        kt = tl.trans(k_desc.load([k_row, 0]))
    else:
        kt = tl.load(kt_ptrs)  # K^T, contiguous along D
    s = tl.dot(q, kt, out_dtype=tl.float32) * (q_scale * k_scale)
    if MASK_KEYS:
        s = tl.where((key_idx < S)[None, :], s, float("-inf"))
    m_blk = tl.max(s, axis=1)  # finite: every key block holds at least one real key
    m_new = tl.maximum(m_i, m_blk)
    alpha = tl.exp2(m_i - m_new)
    # P against the block's own row maximum: the row's largest entry maps to 448 exactly.
    p = tl.exp2(s - m_blk[:, None]) * 448.0
    row_factor = tl.exp2(m_blk - m_new) * (1.0 / 448.0)
    l_i = l_i * alpha + tl.sum(p, axis=1) * row_factor
    p8 = _to_e4m3(p, SOFT_ROUND)
    if USE_TMA:
        vt = vt_desc.load([vt_row, key0])
    else:
        vt = tl.load(vt_ptrs)  # V^T, contiguous along keys
    pv = tl.dot(p8, tl.trans(vt), out_dtype=tl.float32)
    acc = acc * alpha[:, None] + pv * (row_factor * v_scale)[:, None]
    return acc, m_new, l_i

@triton.jit
def _fp8_attention_fwd_kernel(
    q8_ptr, k8_ptr, v8t_ptr, q_scale_ptr, k_scale_ptr, v_scale_ptr, o_ptr,
    s_ob, s_oh, s_os, s_od,
    S, H, S_PAD_M, S_PAD_N, N_BLK_M, N_BLK_N,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr, SOFT_ROUND: tl.constexpr, USE_TMA: tl.constexpr = False,
    WARP_SPECIALIZE: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    # Buffers are padded to whole blocks (zeros), so only the output store is masked.
    if USE_TMA:  # 2-D views (rows of all heads, columns); every stride a multiple of 16 bytes (padded S)
        n_bh = tl.num_programs(1)
        k_desc = tl.make_tensor_descriptor(k8_ptr, shape=[n_bh * S_PAD_N, D], strides=[D, 1],
                                           block_shape=[BLOCK_N, D])
        vt_desc = tl.make_tensor_descriptor(v8t_ptr, shape=[n_bh * D, S_PAD_N], strides=[S_PAD_N, 1],
                                            block_shape=[D, BLOCK_N])
        q_desc = tl.make_tensor_descriptor(q8_ptr, shape=[n_bh * S_PAD_M, D], strides=[D, 1],
                                           block_shape=[BLOCK_M, D])
        q = q_desc.load([(bh * S_PAD_M + pid_m * BLOCK_M).to(tl.int32), 0])
    else:
        k_desc = 0
        vt_desc = 0
        q = tl.load(q8_ptr + bh * S_PAD_M * D + offs_m[:, None] * D + offs_d[None, :])
    q_scale = tl.load(q_scale_ptr + bh * N_BLK_M + pid_m)
    kt_base = k8_ptr + bh * S_PAD_N * D + offs_d[:, None]
    vt_base = v8t_ptr + bh * D * S_PAD_N + offs_d[:, None] * S_PAD_N
    ks_base = k_scale_ptr + bh * N_BLK_N
    vs_base = v_scale_ptr + bh * N_BLK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    n_full = N_BLK_N if EVEN_N else N_BLK_N - 1
    k_row0 = (bh * S_PAD_N).to(tl.int32)
    vt_row = (bh * D).to(tl.int32)
    if WARP_SPECIALIZE:
        # Triton's automatic warp specialisation of the key loop (producer warps issue the K/V loads, consumer
        # warpgroups the MMAs and the softmax). A separate loop rather than tl.range(warp_specialize=...) on the
        # shared one, so the default configs compile exactly the loop they were measured with.
        for j in tl.range(0, n_full, warp_specialize=True):
            key_idx = j * BLOCK_N + offs_n
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, q_scale, kt_base + key_idx[None, :] * D, vt_base + key_idx[None, :], k_desc,
                vt_desc, k_row0 + j * BLOCK_N, vt_row, j * BLOCK_N, tl.load(ks_base + j), tl.load(vs_base + j),
                key_idx, S, False, SOFT_ROUND, USE_TMA,
            )
    else:
        for j in range(0, n_full):
            key_idx = j * BLOCK_N + offs_n
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, q_scale, kt_base + key_idx[None, :] * D, vt_base + key_idx[None, :], k_desc,
                vt_desc, k_row0 + j * BLOCK_N, vt_row, j * BLOCK_N, tl.load(ks_base + j), tl.load(vs_base + j),
                key_idx, S, False, SOFT_ROUND, USE_TMA,
            )
    if not EVEN_N:
        j = N_BLK_N - 1
        key_idx = j * BLOCK_N + offs_n
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, q_scale, kt_base + key_idx[None, :] * D, vt_base + key_idx[None, :], k_desc, vt_desc,
            k_row0 + j * BLOCK_N, vt_row, j * BLOCK_N, tl.load(ks_base + j), tl.load(vs_base + j), key_idx, S,
            True, SOFT_ROUND, USE_TMA,
        )
    out = acc / l_i[:, None]
    dst = o_ptr + b * s_ob + h * s_oh + offs_m.to(tl.int64)[:, None] * s_os + offs_d[None, :] * s_od
    tl.store(dst, out.to(o_ptr.dtype.element_ty), mask=(offs_m < S)[:, None])


def _cfg(bm: int, bn: int, warps: int, stages: int, tma: bool = False, ws: bool = False) -> dict:
    cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
    if tma:  # Q, K and V^T tiles through TMA tensor descriptors (sm_90) instead of pointer loads (cp.async)
        cfg["tma"] = True
    if ws:  # the key loop as tl.range(..., warp_specialize=True)
        cfg["warp_specialize"] = True
    return cfg


# Stored launch configs per (arch, head dim), the default first, then the other candidates worth timing on that
# GPU (benchmarks/bench_attention.py with CDM_FP8_ATTN_CONFIG). Not autotuned at run time: autotuning inside
# CUDA-graph capture or the interpreter misbehaves, and the block sizes are part of the numerics (the quantisation
# blocks; the reference twin takes them from here). sm_90: 128 x 128 tiles with 8 warps (two warpgroups of 64 rows
# each issuing m64n128 / m64nD wgmma), 3 stages at D=64 and 2 at D=128 (shared memory: a K and a V^T tile per
# stage). Untimed on a GPU so far (the H200 figures in RESULTS_gpu.md are of the 128 x 64 config).
#
# Candidates considered and left out (2026-12-06, triton 3.6.0 and 3.9.0, sm_90, compile check):
# - 192 x 128 tiles at D=64 (FA3's Hopper tile): not expressible. BLOCK_M is a tl.arange length and a tensor dimension,
#   and Triton requires both to be powers of two ("arange's range must be a power of 2", both versions). A 192-row
#   tile would need three 64-row sub-tiles written out by hand: a different kernel, not a launch config.
# - tl.range(..., warp_specialize=True) on the key loop (WARP_SPECIALIZE below, with or without TMA): compiles with
#   both Tritons for sm_90 but is not applied. The TTGIR keeps the loop attribute and gets no ttg.warp_specialize
#   partitions, 8 warps stay 8, and the PTX equals the unspecialised kernel's but for line info (both Tritons document
#   warp specialisation as Blackwell-first and "simple matmul loops" only; a plain TMA matmul loop *is* partitioned on
#   sm_90 by both, so the check can see it). Timing it would time the TMA candidate twice; PROBE_CONFIGS keeps it
#   compiled and reported (compile_check --report: "ws partitions") so a Triton that partitions it shows up.
CONFIGS: dict[tuple[int, int], list[dict]] = {
    (90, 64): [_cfg(128, 128, 8, 3), _cfg(128, 64, 8, 3), _cfg(128, 128, 8, 2), _cfg(128, 128, 8, 3, tma=True)],
    (90, 128): [_cfg(128, 128, 8, 2), _cfg(128, 64, 8, 2), _cfg(128, 128, 8, 3), _cfg(128, 128, 8, 2, tma=True)],
}
# Compiled and reported by the compile check, never launched by default nor timed (see above).
PROBE_CONFIGS: dict[tuple[int, int], list[dict]] = {
    (90, 64): [_cfg(128, 128, 8, 3, tma=True, ws=True)],
    (90, 128): [_cfg(128, 128, 8, 2, tma=True, ws=True)],
}


def config_label(cfg: dict) -> str:
    """'128x128 w8 s3 tma ws': one name per launch config (bench rows, compile-check report)."""
    flags = "".join(f" {name}" for key, name in (("tma", "tma"), ("warp_specialize", "ws")) if cfg.get(key))
    return "{BLOCK_M}x{BLOCK_N} w{num_warps} s{num_stages}".format(**cfg) + flags


def _ensure_tma_allocator() -> None:
    """Device-side tensor descriptors need a global scratch allocator (triton.set_allocator); set one once."""
    if getattr(_ensure_tma_allocator, "done", False):
        return

    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, device="cuda", dtype=torch.int8)

    triton.set_allocator(alloc)
    _ensure_tma_allocator.done = True


def kernel_configs(head_dim: int, capability: tuple[int, int] | None = None) -> list[dict]:
    """The stored candidate launch configs for this GPU and head dim (default first)."""
    if capability is not None:
        stored = CONFIGS.get((capability[0] * 10 + capability[1], head_dim))
        if stored:
            return [dict(c) for c in stored]
    # sm_89, other GPUs, the interpreter and the CPU: the config the kernel was first measured with.
    if head_dim <= 64:
        return [_cfg(128, 64, 8, 3)]
    return [_cfg(128, 64, 8, 2)]


def kernel_config(head_dim: int, capability: tuple[int, int] | None = None) -> dict:
    """Block sizes and launch parameters of the Triton path on a GPU of `capability` (None: the interpreter's).

    Override with CDM_FP8_ATTN_CONFIG="BLOCK_M,BLOCK_N,num_warps,num_stages" to tune on a new GPU.
    """
    override = config_override("CDM_FP8_ATTN_CONFIG")
    if override is not None:
        return override
    return kernel_configs(head_dim, capability)[0]


def launch_capability(device: torch.device) -> tuple[int, int] | None:
    """The capability whose stored config a launch on `device` uses (None on the CPU and in the interpreter)."""
    if device.type != "cuda" or INTERPRET:
        return None
    return tuple(torch.cuda.get_device_capability(device))


def triton_fp8_attention(q, k, v, softmax_scale: float, config: dict | None = None, *,
                         soft_round: bool | None = None) -> torch.Tensor:
    """soft_round: round onto the e4m3 grid with integer ops (what the interpreter needs); default: on
    CPU tensors or under the interpreter. The compile check passes False for CPU stand-ins of GPU tensors."""
    cfg = config or kernel_config(q.shape[-1], launch_capability(q.device))
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    b, h, s, d = q.shape
    bh = b * h
    n_blk_m, n_blk_n = triton.cdiv(s, bm), triton.cdiv(s, bn)
    s_pad_m, s_pad_n = n_blk_m * bm, n_blk_n * bn
    dev = q.device
    f8 = torch.float8_e4m3fn
    q8 = torch.empty((bh, s_pad_m, d), dtype=f8, device=dev)
    k8 = torch.empty((bh, s_pad_n, d), dtype=f8, device=dev)
    v8t = torch.empty((bh, d, s_pad_n), dtype=f8, device=dev)
    q_scale = torch.empty((bh, n_blk_m), dtype=torch.float32, device=dev)
    k_scale = torch.empty((bh, n_blk_n), dtype=torch.float32, device=dev)
    v_scale = torch.empty((bh, n_blk_n), dtype=torch.float32, device=dev)
    k_part = torch.empty((bh, n_blk_n, d), dtype=torch.float32, device=dev)
    soft = (INTERPRET or dev.type != "cuda") if soft_round is None else soft_round
    _k_colsum_kernel[(n_blk_n, bh)](k, *k.stride(), k_part, s, h, n_blk_n, D=d, BLOCK_N=bn, num_warps=4)
    _quantize_qkv_kernel[(max(n_blk_m, n_blk_n), bh, 3)](
        q, k, v, *q.stride(), *k.stride(), *v.stride(),
        q8, k8, v8t, q_scale, k_scale, v_scale, k_part,
        s, h, float(softmax_scale * LOG2E), s_pad_m, s_pad_n, n_blk_m, n_blk_n,
        D=d, BLOCK_M=bm, BLOCK_N=bn, SOFT_ROUND=soft, num_warps=4,
    )
    out = _output_like(q)
    # The interpreter's fp32 -> bf16 cast truncates: keep fp32 there and let torch round.
    o = _output_like(q, torch.float32) if (soft and q.dtype != torch.float32) else out
    use_tma = bool(cfg.get("tma", False))
    use_ws = bool(cfg.get("warp_specialize", False))
    if use_tma and dev.type == "cuda" and not INTERPRET:
        _ensure_tma_allocator()
    _fp8_attention_fwd_kernel[(n_blk_m, bh)](
        q8, k8, v8t, q_scale, k_scale, v_scale, o, *o.stride(),
        s, h, s_pad_m, s_pad_n, n_blk_m, n_blk_n,
        D=d, BLOCK_M=bm, BLOCK_N=bn, EVEN_N=(s % bn == 0), SOFT_ROUND=soft, USE_TMA=use_tma,
        WARP_SPECIALIZE=use_ws, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if o is not out:
        out.copy_(o)
    return out


def aot_compile(capability: int = 90, head_dim: int = 64, dtype: str = "bf16", even_n: bool = False,
                config: dict | None = None, asm: str = "ptx"):
    """Compile both kernels for a CUDA target without a GPU (needs triton's bundled ptxas).

    Returns {"colsum": ptx, "quantize": ptx, "attention": ptx}, compiled with `config` or else the stored
    default config of (capability, head_dim); asm="kernel": the compiled kernels themselves (their .asm holds
    ptx and cubin, .metadata the launch facts). Only outside the interpreter (TRITON_INTERPRET=0
    when this module was imported). Lets CPU-only CI check that the GPU code path compiles, and
    whether the FP8 MMAs came out as wgmma (sm_90) or mma (sm_89).
    """
    if INTERPRET:
        raise RuntimeError("aot_compile needs TRITON_INTERPRET=0 when cdm_kernels.attention._kernels is imported")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = config or kernel_config(head_dim, divmod(capability, 10))
    target = GPUTarget("cuda", capability, 32)

    def build(fn, ptr_types: dict, scalars: dict, consts: dict, options: dict) -> str:
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name in ptr_types:
                sig[name] = ptr_types[name]
            else:
                sig[name] = scalars.get(name, "i32")
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        kernel = triton.compile(src, target=target, options=options)
        return kernel if asm == "kernel" else kernel.asm[asm]

    f8 = {n: "*fp8e4nv" for n in ("q8_ptr", "k8_ptr", "v8t_ptr")}
    f32 = {n: "*fp32" for n in ("q_scale_ptr", "k_scale_ptr", "v_scale_ptr")}
    blocks = {"D": head_dim, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "SOFT_ROUND": False}
    colsum = build(_k_colsum_kernel, {"k_ptr": f"*{dtype}", "part_ptr": "*fp32"}, {},
                   {"D": head_dim, "BLOCK_N": cfg["BLOCK_N"]}, {"num_warps": 4})
    quant = build(_quantize_qkv_kernel, {**{n: f"*{dtype}" for n in ("q_ptr", "k_ptr", "v_ptr")}, **f8, **f32,
                                         "k_part_ptr": "*fp32"}, {"q_mult": "fp32"}, blocks, {"num_warps": 4})
    consts = {**blocks, "EVEN_N": even_n, "USE_TMA": bool(cfg.get("tma", False)),
              "WARP_SPECIALIZE": bool(cfg.get("warp_specialize", False))}
    attn = build(_fp8_attention_fwd_kernel, {**f8, **f32, "o_ptr": f"*{dtype}"}, {}, consts,
                 {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    return {"colsum": colsum, "quantize": quant, "attention": attn}
