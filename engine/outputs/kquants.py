"""llama.cpp's k-quants (Q4_K, Q5_K, Q6_K) written in vectorised numpy.

These are ggml's reference quantisers (``quantize_row_q4_K_ref`` / ``q5_K_ref`` / ``q6_K_ref`` in
ggml-quants.c, the path ``llama-quantize`` takes without an importance matrix), computed for every
256-value super-block of a tensor at once instead of one block at a time. The byte layout is
ggml's ``block_q4_K`` / ``block_q5_K`` / ``block_q6_K``; the ``gguf`` package dequantises all three
(``gguf.quants.dequantize``), which is how the tests and the export's verification read them back.

Arithmetic is float32 like the C code, but sums are numpy's (pairwise) rather than sequential, so
a scale can differ from llama-quantize's in its last bit; the algorithm (the search over scales and
mins, the 6-bit super-block scales, the requantisation) is the same.
"""
from __future__ import annotations

import numpy as np

QK_K = 256
GROUP_MAX_EPS = 1e-15
_F = np.float32


def _rint(a):
    """ggml's nearest_int: round half to even (the 1.5 * 2**23 trick), as int32."""
    return np.rint(a).astype(np.int32)


def _f16(a):
    """fp32 -> fp16 -> fp32, as the block's d/dmin are stored and read back."""
    return np.asarray(a, dtype=_F).astype(np.float16).astype(_F)


def _blocks(data: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(data, dtype=_F)
    if x.shape[-1] % QK_K:
        raise ValueError(f"k-quants need rows that are a multiple of {QK_K} values, got {x.shape[-1]}")
    return x.reshape(-1, QK_K)


# --------------------------------------------------------------------------- shared helpers

def _sum(a):
    """Sum over axis 0 of an (n, G) array: numpy adds the rows in order, the C loop's order."""
    return np.add.reduce(a, axis=0)


def make_qkx2_quants(x, w, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml's make_qkx2_quants over groups ``x`` (G, n): asymmetric quants L in [0, nmax] with a
    scale and a (non-positive) min found by a grid search of least-squares fits. Returns
    (scale (G,), the_min = -min (G,), L (G, n) uint8). Works on (n, G) internally so that every sum
    adds the values in the C code's order."""
    x = np.ascontiguousarray(x.T)
    w = np.ascontiguousarray(w.T)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        mn = np.minimum(x.min(axis=0), _F(0))
        mx = x.max(axis=0)
        flat = mx == mn
        sum_w = _sum(w)
        sum_x = _sum(w * x)
        iscale = _F(nmax) / np.where(flat, _F(1), mx - mn)
        scale = _F(1) / iscale
        L = np.clip(_rint(iscale * (x - mn)), 0, nmax)
        diff = scale * L.astype(_F) + mn - x
        best = _sum(w * (diff * diff))
        cur_min = mn.copy()
        for step in range(nstep + 1):      # the C code updates min as it goes: so do we
            iscale = (_F(rmin) + _F(rdelta) * _F(step) + _F(nmax)) / np.where(flat, _F(1), mx - cur_min)
            la = np.clip(_rint(iscale * (x - cur_min)), 0, nmax)
            lf = la.astype(_F)
            sum_l = _sum(w * lf)
            sum_l2 = _sum(w * lf * lf)
            sum_xl = _sum(w * lf * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            this_min = np.where(pos, _F(0), this_min)
            diff = this_scale * lf + this_min - x
            err = _sum(w * (diff * diff))
            take = (D > 0) & (err < best) & ~flat
            L = np.where(take, la, L)
            best = np.where(take, err, best)
            scale = np.where(take, this_scale, scale)
            cur_min = np.where(take, this_min, cur_min)
        L = np.where(flat, 0, L)
        scale = np.where(flat, _F(0), scale).astype(_F)
    return scale, (-cur_min).astype(_F), np.ascontiguousarray(L.T).astype(np.uint8)


def make_qx_quants_rmse1(x, nmax: int):
    """ggml's make_qx_quants(n, nmax, x, L, rmse_type=1, NULL) over groups ``x`` (G, n): symmetric
    quants L + nmax in [0, 2 nmax) with weights x**2 and a search over 19 scales."""
    G, n = x.shape
    idx = np.abs(x).argmax(axis=1)
    mx = x[np.arange(G), idx]
    x = np.ascontiguousarray(x.T)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        zero = np.abs(mx) < GROUP_MAX_EPS
        mx = np.where(zero, _F(1), mx)
        w = x * x

        def fit(iscale):
            l = np.clip(_rint(iscale * x), -nmax, nmax - 1)
            lf = l.astype(_F)
            return l, _sum(w * x * lf), _sum(w * lf * lf)

        iscale = _F(-nmax) / mx
        L, sumlx, suml2 = fit(iscale)
        scale = np.where(suml2 != 0, sumlx / suml2, _F(0)).astype(_F)
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(_F(nmax) + _F(0.1) * _F(step)) / mx
            l, sumlx, suml2 = fit(iscale)
            take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(take, l, L)
            scale = np.where(take, sumlx / suml2, scale)
            best = np.where(take, scale * sumlx, best)
        L = np.where(zero, -nmax, L)       # all zero: L = 0 after the +nmax below
        scale = np.where(zero, _F(0), scale).astype(_F)
    return scale, np.ascontiguousarray((L + nmax).T).astype(np.uint8)


def _pack_scales_k4(ls, lm):
    """The 12-byte 6-bit scales/mins of Q4_K/Q5_K (get_scale_min_k4's inverse), ls/lm (nb, 8)."""
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    s = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    s[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    s[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    s[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return s


def _q45_k(data, nmax: int, rmin: float, rdelta: float, nstep: int):
    """What Q4_K and Q5_K share: per 32-value group a qkx2 fit, 6-bit scales and mins under an fp16
    super-block scale and min, then the values requantised with the stored scales."""
    x = _blocks(data)
    nb = x.shape[0]
    g = x.reshape(nb * 8, 32)
    av_x = np.sqrt(_sum(np.ascontiguousarray((g * g).T)) / _F(32))
    w = av_x[:, None] + np.abs(g)
    scales, mins, L = make_qkx2_quants(g, w, nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = scales.max(axis=1)
    max_min = mins.max(axis=1)
    max_scale = np.where(max_scale > 0, max_scale, _F(0))     # the C loops start from +0
    max_min = np.where(max_min > 0, max_min, _F(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, _F(63) / max_scale, _F(0)).astype(_F)
        inv_min = np.where(max_min > 0, _F(63) / max_min, _F(0)).astype(_F)
    ls = np.minimum(63, _rint(inv_scale[:, None] * scales))
    lm = np.minimum(63, _rint(inv_min[:, None] * mins))
    d = _f16(max_scale / _F(63))
    dmin = _f16(max_min / _F(63))
    dd = d[:, None] * ls.astype(_F)                   # (nb, 8)
    dm = dmin[:, None] * lm.astype(_F)
    xg = x.reshape(nb, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_rint((xg + dm[:, :, None]) / dd[:, :, None]), 0, nmax)
    L = np.where((dd != 0)[:, :, None], requant, L.reshape(nb, 8, 32)).astype(np.uint8)
    head = np.concatenate([d.astype(np.float16).view(np.uint8).reshape(nb, 2),
                           dmin.astype(np.float16).view(np.uint8).reshape(nb, 2),
                           _pack_scales_k4(ls, lm)], axis=1)
    return head, L.reshape(nb, 4, 2, 32)


def quantize_q4_k(data: np.ndarray) -> np.ndarray:
    """float32 rows (multiple of 256) -> Q4_K bytes (rows, n/256*144): quantize_row_q4_K_ref."""
    shape = np.shape(data)
    head, L = _q45_k(data, 15, -1.0, 0.1, 20)
    qs = (L[:, :, 0, :] | (L[:, :, 1, :] << 4)).reshape(-1, 128)
    return np.concatenate([head, qs], axis=1).reshape(*shape[:-1], shape[-1] // QK_K * 144)


def quantize_q5_k(data: np.ndarray) -> np.ndarray:
    """float32 rows (multiple of 256) -> Q5_K bytes (rows, n/256*176): quantize_row_q5_K_ref."""
    shape = np.shape(data)
    head, L = _q45_k(data, 31, -0.5, 0.1, 15)
    qs = ((L[:, :, 0, :] & 0xF) | ((L[:, :, 1, :] & 0xF) << 4)).reshape(-1, 128)
    hi = (L >> 4).astype(np.uint8)                    # (nb, 4, 2, 32): bit 2c (low half), 2c+1 (high)
    qh = np.zeros((L.shape[0], 32), dtype=np.uint8)
    for c in range(4):
        qh |= (hi[:, c, 0, :] << (2 * c)) | (hi[:, c, 1, :] << (2 * c + 1))
    return np.concatenate([head, qh, qs], axis=1).reshape(*shape[:-1], shape[-1] // QK_K * 176)


def quantize_q6_k(data: np.ndarray) -> np.ndarray:
    """float32 rows (multiple of 256) -> Q6_K bytes (rows, n/256*210): quantize_row_q6_K_ref."""
    shape = np.shape(data)
    x = _blocks(data)
    nb = x.shape[0]
    scales, L = make_qx_quants_rmse1(x.reshape(nb * 16, 16), 32)
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 16, 16)
    idx = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(nb), idx]
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(zero, _F(0), _F(-128) / np.where(zero, _F(1), max_scale)).astype(_F)
        d = _f16(np.where(zero, _F(0), _F(1) / np.where(zero, _F(1), iscale)))
    sc = np.minimum(127, _rint(iscale[:, None] * scales)).astype(np.int8)     # (nb, 16)
    dd = d[:, None] * sc.astype(_F)
    xg = x.reshape(nb, 16, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_rint(xg / dd[:, :, None]), -32, 31) + 32
    L = np.where((dd != 0)[:, :, None], requant, L)
    L = np.where(zero[:, None, None], 0, L).astype(np.uint8)
    sc = np.where(zero[:, None], 0, sc).astype(np.int8)
    L = L.reshape(nb, 2, 4, 32)                       # two 128-value halves, four 32-value quarters
    ql = np.concatenate([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4),
                         (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], axis=2).reshape(nb, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4)
          | ((L[:, :, 3] >> 4) << 6)).reshape(nb, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d.astype(np.float16).view(np.uint8).reshape(nb, 2)],
                         axis=1)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * 210)


_BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
_KERNELS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}
CHUNK_BLOCKS = 2048          # super-blocks per step: bounded memory, cache-sized temporaries


def quantize(data: np.ndarray, name: str) -> np.ndarray:
    """float32 array (last axis a multiple of 256) -> ggml ``name`` bytes (Q4_K, Q5_K or Q6_K),
    shaped like gguf.quants.quantize's output, in chunks of CHUNK_BLOCKS super-blocks."""
    shape = np.shape(data)
    flat = _blocks(data)
    out = np.empty((flat.shape[0], _BLOCK_BYTES[name]), dtype=np.uint8)
    for i in range(0, flat.shape[0], CHUNK_BLOCKS):
        out[i:i + CHUNK_BLOCKS] = _KERNELS[name](flat[i:i + CHUNK_BLOCKS]).reshape(-1, _BLOCK_BYTES[name])
    return out.reshape(*shape[:-1], shape[-1] // QK_K * _BLOCK_BYTES[name])


QUANTIZERS = {k: (lambda n: lambda data: quantize(data, n))(k) for k in _KERNELS}
