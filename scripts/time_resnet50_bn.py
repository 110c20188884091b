#!/usr/bin/env python3
"""Time resnet50's batch norm layers one by one: torch's BN -> (+ residual) -> ReLU, bnext's BN with
torch's add and ReLU, and bnext.BatchNormAct2d, forward and forward + backward, weighted by how many
layers of each shape the network has: where a training step's BN time goes.

    python scripts/time_resnet50_bn.py [--batch 16] [--resolution 128] [--layout channels_last]

Each shape is one group of timers interleaved round by round in one process (torch.utils.benchmark,
glibc trimming off as in benchmarks/bench.py). The last line sums count * median per variant.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils import benchmark  # noqa: E402

import bnext  # noqa: E402
from bench import tune_malloc  # noqa: E402


def resnet50_bn_relu_layers(S):
    """(C, H, residual, count) of torchvision resnet50's BN layers followed by a ReLU, S the spatial
    size after the stem (resolution / 4). The four downsample BNs have no activation and are left out."""
    return [(64, 2 * S, False, 1), (64, S, False, 6), (256, S, True, 3), (128, S, False, 1),
            (128, S // 2, False, 7), (512, S // 2, True, 4), (256, S // 2, False, 1), (256, S // 4, False, 11),
            (1024, S // 4, True, 6), (512, S // 4, False, 1), (512, S // 8, False, 5), (2048, S // 8, True, 3)]


class TorchBNAct(nn.Module):
    def __init__(self, C, bn_cls):
        super().__init__()
        self.bn = bn_cls(C)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x, r=None):
        y = self.bn(x)
        if r is not None:
            y = y + r
        return self.act(y)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--layout", choices=["nchw", "channels_last"], default="channels_last")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-run-time", type=float, default=0.15)
    args = p.parse_args()
    tune_malloc()
    torch.manual_seed(0)
    fmt = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    threads = torch.get_num_threads()
    names = ("torch", "bnext", "fused")
    total = {k: [0.0, 0.0] for k in names}
    print(f"resnet50 BN layers, batch {args.batch}, resolution {args.resolution}, {args.layout}, {threads} threads; ms")
    for C, H, res, count in resnet50_bn_relu_layers(args.resolution // 4):
        shape = (args.batch, C, H, H)
        x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
        r = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_() if res else None
        dy = torch.randn(shape).contiguous(memory_format=fmt)
        mods = {"torch": TorchBNAct(C, nn.BatchNorm2d), "bnext": TorchBNAct(C, bnext.BatchNorm2d),
                "fused": bnext.BatchNormAct2d(C)}
        timers = {}
        for k, m in mods.items():
            inputs = [x] + ([r] if res else []) + list(m.parameters())
            g = {"m": m, "x": x, "r": r, "inputs": inputs, "dy": dy, "torch": torch}
            timers[(k, 0)] = benchmark.Timer("m(x, r)", globals=g, num_threads=threads)
            timers[(k, 1)] = benchmark.Timer("torch.autograd.grad(m(x, r), inputs, dy)", globals=g, num_threads=threads)
        measured = {k: [] for k in timers}
        keys = list(timers)
        for rnd in range(args.rounds):
            for k in keys[rnd % len(keys):] + keys[:rnd % len(keys)]:
                measured[k].append(timers[k].blocked_autorange(min_run_time=args.min_run_time))
        med = {k: benchmark.Measurement.merge(v)[0].median * 1e3 for k, v in measured.items()}
        for k in names:
            total[k][0] += count * med[(k, 0)]
            total[k][1] += count * med[(k, 1)]
        print(f"{str(shape):22s} {'+res' if res else '    '} x{count:2d}  forward "
              + " ".join(f"{k} {med[(k, 0)]:7.3f}" for k in names) + "  | forward+backward "
              + " ".join(f"{k} {med[(k, 1)]:7.3f}" for k in names), flush=True)
    print("count-weighted sums: " + ", ".join(
        f"{k} forward {v[0]:.1f} ms, forward+backward {v[1]:.1f} ms" for k, v in total.items()))


if __name__ == "__main__":
    main()
