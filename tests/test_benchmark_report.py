"""The benchmark's report from its saved results (no timing here): the summary chart renders, and
benchmarks/RESULTS.md and the README's speed section say what the results JSON it names holds;
the benchmark matrix (benchmarks/matrix.py) and the report's statistics from synthetic rows."""
import importlib.util
import json
import math
import random
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _reported_results():
    """The results JSON benchmarks/RESULTS.md reports: results/cpu.json after `make bench`,
    results/cpu_full.json after `make bench BENCH_ARGS=--full`."""
    match = re.search(r"Raw results: `([^`]+\.json)`", (REPO / "benchmarks" / "RESULTS.md").read_text())
    assert match, "benchmarks/RESULTS.md names no results JSON"
    return REPO / match.group(1)


RESULTS = _reported_results()


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bnext_bench", REPO / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def saved():
    with open(RESULTS) as f:
        return json.load(f)


def test_chart_renders_from_the_saved_results(bench, saved, tmp_path):
    path = tmp_path / "cpu.png"
    bench.chart(saved["cases"], path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 20_000


def test_results_md_is_the_report_of_the_saved_results(bench, saved, tmp_path):
    """RESULTS.md as `bench.py --from-json` writes it: every case one table row, the chart linked."""
    md = tmp_path / "RESULTS.md"
    bench.write_results_md(saved, md, tmp_path / "results" / RESULTS.with_suffix(".png").name, RESULTS)
    assert md.read_text() == (REPO / "benchmarks" / "RESULTS.md").read_text()
    rows = [line for line in md.read_text().splitlines() if line.startswith("| (")]
    if len(saved["cases"]) <= bench.report.MAX_TABLE_ROWS:
        assert len(rows) == len(saved["cases"])


def test_readme_speed_numbers_are_the_saved_results(bench, saved):
    s = bench.summarize(saved["cases"])
    readme = " ".join((REPO / "README.md").read_text().split())
    phases = s["geomean_speedup_by_phase"]
    for claim in [
        f"over {s['cases']} cases",
        f"**{s['geomean_speedup']:.2f}x `torch.nn` batch norm**",
        f"train forward {phases['train_fwd']:.2f}x, forward+backward {phases['train_fwdbwd']:.2f}x, "
        f"eval {phases['eval_fwd']:.2f}x",
        f"{s['geomean_speedup_vs_compile']:.2f}x `torch.compile`d torch batch norm",
        f"is {s['geomean_floor_ratio']:.2f} (geometric mean)",
    ]:
        assert claim in readme, claim
    # The README states how many cases were slower than torch beyond noise (the target is none; the
    # benchmark's summary reports it as met or not, this test only keeps the README true to the run).
    n = len(s["slower_beyond_noise"])
    slower = "no case slower beyond noise" if n == 0 else f"{n} of {s['cases']} cases slower than torch beyond noise"
    assert slower in readme, slower


# ---------------------------------------------------------------------------------------------
# The benchmark matrix (benchmarks/matrix.py, benchmarks/matrix.json)

# Models whose shapes the regeneration test rebuilds (all of them take about a minute on meta):
# one per extraction path (plain classification, RegNet's CPU-computed widths, inception's
# auxiliary head and second resolution, SSDlite and R-CNN heads, segmentation, video).
REGENERATED = {"resnet18", "mobilenet_v3_small", "regnet_x_400mf", "inception_v3", "ssdlite320_mobilenet_v3_large",
               "maskrcnn_resnet50_fpn_v2", "lraspp_mobilenet_v3_large", "r3d_18"}


@pytest.fixture(scope="module")
def mx(bench):
    return bench.mx


@pytest.fixture(scope="module")
def rp(bench):
    return bench.report


@pytest.fixture(scope="module")
def committed(mx):
    return mx.load()


def _pairs(cases, keep=lambda family, source: True):
    """{(shape, family, source)} of case records, for comparing provenance."""
    return {(tuple(c["shape"]), f, s) for c in cases for f, names in c["sources"].items() for s in names if keep(f, s)}


def test_matrix_regeneration_reproduces_the_committed_file(mx, committed):
    in_subset = lambda family, source: source.split("@")[0] in REGENERATED  # noqa: E731
    regenerated, _ = mx.build(mx.model_sources(lambda name: name in REGENERATED))
    assert _pairs(regenerated) == _pairs(committed["cases"], in_subset)
    tables, _ = mx.build(list(mx.table_sources()) + list(mx.random_sources()))
    assert _pairs(tables) == _pairs(committed["cases"], lambda f, s: f in ("tabular", "sequence", "random"))
    assert committed["settings"] == json.loads(json.dumps(mx.settings()))


def test_every_torchvision_classification_model_with_batch_norm_is_in_a_family(mx):
    assert mx.unlisted_models_with_batch_norm() == []


def test_matrix_json_round_trip(mx, committed):
    text = (REPO / "benchmarks" / "matrix.json").read_text()
    assert mx.dumps(committed) == text
    assert json.loads(mx.dumps(committed)) == committed


def test_matrix_shapes_are_distinct_and_within_the_caps(mx, committed):
    cases = committed["cases"]
    shapes = [tuple(c["shape"]) for c in cases]
    assert len(set(shapes)) == len(shapes)
    for c in cases:
        assert 2 <= len(c["shape"]) <= 5
        assert math.prod(c["shape"]) <= mx.MAX_NUMEL
        assert mx.trainable(c["shape"])
        assert c["family"] == list(c["sources"])[0]  # the primary family is the first in FAMILIES order
        assert list(c["sources"]) == sorted(c["sources"], key=mx.FAMILIES.index)
    assert sum(c["sources"].get("random") is not None for c in cases) == mx.RANDOM_CASES
    assert committed["dropped_over_max_numel"], "no model shape reached the cap: the cap is untested"


def test_every_family_is_in_the_full_matrix_and_in_the_sample(bench, mx, committed):
    cases = committed["cases"]
    families = lambda cs: {f for c in cs for f in c["sources"]}  # noqa: E731
    assert families(cases) == set(mx.FAMILIES)
    for n in (len(mx.FAMILIES), bench.DEFAULT_SAMPLE, 50):
        sample = mx.sample_matrix(n, cases)
        assert len(sample) == n
        assert families(sample) == set(mx.FAMILIES)
        assert len({tuple(c["shape"]) for c in sample}) == n
    # Every rank and size bucket of the matrix is in a sample of a few dozen.
    sample = mx.sample_matrix(50, cases)
    assert {len(c["shape"]) for c in sample} == {2, 3, 4, 5}
    assert {mx.size_bucket(c["shape"]) for c in sample} == {mx.size_bucket(c["shape"]) for c in cases}


def test_sample_is_deterministic_and_independent_of_case_order(mx, committed):
    cases = committed["cases"]
    a = mx.sample_matrix(20, cases)
    assert a == mx.sample_matrix(20, cases)
    shuffled = list(cases)
    random.Random(0).shuffle(shuffled)
    assert a == mx.sample_matrix(20, shuffled)
    assert mx.sample_matrix(len(cases) + 1, cases) == sorted(cases, key=mx.case_order)


def test_quick_matrix_is_small_and_covers_every_rank(mx, committed):
    quick = mx.quick_matrix(committed["cases"])
    ranks = [len(c["shape"]) for c in quick]
    assert sorted(ranks) == [2, 3, 4, 4, 5]
    assert all(math.prod(c["shape"]) <= mx.QUICK_MAX_NUMEL for c in quick)


def test_build_dedupes_shapes_and_keeps_provenance(mx):
    big = (64, 1024, 32, 33)  # over MAX_NUMEL
    cases, dropped = mx.build([
        ("densenet", "densenet121@224", [(8, 64, 56, 56), (8, 64, 56, 56), big, (1, 256, 1, 1)]),
        ("resnet", "resnet50@224", [(8, 64, 56, 56)]),
        ("resnet", "resnet18@224", [(8, 64, 56, 56), (2, 64, 56, 56)]),
    ])
    assert math.prod(big) > mx.MAX_NUMEL
    assert dropped == {"densenet": 1}
    by_shape = {tuple(c["shape"]): c for c in cases}
    assert set(by_shape) == {(8, 64, 56, 56), (2, 64, 56, 56)}  # (1, 256, 1, 1): one value per channel
    shared = by_shape[(8, 64, 56, 56)]
    assert shared["family"] == "resnet"  # resnet comes before densenet in FAMILIES
    assert dict(shared["sources"]) == {"resnet": ["resnet18@224", "resnet50@224"], "densenet": ["densenet121@224"]}


def test_batch_sizes_rescale_the_extraction_batch(mx):
    shapes = list(mx._per_batch({(mx.EXTRACT_BATCH, 64, 7, 7), (mx.EXTRACT_BATCH * 512, 256, 7, 7)}))
    assert set(shapes) == {(b, 64, 7, 7) for b in mx.BATCHES} | {(512 * b, 256, 7, 7) for b in mx.BATCHES}
    with pytest.raises(RuntimeError, match="not a multiple"):
        list(mx._per_batch({(mx.EXTRACT_BATCH + 1, 8)}))


# ---------------------------------------------------------------------------------------------
# The report from synthetic result rows (no timing)

def _row(rp, shape, phase="train_fwd", dtype="float32", layout="nchw", bnext=1.0, torch=2.0, floor=1.0,
         compile_s=None, p25=None, p75=None, family="resnet"):
    r = {"shape": list(shape), "layout": layout, "dtype": dtype, "phase": phase, "bnext_s": bnext, "torch_s": torch,
         "floor_s": floor, "read_s": floor / 2, "write_s": floor / 2, "bnext_p25_s": bnext if p25 is None else p25,
         "torch_p75_s": torch if p75 is None else p75, "family": family, "source": f"{family}:x@1"}
    if compile_s is not None:
        r["compile_s"] = compile_s
    return rp.finish_row(r)


KIB256_F32 = (1, 1024, 8, 8)  # 65536 float32 values: exactly 256 KiB


def test_floor_targets_exclude_inputs_under_256_kib(rp):
    at = _row(rp, KIB256_F32, bnext=1.2, floor=1.0)
    half = _row(rp, KIB256_F32, dtype="bfloat16", bnext=1.2, floor=1.0)  # 128 KiB
    tiny = _row(rp, (2, 8, 4, 4), bnext=9.0, torch=0.9, floor=1.0)
    assert at["input_bytes"] == 256 * 1024 and at["floor_target"]
    assert not half["floor_target"] and not tiny["floor_target"]
    s = rp.summarize([at, half, tiny])
    assert s["floor_target_cases"] == 1
    assert s["geomean_floor_ratio_target"] == pytest.approx(1.2)
    assert s["worst_floor_ratio_target"] is at
    assert [r["floor_ratio"] for r in s["worst_floor_ratio_cases"]] == [pytest.approx(1.2)]
    # ... but they count for the speed targets and the all-case floor figures.
    assert s["geomean_speedup"] == pytest.approx((2.0 / 1.2 * 2.0 / 1.2 * 0.1) ** (1 / 3))
    assert s["worst_floor_ratio"] is tiny and s["worst_speedup"] is tiny
    targets = s["targets"]
    assert targets["geomean_floor_ratio<=1.3 (inputs >= 256 KiB)"]
    assert targets["worst_floor_ratio<=1.6 (inputs >= 256 KiB)"]
    assert not targets["geomean_speedup>=2.0"]


def test_summary_statistics(rp):
    rows = [_row(rp, (32, 64, 56, 56), phase=p, bnext=b, torch=t, floor=f, compile_s=c)
            for p, b, t, f, c in [("train_fwd", 1.0, 4.0, 1.0, 3.0), ("train_fwdbwd", 2.0, 4.0, 1.0, None),
                                  ("eval_fwd", 1.0, 1.0, 0.5, 2.0)]]
    rows += [_row(rp, (32, 256, 14, 14), phase="eval_fwd", bnext=3.0, torch=1.0, floor=1.5, p25=2.5, p75=1.5),
             _row(rp, (32, 256, 14, 14), phase="train_fwd", bnext=3.0, torch=1.0, floor=1.0, p25=0.5, p75=1.5)]
    s = rp.summarize(rows)
    assert s["cases"] == 5
    assert s["geomean_speedup"] == pytest.approx((4 * 2 * 1 * (1 / 3) * (1 / 3)) ** (1 / 5))
    assert s["geomean_speedup_vs_compile"] == pytest.approx((3 * 2) ** 0.5) and s["compile_cases"] == 2
    assert s["geomean_speedup_by_phase"]["train_fwd"] == pytest.approx((4 / 3) ** 0.5)
    assert s["geomean_floor_ratio_target"] == pytest.approx((1 * 2 * 2 * 2 * 3) ** (1 / 5))
    assert s["worst_floor_ratio_target"]["floor_ratio"] == pytest.approx(3.0)
    assert [r["speedup"] for r in s["worst_speedup_cases"]] == sorted(r["speedup"] for r in rows)
    # Slower beyond noise: slower and bnext's 25th percentile above torch's 75th (only the eval row).
    assert [(tuple(r["shape"]), r["phase"]) for r in s["slower_beyond_noise"]] == [((32, 256, 14, 14), "eval_fwd")]
    assert s["slower_beyond_noise_count"] == 1 and not s["targets"]["no_case_slower_beyond_noise"]
    text = rp.summary_text(s)
    assert "worst floor ratios (inputs >= 256 KiB): 3.00 (32, 256, 14, 14)" in text
    assert "slower than torch beyond noise (1)" in text


def test_repeated_runs_combine_to_medians_and_report_the_spread(rp):
    def run(scale):
        return [_row(rp, (32, 64, 56, 56), bnext=1.0 * scale, torch=2.0, floor=1.0),
                _row(rp, (8, 64, 56, 56), phase="eval_fwd", bnext=0.5, torch=1.0 * scale, floor=0.5)]

    runs = [run(1.0), run(1.2), run(0.8)]
    combined = rp.combine_runs(runs)
    assert [r["bnext_s"] for r in combined] == [pytest.approx(1.0), pytest.approx(0.5)]
    first = combined[0]
    assert first["speedup"] == pytest.approx(2.0) and first["floor_ratio"] == pytest.approx(1.0)
    assert first["runs"]["speedup"] == [pytest.approx(2.0), pytest.approx(2 / 1.2), pytest.approx(2 / 0.8)]
    assert first["speedup_spread"] == pytest.approx((2 / 0.8 - 2 / 1.2) / 2.0)
    assert first["time_spread"] == pytest.approx(0.4)
    assert combined[1]["time_spread"] == 0.0 and combined[1]["speedup_spread"] == pytest.approx(0.4)
    sp = rp.run_spread(runs)
    assert sp["runs"] == 3
    per_run = [rp.summarize(r)["geomean_speedup"] for r in runs]
    assert sp["geomean_speedup"]["per_run"] == pytest.approx(per_run)
    assert sp["geomean_speedup"]["min"] == pytest.approx(min(per_run))
    assert sp["geomean_speedup"]["max"] == pytest.approx(max(per_run))
    assert sp["median_case_speedup_spread"] == pytest.approx(((2 / 0.8 - 2 / 1.2) / 2.0 + 0.4) / 2)
    assert sp["median_case_time_spread"] == pytest.approx(0.2)
    assert "3 whole-matrix runs" in rp.spread_text(sp)
    assert rp.run_spread(runs[:1]) is None and rp.combine_runs(runs[:1]) is runs[0]
    with pytest.raises(ValueError, match="repeated runs must time the same cases"):
        rp.combine_runs([run(1.0), run(1.0)[:1]])


def _synthetic_run(rp, repeat=None):
    rows = []
    for i, (shape, family) in enumerate([((32, 64, 56, 56), "resnet"), ((1, 96, 7, 7), "mobilenet_v2"),
                                         ((4, 32, 8, 28, 28), "video"), ((256, 512), "tabular")]):
        for layout in (("nchw", "channels_last") if len(shape) >= 4 else ("nchw",)):
            for dtype in ("float32", "bfloat16"):
                for j, phase in enumerate(rp.PHASES):
                    rows.append(_row(rp, shape, phase, dtype, layout, bnext=1.0 + 0.1 * (i + j), torch=2.0,
                                     floor=1.0, compile_s=2.5 if dtype == "float32" else None, family=family))
    info = {"cpu_model": "test CPU", "logical_cpus": 2, "threads": 2, "cpu_isa": "avx2", "torch_version": "2",
            "python": "3", "load_average": [1.0, 1.0, 1.0], "date_utc": "2026-01-01 00:00 UTC", "malloc_tuned": True}
    return {"machine": info, "args": {"quick": False}, "argv": ["--sample", "4"], "elapsed_s": 60.0,
            "matrix": {"selection": "sample", "shapes": 4, "matrix_shapes": 3098, "families": None},
            "repeat": repeat, "cases": rows}


def test_results_md_of_a_matrix_run(bench, rp, tmp_path):
    runs = [_synthetic_run(rp)["cases"] for _ in range(2)]
    data = _synthetic_run(rp, repeat=rp.run_spread(runs))
    (tmp_path / "results").mkdir()
    md = tmp_path / "RESULTS.md"
    bench.write_results_md(data, md, tmp_path / "results" / "cpu.png", tmp_path / "results" / "cpu.json")
    text = md.read_text()
    for phase, (formula, _) in rp.FLOOR_FORMULAS.items():
        assert f"| {phase} | {formula} |" in text
    assert "sample of the generated matrix `benchmarks/matrix.json` (4 of its 3098 shapes" in text
    assert "2 whole-matrix runs" in text
    assert "## Per family" in text and "| video | 12 |" in text
    table_rows = [line for line in text.splitlines() if line.startswith("| (")]
    assert len(table_rows) == len(data["cases"])
    assert sum("(<256K)" in line for line in table_rows) == sum(not r["floor_target"] for r in data["cases"])
    assert "](results/cpu.png)" in text


def test_results_md_lists_the_worst_cases_of_a_long_run(bench, rp, tmp_path, monkeypatch):
    data = _synthetic_run(rp)
    monkeypatch.setattr(rp, "MAX_TABLE_ROWS", 10)
    monkeypatch.setattr(rp, "LISTED_WHEN_LONG", 3)
    md = tmp_path / "RESULTS.md"
    bench.write_results_md(data, md, tmp_path / "cpu.png", tmp_path / "cpu.json")
    text = md.read_text()
    assert f"{len(data['cases'])} cases: all of them are in" in text
    assert len([line for line in text.splitlines() if line.startswith("| (")]) == 6


def test_chart_renders_a_matrix_run(bench, rp, tmp_path):
    path = tmp_path / "cpu.png"
    bench.chart(_synthetic_run(rp)["cases"], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_output_paths_of_a_smoke_run_stay_in_out_dir(bench, tmp_path):
    args = bench.argparse.Namespace(out_dir=str(tmp_path), out="unused", no_markdown=False)
    assert bench.output_paths(args, "sample") == tuple(str(tmp_path / n) for n in ("cpu.json", "cpu.png", "RESULTS.md"))
    assert bench.output_paths(args, "quick")[2] is None
    assert bench.output_paths(args, "full")[0] == str(tmp_path / "cpu_full.json")


def test_unknown_family_is_refused(bench):
    args = bench.argparse.Namespace(families="resnet,nonet", quick=False, full=False, sample=3)
    with pytest.raises(SystemExit, match="unknown family nonet"):
        bench.select_cases(args)
