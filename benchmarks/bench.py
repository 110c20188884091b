"""bnext CPU benchmark: bnext vs torch.nn batch norm vs torch.compile'd torch batch norm, over
batch-norm shapes of real networks (benchmarks/matrix.py, benchmarks/matrix.json).

    make bench                            # a stratified sample of the matrix: writes RESULTS.md,
                                          # results/cpu.json, results/cpu.png
    make bench BENCH_ARGS=--full          # every case of the matrix (results/cpu_full.*, RESULTS.md)
    make bench BENCH_ARGS="--repeat 3"    # the selection three times: run-to-run spread
    make bench BENCH_ARGS=--quick         # smoke subset (no RESULTS.md)
    python benchmarks/bench.py --sample 3 --rounds 1 --min-run-time 0.01 --out-dir /tmp/b   # smoke
    python benchmarks/bench.py --help

Everything runs in ONE process on the SAME inputs. For every (shape, layout, dtype) group the
timers of all implementations and of the memory floor are interleaved round-robin (the start
rotates each round), so machine drift hits all of them alike; each timer is a
torch.utils.benchmark `Timer.blocked_autorange`, and the rounds are merged with
`Measurement.merge`. Reported per case: median time, speedup vs torch.nn and vs compiled torch,
achieved GB/s (bytes the op must move / time) and the ratio to the memory floor measured in the
same group (report.FLOOR_FORMULAS, with R = x.sum(), W = x.clone()):

    train forward:  R + W           (statistics must read x before the first output value exists)
    eval forward:   W               (one read + one write)
    train fwd+bwd:  R + W  +  2R + W   (forward; backward reduces over (dy, x), then writes dx)

Targets (issue 23, report.summarize): geometric-mean speedup vs torch.nn >= 2.0, no case slower
than torch beyond noise (bnext's 25th percentile above torch's 75th); over inputs of at least
256 KiB, geometric-mean floor ratio <= 1.3 and worst <= 1.6.
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
import matrix as mx  # noqa: E402
import report  # noqa: E402
# The report (bench_fused.py and the tests import these names from here).
from report import (PHASES, chart, combine_runs, finish_row, floor_time, geomean, run_spread,  # noqa: E402,F401
                    spread_text, summarize, summary_text, table, write_markdown, write_results_md)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
EPS = 1e-5
MOMENTUM = 0.1

# `make bench`'s sample: as many shapes as the matrix has families (matrix.FAMILIES), so each
# family picks one (matrix.sample_matrix): about 75 groups and 230 cases, the size of the hand list
# bench.py had before and about as long to run (docs/performance.md: the estimate and how it was made).
DEFAULT_SAMPLE = len(mx.FAMILIES)


def select_cases(args):
    """(selection name, matrix cases, number of shapes in the matrix) for the command line:
    --quick, --full or --sample N, each optionally restricted to shapes of --families."""
    cases = mx.full_matrix()
    total = len(cases)
    if args.families:
        wanted = args.families.split(",")
        unknown = [f for f in wanted if f not in mx.FAMILIES]
        if unknown:
            raise SystemExit(f"--families: unknown family {', '.join(unknown)}; expected some of "
                             f"{','.join(mx.FAMILIES)}")
        cases = [c for c in cases if any(f in c["sources"] for f in wanted)]
    if args.quick:
        return "quick", mx.quick_matrix(cases), total
    if args.full:
        return "full", cases, total
    return "sample", mx.sample_matrix(args.sample, cases), total


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

        # One compiled graph per dtype, layout, rank, phase and size-1 specialization: the full
        # matrix needs more than the default limits, and a limit hit must fail, not silently time
        # eager torch under the name "compile".
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, 1024)
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4096)
        cfg.fail_on_recompile_limit_hit = True
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
    rows = []
    for phase in phases:
        m_b = merged[(phase, "bnext")]
        m_t = merged[(phase, "torch")]
        row = {
            "shape": list(shape), "layout": layout, "dtype": dtype_name, "phase": phase,
            "bnext_s": m_b.median, "torch_s": m_t.median,
            "bnext_iqr_s": m_b.iqr, "torch_iqr_s": m_t.iqr,
            "bnext_p25_s": _quantile(m_b, 0.25), "torch_p75_s": _quantile(m_t, 0.75),
            "floor_s": floor_time(phase, R, W), "read_s": R, "write_s": W,
        }
        if "compile" in impls:
            row["compile_s"] = merged[(phase, "compile")].median
        rows.append(finish_row(row))
    return rows, list(merged.values())


def _quantile(m, q):
    times = sorted(m.times)
    if not times:
        return m.median
    pos = q * (len(times) - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    return times[lo] + (times[hi] - times[lo]) * (pos - lo)


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


def select_impls(compile_policy, dtype, shape):
    with_compile = compile_policy == "all" or (compile_policy == "float32-4d" and dtype == "float32" and len(shape) == 4)
    return ["bnext", "torch"] + (["compile"] if with_compile else [])


def output_paths(args, selection):
    """(json, png, RESULTS.md or None): --out-dir puts all three there; otherwise the JSON and chart
    go to --out and RESULTS.md to benchmarks/ (never for --quick or --no-markdown)."""
    stem = {"quick": "cpu_quick", "full": "cpu_full", "sample": "cpu"}[selection]
    out = args.out_dir or args.out
    md = None
    if selection != "quick" and not args.no_markdown:
        md = os.path.join(args.out_dir, "RESULTS.md") if args.out_dir else os.path.join(HERE, "RESULTS.md")
    return os.path.join(out, f"{stem}.json"), os.path.join(out, f"{stem}.png"), md


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--quick", action="store_true",
                     help="smoke subset: one small case per rank (two 4-D); does not rewrite RESULTS.md")
    sel.add_argument("--full", action="store_true", help="every case of benchmarks/matrix.json (hours: see "
                     "docs/performance.md)")
    sel.add_argument("--sample", type=int, default=DEFAULT_SAMPLE,
                     help=f"a stratified sample of this many matrix shapes (default {DEFAULT_SAMPLE})")
    p.add_argument("--families", default=None,
                   help="only shapes coming from these matrix families (comma-separated, e.g. resnet,video)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the whole selection this many times; reports each case's median and the "
                        "run-to-run spread")
    p.add_argument("--device", default="cpu", help="only 'cpu' (the CUDA benchmark is benchmarks/bench_cuda.py)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per group (default 3, quick 2)")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds per blocked_autorange (default 0.03)")
    p.add_argument("--compile", choices=["all", "float32-4d", "none"], default=None,
                   help="which cases also time torch.compile'd torch BN (dynamic=True); every dtype/layout/rank/"
                        "phase (and size-1 specialization) is one more inductor compile (10-30 s each here), so "
                        "by default only float32 4-D inputs (--full: all; --quick: none)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="directory of the JSON results and chart")
    p.add_argument("--out-dir", default=None,
                   help="write the JSON, chart and RESULTS.md here instead (smoke runs: leaves benchmarks/ alone)")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="leave glibc's trim/mmap thresholds alone (see tune_malloc)")
    p.add_argument("--from-json", default=None,
                   help="re-render the table, chart and RESULTS.md from a results JSON instead of measuring")
    p.add_argument("--no-markdown", action="store_true", help="do not rewrite benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    argv_list = sys.argv[1:] if argv is None else list(argv)
    if args.device != "cpu":
        p.error(f"--device must be 'cpu', got '{args.device}': this is the CPU benchmark; "
                "the CUDA one is benchmarks/bench_cuda.py")
    if args.repeat < 1:
        p.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.sample < 1:
        p.error(f"--sample must be at least 1, got {args.sample}")
    if args.from_json:
        return rerender(args)
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
    selection, cases, total = select_cases(args)
    if args.compile is None:
        args.compile = {"quick": "none", "full": "all", "sample": "float32-4d"}[selection]
    groups = [(case, tuple(case["shape"]), layout, d) for case in cases
              for layout in layouts_for(case["shape"]) for d in dtypes]
    if not groups:
        p.error("no cases selected (check --families)")
    info = machine_info()
    info["malloc_tuned"] = tune_malloc() if not args.no_malloc_tuning else False
    n_timers = sum(2 + len(phases) * len(select_impls(args.compile, d, shape)) for _, shape, _, d in groups)
    print(f"bnext CPU benchmark: {info['cpu_model']}, ISA {info['cpu_isa']}, {info['threads']} threads, "
          f"torch {info['torch_version']}\n{selection}: {len(cases)} of the matrix's {total} shapes, {len(groups)} "
          f"groups, {len(groups) * len(phases)} cases, x{args.repeat} runs; at least "
          f"{args.repeat * (rounds + 1) * n_timers} timer runs of >= {mrt} s each, plus compiles", flush=True)
    t0 = time.time()
    runs, measurements = [], []
    for rep in range(args.repeat):
        rows = []
        measurements = []  # Compare prints the last run's
        for i, (case, shape, layout, d) in enumerate(groups):
            impls = select_impls(args.compile, d, shape)
            # Seeded per group: every run of a group times the same input values.
            gen = torch.Generator().manual_seed(i)
            g_rows, g_meas = run_group(shape, layout, d, phases, impls, rounds, mrt, gen)
            for r in g_rows:
                r["family"] = case["family"]
                r["source"] = mx.case_label(case)
            rows += g_rows
            measurements += g_meas
            run_tag = f"run {rep + 1}/{args.repeat} " if args.repeat > 1 else ""
            print(f"{run_tag}[{i + 1}/{len(groups)}] {shape} {layout} {d} ({mx.case_label(case)}): "
                  + "  ".join(f"{r['phase']} {r['speedup']:.2f}x (floor {r['floor_ratio']:.2f})" for r in g_rows)
                  + f"  [{time.time() - t0:.0f} s]", flush=True)
        runs.append(rows)
    elapsed = time.time() - t0
    info["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if len(groups) <= 100:
        compare = benchmark.Compare(measurements)
        compare.trim_significant_figures()
        compare.print()
    rows = combine_runs(runs)
    spread = run_spread(runs)
    print(table(rows, args.compile != "none"))
    s = summarize(rows)
    print(summary_text(s))
    if spread:
        print(spread_text(spread))
    json_path, png_path, md_path = output_paths(args, selection)
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    data = {"machine": info, "args": vars(args), "argv": argv_list, "elapsed_s": elapsed,
            "matrix": {"selection": selection, "shapes": len(cases), "matrix_shapes": total,
                       "families": args.families},
            "summary": s, "repeat": spread, "cases": rows}
    with open(json_path, "w") as f:
        json.dump(data, f, indent=1)
    chart(rows, png_path)
    print(f"wrote {json_path}, {png_path}")
    if md_path:
        write_results_md(data, md_path, png_path, json_path)
        print(f"wrote {md_path}")
    return 0


def rerender(args):
    """--from-json: the table, chart, summary and RESULTS.md of a saved run, without measuring."""
    with open(args.from_json) as f:
        data = json.load(f)
    rows = data["cases"]
    s = summarize(rows)
    print(table(rows, any("compile_s" in r for r in rows)))
    print(summary_text(s))
    if data.get("repeat"):
        print(spread_text(data["repeat"]))
    png_path = os.path.splitext(args.from_json)[0] + ".png"
    chart(rows, png_path)
    data["summary"] = s
    with open(args.from_json, "w") as f:
        json.dump(data, f, indent=1)
    if not args.no_markdown and not data["args"].get("quick"):
        md = os.path.join(args.out_dir, "RESULTS.md") if args.out_dir else os.path.join(HERE, "RESULTS.md")
        write_results_md(data, md, png_path, args.from_json)
        print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
