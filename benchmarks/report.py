"""The CPU benchmark's report from result rows (no timing here, so tests can check it): the memory
floor per phase, summary statistics against the targets, run-to-run spread of repeated runs, the
text table, the chart and benchmarks/RESULTS.md.

A result row (one case: shape x layout x dtype x phase) holds at least shape, layout, dtype, phase,
bnext_s, torch_s, floor_s, speedup, floor_ratio, slower_beyond_noise; compile_s where compiled
torch was timed; family/source (the matrix provenance) in runs since the generated matrix.
"""
import json
import math
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))

PHASES = ("train_fwd", "train_fwdbwd", "eval_fwd")

# The memory floor of a phase, from R = x.sum() (one read pass) and W = x.clone() (one read and
# one allocate-and-write pass), both measured in the same interleaved group on the same input.
# The one owner of the formula: floor_time computes it, RESULTS.md prints FLOOR_FORMULAS.
FLOOR_FORMULAS = {
    "train_fwd": ("R + W", "statistics must read x before the first output value exists, then x -> y"),
    "train_fwdbwd": ("3R + 2W", "the forward (R + W); backward reduces over (dy, x), then writes dx"),
    "eval_fwd": ("W", "x -> y with the running statistics: one read, one write"),
}


def floor_time(phase, R, W):
    return {"train_fwd": R + W, "eval_fwd": W, "train_fwdbwd": 3 * R + 2 * W}[phase]


def floor_bytes(phase, nbytes):
    # Bytes the op must move at the least (reads of inputs, writes of outputs), for GB/s.
    return {"train_fwd": 2 * nbytes, "eval_fwd": 2 * nbytes, "train_fwdbwd": 5 * nbytes}[phase]


# Targets (issue 23). Inputs under FLOOR_TARGET_BYTES are excluded from the floor targets (not from
# the speed ones): a call there costs a fixed tens of microseconds of Python, dispatcher and
# running-statistics work, so its floor ratio measures call overhead, not memory traffic.
SPEEDUP_TARGET = 2.0
FLOOR_GEOMEAN_TARGET = 1.3
FLOOR_WORST_TARGET = 1.6
FLOOR_TARGET_BYTES = 256 * 1024
WORST_LISTED = 5
LARGE_NUMEL = 1 << 20

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def geomean(v):
    v = [a for a in v if a > 0]
    return math.exp(sum(math.log(a) for a in v) / len(v)) if v else float("nan")


def input_bytes(r):
    return math.prod(r["shape"]) * DTYPE_BYTES[r["dtype"]]


def floor_target(r):
    """Whether the case counts for the floor targets (inputs of at least FLOOR_TARGET_BYTES)."""
    return input_bytes(r) >= FLOOR_TARGET_BYTES


def vs_compile(r):
    return r["compile_s"] / r["bnext_s"] if "compile_s" in r else None


def case_name(r):
    return f"{tuple(r['shape'])} {r['layout']} {r['dtype']} {r['phase']}"


def source_of(r):
    """Matrix provenance of a row (runs before the generated matrix: the hand list's group)."""
    return r.get("source") or r.get("group", "")


def family_of(r):
    return r.get("family") or r.get("group", "")


def _by_phase(rows, key):
    return {p: geomean([key(r) for r in rows if r["phase"] == p]) for p in PHASES if any(r["phase"] == p for r in rows)}


def summarize(rows):
    speed = geomean([r["speedup"] for r in rows])
    large = [r for r in rows if math.prod(r["shape"]) >= LARGE_NUMEL]
    speeds = sorted(r["speedup"] for r in rows)
    ratio = geomean([r["floor_ratio"] for r in rows])
    worst = min(rows, key=lambda r: r["speedup"])
    worst_floor = max(rows, key=lambda r: r["floor_ratio"])
    slower = [r for r in rows if r["slower_beyond_noise"]]
    compile_rows = [r for r in rows if "compile_s" in r]
    compile_geomean = geomean([vs_compile(r) for r in compile_rows]) if compile_rows else None
    targeted = [r for r in rows if floor_target(r)]
    t_ratio = geomean([r["floor_ratio"] for r in targeted])
    t_worst = max(targeted, key=lambda r: r["floor_ratio"]) if targeted else None
    return {
        "cases": len(rows),
        "geomean_speedup": speed,
        "geomean_floor_ratio": ratio,  # over every case; the floor targets use the *_target ones
        "geomean_speedup_by_phase": _by_phase(rows, lambda r: r["speedup"]),
        "geomean_floor_ratio_by_phase": _by_phase(rows, lambda r: r["floor_ratio"]),
        "geomean_speedup_vs_compile": compile_geomean,
        "compile_cases": len(compile_rows),
        "median_speedup": speeds[len(speeds) // 2] if speeds else float("nan"),
        "large_cases": len(large),
        "geomean_speedup_large": geomean([r["speedup"] for r in large]),
        "geomean_floor_ratio_large": geomean([r["floor_ratio"] for r in large]),
        "worst_speedup": worst,
        "worst_floor_ratio": worst_floor,
        "floor_target_min_bytes": FLOOR_TARGET_BYTES,
        "floor_target_cases": len(targeted),
        "geomean_floor_ratio_target": t_ratio,
        "geomean_floor_ratio_target_by_phase": _by_phase(targeted, lambda r: r["floor_ratio"]),
        "worst_floor_ratio_target": t_worst,
        "worst_floor_ratio_cases": sorted(targeted, key=lambda r: -r["floor_ratio"])[:WORST_LISTED],
        "worst_speedup_cases": sorted(rows, key=lambda r: r["speedup"])[:WORST_LISTED],
        "slower_beyond_noise": slower,
        "slower_beyond_noise_count": len(slower),
        "targets": {
            f"geomean_speedup>={SPEEDUP_TARGET}": speed >= SPEEDUP_TARGET,
            "no_case_slower_beyond_noise": not slower,
            f"geomean_floor_ratio<={FLOOR_GEOMEAN_TARGET} (inputs >= 256 KiB)": bool(t_ratio <= FLOOR_GEOMEAN_TARGET),
            f"worst_floor_ratio<={FLOOR_WORST_TARGET} (inputs >= 256 KiB)":
                t_worst is not None and t_worst["floor_ratio"] <= FLOOR_WORST_TARGET,
        },
    }


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
    if s.get("floor_target_cases"):
        lines.append(f"inputs >= 256 KiB ({s['floor_target_cases']} cases, the floor targets): geomean floor ratio "
                     f"{s['geomean_floor_ratio_target']:.2f}  "
                     + "  ".join(f"{k} {v:.2f}" for k, v in s["geomean_floor_ratio_target_by_phase"].items())
                     + f"; worst {s['worst_floor_ratio_target']['floor_ratio']:.2f} "
                       f"({case_name(s['worst_floor_ratio_target'])})")
    lines.append(f"median speedup: {s['median_speedup']:.2f}x")
    if s["large_cases"]:
        lines.append(f"inputs with >= {LARGE_NUMEL} elements ({s['large_cases']} cases): geomean speedup "
                     f"{s['geomean_speedup_large']:.2f}x, geomean floor ratio {s['geomean_floor_ratio_large']:.2f}")
    if s["geomean_speedup_vs_compile"] is not None:
        lines.append(f"geomean speedup vs torch.compile'd torch BN ({s.get('compile_cases', '?')} cases): "
                     f"{s['geomean_speedup_vs_compile']:.2f}x")
    lines.append(f"worst speedup: {w['speedup']:.2f}x ({case_name(w)})")
    lines.append(f"worst floor ratio, all inputs: {wf['floor_ratio']:.2f} ({case_name(wf)})")
    if s.get("worst_floor_ratio_cases"):
        lines.append("worst floor ratios (inputs >= 256 KiB): "
                     + ", ".join(f"{r['floor_ratio']:.2f} {case_name(r)}" for r in s["worst_floor_ratio_cases"]))
    if s.get("worst_speedup_cases"):
        lines.append("worst speedups: " + ", ".join(f"{r['speedup']:.2f}x {case_name(r)}"
                                                    for r in s["worst_speedup_cases"]))
    lines.append(f"slower than torch beyond noise ({len(s['slower_beyond_noise'])}): "
                 + (", ".join(case_name(r) for r in s["slower_beyond_noise"]) or "none"))
    for k, ok in s["targets"].items():
        lines.append(f"target {k}: {'MET' if ok else 'NOT MET'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Repeated whole-matrix runs

# Per-run values a combined row takes the median of (present in every run, or left out).
TIME_FIELDS = ("bnext_s", "torch_s", "compile_s", "read_s", "write_s", "floor_s", "bnext_iqr_s", "torch_iqr_s",
               "bnext_p25_s", "torch_p75_s")


def case_key(r):
    return (tuple(r["shape"]), r["layout"], r["dtype"], r["phase"])


def finish_row(row):
    """Derived fields of a row from its times (one owner for a measured and a combined row)."""
    row["speedup"] = row["torch_s"] / row["bnext_s"]
    row["floor_ratio"] = row["bnext_s"] / row["floor_s"]
    row["gbps"] = floor_bytes(row["phase"], input_bytes(row)) / row["bnext_s"] / 1e9
    row["input_bytes"] = input_bytes(row)
    row["floor_target"] = floor_target(row)
    if "compile_s" in row:
        row["vs_compile"] = vs_compile(row)
    if "bnext_p25_s" in row and "torch_p75_s" in row:
        # "Slower beyond noise": slower, and bnext's 25th percentile above torch's 75th.
        row["slower_beyond_noise"] = bool(row["bnext_s"] > row["torch_s"] and row["bnext_p25_s"] > row["torch_p75_s"])
    return row


def relative_spread(values):
    """(max - min) / median: 0 when every run measured the same."""
    med = statistics.median(values)
    return (max(values) - min(values)) / med if med > 0 else float("nan")


def combine_runs(runs):
    """One row per case from K whole-matrix runs (lists of rows): each time the median over the
    runs, ratios recomputed from those medians, and every run's speedup and floor ratio kept in
    row["runs"]. A single run is returned as it is."""
    if len(runs) == 1:
        return runs[0]
    by_key = {}
    for rows in runs:
        for r in rows:
            by_key.setdefault(case_key(r), []).append(r)
    combined = []
    for r in runs[0]:
        per_run = by_key[case_key(r)]
        if len(per_run) != len(runs):
            raise ValueError(f"case {case_name(r)} is in {len(per_run)} of {len(runs)} runs; "
                             "repeated runs must time the same cases")
        row = dict(r)
        for f in TIME_FIELDS:
            if all(f in x for x in per_run):
                row[f] = statistics.median(x[f] for x in per_run)
        finish_row(row)
        if not ("bnext_p25_s" in row and "torch_p75_s" in row):
            row["slower_beyond_noise"] = sum(x["slower_beyond_noise"] for x in per_run) * 2 > len(per_run)
        row["runs"] = {"speedup": [x["speedup"] for x in per_run], "floor_ratio": [x["floor_ratio"] for x in per_run],
                       "bnext_s": [x["bnext_s"] for x in per_run]}
        row["speedup_spread"] = relative_spread(row["runs"]["speedup"])
        row["time_spread"] = relative_spread(row["runs"]["bnext_s"])
        combined.append(row)
    return combined


def run_spread(runs):
    """Run-to-run spread of K whole-matrix runs: each run's summary geomeans, their min and max,
    and the median (and 90th percentile) over cases of the relative spread of a case's speedup and
    of its bnext time; None for a single run."""
    if len(runs) < 2:
        return None
    per_run = [summarize(rows) for rows in runs]
    out = {"runs": len(runs)}
    for key in ("geomean_speedup", "geomean_speedup_vs_compile", "geomean_floor_ratio_target", "median_speedup"):
        vals = [s[key] for s in per_run if s[key] is not None]
        if vals:
            out[key] = {"per_run": vals, "min": min(vals), "max": max(vals), "relative_spread": relative_spread(vals)}
    combined = combine_runs(runs)
    for key in ("speedup_spread", "time_spread"):
        vals = sorted(r[key] for r in combined)
        out[f"median_case_{key}"] = statistics.median(vals)
        out[f"p90_case_{key}"] = vals[min(len(vals) - 1, int(0.9 * len(vals)))]
    out["slower_beyond_noise_per_run"] = [s["slower_beyond_noise_count"] for s in per_run]
    return out


def spread_text(sp):
    if not sp:
        return ""
    lines = [f"{sp['runs']} whole-matrix runs (per case: median of the runs' medians):"]
    names = {"geomean_speedup": "geomean speedup vs torch.nn", "geomean_speedup_vs_compile": "geomean vs compile",
             "geomean_floor_ratio_target": "geomean floor ratio (>= 256 KiB)", "median_speedup": "median speedup"}
    for key, label in names.items():
        if key in sp:
            v = sp[key]
            lines.append(f"  {label}: per run " + ", ".join(f"{x:.2f}" for x in v["per_run"])
                         + f"  (min {v['min']:.2f}, max {v['max']:.2f}, spread {100 * v['relative_spread']:.1f}%)")
    lines.append(f"  per case, (max - min) / median over the runs: speedup median {100 * sp['median_case_speedup_spread']:.1f}%"
                 f" (90th percentile {100 * sp['p90_case_speedup_spread']:.1f}%), bnext time median "
                 f"{100 * sp['median_case_time_spread']:.1f}% (90th percentile {100 * sp['p90_case_time_spread']:.1f}%)")
    lines.append("  cases slower beyond noise per run: " + ", ".join(map(str, sp["slower_beyond_noise_per_run"])))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Text table, chart, RESULTS.md

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
        if not floor_target(r):
            line += "  <256K"
        if r["slower_beyond_noise"]:
            line += "  SLOWER"
        lines.append(line)
    return "\n".join(lines)


PHASE_STYLE = {  # phase -> (label, colour)
    "train_fwd": ("train forward", "tab:blue"),
    "train_fwdbwd": ("train forward+backward", "tab:orange"),
    "eval_fwd": ("eval forward", "tab:green"),
}
KINDS = [("float32", "nchw"), ("float32", "channels_last"), ("bfloat16", "nchw"), ("bfloat16", "channels_last")]
KIND_STYLE = {  # (dtype, layout) -> (marker, colour) of the floor panels
    ("float32", "nchw"): ("o", "tab:blue"), ("float32", "channels_last"): ("s", "tab:orange"),
    ("bfloat16", "nchw"): ("^", "tab:green"), ("bfloat16", "channels_last"): ("D", "tab:red"),
}
ANNOTATED = 3  # worst floor ratios named in each floor panel


def kind_label(kind):
    return f"{kind[0]} {'NCHW' if kind[1] == 'nchw' else 'channels_last'}"


def chart(rows, path):
    """The summary a reader wants at a glance (the full table is in RESULTS.md). Top: the spread of
    the speedups over torch.nn per dtype and layout, one box per phase, every case a dot. Bottom,
    one panel per phase: time over the memory floor against input size, dtype and layout as marker
    and colour, the targets as lines, the inputs the floor targets exclude shaded and the worst
    cases named, so they stand out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    def plain_log_ticks(axis, ticks):
        axis.set_major_locator(FixedLocator(ticks))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_locator(NullLocator())

    phases = [p for p in PHASE_STYLE if any(r["phase"] == p for r in rows)]
    fig = plt.figure(figsize=(16, 10.5))
    grid = fig.add_gridspec(2, max(len(phases), 1), height_ratios=[1, 1.15])
    ax_s = fig.add_subplot(grid[0, :])
    width = 0.26
    kinds = [k for k in KINDS if any((r["dtype"], r["layout"]) == k for r in rows)]
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
    plain_log_ticks(ax_s.yaxis, [0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 7, 10, 20, 30, 50, 100, 200])
    ax_s.set_xticks(range(len(kinds)))
    ax_s.set_xticklabels([kind_label(k).replace(" ", "\n", 1) for k in kinds])
    ax_s.set_ylabel("speedup over torch.nn\n(log scale; above 1 = bnext faster)")
    ax_s.set_title(f"Speedup per case, {len(rows)} cases: geometric mean {geomean([r['speedup'] for r in rows]):.2f}x "
                   "(box: quartiles, whiskers: min-max, label: geometric mean)", fontsize=10)
    ax_s.grid(axis="y", alpha=0.3)
    for phase in phases:
        label, colour = PHASE_STYLE[phase]
        ax_s.scatter([], [], color=colour, label=label)
    ax_s.legend(loc="upper left", fontsize=8)

    shared = None
    for j, phase in enumerate(phases):
        ax = fig.add_subplot(grid[1, j], sharey=shared)
        shared = shared or ax
        prow = [r for r in rows if r["phase"] == phase]
        for kind in kinds:
            kr = [r for r in prow if (r["dtype"], r["layout"]) == kind]
            marker, colour = KIND_STYLE[kind]
            ax.scatter([input_bytes(r) / 2**20 for r in kr], [r["floor_ratio"] for r in kr], s=14, marker=marker,
                       color=colour, alpha=0.7, lw=0, label=kind_label(kind))
        ax.axvspan(1e-6, FLOOR_TARGET_BYTES / 2**20, color="0.85", alpha=0.5, lw=0)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(FLOOR_GEOMEAN_TARGET, color="r", lw=0.8, ls="--")
        ax.axhline(FLOOR_WORST_TARGET, color="r", lw=0.8, ls=":")
        targeted = sorted((r for r in prow if floor_target(r)), key=lambda r: -r["floor_ratio"])
        for r in targeted[:ANNOTATED]:
            ax.annotate(f"{tuple(r['shape'])}\n{kind_label((r['dtype'], r['layout']))}",
                        (input_bytes(r) / 2**20, r["floor_ratio"]), textcoords="offset points", xytext=(4, 2),
                        fontsize=6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        if prow:
            lo = min(input_bytes(r) for r in prow) / 2**20
            hi = max(input_bytes(r) for r in prow) / 2**20
            ax.set_xlim(lo / 1.5, hi * 1.5)
        plain_log_ticks(ax.xaxis, [0.001, 0.01, 0.1, 0.25, 1, 10, 100, 1000])
        plain_log_ticks(ax.yaxis, [0.3, 0.5, 0.7, 1, 1.3, 1.6, 2, 3, 5, 10, 20, 50])
        ax.set_xlabel("input size (MiB, log scale)")
        if j == 0:
            ax.set_ylabel("bnext time / memory floor\n(log scale; 1 = as fast as the floor)")
        t_geo = geomean([r["floor_ratio"] for r in targeted])
        ax.set_title(f"{PHASE_STYLE[phase][0]} (floor {FLOOR_FORMULAS[phase][0]}): geomean over >= 256 KiB "
                     f"{t_geo:.2f}", fontsize=9)
        ax.grid(alpha=0.3)
        if j == 0:
            ax.legend(loc="upper right", fontsize=7, title=f"grey: < 256 KiB (excluded from floor targets); "
                      f"red: {FLOOR_GEOMEAN_TARGET} geomean, {FLOOR_WORST_TARGET} worst target", title_fontsize=6)
    fig.suptitle("bnext CPU batch norm against torch.nn (benchmarks/RESULTS.md has every case)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def family_table(rows):
    """Markdown rows per provenance family: the worst families stand out."""
    lines = ["| family | cases | geomean x torch | geomean x compile | geomean / floor (>= 256 KiB) | worst / floor "
             "(>= 256 KiB) |", "|---|---|---|---|---|---|"]
    fams = []
    for r in rows:
        if family_of(r) not in fams:
            fams.append(family_of(r))
    for f in fams:
        fr = [r for r in rows if family_of(r) == f]
        comp = [vs_compile(r) for r in fr if "compile_s" in r]
        tr = [r["floor_ratio"] for r in fr if floor_target(r)]
        cells = [f, str(len(fr)), f"{geomean([r['speedup'] for r in fr]):.2f}",
                 f"{geomean(comp):.2f}" if comp else "", f"{geomean(tr):.2f}" if tr else "",
                 f"{max(tr):.2f}" if tr else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# RESULTS.md lists every case up to this many rows; beyond (the full matrix: tens of thousands of
# cases), the worst ones by floor ratio and by speedup, and the JSON holds all of them.
MAX_TABLE_ROWS = 3000
LISTED_WHEN_LONG = 300


def case_table(rows):
    hdr = ("| shape | source | layout | dtype | phase | bnext ms | torch ms | compile ms | speedup | GB/s | floor ms "
           "| / floor |")
    lines = [hdr, "|" + "---|" * 12]
    for r in rows:
        comp = f"{r['compile_s'] * 1e3:.3f}" if "compile_s" in r else ""
        flag = " **SLOWER**" if r["slower_beyond_noise"] else ""
        small = " (<256K)" if not floor_target(r) else ""
        lines.append(f"| {tuple(r['shape'])} | {source_of(r)} | {r['layout']} | {r['dtype']} | {r['phase']} | "
                     f"{r['bnext_s'] * 1e3:.3f} | {r['torch_s'] * 1e3:.3f} | {comp} | {r['speedup']:.2f}{flag} | "
                     f"{r['gbps']:.1f} | {r['floor_s'] * 1e3:.3f} | {r['floor_ratio']:.2f}{small} |")
    return lines


def matrix_text(matrix, rows):
    """What the cases are: the generated matrix's selection, or (older runs) the hand list."""
    dtypes = " and ".join(sorted({r["dtype"] for r in rows}, key=list(DTYPE_BYTES).index))
    phases = ", ".join(p for p in PHASES if any(r["phase"] == p for r in rows))
    if not matrix:
        return ("Cases: the hand list bench.py had before the generated matrix (ResNet-50's BN shapes at batch 32, "
                "small and large ones, BatchNorm1d and BatchNorm3d).")
    text = (f"Cases: {matrix['selection']} of the generated matrix `benchmarks/matrix.json` ({matrix['shapes']} of "
            f"its {matrix['matrix_shapes']} shapes; each in NCHW and channels_last where it has both, {dtypes}; "
            f"{phases}). The shapes are every batch-norm input of torchvision's classification, "
            "detection, segmentation and video models at batch 1, 8 and 32 and two resolutions, BatchNorm1d of "
            "tabular and sequence models and seeded odd shapes (docs/performance.md, benchmarks/matrix.py).")
    if matrix.get("families"):
        text += f" Only shapes that come from the families {matrix['families']} (--families)."
    if matrix["selection"] == "sample":
        text += (" The sample is stratified: families take turns, each family's picks rotate over its (rank, size) "
                 "strata (matrix.sample_matrix).")
    return text


def write_markdown(path, info, s, rows, chart_rel, json_rel, args, elapsed, matrix=None, spread=None):
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
    if spread:
        lines.append("")
        lines.append(spread_text(spread))
    lines.append("```")
    lines.append("")
    lines.append(matrix_text(matrix, rows))
    lines.append("")
    lines.append("Memory floor per case, measured in the same interleaved group on the same input: R = `x.sum()` "
                 "(one read pass), W = `x.clone()` (one read and one allocate-and-write pass):")
    lines.append("")
    lines.append("| phase | floor | why |")
    lines.append("|---|---|---|")
    for phase, (formula, why) in FLOOR_FORMULAS.items():
        lines.append(f"| {phase} | {formula} | {why} |")
    lines.append("")
    lines.append("`/ floor` = bnext time / floor. The floor targets (geometric mean <= "
                 f"{FLOOR_GEOMEAN_TARGET}, worst <= {FLOOR_WORST_TARGET}) count inputs of at least 256 KiB; smaller "
                 "ones are marked (<256K) and count for the speed targets only. "
                 "GB/s counts the bytes the op must move (fwd/eval: read x + write y; fwd+bwd: 5 tensor passes). "
                 "`speedup` = torch.nn time / bnext time (modules, train mode updating running stats). "
                 "`compile` = `torch.compile(F.batch_norm, dynamic=True)` (the cases `--compile` selects). "
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
    lines.append("")
    lines.append(f"![speedup per dtype, layout and phase; time over the memory floor by input size, per phase]({chart_rel})")
    lines.append("")
    lines.append(f"Raw results: `{json_rel}`.")
    lines.append("")
    if any("family" in r for r in rows):
        lines.append("## Per family")
        lines.append("")
        lines.append("Family: the first family (in matrix.FAMILIES order) a shape comes from.")
        lines.append("")
        lines += family_table(rows)
        lines.append("")
    if len(rows) <= MAX_TABLE_ROWS:
        lines.append("## All cases")
        lines.append("")
        lines += case_table(rows)
    else:
        lines.append(f"## Worst {LISTED_WHEN_LONG} cases by floor ratio (>= 256 KiB) and by speedup")
        lines.append("")
        lines.append(f"{len(rows)} cases: all of them are in `{json_rel}`.")
        lines.append("")
        worst = sorted((r for r in rows if floor_target(r)), key=lambda r: -r["floor_ratio"])[:LISTED_WHEN_LONG]
        slow = [r for r in sorted(rows, key=lambda r: r["speedup"]) if r not in worst][:LISTED_WHEN_LONG]
        lines += case_table(worst + slow)
    lines.append("")
    fused = os.path.join(HERE, "results", "fused.json")
    if os.path.exists(fused):
        # The fused BN + activation benchmark's section (benchmarks/bench_fused.py), from its saved results.
        from bench_fused import fused_markdown

        with open(fused) as f:
            lines += fused_markdown(json.load(f))
    small = os.path.join(HERE, "results", "small_batch.json")
    if os.path.exists(small):
        # The small- and irregular-batch layers' section (benchmarks/bench_small_batch.py).
        from bench_small_batch import small_batch_markdown

        with open(small) as f:
            lines += small_batch_markdown(json.load(f))
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_results_md(data, md_path, png_path, json_path):
    """RESULTS.md of a saved run (`data` as bench.py writes its JSON): paths relative to the
    markdown's directory (the chart) and to the repository (the JSON)."""
    root = os.path.dirname(HERE)
    json_path = os.path.abspath(json_path)
    json_rel = os.path.relpath(json_path, root) if json_path.startswith(root + os.sep) else json_path
    rows = data["cases"]
    write_markdown(md_path, data["machine"], summarize(rows), rows,
                   os.path.relpath(png_path, os.path.dirname(os.path.abspath(md_path))), json_rel,
                   data.get("argv", []), data["elapsed_s"], matrix=data.get("matrix"), spread=data.get("repeat"))
