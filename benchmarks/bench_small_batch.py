"""Layers for small and irregular batches on CPU, each against the call it replaces on the same input
(the cost the layer adds), and what each keeps for backward.

    .venv/bin/python benchmarks/bench_small_batch.py                       # every kind, 1 thread, a few minutes
    .venv/bin/python benchmarks/bench_small_batch.py --layers ghost --shape 64,64,28,28 --virtual-batches 16
    .venv/bin/python benchmarks/bench_small_batch.py --layers masked --shape 64,256,512 --real 0.5

Per layer kind (--layers; LAYERS below: a kind is a function returning its cases), per memory format
and phase, the timers of the layer, of its baseline and of the references are interleaved
round-robin (the start rotates each round) in one process on the same input, each a
torch.utils.benchmark Timer.blocked_autorange with the rounds merged; reported: median time, the
ratio to the baseline and to one x.clone() (a read + write pass of the input, the unit of memory
traffic), and for fwd_bwd the bytes of the distinct tensors autograd keeps for backward
(saved_tensors_hooks; the input itself included where it is kept, the layer's own parameters and
buffers not: the layer holds them anyway).

ghost: bnext.GhostBatchNorm2d (1d for 2-D/3-D --shape) with N / --virtual-batches rows per virtual
batch; baseline: one bnext.BatchNorm2d call on the same input; references: the definition as users
write it, a Python loop over the virtual batches through bnext.BatchNorm2d and through
torch.nn.BatchNorm2d (torch.cat of the chunks' outputs).

frozen: bnext.FrozenBatchNorm2d; baseline: torchvision.ops.misc.FrozenBatchNorm2d with the same
buffers (the layer it replaces); reference: nn.BatchNorm2d in eval. fwd_bwd is the forward and the
input gradient (the buffers are constants), as in fine-tuning.

masked: bnext.MaskedBatchNorm1d on (N, C, L) (--shape) padded sequences, lengths uniform in
[--real - 0.25, --real + 0.25] * L, padding at the end of each row; baseline: one unmasked
bnext.BatchNorm1d call on the same padded input; references: the same layer forced onto its
torch-op route (the route of masks with many holes) and torch.nn.BatchNorm1d unmasked.

--json (default benchmarks/results/small_batch.json) keeps the last run of each kind; `make bench`
puts its table into benchmarks/RESULTS.md.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)  # bench.py's helpers

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils import benchmark  # noqa: E402

import bnext  # noqa: E402
from bnext import masked as _masked  # noqa: E402
from bnext.ghost import GhostBatchNorm1d, GhostBatchNorm2d  # noqa: E402
from bench import machine_info, tune_malloc  # noqa: E402

RESULTS = os.path.join(HERE, "results", "small_batch.json")

FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def train_step(layer, x, g):
    """A training forward (+ backward when g is given) of `layer` on a leaf copy of x."""

    def run():
        xi = x.detach().requires_grad_(g is not None)
        y = layer(xi)
        if g is not None:
            y.backward(g)
        return y

    return run


def saved_bytes(layer, x):
    """Bytes of the distinct storages autograd keeps for the backward of layer(x) (x a leaf that
    requires grad; x itself counts where it is kept), but for the layer's own parameters and
    buffers, which the layer holds anyway: the memory a training step holds for backward."""
    held = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in held:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    xi = x.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(xi)
    return sum(storages.values())


class ChunkLoop(nn.Module):
    """The definition of ghost batch norm as a loop: chunks of v rows through one batch norm layer."""

    def __init__(self, bn, v):
        super().__init__()
        self.bn, self.v = bn, v

    def forward(self, x):
        return torch.cat([self.bn(c) for c in x.split(self.v)])


def ghost_cases(args, x, fmt):
    """{label: layer}; the first is the layer measured, 'baseline' the batch norm call. 4-D input:
    the 2d layers, 2-D or 3-D: the 1d layers."""
    C = x.shape[1]
    v = x.shape[0] // args.virtual_batches
    dev, dt = x.device, torch.float32 if x.dtype != torch.float64 else torch.float64
    ghost, ours, theirs = (
        (GhostBatchNorm2d, bnext.BatchNorm2d, nn.BatchNorm2d) if x.dim() == 4
        else (GhostBatchNorm1d, bnext.BatchNorm1d, nn.BatchNorm1d)
    )
    return {
        f"ghost (v={v})": ghost(C, v, device=dev, dtype=dt),
        "baseline": ours(C, device=dev, dtype=dt),
        f"loop bnext.{ours.__name__}": ChunkLoop(ours(C, device=dev, dtype=dt), v),
        f"loop nn.{theirs.__name__}": ChunkLoop(theirs(C, device=dev, dtype=dt), v),
    }


def frozen_cases(args, x, fmt):
    """bnext's frozen layer, torchvision's (the baseline) and nn.BatchNorm2d in eval, same buffers."""
    from torchvision.ops.misc import FrozenBatchNorm2d as TorchvisionFrozen

    C = x.shape[1]
    ours = bnext.FrozenBatchNorm2d(C)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-0.5, 0.5)
        ours.running_mean.uniform_(-0.5, 0.5)
        ours.running_var.uniform_(0.5, 2.0)
    theirs, bn = TorchvisionFrozen(C), nn.BatchNorm2d(C).eval()
    theirs.load_state_dict(ours.state_dict())
    bn.load_state_dict(ours.state_dict(), strict=False)
    return {"bnext.FrozenBatchNorm2d": ours, "baseline": theirs, "nn.BatchNorm2d (eval)": bn}


class Masked(nn.Module):
    """layer(x, mask) with a fixed mask (the timers call layer(x)); torch_ops: the torch-op route."""

    def __init__(self, layer, mask, torch_ops=False):
        super().__init__()
        self.layer, self.mask, self.torch_ops = layer, mask, torch_ops

    def forward(self, x):
        if not self.torch_ops:
            return self.layer(x, self.mask)
        route = _masked._compact_route
        _masked._compact_route = lambda runs, input: False
        try:
            return self.layer(x, self.mask)
        finally:
            _masked._compact_route = route


def padding_mask(N, L, real):
    """(N, L) bool: row n real on its first length_n positions, lengths uniform in
    [real - 0.25, real + 0.25] * L (at least 2)."""
    lo, hi = max(2, int((real - 0.25) * L)), min(L, int((real + 0.25) * L))
    lengths = torch.randint(lo, hi + 1, (N,), generator=torch.Generator().manual_seed(1))
    return torch.arange(L)[None, :] < lengths[:, None]


def masked_cases(args, x, fmt):
    """MaskedBatchNorm1d on padded sequences; baseline: one unmasked bnext.BatchNorm1d call."""
    if x.dim() != 3:
        raise SystemExit(f"--layers masked needs --shape N,C,L, got {tuple(x.shape)}")
    N, C, L = x.shape
    mask = padding_mask(N, L, args.real)
    args.notes["masked"] = f"{mask.float().mean().item():.1%} real positions"
    return {
        "bnext.MaskedBatchNorm1d": Masked(bnext.MaskedBatchNorm1d(C), mask),
        "baseline": bnext.BatchNorm1d(C),
        "masked, torch-op route": Masked(bnext.MaskedBatchNorm1d(C), mask, torch_ops=True),
        "nn.BatchNorm1d (unmasked)": nn.BatchNorm1d(C),
    }


# Layer kind -> function (args, input, format name) -> {label: layer}, measured layer first,
# "baseline" (BASELINES names it) among them.
LAYERS = {"ghost": ghost_cases, "frozen": frozen_cases, "masked": masked_cases}
BASELINES = {
    "ghost": "one bnext.BatchNorm2d call (BatchNorm1d for 1d shapes)",
    "frozen": "torchvision.ops.misc.FrozenBatchNorm2d",
    "masked": "one unmasked bnext.BatchNorm1d call",
}
DEFAULT_SHAPES = {"ghost": "64,64,28,28", "frozen": "8,256,56,56", "masked": "64,256,512"}


def measure(timers, rounds, min_run_time):
    """Round-robin blocked_autorange over the timers, the start rotating; merged measurements."""
    results = {label: [] for label in timers}
    labels = list(timers)
    for r in range(rounds):
        order = labels[r % len(labels):] + labels[: r % len(labels)]
        for label in order:
            results[label].append(timers[label].blocked_autorange(min_run_time=min_run_time))
    return {label: benchmark.Measurement.merge(ms)[0] for label, ms in results.items()}


def run_kind(args, kind, shape, dtype):
    """The rows of one layer kind: every format and phase."""
    rows = []
    for fmt_name in args.formats.split(","):
        if len(shape) != 4 and fmt_name != "nchw":
            continue  # channels_last: 4-D only
        x = (torch.randn(shape) * 2 + 0.5).to(dtype)
        if len(shape) == 4:
            x = x.contiguous(memory_format=FORMATS[fmt_name])
        g = torch.randn_like(x)
        layers = LAYERS[kind](args, x, fmt_name)
        for phase in args.phases.split(","):
            grad = g if phase == "fwd_bwd" else None
            timers = {
                label: benchmark.Timer("run()", globals={"run": train_step(m, x, grad)}, num_threads=args.threads)
                for label, m in layers.items()
            }
            timers["x.clone()"] = benchmark.Timer("x.clone()", globals={"x": x}, num_threads=args.threads)
            m = measure(timers, args.rounds, args.min_run_time)
            base, unit = m["baseline"].median, m["x.clone()"].median
            note = f", {args.notes[kind]}" if kind in args.notes else ""
            print(f"\n{kind} {fmt_name} {phase} {tuple(shape)} {args.dtype}{note}, {args.threads} thread(s); "
                  f"baseline: {BASELINES[kind]}")
            for label, meas in m.items():
                t = meas.median
                saved = saved_bytes(layers[label], x) if phase == "fwd_bwd" and label in layers else None
                kept = f"  saves {saved:,} B" if saved is not None else ""
                print(f"  {label:28s} {t * 1e3:9.3f} ms  {t / base:6.2f}x baseline  {t / unit:6.2f} clones"
                      f"  (IQR {meas.iqr * 1e3:.3f} ms){kept}")
                rows.append({"kind": kind, "shape": list(shape), "format": fmt_name, "phase": phase, "label": label,
                             "median_s": t, "iqr_s": meas.iqr, "vs_baseline": t / base, "clones": t / unit,
                             "saved_bytes": saved, "note": args.notes.get(kind, "")})
    return rows


def small_batch_markdown(result):
    """The RESULTS.md section of a saved run (bench.py writes RESULTS.md and includes it)."""
    lines = ["", "# Layers for small and irregular batches", "",
             "`python benchmarks/bench_small_batch.py` (what each row means: its docstring); raw results: "
             "`benchmarks/results/small_batch.json`. Per kind: the machine and command of its last run; "
             "`x baseline`: median time over the baseline's, measured interleaved in the same run; `clones`: "
             "time over one `x.clone()` (a read and a write of the input); `saved`: bytes autograd keeps "
             "for backward (fwd_bwd)."]
    for kind, run in result.items():
        info = run["info"]
        lines += ["", f"## {kind}: baseline {BASELINES.get(kind, 'baseline')}", "",
                  f"`{' '.join(['python benchmarks/bench_small_batch.py'] + run['argv'])}` on {info['date_utc']}: "
                  f"{info['cpu_model']}, {info['threads']} thread(s), kernel variant {info['cpu_isa']}, shape "
                  f"{tuple(info['shape'])} {info['dtype']}{', ' + run['rows'][0]['note'] if run['rows'][0]['note'] else ''}.",
                  "", "| layout | phase | layer | ms | x baseline | clones | saved |", "|---|---|---|---|---|---|---|"]
        for r in run["rows"]:
            saved = f"{r['saved_bytes']:,} B" if r.get("saved_bytes") is not None else ""
            label = r["label"] if r["label"] != "baseline" else f"baseline ({BASELINES.get(kind, '')})"
            lines.append(f"| {r['format']} | {r['phase']} | {label} | {r['median_s'] * 1e3:.3f} | "
                         f"{r['vs_baseline']:.2f} | {r['clones']:.2f} | {saved} |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default=",".join(LAYERS), help=f"comma-separated, of: {', '.join(LAYERS)}")
    parser.add_argument("--shape", default=None,
                        help="N,C,H,W (or N,C / N,C,L: the 1d layers); default per kind: "
                             + ", ".join(f"{k} {v}" for k, v in DEFAULT_SHAPES.items()))
    parser.add_argument("--virtual-batches", type=int, default=16, help="ghost: N / virtual_batch_size")
    parser.add_argument("--real", type=float, default=0.5, help="masked: mean fraction of real positions")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--formats", default="nchw,channels_last")
    parser.add_argument("--phases", default="fwd_bwd,fwd", help="fwd_bwd (training forward + backward), fwd")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per timer per round")
    parser.add_argument("--json", default=RESULTS, help="keep each kind's last run here ('' : nowhere)")
    args = parser.parse_args()
    args.notes = {}

    malloc_tuned = tune_malloc()
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    saved = {}
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            saved = json.load(f)
    for kind in args.layers.split(","):
        torch.manual_seed(0)
        shape = tuple(int(s) for s in (args.shape or DEFAULT_SHAPES[kind]).split(","))
        info = dict(machine_info(), malloc_tuned=malloc_tuned, shape=shape, dtype=args.dtype)
        print(json.dumps(info))
        saved[kind] = {"info": info, "argv": sys.argv[1:], "rows": run_kind(args, kind, shape, dtype)}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(saved, f, indent=1)


if __name__ == "__main__":
    main()
