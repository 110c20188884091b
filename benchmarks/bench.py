"""bnext CPU benchmark: bnext vs torch.nn batch norm vs torch.compile'd torch batch norm.

    make bench                            # full matrix, writes benchmarks/RESULTS.md, results/*.json, chart
    make bench BENCH_ARGS=--quick         # smoke subset (no RESULTS.md)
    python benchmarks/bench.py --help

Everything runs in ONE process on the SAME inputs. For every (shape, layout, dtype) group the
timers of all implementations and of the memory floor are interleaved round-robin (the start
rotates each round), so machine drift hits all of them alike; each timer is a
torch.utils.benchmark `Timer.blocked_autorange`, and the rounds are merged with
`Measurement.merge`. Reported per case: median time, speedup vs torch.nn, achieved GB/s (bytes the
op must move / time) and the ratio to the memory floor measured in the same group:

    R = x.sum()   (one read pass),  W = x.clone()   (one read + allocate-and-write pass)
    train forward:  R + W           (statistics must read x before the first output value exists)
    eval forward:   W               (one read + one write)
    train fwd+bwd:  R + W  +  2R + W   (forward; backward reduces over (dy, x), then writes dx)

Targets (issue 5): geometric-mean speedup vs torch.nn >= 2.0, no case slower than torch beyond
noise (bnext's 25th percentile above torch's 75th), geometric-mean floor ratio <= 1.5.
"""
import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils import benchmark  # noqa: E402

import bnext  # noqa: E402

PHASES = ("train_fwd", "train_fwdbwd", "eval_fwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
EPS = 1e-5
MOMENTUM = 0.1

# ResNet-50 (torchvision, 224x224) batch-norm inputs (C, H=W), each distinct shape once.
RESNET50 = [(64, 112), (64, 56), (256, 56), (128, 56), (128, 28), (512, 28), (256, 28), (256, 14), (1024, 14),
            (512, 14), (512, 7), (2048, 7)]


def build_matrix(quick, batch):
    """(name, shape) per case group; layouts are expanded later."""
    shapes = []
    if quick:
        shapes += [("resnet50", (batch, 64, 56, 56)), ("resnet50", (batch, 1024, 14, 14)), ("small", (16, 32, 16, 16)),
                   ("bn1d", (256, 512)), ("bn3d", (4, 32, 8, 28, 28))]
        return shapes
    shapes += [("resnet50", (batch, c, h, h)) for c, h in RESNET50]
    shapes += [("small", (16, 32, 16, 16)), ("small", (8, 64, 8, 8)), ("large", (8, 3, 224, 224))]
    shapes += [("bn1d", (256, 512)), ("bn1d", (4096, 1024)), ("bn1d", (32, 128, 256))]
    shapes += [("bn3d", (4, 32, 8, 28, 28)), ("bn3d", (2, 64, 16, 56, 56))]
    return shapes


def layouts_for(shape):
    if len(shape) == 4:
        return ["nchw", "channels_last"]
    if len(shape) == 5:
        return ["nchw", "channels_last"]
    return ["nchw"]  # (N, C) and (N, C, L): one memory format


def make_input(shape, layout, dtype, gen):
    x = torch.randn(shape, generator=gen).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def module_pair(dim, C, dtype):
    cls_t = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[dim]
    cls_b = {2: bnext.BatchNorm1d, 3: bnext.BatchNorm1d, 4: bnext.BatchNorm2d, 5: bnext.BatchNorm3d}[dim]
    t = cls_t(C, eps=EPS, momentum=MOMENTUM).to(dtype)
    with torch.no_grad():
        t.weight.uniform_(0.5, 1.5)
        t.bias.uniform_(-0.5, 0.5)
    b = cls_b(C, eps=EPS, momentum=MOMENTUM).to(dtype)
    b.load_state_dict(t.state_dict())
    return t, b


def _torch_bn(x, running_mean, running_var, weight, bias, training: bool):
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS)


_compiled = None


def compiled_bn():
    global _compiled
    if _compiled is None:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 128)
        _compiled = torch.compile(_torch_bn, dynamic=True)
    return _compiled


def phase_fn(impl, phase, mod, x, dy):
    """A zero-argument callable running `phase` with implementation `impl` on module `mod`."""
    if impl == "compile":
        fn = compiled_bn()
        call = lambda inp, training: fn(inp, mod.running_mean, mod.running_var, mod.weight, mod.bias, training)  # noqa: E731
    else:
        call = lambda inp, training: mod(inp)  # noqa: E731
    if phase == "train_fwd":
        mod.train()

        def run():
            return call(x, True)

    elif phase == "eval_fwd":
        def run():
            mod.eval()
            with torch.no_grad():
                out = call(x, False)
            mod.train()
            return out

    else:
        xg = x.detach().requires_grad_(True)
        mod.train()

        def run():
            y = call(xg, True)
            return torch.autograd.grad(y, (xg, mod.weight, mod.bias), dy)

    return run


def floor_bytes(phase, nbytes):
    # Bytes the op must move at the least (reads of inputs, writes of outputs).
    return {"train_fwd": 2 * nbytes, "eval_fwd": 2 * nbytes, "train_fwdbwd": 5 * nbytes}[phase]


def floor_time(phase, R, W):
    return {"train_fwd": R + W, "eval_fwd": W, "train_fwdbwd": 3 * R + 2 * W}[phase]


def run_group(shape, layout, dtype_name, phases, impls, rounds, min_run_time, gen):
    dtype = DTYPES[dtype_name]
    x = make_input(shape, layout, dtype, gen)
    dy = make_input(shape, layout, dtype, gen)
    C = shape[1]
    tag = f"{tuple(shape)} {layout} {dtype_name}"
    timers = {}
    # Every timer runs on the same thread count (Timer's own default is one thread).
    threads = torch.get_num_threads()
    timers[("floor", "read")] = benchmark.Timer("x.sum()", globals={"x": x}, label="floor", sub_label=tag,
                                                description="x.sum()", num_threads=threads)
    timers[("floor", "write")] = benchmark.Timer("x.clone()", globals={"x": x}, label="floor", sub_label=tag,
                                                 description="x.clone()", num_threads=threads)
    mods = {}
    for impl in impls:
        t_mod, b_mod = module_pair(len(shape), C, dtype)
        mods[impl] = b_mod if impl == "bnext" else t_mod
    for phase in phases:
        for impl in impls:
            fn = phase_fn(impl, phase, mods[impl], x, dy)
            fn()  # warm up (and compile) before timing
            timers[(phase, impl)] = benchmark.Timer("fn()", globals={"fn": fn}, label=phase, sub_label=tag,
                                                    description=impl, num_threads=threads)
    keys = list(timers)
    measured = {k: [] for k in keys}
    # Round 0 is a warm-up and is discarded: until every timer has run for a while, the
    # allocator's free lists and the caches still settle (first-round medians of one timer
    # measured up to 2x its later ones).
    for r in range(rounds + 1):
        shift = r % len(keys)
        for k in keys[shift:] + keys[:shift]:
            m = timers[k].blocked_autorange(min_run_time=min_run_time)
            if r > 0:
                measured[k].append(m)
    merged = {k: benchmark.Measurement.merge(v)[0] for k, v in measured.items()}
    R = merged[("floor", "read")].median
    W = merged[("floor", "write")].median
    nbytes = x.numel() * x.element_size()
    rows = []
    for phase in phases:
        m_b = merged[(phase, "bnext")]
        m_t = merged[(phase, "torch")]
        row = {
            "shape": list(shape), "layout": layout, "dtype": dtype_name, "phase": phase,
            "bnext_s": m_b.median, "torch_s": m_t.median,
            "bnext_iqr_s": m_b.iqr, "torch_iqr_s": m_t.iqr,
            "floor_s": floor_time(phase, R, W), "read_s": R, "write_s": W,
        }
        # "Slower beyond noise": bnext's 25th percentile above torch's 75th.
        b25 = _quantile(m_b, 0.25)
        t75 = _quantile(m_t, 0.75)
        row["slower_beyond_noise"] = bool(m_b.median > m_t.median and b25 > t75)
        if ("compile" in impls):
            row["compile_s"] = merged[(phase, "compile")].median
        row["speedup"] = m_t.median / m_b.median
        row["floor_ratio"] = m_b.median / row["floor_s"]
        row["gbps"] = floor_bytes(phase, nbytes) / m_b.median / 1e9
        rows.append(row)
    return rows, list(merged.values())


def _quantile(m, q):
    times = sorted(m.times)
    if not times:
        return m.median
    pos = q * (len(times) - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    return times[lo] + (times[hi] - times[lo]) * (pos - lo)


def geomean(v):
    v = [a for a in v if a > 0]
    return math.exp(sum(math.log(a) for a in v) / len(v)) if v else float("nan")


def tune_malloc():
    """Keep freed tensor memory in the process (glibc) so no timer pays page faults for it.

    glibc returns a freed heap top above M_TRIM_THRESHOLD (dynamic: twice the largest freed
    mmapped block, about 51 MB after one 25.7 MB tensor) to the OS; a benchmark iteration that
    frees two such outputs then page-faults (and zeroes) them again on the next call, while one
    x.clone() does not. That is allocator behaviour, not batch norm, and it hits torch and bnext
    alike but not the floor, so it is turned off (the usual CPU advice: a caching allocator,
    jemalloc/tcmalloc, does the same). Blocks above M_MMAP_THRESHOLD's 32 MiB ceiling would
    still be mmapped, and page-faulted and zeroed by the kernel, on every call: for the 103 MB
    tensors of the matrix that made every timer (x.clone() too: 50 ms for 103 MB) measure the
    kernel's page zeroing with run-to-run swings of 2x, so mmap is turned off as well
    (M_MMAP_MAX=0: every block comes from the heap and is reused).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
        ok = (libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
              and libc.mallopt(M_MMAP_MAX, 0))
        return bool(ok)
    except OSError:
        return False


def machine_info():
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_isa": bnext.build_info()["cpu_isa"],
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def fmt_ms(s):
    return f"{s * 1e3:9.3f}"


def table(rows, with_compile):
    hdr = f"{'shape':<22} {'layout':<13} {'dtype':<8} {'phase':<12} {'bnext ms':>9} {'torch ms':>9}"
    if with_compile:
        hdr += f" {'compile ms':>10}"
    hdr += f" {'speedup':>7} {'GB/s':>6} {'floor ms':>9} {'/floor':>6}"
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        line = (f"{str(tuple(r['shape'])):<22} {r['layout']:<13} {r['dtype']:<8} {r['phase']:<12} "
                f"{fmt_ms(r['bnext_s'])} {fmt_ms(r['torch_s'])}")
        if with_compile:
            line += f" {fmt_ms(r['compile_s']) if 'compile_s' in r else '':>10}"
        line += f" {r['speedup']:7.2f} {r['gbps']:6.1f} {fmt_ms(r['floor_s'])} {r['floor_ratio']:6.2f}"
        if r["slower_beyond_noise"]:
            line += "  SLOWER"
        lines.append(line)
    return "\n".join(lines)


LARGE_NUMEL = 1 << 20


def summarize(rows):
    speed = geomean([r["speedup"] for r in rows])
    large = [r for r in rows if math.prod(r["shape"]) >= LARGE_NUMEL]
    speeds = sorted(r["speedup"] for r in rows)
    ratio = geomean([r["floor_ratio"] for r in rows])
    worst = min(rows, key=lambda r: r["speedup"])
    worst_floor = max(rows, key=lambda r: r["floor_ratio"])
    slower = [r for r in rows if r["slower_beyond_noise"]]
    per_phase = {p: geomean([r["speedup"] for r in rows if r["phase"] == p]) for p in PHASES
                 if any(r["phase"] == p for r in rows)}
    per_phase_floor = {p: geomean([r["floor_ratio"] for r in rows if r["phase"] == p]) for p in PHASES
                       if any(r["phase"] == p for r in rows)}
    compile_rows = [r for r in rows if "compile_s" in r]
    vs_compile = geomean([r["compile_s"] / r["bnext_s"] for r in compile_rows]) if compile_rows else None
    return {
        "cases": len(rows),
        "geomean_speedup": speed,
        "geomean_floor_ratio": ratio,
        "geomean_speedup_by_phase": per_phase,
        "geomean_floor_ratio_by_phase": per_phase_floor,
        "geomean_speedup_vs_compile": vs_compile,
        "median_speedup": speeds[len(speeds) // 2] if speeds else float("nan"),
        "large_cases": len(large),
        "geomean_speedup_large": geomean([r["speedup"] for r in large]),
        "geomean_floor_ratio_large": geomean([r["floor_ratio"] for r in large]),
        "worst_speedup": worst,
        "worst_floor_ratio": worst_floor,
        "slower_beyond_noise": slower,
        "targets": {
            "geomean_speedup>=2.0": speed >= 2.0,
            "no_case_slower_beyond_noise": not slower,
            "geomean_floor_ratio<=1.5": ratio <= 1.5,
        },
    }


def case_name(r):
    return f"{tuple(r['shape'])} {r['layout']} {r['dtype']} {r['phase']}"


def summary_text(s):
    w = s["worst_speedup"]
    wf = s["worst_floor_ratio"]
    lines = [
        f"cases: {s['cases']}",
        f"geomean speedup vs torch.nn: {s['geomean_speedup']:.2f}x  "
        + "  ".join(f"{k} {v:.2f}x" for k, v in s["geomean_speedup_by_phase"].items()),
        f"geomean ratio to memory floor: {s['geomean_floor_ratio']:.2f}  "
        + "  ".join(f"{k} {v:.2f}" for k, v in s["geomean_floor_ratio_by_phase"].items()),
    ]
    lines.append(f"median speedup: {s['median_speedup']:.2f}x")
    lines.append(f"inputs with >= {LARGE_NUMEL} elements ({s['large_cases']} cases): geomean speedup "
                 f"{s['geomean_speedup_large']:.2f}x, geomean floor ratio {s['geomean_floor_ratio_large']:.2f}")
    if s["geomean_speedup_vs_compile"] is not None:
        lines.append(f"geomean speedup vs torch.compile'd torch BN: {s['geomean_speedup_vs_compile']:.2f}x")
    lines.append(f"worst speedup: {w['speedup']:.2f}x ({case_name(w)})")
    lines.append(f"worst floor ratio: {wf['floor_ratio']:.2f} ({case_name(wf)})")
    lines.append("slower than torch beyond noise: "
                 + (", ".join(case_name(r) for r in s["slower_beyond_noise"]) or "none"))
    for k, ok in s["targets"].items():
        lines.append(f"target {k}: {'MET' if ok else 'NOT MET'}")
    return "\n".join(lines)


PHASE_STYLE = {  # phase -> (label, colour)
    "train_fwd": ("train forward", "tab:blue"),
    "train_fwdbwd": ("train forward+backward", "tab:orange"),
    "eval_fwd": ("eval forward", "tab:green"),
}
KINDS = [("float32", "nchw"), ("float32", "channels_last"), ("bfloat16", "nchw"), ("bfloat16", "channels_last")]


def input_bytes(r):
    return math.prod(r["shape"]) * (2 if r["dtype"] == "bfloat16" else 4)


def chart(rows, path):
    """The summary a reader wants at a glance (the full table is in RESULTS.md): left, the spread of
    the speedups over torch.nn per dtype and layout, one box per phase, every case a dot; right, time
    over the memory floor against input size, where only large inputs can approach the floor (small
    ones pay a fixed per-call cost)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    def plain_log_ticks(axis, ticks):
        axis.set_major_locator(FixedLocator(ticks))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_locator(NullLocator())

    fig, (ax_s, ax_f) = plt.subplots(1, 2, figsize=(14, 5.8), gridspec_kw={"width_ratios": [1.15, 1]})
    width = 0.26
    kinds = [k for k in KINDS if any((r["dtype"], r["layout"]) == k for r in rows)]
    phases = [p for p in PHASE_STYLE if any(r["phase"] == p for r in rows)]
    for i, (dtype, layout) in enumerate(kinds):
        for j, phase in enumerate(phases):
            vals = [r["speedup"] for r in rows if (r["dtype"], r["layout"], r["phase"]) == (dtype, layout, phase)]
            if not vals:
                continue
            x = i + (j - (len(phases) - 1) / 2) * width
            colour = PHASE_STYLE[phase][1]
            ax_s.boxplot([vals], positions=[x], widths=width * 0.8, whis=(0, 100), showfliers=False,
                         patch_artist=True, boxprops=dict(facecolor=colour, alpha=0.35, edgecolor=colour),
                         medianprops=dict(color="k"), whiskerprops=dict(color=colour), capprops=dict(color=colour))
            # Deterministic spread of the dots across the box, ordered by value.
            offsets = [((k * 0.618) % 1 - 0.5) * width * 0.6 for k in range(len(vals))]
            ax_s.scatter([x + o for o in offsets], sorted(vals), s=9, color=colour, alpha=0.8, zorder=3, lw=0)
            ax_s.annotate(f"{geomean(vals):.2f}x", (x, max(vals)), textcoords="offset points", xytext=(0, 4),
                          ha="center", fontsize=7)
    ax_s.axhline(1.0, color="k", lw=0.8)
    ax_s.set_yscale("log")
    plain_log_ticks(ax_s.yaxis, [0.5, 0.7, 1, 1.5, 2, 3, 5, 7, 10, 20, 30, 50, 100, 200])
    ax_s.set_xticks(range(len(kinds)))
    ax_s.set_xticklabels([f"{d}\n{'NCHW' if l == 'nchw' else 'channels_last'}" for d, l in kinds])
    ax_s.set_ylabel("speedup over torch.nn (log scale; above 1 = bnext faster)")
    ax_s.set_title(f"Speedup per case, {len(rows)} cases: geometric mean {geomean([r['speedup'] for r in rows]):.2f}x\n"
                   "(box: quartiles, whiskers: min-max, label: geometric mean)", fontsize=10)
    ax_s.grid(axis="y", alpha=0.3)
    for phase in phases:
        label, colour = PHASE_STYLE[phase]
        ax_s.scatter([], [], color=colour, label=label)
    ax_s.legend(loc="upper left", fontsize=8)

    markers = {("float32", "nchw"): "o", ("float32", "channels_last"): "s", ("bfloat16", "nchw"): "^",
               ("bfloat16", "channels_last"): "D"}
    for r in rows:
        ax_f.scatter(input_bytes(r) / 2**20, r["floor_ratio"], s=14, color=PHASE_STYLE[r["phase"]][1],
                     marker=markers[(r["dtype"], r["layout"])], alpha=0.75, lw=0)
    ax_f.axhline(1.0, color="k", lw=0.8)
    ax_f.axhline(1.5, color="r", lw=0.8, ls="--")
    ax_f.text(0.01, 1.5, " 1.5x floor target", transform=ax_f.get_yaxis_transform(),
              color="r", fontsize=7, va="bottom")
    ax_f.set_xscale("log")
    ax_f.set_yscale("log")
    plain_log_ticks(ax_f.xaxis, [0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000])
    plain_log_ticks(ax_f.yaxis, [0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 7, 10, 20])
    ax_f.set_xlabel("input size (MiB, log scale)")
    ax_f.set_ylabel("bnext time / memory floor (log scale; 1 = as fast as a copy)")
    ax_f.set_title(f"Time over the memory floor measured in the same run: geometric mean "
                   f"{geomean([r['floor_ratio'] for r in rows]):.2f}", fontsize=10)
    ax_f.grid(alpha=0.3)
    for kind, marker in markers.items():
        if kind in kinds:
            ax_f.scatter([], [], color="grey", marker=marker,
                         label=f"{kind[0]} {'NCHW' if kind[1] == 'nchw' else 'channels_last'}")
    ax_f.legend(loc="upper right", fontsize=8, title="colour: phase, as on the left", title_fontsize=7)
    fig.suptitle("bnext CPU batch norm against torch.nn (benchmarks/RESULTS.md has every case)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(path, info, s, rows, chart_rel, json_rel, args, elapsed):
    lines = ["# bnext CPU benchmark results", ""]
    lines.append(f"Generated by `make bench` (`python benchmarks/bench.py {' '.join(args)}`) on {info['date_utc']}, "
                 f"{elapsed / 60:.1f} min.")
    lines.append("")
    lines.append("## Machine")
    lines.append("")
    lines.append(f"- CPU: {info['cpu_model']} ({info['logical_cpus']} logical CPUs)")
    lines.append(f"- bnext CPU kernel variant (ISA): {info['cpu_isa']}")
    lines.append(f"- threads (torch.get_num_threads): {info['threads']}")
    lines.append(f"- torch {info['torch_version']}, Python {info['python']}")
    lines.append(f"- glibc malloc keeps freed memory and never mmaps (bench.py tune_malloc): {info.get('malloc_tuned')}")
    if info.get("load_average"):
        la = ", ".join(f"{v:.1f}" for v in info["load_average"])
        lines.append(f"- load average when the run ended: {la} (the benchmark's own threads count toward it; a "
                     "value well above the thread count means other jobs shared the machine and absolute times "
                     "are noisy; every ratio below compares timers interleaved in the same group)")
    lines.append("")
    lines.append("## Summary")
    lines.append("")
    lines.append("```")
    lines.append(summary_text(s))
    lines.append("```")
    lines.append("")
    lines.append("Memory floor per case, measured in the same interleaved group on the same input: "
                 "R = `x.sum()`, W = `x.clone()`; train forward R+W, eval forward W, train fwd+bwd 3R+2W. "
                 "GB/s counts the bytes the op must move (fwd/eval: read x + write y; fwd+bwd: 5 tensor passes). "
                 "`speedup` = torch.nn time / bnext time (modules, train mode updating running stats). "
                 "`compile` = `torch.compile(F.batch_norm, dynamic=True)` (float32 4-D cases; `--compile all` for every case). "
                 "SLOWER marks a case where bnext's 25th percentile exceeds torch's 75th.")
    lines.append("")
    lines.append("How to read these numbers:")
    lines.append("")
    lines.append("- torch's eager CPU batch norm enters several OpenMP parallel regions per call. On a 2-core "
                 "machine whose other core is busy with other jobs, a region can wait for a scheduler tick, so "
                 "torch's median for a small input is sometimes milliseconds; that shows up as speedups of 100x and "
                 "more (bnext keeps work below 32768 values per task on one thread and is less exposed). The median "
                 f"and the geomean over inputs with at least {LARGE_NUMEL} elements are the robust figures.")
    lines.append("- Allocation: the process keeps freed memory and never mmaps (tune_malloc), for torch, bnext and "
                 "the floor alike. Without that, every output above 32 MiB is page-faulted and zeroed by the kernel "
                 "on every call and every timer of those cases, x.clone() included, measures page zeroing (x.clone() "
                 "of a 103 MB tensor: 50 ms instead of 8 ms) with run-to-run swings of 2x.")
    lines.append("- Ratios below 1 to the floor are real: W is x.clone(), whose ordinary stores read every output "
                 "line before writing it; bnext writes the output of a pass that moves more than a cache-sized threshold "
                 "(AMD: half the L3 of the core complex; otherwise 3/4 of the process's share of the last-level cache, "
                 "at most 4 MiB per CPU) with streaming (non-temporal) stores, which skip that read.")
    lines.append("- Floor ratios of small inputs measure fixed per-call cost (module, autograd Function, running-stat "
                 "update, op dispatch: tens of microseconds of Python and dispatcher time), not memory traffic: "
                 "x.clone() of a 128 KiB tensor takes about 10 us.")
    lines.append("- The 4-D ResNet-50 shapes run at batch 32 (none scaled down).")
    lines.append("")
    lines.append(f"![speedup per dtype, layout and phase; time over the memory floor by input size]({chart_rel})")
    lines.append("")
    lines.append(f"Raw results: `{json_rel}`.")
    lines.append("")
    lines.append("## All cases")
    lines.append("")
    hdr = "| shape | layout | dtype | phase | bnext ms | torch ms | compile ms | speedup | GB/s | floor ms | / floor |"
    lines.append(hdr)
    lines.append("|" + "---|" * 11)
    for r in rows:
        comp = f"{r['compile_s'] * 1e3:.3f}" if "compile_s" in r else ""
        flag = " **SLOWER**" if r["slower_beyond_noise"] else ""
        lines.append(f"| {tuple(r['shape'])} | {r['layout']} | {r['dtype']} | {r['phase']} | {r['bnext_s'] * 1e3:.3f} | "
                     f"{r['torch_s'] * 1e3:.3f} | {comp} | {r['speedup']:.2f}{flag} | {r['gbps']:.1f} | "
                     f"{r['floor_s'] * 1e3:.3f} | {r['floor_ratio']:.2f} |")
    lines.append("")
    fused = os.path.join(HERE, "results", "fused.json")
    if os.path.exists(fused):
        # The fused BN + activation benchmark's section (benchmarks/bench_fused.py), from its saved results.
        from bench_fused import fused_markdown

        with open(fused) as f:
            lines += fused_markdown(json.load(f))
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small smoke subset; does not rewrite RESULTS.md")
    p.add_argument("--device", default="cpu", help="only 'cpu' (the CUDA benchmark is benchmarks/bench_cuda.py)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--batch", type=int, default=32, help="batch size of the ResNet-50 shapes")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per group (default 3, quick 2)")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds per blocked_autorange (default 0.03)")
    p.add_argument("--compile", choices=["all", "float32-4d", "none"], default="float32-4d",
                   help="which cases also time torch.compile'd torch BN (dynamic=True); every dtype/layout/rank/"
                        "phase is one more inductor compile (10-30 s each here), so by default only float32 4-D "
                        "inputs (--quick: none)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="directory of the JSON results and chart")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="leave glibc's trim/mmap thresholds alone (see tune_malloc)")
    p.add_argument("--from-json", default=None,
                   help="re-render the table, chart and RESULTS.md from a results JSON instead of measuring")
    p.add_argument("--no-markdown", action="store_true", help="do not rewrite benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if args.device != "cpu":
        p.error(f"--device must be 'cpu', got '{args.device}': this is the CPU benchmark; "
                "the CUDA one is benchmarks/bench_cuda.py")
    if args.from_json:
        with open(args.from_json) as f:
            data = json.load(f)
        rows, info = data["cases"], data["machine"]
        s = summarize(rows)
        print(table(rows, any("compile_s" in r for r in rows)))
        print(summary_text(s))
        png_path = os.path.splitext(args.from_json)[0] + ".png"
        chart(rows, png_path)
        data["summary"] = s
        with open(args.from_json, "w") as f:
            json.dump(data, f, indent=1)
        if not args.no_markdown and not data["args"].get("quick"):
            write_markdown(os.path.join(HERE, "RESULTS.md"), info, s, rows, os.path.relpath(png_path, HERE),
                           os.path.relpath(args.from_json, ROOT), data.get("argv", []), data["elapsed_s"])
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (2 if args.quick else 3)
    mrt = args.min_run_time or 0.03
    phases = [ph for ph in args.phases.split(",") if ph]
    for ph in phases:
        if ph not in PHASES:
            p.error(f"--phases: unknown phase '{ph}', expected some of {','.join(PHASES)}")
    dtypes = [d for d in args.dtypes.split(",") if d]
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"--dtypes: unknown dtype '{d}', expected some of {','.join(DTYPES)}")
    if args.quick and "--compile" not in " ".join(sys.argv[1:] if argv is None else argv):
        args.compile = "none"
    info = machine_info()
    info["malloc_tuned"] = tune_malloc() if not args.no_malloc_tuning else False
    print(f"bnext CPU benchmark: {info['cpu_model']}, ISA {info['cpu_isa']}, {info['threads']} threads, "
          f"torch {info['torch_version']}", flush=True)
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    rows, measurements = [], []
    groups = [(name, shape, layout, d) for name, shape in build_matrix(args.quick, args.batch)
              for layout in layouts_for(shape) for d in dtypes]
    for i, (name, shape, layout, d) in enumerate(groups):
        with_compile = args.compile == "all" or (args.compile == "float32-4d" and d == "float32" and len(shape) == 4)
        impls = ["bnext", "torch"] + (["compile"] if with_compile else [])
        g_rows, g_meas = run_group(shape, layout, d, phases, impls, rounds, mrt, gen)
        for r in g_rows:
            r["group"] = name
        rows += g_rows
        measurements += g_meas
        print(f"[{i + 1}/{len(groups)}] {tuple(shape)} {layout} {d}: "
              + "  ".join(f"{r['phase']} {r['speedup']:.2f}x (floor {r['floor_ratio']:.2f})" for r in g_rows)
              + f"  [{time.time() - t0:.0f} s]", flush=True)
    elapsed = time.time() - t0
    info["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    compare = benchmark.Compare(measurements)
    compare.trim_significant_figures()
    compare.print()
    print(table(rows, args.compile != "none"))
    s = summarize(rows)
    print(summary_text(s))
    os.makedirs(args.out, exist_ok=True)
    stem = "cpu_quick" if args.quick else "cpu"
    json_path = os.path.join(args.out, f"{stem}.json")
    with open(json_path, "w") as f:
        json.dump({"machine": info, "args": vars(args), "argv": sys.argv[1:] if argv is None else argv,
                   "elapsed_s": elapsed, "summary": s, "cases": rows}, f, indent=1)
    png_path = os.path.join(args.out, f"{stem}.png")
    chart(rows, png_path)
    print(f"wrote {os.path.relpath(json_path, ROOT)}, {os.path.relpath(png_path, ROOT)}")
    if not args.quick and not args.no_markdown:
        md = os.path.join(HERE, "RESULTS.md")
        write_markdown(md, info, s, rows, os.path.relpath(png_path, HERE), os.path.relpath(json_path, ROOT),
                       sys.argv[1:] if argv is None else argv, elapsed)
        print(f"wrote {os.path.relpath(md, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
