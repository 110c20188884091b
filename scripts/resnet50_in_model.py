#!/usr/bin/env python3
"""Where a resnet50 training step's time goes, torch against fuse_model, measured inside the model.

    python scripts/resnet50_in_model.py [--mode step|nodes] [--rounds 15] [--batch 16] [--resolution 128]
                                        [--layout channels_last] [--composed]

Loop timings of one layer (scripts/time_resnet50_bn.py, benchmarks/bench_fused.py) keep that layer's
tensors in the caches; inside a network its saved input and residual were written hundreds of MB
earlier and come from memory, while the gradient it gets was just written. This script measures
the layers where they run:

  step   forward and backward medians of torchvision's resnet50 (torch), bnext.convert_model and
         bnext.fuse_model, one training step of each per round, in rotating order, in one process.
         --composed adds fuse_model on the composed path (the ops' Python autograd kernels, as under
         torch.func) instead of the eager one-call C++ path: what the C++ autograd nodes save.
  nodes  the backward's autograd nodes timed one by one (Node.register_prehook / register_hook),
         summed per kind and per BN shape: torch's BatchNorm + ReLU (+ add) nodes against the fused
         nodes, for each of resnet50's BN shapes, with the minor page faults each took (in
         parentheses: a node that grows the heap pays for fresh pages, about 1.3 us each here).

glibc keeps freed memory (benchmarks/bench.py tune_malloc), as in the other benchmarks.
"""
import argparse
import copy
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import torch  # noqa: E402

import bnext  # noqa: E402
import bnext.functional as F_bnext  # noqa: E402
from bench import tune_malloc  # noqa: E402

BN_NODES = {"NativeBatchNormBackward0", "ReluBackward0", "AddBackward0", "CppFunction"}


def median(values):
    return sorted(values)[len(values) // 2]


def minor_faults():
    # Pages the process touched for the first time (or again after glibc returned them): a step
    # that grows the heap pays about 1.3 us a page here (4096 of them for a 16 MiB tensor).
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def models(layout):
    import torchvision

    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    base = torchvision.models.resnet50(num_classes=1000).to(memory_format=fmt).train()
    return base, bnext.convert_model(copy.deepcopy(base)).train(), bnext.fuse_model(copy.deepcopy(base)).train()


def composed(fn):
    """fn run with bnext's layers on the composed path (the eager route off)."""
    def run():
        saved = F_bnext.eager_route
        F_bnext.eager_route = lambda: False
        try:
            return fn()
        finally:
            F_bnext.eager_route = saved
    return run


def step_mode(args, x, torch_m, convert_m, fuse_m):
    def step(m):
        def run():
            f0, t0 = minor_faults(), time.perf_counter()
            y = m(x)
            t1 = time.perf_counter()
            y.sum().backward()
            return t1 - t0, time.perf_counter() - t1, minor_faults() - f0
        return run

    variants = {"torch": step(torch_m), "convert_model": step(convert_m), "fuse_model": step(fuse_m)}
    if args.composed:
        variants["fuse_model composed"] = composed(step(fuse_m))
    times = {k: [] for k in variants}
    keys = list(variants)
    for rnd in range(args.rounds + 2):
        for k in keys[rnd % len(keys):] + keys[:rnd % len(keys)]:
            measured = variants[k]()
            if rnd >= 2:  # two warm-up rounds
                times[k].append(measured)
    print(f"resnet50 training step, batch {args.batch}, {args.resolution}x{args.resolution}, {args.layout}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds; medians in ms")
    for k, t in times.items():
        print(f"{k:20s} forward {1e3 * median([a for a, _, _ in t]):7.1f}  backward {1e3 * median([b for _, b, _ in t]):7.1f}"
              f"  step {1e3 * median([a + b for a, b, _ in t]):7.1f}  page faults per step {median([f for _, _, f in t])}")


def instrument(loss, name, acc):
    """Times every autograd node of loss's graph into acc[(name, node kind, grad shape)]."""
    seen, stack, start = set(), [loss.grad_fn], {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)

        def pre(grads, node=node):
            start[node] = (time.perf_counter(), minor_faults())

        def post(grad_inputs, grad_outputs, node=node):
            shape = tuple(grad_outputs[0].shape) if grad_outputs and grad_outputs[0] is not None else ()
            key = (name, type(node).__name__, shape)
            t, f = acc.get(key, (0.0, 0))
            acc[key] = (t + time.perf_counter() - start[node][0], f + minor_faults() - start[node][1])

        node.register_prehook(pre)
        node.register_hook(post)
        stack.extend(f for f, _ in node.next_functions)


def nodes_mode(args, x, torch_m, fuse_m):
    acc = {}
    for rnd in range(args.rounds + 2):
        if rnd == 2:
            acc.clear()
        for name, m in (("torch", torch_m), ("fuse_model", fuse_m))[:: 1 if rnd % 2 else -1]:
            loss = m(x).sum()
            instrument(loss, name, acc)
            loss.backward()
    R = args.rounds

    def total(name, match):
        hits = [v for k, v in acc.items() if k[0] == name and match(k)]
        return 1e3 * sum(t for t, _ in hits) / R, sum(f for _, f in hits) // R

    print(f"resnet50 backward nodes, batch {args.batch}, {args.resolution}x{args.resolution}, {args.layout}; "
          f"ms and page faults per step, {R} steps each")
    kinds = sorted({k[1] for k in acc}, key=lambda kind: -sum(v[0] for k, v in acc.items() if k[1] == kind))
    for kind in kinds:
        (t, tf), (f, ff) = total("torch", lambda k: k[1] == kind), total("fuse_model", lambda k: k[1] == kind)
        print(f"{kind:40s} torch {t:8.2f} ({tf:5d})  fuse_model {f:8.2f} ({ff:5d})")
    print("BN layers' nodes by shape (torch: BatchNorm, ReLU and add; fuse_model: fused and downsample BN):")
    shapes = sorted({k[2] for k in acc if k[1] in BN_NODES and len(k[2]) == 4}, key=lambda s: -s[1] * s[2] * s[3])
    for shape in shapes:
        (t, tf), (f, ff) = (total(name, lambda k: k[2] == shape and k[1] in BN_NODES) for name in ("torch", "fuse_model"))
        print(f"{str(shape):22s} torch {t:7.2f} ({tf:5d})  fuse_model {f:7.2f} ({ff:5d})")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["step", "nodes"], default="step")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--layout", choices=["nchw", "channels_last"], default="channels_last")
    p.add_argument("--composed", action="store_true", help="step mode: add fuse_model on the composed path")
    args = p.parse_args()
    tune_malloc()
    torch_m, convert_m, fuse_m = models(args.layout)
    fmt = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    x = torch.randn(args.batch, 3, args.resolution, args.resolution).contiguous(memory_format=fmt)
    if args.mode == "step":
        step_mode(args, x, torch_m, convert_m, fuse_m)
    else:
        nodes_mode(args, x, torch_m, fuse_m)


if __name__ == "__main__":
    main()
