"""Fused BN + activation (+ residual) on CPU: bnext.BatchNormAct2d against torch's unfused modules
and against torch.compile'd torch, per layer and in whole training steps.

    make bench-fused                               # layers + models, writes benchmarks/results/fused.json
    .venv/bin/python benchmarks/bench_fused.py --quick
    .venv/bin/python benchmarks/bench_fused.py --skip-models   # the layer matrix only

Layers (one process, same inputs, timers interleaved round-robin as in bench.py): the batch norm
inputs of torchvision's resnet50 and mobilenet_v3 (224x224, --batch), float32 and bfloat16,
NCHW and channels_last, for BN + ReLU, BN + add + ReLU and BN + SiLU:

    torch     nn.BatchNorm2d -> (+ residual) -> activation module (ReLU in place, as torchvision)
    compile   the same, torch.compile'd (inductor fuses it too)
    bnext     bnext.BatchNormAct2d(activation=..., forward(x, residual))

Memory floor of the fused op, from R = x.sum() (one read pass) and W = x.clone() (read + write)
measured in the same group, w = W - R the cost of one write pass, k = 1 with a residual else 0:

    train forward:       (2 + k) reads + 1 write      (statistics of x; then x, r -> y)
    train fwd+bwd:       forward + 2 (2 + k) reads + (1 + k) writes
                         (backward: reduce over dy, x, r; then dy, x, r -> dx, dr)
    eval forward:        (1 + k) reads + 1 write

Models: a training step (forward, backward) and inference of torchvision resnet18, resnet50,
mobilenet_v3_small and efficientnet_b0: torch, bnext.convert_model, bnext.fuse_model, eager and
torch.compile'd, float32 and bfloat16 autocast, NCHW and channels_last; with the bytes of the
distinct tensors autograd saves for backward (torch.autograd.graph.saved_tensors_hooks).
"""
import argparse
import copy
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils import benchmark  # noqa: E402

import bnext  # noqa: E402
from bench import geomean, machine_info, tune_malloc  # noqa: E402

# (C, H=W) of resnet50's BN layers with a ReLU after (and the add + ReLU ones), and mobilenet_v3's.
RESNET50 = [(64, 112), (64, 56), (256, 56), (128, 28), (512, 28), (256, 14), (1024, 14), (512, 7), (2048, 7)]
MOBILENET = [(16, 112), (72, 56), (96, 28), (240, 14), (576, 7)]
CASES = {  # kind -> (activation, residual, shapes)
    "bn_relu": ("relu", False, RESNET50),
    "bn_add_relu": ("relu", True, [(256, 56), (512, 28), (1024, 14), (2048, 7)]),
    "bn_silu": ("silu", False, MOBILENET),
}
TORCH_ACT = {"relu": lambda: nn.ReLU(inplace=True), "silu": lambda: nn.SiLU(inplace=True)}
PHASES = ("train_fwdbwd", "train_fwd", "eval_fwd")


class TorchBNAct(nn.Module):
    def __init__(self, C, activation):
        super().__init__()
        self.bn = nn.BatchNorm2d(C)
        self.act = TORCH_ACT[activation]()

    def forward(self, x, residual=None):
        y = self.bn(x)
        if residual is not None:
            y = y + residual
        return self.act(y)


_compiled = {}


def _torch_bn_act(x, residual, weight, bias, running_mean, running_var, training: bool, activation: str):
    y = torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if activation == "relu" else torch.nn.functional.silu(y)


class CompiledBNAct(nn.Module):
    """TorchBNAct through one torch.compile'd function (dynamic shapes) shared by every case, so a
    case costs no recompilation."""

    def __init__(self, ref, activation):
        super().__init__()
        self.bn, self.activation = ref.bn, activation
        if "fn" not in _compiled:
            import torch._dynamo

            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            _compiled["fn"] = torch.compile(_torch_bn_act, dynamic=True)

    def forward(self, x, residual=None):
        bn = self.bn
        return _compiled["fn"](x, residual, bn.weight, bn.bias, bn.running_mean, bn.running_var, self.training,
                               self.activation)


def floor_time(phase, R, W, k):
    w = W - R
    fwd = (2 + k) * R + w
    return {"train_fwd": fwd, "train_fwdbwd": fwd + 2 * (2 + k) * R + (1 + k) * w, "eval_fwd": (1 + k) * R + w}[phase]


def phase_fn(phase, mod, x, r, dy):
    if phase == "eval_fwd":
        def run():
            mod.eval()
            with torch.no_grad():
                out = mod(x, r)
            mod.train()
            return out
    elif phase == "train_fwd":
        def run():
            return mod(x, r)
    else:
        xg = x.detach().requires_grad_(True)
        rg = None if r is None else r.detach().requires_grad_(True)
        params = [p for p in mod.parameters()]
        inputs = [xg] + ([rg] if rg is not None else []) + params

        def run():
            return torch.autograd.grad(mod(xg, rg), inputs, dy)
    return run


def layer_group(kind, C, H, batch, dtype, layout, phases, rounds, min_run_time, use_compile):
    activation, residual, _ = CASES[kind]
    shape = (batch, C, H, H)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    gen = torch.Generator().manual_seed(C * 1000 + H)
    x = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=fmt)
    r = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=fmt) if residual else None
    dy = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=fmt)
    ref = TorchBNAct(C, activation).to(dtype)
    mods = {"torch": ref, "bnext": bnext.BatchNormAct2d(C, activation=activation).to(dtype)}
    mods["bnext"].load_state_dict(ref.bn.state_dict())
    if use_compile:
        mods["compile"] = CompiledBNAct(copy.deepcopy(ref), activation)
    threads = torch.get_num_threads()
    timers = {
        ("floor", "read"): benchmark.Timer("x.sum()", globals={"x": x}, num_threads=threads),
        ("floor", "write"): benchmark.Timer("x.clone()", globals={"x": x}, num_threads=threads),
    }
    for phase in phases:
        for impl, mod in mods.items():
            fn = phase_fn(phase, mod, x, r, dy)
            fn()
            fn()
            timers[(phase, impl)] = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=threads)
    keys = list(timers)
    measured = {k: [] for k in keys}
    for rnd in range(rounds + 1):
        shift = rnd % len(keys)
        for k in keys[shift:] + keys[:shift]:
            m = timers[k].blocked_autorange(min_run_time=min_run_time)
            if rnd > 0:
                measured[k].append(m)
    med = {k: benchmark.Measurement.merge(v)[0].median for k, v in measured.items()}
    R, W = med[("floor", "read")], med[("floor", "write")]
    rows = []
    for phase in phases:
        row = {
            "kind": kind, "shape": list(shape), "layout": layout, "dtype": str(dtype).replace("torch.", ""),
            "phase": phase, "bnext_s": med[(phase, "bnext")], "torch_s": med[(phase, "torch")],
            "floor_s": floor_time(phase, R, W, int(residual)),
        }
        if use_compile:
            row["compile_s"] = med[(phase, "compile")]
        row["speedup"] = row["torch_s"] / row["bnext_s"]
        row["floor_ratio"] = row["bnext_s"] / row["floor_s"]
        rows.append(row)
    return rows


def layer_summary(rows):
    out = {}
    for kind in CASES:
        for phase in PHASES:
            sel = [r for r in rows if r["kind"] == kind and r["phase"] == phase]
            if not sel:
                continue
            item = {
                "cases": len(sel),
                "geomean_speedup": geomean([r["speedup"] for r in sel]),
                "geomean_floor_ratio": geomean([r["floor_ratio"] for r in sel]),
                "worst_speedup": min(r["speedup"] for r in sel),
            }
            comp = [r["compile_s"] / r["bnext_s"] for r in sel if "compile_s" in r]
            if comp:
                item["geomean_speedup_vs_compile"] = geomean(comp)
            out[f"{kind} {phase}"] = item
    return out


# ----------------------------------------------------------------------------------------------
# Whole models


def saved_bytes(model, x):
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(seen.values())


def model_variants(name, layout, compile_modes):
    import torchvision

    torch.manual_seed(0)
    base = getattr(torchvision.models, name)(num_classes=1000)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    base = base.to(memory_format=fmt)
    variants = {
        "torch": base,
        "convert_model": bnext.convert_model(copy.deepcopy(base)),
        "fuse_model": bnext.fuse_model(copy.deepcopy(base)),
    }
    out = {}
    for impl, m in variants.items():
        out[(impl, "eager")] = m
        if "compiled" in compile_modes and impl != "convert_model":
            out[(impl, "compiled")] = torch.compile(m)
    return out


def model_group(name, batch, res, dtype, layout, rounds, compile_modes):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(batch, 3, res, res).contiguous(memory_format=fmt)
    amp = dtype == "bfloat16"
    rows = []
    variants = model_variants(name, layout, compile_modes)
    fns = {}
    for key, m in variants.items():
        m.train()

        def step(m=m):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                y = m(x)
            y.float().sum().backward()

        def infer(m=m):
            m.eval()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                m(x)
            m.train()

        step(), step(), infer(), infer()  # warm up (and compile)
        fns[key + ("train_step",)] = step
        fns[key + ("inference",)] = infer
    times = {k: [] for k in fns}
    for rnd in range(rounds):
        keys = list(fns)
        shift = rnd % len(keys)
        for k in keys[shift:] + keys[:shift]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    mem = {}
    for (impl, mode), m in variants.items():
        if mode == "eager":
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                mem[impl] = saved_bytes(m, x)
    for (impl, mode, phase), t in times.items():
        rows.append({
            "model": name, "impl": impl, "mode": mode, "phase": phase, "dtype": dtype, "layout": layout,
            "batch": batch, "resolution": res, "median_s": sorted(t)[len(t) // 2],
            "saved_bytes": mem.get(impl) if phase == "train_step" else None,
        })
    return rows


def model_table(rows):
    lines = [f"{'model':<20} {'dtype':<9} {'layout':<13} {'phase':<11} {'mode':<9} "
             f"{'torch ms':>9} {'convert':>9} {'fuse':>9} {'fuse x':>7} {'saved MB torch/fuse':>20}"]
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["dtype"], r["layout"], r["phase"], r["mode"]), {})[r["impl"]] = r
    for (model, dtype, layout, phase, mode), g in groups.items():
        t, f = g["torch"]["median_s"], g["fuse_model"]["median_s"]
        c = f"{g['convert_model']['median_s'] * 1e3:9.1f}" if "convert_model" in g else " " * 9
        mem = ""
        if g["torch"]["saved_bytes"]:
            mem = f"{g['torch']['saved_bytes'] / 2**20:8.1f} / {g['fuse_model']['saved_bytes'] / 2**20:8.1f}"
        lines.append(f"{model:<20} {dtype:<9} {layout:<13} {phase:<11} {mode:<9} "
                     f"{t * 1e3:9.1f} {c} {f * 1e3:9.1f} {t / f:7.2f} {mem:>20}")
    return "\n".join(lines)


def layer_table(rows):
    lines = [f"{'kind':<12} {'shape':<20} {'layout':<13} {'dtype':<8} {'phase':<12} {'bnext ms':>9} "
             f"{'torch ms':>9} {'compile':>9} {'speedup':>7} {'/floor':>6}"]
    for r in rows:
        comp = f"{r['compile_s'] * 1e3:9.3f}" if "compile_s" in r else " " * 9
        lines.append(f"{r['kind']:<12} {str(tuple(r['shape'])):<20} {r['layout']:<13} {r['dtype']:<8} "
                     f"{r['phase']:<12} {r['bnext_s'] * 1e3:9.3f} {r['torch_s'] * 1e3:9.3f} {comp} "
                     f"{r['speedup']:7.2f} {r['floor_ratio']:6.2f}")
    return "\n".join(lines)


def fused_markdown(result):
    """The RESULTS.md section of a saved run (bench.py writes RESULTS.md and includes it)."""
    info = result["machine"]
    lines = ["", "# Fused BN + activation (+ residual)", ""]
    lines.append(f"Generated by `make bench-fused` (`python benchmarks/bench_fused.py "
                 f"{' '.join(result.get('argv', []))}`) on {info['date_utc']}, {result['elapsed_s'] / 60:.1f} min; "
                 f"{info['cpu_model']}, {info['threads']} threads, kernel variant {info['cpu_isa']}, load average "
                 f"{', '.join(f'{v:.1f}' for v in info.get('load_average') or [])}. Raw results: "
                 "`benchmarks/results/fused.json`. What each column means: `benchmarks/bench_fused.py`.")
    if "layer_summary" in result:
        lines += ["", "## Layers: summary", "", "| case | phase | cases | speedup vs torch | vs torch.compile | "
                  "/ floor | worst speedup |", "|---|---|---|---|---|---|---|"]
        for key, v in result["layer_summary"].items():
            kind, phase = key.split(" ")
            comp = f"{v['geomean_speedup_vs_compile']:.2f}x" if "geomean_speedup_vs_compile" in v else ""
            lines.append(f"| {kind} | {phase} | {v['cases']} | {v['geomean_speedup']:.2f}x | {comp} | "
                         f"{v['geomean_floor_ratio']:.2f} | {v['worst_speedup']:.2f}x |")
    if result.get("models"):
        lines += ["", "## Whole models", "",
                  "Median seconds of a training step (forward, backward) and of inference; `saved MB`: bytes of "
                  "the distinct tensors autograd keeps for backward.", "",
                  "| model | dtype | layout | phase | mode | torch ms | convert_model ms | fuse_model ms | "
                  "torch / fuse_model | saved MB torch / fuse_model |", "|---|---|---|---|---|---|---|---|---|---|"]
        groups = {}
        for r in result["models"]:
            groups.setdefault((r["model"], r["dtype"], r["layout"], r["phase"], r["mode"]), {})[r["impl"]] = r
        for (model, dtype, layout, phase, mode), g in groups.items():
            t, f = g["torch"]["median_s"], g["fuse_model"]["median_s"]
            c = f"{g['convert_model']['median_s'] * 1e3:.1f}" if "convert_model" in g else ""
            mem = ""
            if g["torch"]["saved_bytes"]:
                mem = f"{g['torch']['saved_bytes'] / 2**20:.1f} / {g['fuse_model']['saved_bytes'] / 2**20:.1f}"
            lines.append(f"| {model} | {dtype} | {layout} | {phase} | {mode} | {t * 1e3:.1f} | {c} | "
                         f"{f * 1e3:.1f} | {t / f:.2f} | {mem} |")
    if result.get("layers"):
        lines += ["", "## Layers: every case", "",
                  "| kind | shape | layout | dtype | phase | bnext ms | torch ms | compile ms | speedup | / floor |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["layers"]:
            comp = f"{r['compile_s'] * 1e3:.3f}" if "compile_s" in r else ""
            lines.append(f"| {r['kind']} | {tuple(r['shape'])} | {r['layout']} | {r['dtype']} | {r['phase']} | "
                         f"{r['bnext_s'] * 1e3:.3f} | {r['torch_s'] * 1e3:.3f} | {comp} | {r['speedup']:.2f} | "
                         f"{r['floor_ratio']:.2f} |")
    lines.append("")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few layer cases and one small model")
    p.add_argument("--batch", type=int, default=16, help="batch size of the layer shapes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-run-time", type=float, default=0.2)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--layouts", default="nchw,channels_last")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd columns")
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--skip-models", action="store_true")
    p.add_argument("--models", default="resnet18,resnet50,mobilenet_v3_small,efficientnet_b0")
    p.add_argument("--model-batch", type=int, default=16)
    p.add_argument("--model-resolution", type=int, default=128)
    p.add_argument("--model-rounds", type=int, default=5)
    p.add_argument("--model-dtypes", default=None, help="default: --dtypes")
    p.add_argument("--model-layouts", default=None, help="default: --layouts")
    p.add_argument("--model-compile", default="resnet50:float32:channels_last",
                   help="model:dtype:layout groups that also run compiled ('all', or 'none')")
    p.add_argument("--out", default=os.path.join(HERE, "results", "fused.json"))
    args = p.parse_args(argv)
    tune_malloc()
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    dtype_names = args.dtypes.split(",")
    layouts = args.layouts.split(",")
    t0 = time.time()
    result = {"machine": machine_info(), "args": vars(args), "argv": list(argv if argv is not None else sys.argv[1:])}
    if not args.skip_layers:
        rows = []
        for kind, (_, _, shapes) in CASES.items():
            picked = shapes[::3] if args.quick else shapes
            for C, H in picked:
                for dt in dtype_names:
                    for layout in layouts:
                        rows += layer_group(kind, C, H, args.batch, dtypes[dt], layout, PHASES,
                                            1 if args.quick else args.rounds, args.min_run_time,
                                            not args.no_compile and dt == "float32")
                        print(layer_table(rows[-len(PHASES):]).split("\n", 1)[1], flush=True)
        result["layers"] = rows
        result["layer_summary"] = layer_summary(rows)
        print(layer_table(rows))
        for k, v in result["layer_summary"].items():
            extra = f", vs compile {v['geomean_speedup_vs_compile']:.2f}x" if "geomean_speedup_vs_compile" in v else ""
            print(f"{k}: {v['cases']} cases, geomean {v['geomean_speedup']:.2f}x torch, "
                  f"floor ratio {v['geomean_floor_ratio']:.2f}, worst {v['worst_speedup']:.2f}x{extra}")
    if not args.skip_models:
        models = ["resnet18"] if args.quick else args.models.split(",")
        mrows = []
        for name in models:
            for dt in (args.model_dtypes or args.dtypes).split(","):
                for layout in (args.model_layouts or args.layouts).split(","):
                    spec = f"{name}:{dt}:{layout}"
                    compiled = args.model_compile == "all" or spec in args.model_compile.split(",")
                    modes = ("eager", "compiled") if compiled and not args.no_compile else ("eager",)
                    batch = 4 if args.quick else args.model_batch
                    res = 64 if args.quick else args.model_resolution
                    mrows += model_group(name, batch, res, dt, layout, 2 if args.quick else args.model_rounds, modes)
                    print(model_table([r for r in mrows if (r["model"], r["dtype"], r["layout"]) == (name, dt, layout)]),
                          flush=True)
        result["models"] = mrows
        print(model_table(mrows))
    result["elapsed_s"] = time.time() - t0
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out} ({result['elapsed_s']:.0f} s)")
    cpu_json = os.path.join(HERE, "results", "cpu.json")
    if not args.quick and os.path.abspath(args.out) == os.path.join(HERE, "results", "fused.json") and os.path.exists(cpu_json):
        import bench

        bench.main(["--from-json", cpu_json])  # rewrites RESULTS.md with this run's section


if __name__ == "__main__":
    main()
