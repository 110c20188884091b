"""GPU timings of bnext against torch's own batch norm (cuDNN / native CUDA kernels), with CUDA events.

    python benchmarks/bench_cuda.py [--dtype float32] [--iters 50] [--json benchmarks/results_cuda.json]

For each shape and memory format: training forward, and forward + backward, of bnext.BatchNorm2d
and nn.BatchNorm2d in the same run; prints milliseconds per iteration (median over repeats) and
the ratio torch/bnext (> 1: bnext faster). Then the fused ops: BN + ReLU and BN + add + ReLU,
torch unfused (nn.BatchNorm2d, the add, F.relu, with autograd) against bnext's
batch_norm_act_forward (and batch_norm_act_backward for forward + backward, called as ops).
Refuses cleanly (exit status 2) without a CUDA device.
"""
import argparse
import json
import statistics
import sys

import torch
import torch.nn as nn

SHAPES = [
    (32, 64, 56, 56),
    (32, 256, 14, 14),
    (128, 32, 32, 32),
    (8, 16, 256, 256),
    (256, 1024, 1, 1),
]


def time_ms(fn, iters, repeats=5):
    """Median over `repeats` of the mean time per call of `iters` calls, measured with CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    return statistics.median(samples)


def bench_shape(shape, fmt, dtype, iters):
    import bnext

    C = shape[1]
    x = torch.randn(shape, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
    dy = torch.randn_like(x)
    rows = []
    for name, mod in (("torch", nn.BatchNorm2d(C)), ("bnext", bnext.BatchNorm2d(C))):
        mod = mod.cuda()
        xg = x.clone().requires_grad_()

        def fwd():
            with torch.no_grad():
                mod(x)

        def fwd_bwd():
            mod(xg).backward(dy)

        rows.append((name, time_ms(fwd, iters), time_ms(fwd_bwd, iters)))
    return rows


def bench_fused(shape, fmt, dtype, iters, residual):
    """BN + (add +) ReLU: torch unfused with autograd against the fused ops (forward; forward + backward)."""
    import torch.nn.functional as F

    C = shape[1]
    x = torch.randn(shape, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
    r = torch.randn_like(x) if residual else None
    dy = torch.randn_like(x)
    bn = nn.BatchNorm2d(C).cuda()
    w, b = bn.weight.detach().float(), bn.bias.detach().float()
    xg = x.clone().requires_grad_()
    rg = r.clone().requires_grad_() if residual else None
    relu = 1  # csrc/common/act.h Act::kRelu

    def torch_fwd():
        with torch.no_grad():
            F.relu(bn(x) + r if residual else bn(x))

    def torch_fwd_bwd():
        F.relu(bn(xg) + rg if residual else bn(xg)).backward(dy)

    def bnext_fwd():
        torch.ops.bnext.batch_norm_act_forward(x, w, b, r, 1e-5, relu, 0.0)

    def bnext_fwd_bwd():
        _, mean, invstd, _ = torch.ops.bnext.batch_norm_act_forward(x, w, b, r, 1e-5, relu, 0.0)
        torch.ops.bnext.batch_norm_act_backward(dy, x, r, w, b, mean, invstd, relu, 0.0, False)

    return time_ms(torch_fwd, iters), time_ms(bnext_fwd, iters), time_ms(torch_fwd_bwd, iters), time_ms(bnext_fwd_bwd, iters)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json", help="write machine-readable results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device available; nothing to time", file=sys.stderr)
        return 2
    import bnext

    if not bnext.build_info()["cuda"]:
        print("bench_cuda: bnext was built without CUDA kernels (BNEXT_CUDA=0)", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    results = []
    print(f"device: {torch.cuda.get_device_name()}  dtype: {args.dtype}  (ms per iteration, median)")
    print(f"{'shape':>20} {'format':>14} {'fwd torch':>10} {'fwd bnext':>10} {'ratio':>6} {'f+b torch':>10} {'f+b bnext':>10} {'ratio':>6}")
    for shape in SHAPES:
        for fmt_name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
            (_, tf, tfb), (_, bf, bfb) = bench_shape(shape, fmt, dtype, args.iters)
            print(f"{str(shape):>20} {fmt_name:>14} {tf:10.4f} {bf:10.4f} {tf / bf:6.2f} {tfb:10.4f} {bfb:10.4f} {tfb / bfb:6.2f}")
            results.append(
                {"shape": shape, "format": fmt_name, "dtype": args.dtype, "torch_fwd_ms": tf, "bnext_fwd_ms": bf,
                 "torch_fwd_bwd_ms": tfb, "bnext_fwd_bwd_ms": bfb}
            )
    print("\nfused: torch unfused (BN, add, ReLU) against bnext.batch_norm_act_forward/_backward")
    print(f"{'shape':>20} {'format':>14} {'case':>12} {'fwd torch':>10} {'fwd bnext':>10} {'ratio':>6} {'f+b torch':>10} {'f+b bnext':>10} {'ratio':>6}")
    for shape in SHAPES:
        for fmt_name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
            for case, residual in (("bn+relu", False), ("bn+add+relu", True)):
                tf, bf, tfb, bfb = bench_fused(shape, fmt, dtype, args.iters, residual)
                print(f"{str(shape):>20} {fmt_name:>14} {case:>12} {tf:10.4f} {bf:10.4f} {tf / bf:6.2f} {tfb:10.4f} {bfb:10.4f} {tfb / bfb:6.2f}")
                results.append(
                    {"shape": shape, "format": fmt_name, "dtype": args.dtype, "case": case, "torch_fwd_ms": tf,
                     "bnext_fwd_ms": bf, "torch_fwd_bwd_ms": tfb, "bnext_fwd_bwd_ms": bfb}
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
