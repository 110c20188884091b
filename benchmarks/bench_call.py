"""Per-call cost of small batch-norm layers: bnext against torch.nn, in one process, interleaved.

On small inputs a layer's time is mostly fixed per-call cost (Python, dispatcher, autograd node,
running-statistics update), not memory traffic; this is the number a change to the module and
functional layers can move. Phases: training forward, training forward+backward, eval inference
(no_grad). Prints medians in microseconds and the torch/bnext ratio; --json writes them.

    .venv/bin/python benchmarks/bench_call.py [--rounds 7] [--json out.json]

To compare two checkouts, run the script in each (same machine, alternating runs): it reports only
what the bnext on sys.path does.
"""
import argparse
import json
import statistics

import torch
import torch.utils.benchmark as tb
from torch import nn

import bnext

SHAPES = [(8, 64, 8, 8), (16, 32, 16, 16), (32, 16), (4, 8, 4, 4)]


def _layer(classes, shape):
    return classes[max(1, len(shape) - 2)](shape[1])


def _stmts(m, x, phase):
    if phase == "train_fwd":
        m.train()
        return lambda: m(x)
    if phase == "train_fwd_bwd":
        m.train()
        xr = x.clone().requires_grad_()

        def step():
            m(xr).sum().backward()

        return step
    m.eval()

    def infer():
        with torch.no_grad():
            return m(x)

    return infer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--min-run-time", type=float, default=0.2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch_cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
    bnext_cls = {1: bnext.BatchNorm1d, 2: bnext.BatchNorm2d, 3: bnext.BatchNorm3d}
    rows = []
    print(f"{'shape':>18} {'phase':>14} {'torch us':>10} {'bnext us':>10} {'torch/bnext':>12}")
    for shape in SHAPES:
        x = torch.randn(shape)
        for phase in ("train_fwd", "train_fwd_bwd", "eval"):
            fns = {
                "torch": _stmts(_layer(torch_cls, shape), x, phase),
                "bnext": _stmts(_layer(bnext_cls, shape), x, phase),
            }
            times = {k: [] for k in fns}
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    t = tb.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=args.min_run_time)
                    times[name].append(t.median * 1e6)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"shape": list(shape), "phase": phase, **{f"{k}_us": v for k, v in med.items()}})
            print(f"{str(shape):>18} {phase:>14} {med['torch']:>10.1f} {med['bnext']:>10.1f} "
                  f"{med['torch'] / med['bnext']:>11.2f}x")
    gm = statistics.geometric_mean([r["torch_us"] / r["bnext_us"] for r in rows])
    print(f"geometric mean torch/bnext: {gm:.2f}x   bnext threads: {torch.get_num_threads()}, "
          f"commit-independent: run in each checkout to compare")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "geomean": gm, "build": bnext.build_info()}, f, indent=1)


if __name__ == "__main__":
    main()
