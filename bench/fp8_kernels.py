"""The FP8 base GEMMs' kernels on the GPU (engine/training/fp8.py): the Triton quantisation kernels
against the torch reference path (the CPU's), and the GEMM times against bf16, for the 8B and 70B
projection shapes at 16,384 tokens.

    python bench/fp8_kernels.py

One JSON line per check (FP8 ...).
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.training import fp8  # noqa: E402


def timed(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def main():
    torch.manual_seed(0)
    x = (torch.randn(4096, 1000, device="cuda") * torch.logspace(-3, 3, 4096, device="cuda")[:, None]).bfloat16()
    q, s = fp8.quantize_rows(x)
    qr, sr = fp8.quantize_rows(x.cpu())
    print("FP8 " + json.dumps(dict(check="rows: triton == torch", scales_equal=bool(torch.equal(s.cpu(), sr)),
                                   codes_equal=bool(torch.equal(q.cpu().view(torch.uint8), qr.view(torch.uint8))))))
    w = x[:, :992].contiguous()
    q, s = fp8.quantize_cols_transposed(w)
    qr, sr = fp8.quantize_cols_transposed(w.cpu())
    print("FP8 " + json.dumps(dict(check="cols transposed: triton == torch", shape=list(q.shape),
                                   scales_equal=bool(torch.equal(s.cpu(), sr)),
                                   codes_equal=bool(torch.equal(q.cpu().view(torch.uint8), qr.view(torch.uint8))))))
    for name, (k, n) in {"8b gate": (4096, 14336), "8b down": (14336, 4096), "8b q": (4096, 4096),
                         "70b gate": (8192, 28672), "70b down": (28672, 8192)}.items():
        a = torch.randn(16384, k, device="cuda", dtype=torch.bfloat16)
        wt = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        dy = torch.randn(16384, n, device="cuda", dtype=torch.bfloat16)
        ref = a.float() @ wt.float().t()
        err = ((fp8.matmul_nt(a, wt).float() - ref).norm() / ref.norm()).item()
        t = dict(bf16_nt=timed(lambda: a @ wt.t()), fp8_nt=timed(lambda: fp8.matmul_nt(a, wt)),
                 bf16_nn=timed(lambda: dy @ wt), fp8_nn=timed(lambda: fp8.matmul_nn(dy, wt)),
                 quant_x=timed(lambda: fp8.quantize_rows(a)), quant_w_rows=timed(lambda: fp8.quantize_rows(wt)),
                 quant_w_cols_t=timed(lambda: fp8.quantize_cols_transposed(wt)))
        print("FP8 " + json.dumps(dict(check="gemm ms", shape=name, tokens=16384, rel_err_nt=round(err, 4),
                                       **{kk: round(v, 3) for kk, v in t.items()})), flush=True)


if __name__ == "__main__":
    main()
