"""A tiny smoke run of the benchmark: shape of the output only (benchmarks are not timed tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_cli_writes_table_json_and_plot(tmp_path):
    out, plot = tmp_path / "bench.json", tmp_path / "bench.html"
    proc = subprocess.run([sys.executable, "-m", "flash", "bench", "assets/examples/cat.jpg",
                           "assets/examples/coffee_pan.mp4", "--max-new-tokens", "8", "--warmup", "1",
                           "--json", str(out),
                           "--plot", str(plot)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "| all | flash |" in proc.stdout and "Machine:" in proc.stdout
    report = json.loads(out.read_text())
    for method in ("ar", "eagle", "flash", "flash-tree", "pld"):
        agg = report["methods"][method]
        for key in ("tokens_per_s", "speedup", "tau", "acceptance_rate", "time_split", "identical"):
            assert key in agg
        assert agg["identical"] is True
    assert report["methods"]["ar"]["speedup"] == 1.0
    assert set(report["by_kind"]) == {"image", "video"}
    assert report["machine"]["torch"] and report["machine"]["cpu_isa"] and report["mismatches"] == []
    assert len(report["samples"]) == 2 * 5
    assert "plotly" in plot.read_text()[:5000].lower()
