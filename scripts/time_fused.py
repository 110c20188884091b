#!/usr/bin/env python3
"""Time the fused BN + activation (+ residual) CPU ops against torch's unfused modules.

    python scripts/time_fused.py [--threads N] [--rounds R] [--min-run-time S] [--shapes ...]
                                 [--dtypes float32,bfloat16] [--layouts nchw,channels_last]

For each shape, dtype and layout, in one process, training forward + backward of:
  torch        nn.BatchNorm2d -> nn.ReLU(inplace=True)             (relu)
               nn.BatchNorm2d -> + residual -> nn.ReLU(inplace=True) (add_relu)
  fused        torch.ops.bnext.batch_norm_act_forward + batch_norm_act_backward (relu, from the input)
  floor        the bytes the fused ops must move, timed as x.sum() (a read pass) and x.clone() minus
               x.sum() (a write pass): forward reads x twice (statistics, then the pass), writes y;
               backward reads (dy, x) twice and writes dx; a residual adds a read to each pass and
               the grad_residual write.
Prints per case the medians (ms), torch / fused, fused / floor, and the geometric means. Rounds
alternate the candidates so machine drift (other processes on a shared machine) hits them alike.
"""
import argparse
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils import benchmark  # noqa: E402

import bnext  # noqa: E402,F401  (registers torch.ops.bnext)

RELU = 1
SHAPES = [
    (32, 64, 56, 56), (32, 128, 28, 28), (32, 256, 14, 14), (32, 512, 7, 7),
    (8, 64, 56, 56), (8, 128, 28, 28), (8, 256, 14, 14), (8, 512, 7, 7),
    (32, 32, 112, 112), (32, 96, 56, 56), (32, 144, 28, 28), (32, 960, 7, 7),
]


def calls(shape, dtype, layout):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(dtype)
    r = torch.randn(shape, generator=gen).to(dtype)
    dy = torch.randn(shape, generator=gen).to(dtype)
    if layout == "channels_last":
        x, r, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, r, dy))
    C = shape[1]
    bn = nn.BatchNorm2d(C).to(memory_format=torch.channels_last) if layout == "channels_last" else nn.BatchNorm2d(C)
    if dtype != torch.float32:
        bn = bn.to(dtype)  # torch's CPU BN takes parameters in the input's dtype too
    relu = nn.ReLU(inplace=True)
    xg = x.clone().requires_grad_()
    rg = r.clone().requires_grad_()

    def torch_relu():
        xg.grad = None
        relu(bn(xg)).backward(dy)

    def torch_add_relu():
        xg.grad = rg.grad = None
        relu(bn(xg) + rg).backward(dy)

    ops = torch.ops.bnext
    w = torch.rand(C) + 0.5
    b = torch.rand(C) - 0.5

    def fused(res):
        def f():
            y, mean, invstd, _ = ops.batch_norm_act_forward(x, w, b, res, 1e-5, RELU, 0.0)
            dx, dr, sdz, sdzx = ops.batch_norm_act_backward(dy, x, res, w, b, mean, invstd, RELU, 0.0, False)
            return sdzx * invstd, sdz  # grad_weight, grad_bias as the autograd layer forms them
        return f

    return {
        "torch_relu": torch_relu,
        "torch_add_relu": torch_add_relu,
        "fused_relu": fused(None),
        "fused_add_relu": fused(r),
        "read": lambda: x.sum(),
        "clone": lambda: x.clone(memory_format=torch.preserve_format),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-run-time", type=float, default=0.15)
    p.add_argument("--shapes", nargs="*", default=None, help="e.g. 32,64,56,56 8,512,7,7")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--layouts", default="nchw,channels_last")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    print(f"{torch.get_num_threads()} threads, ISA {bnext.build_info()['cpu_isa']}, torch {torch.__version__}")
    print(f"{'shape':>18s} {'dtype':>8s} {'layout':>13s} | {'relu: torch':>11s} {'fused':>7s} {'ratio':>6s} {'/floor':>6s}"
          f" | {'add: torch':>10s} {'fused':>7s} {'ratio':>6s} {'/floor':>6s}")
    ratios = {"relu": [], "add_relu": []}
    floors = {"relu": [], "add_relu": []}
    for shape in shapes:
        for dtype in [getattr(torch, d) for d in args.dtypes.split(",")]:
            for layout in args.layouts.split(","):
                fns = calls(shape, dtype, layout)
                timers = {k: benchmark.Timer("f()", globals={"f": f}, num_threads=torch.get_num_threads())
                          for k, f in fns.items()}
                meas = {k: [] for k in fns}
                names = list(fns)
                for rnd in range(args.rounds + 1):
                    for i in range(len(names)):
                        k = names[(rnd + i) % len(names)]
                        m = timers[k].blocked_autorange(min_run_time=args.min_run_time)
                        if rnd > 0:
                            meas[k].append(m)
                t = {k: benchmark.Measurement.merge(v)[0].median * 1e3 for k, v in meas.items()}
                t_read, t_write = t["read"], max(t["clone"] - t["read"], 0.0)
                floor = {"relu": 6 * t_read + 2 * t_write, "add_relu": 9 * t_read + 3 * t_write}
                row = f"{'x'.join(map(str, shape)):>18s} {str(dtype).split('.')[-1]:>8s} {layout:>13s}"
                for kind in ("relu", "add_relu"):
                    tt, tf = t[f"torch_{kind}"], t[f"fused_{kind}"]
                    ratios[kind].append(tt / tf)
                    floors[kind].append(tf / floor[kind])
                    row += f" | {tt:11.2f} {tf:7.2f} {tt / tf:6.2f} {tf / floor[kind]:6.2f}"
                print(row, flush=True)
    for kind in ("relu", "add_relu"):
        g = math.exp(sum(map(math.log, ratios[kind])) / len(ratios[kind]))
        f = math.exp(sum(map(math.log, floors[kind])) / len(floors[kind]))
        print(f"geometric mean {kind}: torch / fused {g:.2f}, fused / floor {f:.2f}")


if __name__ == "__main__":
    main()
