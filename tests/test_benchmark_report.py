"""The benchmark's report from its saved results (no timing here): the summary chart renders, and
benchmarks/RESULTS.md and the README's speed section say what benchmarks/results/cpu.json holds."""
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "cpu.json"


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
    summary = bench.summarize(saved["cases"])
    bench.write_markdown(md, saved["machine"], summary, saved["cases"], "results/cpu.png",
                         "benchmarks/results/cpu.json", saved.get("argv", []), saved["elapsed_s"])
    assert md.read_text() == (REPO / "benchmarks" / "RESULTS.md").read_text()
    rows = [line for line in md.read_text().splitlines() if line.startswith("| (")]
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
    assert not s["slower_beyond_noise"] and "no case slower beyond noise" in readme
