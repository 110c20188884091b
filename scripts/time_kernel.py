#!/usr/bin/env python3
"""Time one bnext CPU op on one input: the command behind docs/performance.md.

    python scripts/time_kernel.py OP SHAPE [--layout nchw|channels_last] [--dtype float32|bfloat16] [--control OP]
                                  [--threads N] [--env VAR=a,b ...] [--rounds R] [--min-run-time S]

OP is one of the ops below; `sum` times x.sum() (one read pass, the memory floor's unit). SHAPE is
comma-separated, e.g. 32,512,14,14. Prints the median time of each setting in microseconds.

--env VAR=a,b,... is an A/B inside one process: the kernels read BNEXT_CPU_ISA and
BNEXT_CPU_STREAM_BYTES at every call, so the settings alternate round by round on the same input
(the start rotates each round), and machine drift hits all of them alike. A/B of two code versions
runs this command once in each build (e.g. `git checkout <commit>^`, `make build`, run; then
`<commit>`), alternating the runs.

Examples:
    python scripts/time_kernel.py normalize 32,512,7,7 --threads 2 --env BNEXT_CPU_ISA=avx512,avx512bf16
    python scripts/time_kernel.py eval 32,256,14,14 --threads 2 --env BNEXT_CPU_STREAM_BYTES=0,1000000000
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.utils import benchmark  # noqa: E402

import bnext  # noqa: E402,F401  (registers torch.ops.bnext)

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from bench import tune_malloc  # noqa: E402

OPS = ("stats", "normalize", "eval", "forward", "backward_reduce", "backward_elemt", "backward", "fwdbwd",
       "act_forward", "act_forward_residual", "act_backward", "act_backward_residual", "sum")


def _format_of(x):
    if x.dim() in (4, 5) and not x.is_contiguous():
        return torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format


ACTS = {"identity": 0, "relu": 1, "leaky_relu": 2, "elu": 3, "silu": 4, "hardswish": 5}  # csrc/common/act.h


def make_call(op, x, dy, act="relu"):
    """A zero-argument callable running `op` on x (and dy), with per-channel tensors as the ops take them;
    the act_* ops run the activation `act`."""
    bn = torch.ops.bnext
    C = x.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = torch.rand(C, dtype=acc) + 0.5
    b = torch.rand(C, dtype=acc) - 0.5
    mean, var = bn.batch_norm_stats(x)
    invstd = (var + 1e-5).rsqrt()
    sum_dy, sum_dy_xmu = bn.batch_norm_backward_reduce(dy, x, mean, invstd)
    count = x.numel() // C
    code = ACTS[act]
    param = {"leaky_relu": 0.01, "elu": 1.0}.get(act, 0.0)
    r = torch.randn(x.shape, dtype=x.dtype).contiguous(memory_format=_format_of(x))
    calls = {
        "stats": lambda: bn.batch_norm_stats(x),
        "normalize": lambda: bn.batch_norm_elemt(x, w, b, mean, invstd),
        "eval": lambda: bn.batch_norm_eval(x, w, b, mean, var, 1e-5),
        "forward": lambda: bn.batch_norm_forward(x, w, b, 1e-5),
        "backward_reduce": lambda: bn.batch_norm_backward_reduce(dy, x, mean, invstd),
        "backward_elemt": lambda: bn.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy / count, sum_dy_xmu / count),
        "backward": lambda: bn.batch_norm_backward(dy, x, w, mean, invstd),
        "fwdbwd": lambda: (bn.batch_norm_forward(x, w, b, 1e-5), bn.batch_norm_backward(dy, x, w, mean, invstd)),
        # The fused BN + activation training forward, and backward from the input, without and with a
        # residual (param: leaky_relu's slope / elu's alpha).
        "act_forward": lambda: bn.batch_norm_act_forward(x, w, b, None, 1e-5, code, param),
        "act_forward_residual": lambda: bn.batch_norm_act_forward(x, w, b, r, 1e-5, code, param),
        "act_backward": lambda: bn.batch_norm_act_backward(dy, x, None, w, b, mean, invstd, code, param, False),
        "act_backward_residual": lambda: bn.batch_norm_act_backward(dy, x, r, w, b, mean, invstd, code, param,
                                                                    False),
        "sum": lambda: x.sum(),
    }
    return calls[op]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("op", choices=OPS)
    p.add_argument("shape", help="comma-separated, e.g. 32,512,14,14")
    p.add_argument("--layout", choices=["nchw", "channels_last"], default="nchw")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--env", action="append", default=[], help="VAR=a,b,...: settings to alternate (A/B)")
    p.add_argument("--act", choices=sorted(ACTS), default="relu", help="the activation of the act_* ops")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-run-time", type=float, default=0.2)
    p.add_argument("--control", choices=OPS, default=None,
                   help="also time this op in the same rounds and print OP's median time over it: an op a code "
                        "change leaves alone cancels the drift between the runs of two builds")
    args = p.parse_args()

    tune_malloc()  # no page faults for the outputs a call frees (see benchmarks/bench.py)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(getattr(torch, args.dtype))
    dy = torch.randn(shape, generator=gen).to(x.dtype)
    if args.layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)

    settings = [{}]
    for spec in args.env:
        var, _, values = spec.partition("=")
        settings = [dict(s, **{var: v}) for s in settings for v in values.split(",")]
    timers = [benchmark.Timer("call()", globals={"call": make_call(op, x, dy, args.act)}, num_threads=torch.get_num_threads())
              for op in [args.op] + ([args.control] if args.control else [])]
    saved = {k: os.environ.get(k) for s in settings for k in s}
    measured = [[] for _ in settings]
    control = [[] for _ in settings]
    for r in range(args.rounds + 1):  # round 0 warms up and is discarded
        for i in [(r + k) % len(settings) for k in range(len(settings))]:
            os.environ.update(settings[i])
            ms = [t.blocked_autorange(min_run_time=args.min_run_time) for t in timers]
            if r > 0:
                measured[i].append(ms[0])
                if args.control:
                    control[i].append(ms[0].median / ms[1].median)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    print(f"{args.op} {shape} {args.layout} {args.dtype}, {torch.get_num_threads()} threads, ISA {bnext.build_info()['cpu_isa']}")
    for i, (s, ms) in enumerate(zip(settings, measured)):
        m = benchmark.Measurement.merge(ms)[0]
        label = " ".join(f"{k}={v}" for k, v in s.items()) or "default"
        extra = f"   / {args.control} {sorted(control[i])[len(control[i]) // 2]:.3f}" if args.control else ""
        print(f"  {label:48s} median {m.median * 1e6:10.1f} us   IQR {m.iqr * 1e6:8.1f} us{extra}")


if __name__ == "__main__":
    main()
