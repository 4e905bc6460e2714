"""The benchmark summary (benchmarks/summary.py, benchmarks/conftest.py) and the run comparison (compare_runs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import compare_runs, summary

ROOT = Path(__file__).resolve().parents[2]

TINY_BENCH = '''
import time

import torch

from benchmarks import summary


def _sleeper(seconds):
    def run():
        time.sleep(seconds)
    return run


def test_fast(benchmark):
    benchmark.extra_info["threads"] = torch.get_num_threads()
    summary.record(benchmark, op="sleep", case="1 ms", impl="fastabsld", nbytes=10 ** 6, saved_bytes=2048)
    benchmark.pedantic(_sleeper(0.001), rounds=5)


def test_slow(benchmark):
    summary.record(benchmark, op="sleep", case="1 ms", impl="eager", saved_bytes=4096)
    benchmark.pedantic(_sleeper(0.003), rounds=5)


def test_everyone(benchmark):
    summary.record(benchmark, op="sleep", case=None, impl="compile")
    benchmark.pedantic(_sleeper(0.002), rounds=5)


def test_pair(benchmark):
    summary.record(benchmark, op="sleep", case="1 ms", impl=None, weighted_over_unweighted=1.25)
    benchmark.pedantic(_sleeper(0.0001), rounds=2)
'''


def _run_pytest(args, cwd):
    """pytest in a subprocess; outside the repository the plugin is loaded by name (inside, as a conftest)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    plugin = [] if Path(cwd) == ROOT else ["-p", "benchmarks.conftest"]
    return subprocess.run([sys.executable, "-m", "pytest", *plugin, "-q", "-p", "no:cacheprovider",
                           "--rootdir", str(cwd), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _ratios_from_own_timings(data):
    """x <baseline> of every summary row, recomputed from the JSON's own medians."""
    medians = {(b["extra_info"]["summary"]["op"], b["extra_info"]["summary"]["case"],
                b["extra_info"]["summary"]["impl"]): b["stats"]["median"]
               for b in data["benchmarks"] if "summary" in b["extra_info"]}
    expected = {}
    for (op, case, impl), median in medians.items():
        if impl == "fastabsld":
            expected[(op, case)] = {other_impl: other / median for (o, c, other_impl), other in medians.items()
                                    if o == op and c in (case, None) and other_impl not in ("fastabsld", None)}
    return expected


def test_the_summary_ratios_are_the_benchmarks_own_timings(tmp_path):
    (tmp_path / "bench_tiny.py").write_text(TINY_BENCH)
    out = tmp_path / "run.json"
    proc = _run_pytest(["bench_tiny.py", "--benchmark-only", f"--benchmark-json={out}", "--bench-threads", "1"],
                       tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    rows = data[summary.JSON_KEY]["rows"]
    assert len(rows) == 1
    row = rows[0]
    expected = _ratios_from_own_timings(data)[("sleep", "1 ms")]
    assert row["speedups"] == pytest.approx(expected, rel=1e-12)
    assert row["speedups"]["eager"] > 2 and row["speedups"]["compile"] > 1.4  # 3 ms and 2 ms over 1 ms
    assert row["weighted_over_unweighted"] == 1.25
    fast = next(b for b in data["benchmarks"] if b["name"] == "test_fast")
    assert row["gbps"] == pytest.approx(1e6 / fast["stats"]["median"] / 1e9)
    assert fast["extra_info"]["threads"] == 1 and data[summary.JSON_KEY]["context"]["threads"] == 1
    # The printed table shows the same ratios, and the header the machine.
    text = proc.stdout
    assert "fastabsld benchmark summary:" in text and "torch threads 1" in text
    table = text[text.index("\nsleep\n"):].splitlines()
    assert table[2].split()[0:2] == ["case", "dtype"]
    line = next(line for line in table if line.startswith("1 ms"))
    assert f"{row['speedups']['eager']:.2f}" in line and f"{row['speedups']['compile']:.2f}" in line
    assert "1.250" in line and "2 KiB" in line and "4 KiB" in line
    block = text[text.index("fastabsld benchmark summary"):].split("\n\n")
    assert max(len(line) for part in block[:-1] for line in part.splitlines()) <= 100


def test_the_real_kd_benchmark_feeds_the_summary(tmp_path):
    out = tmp_path / "kd.json"
    proc = _run_pytest([str(ROOT / "benchmarks" / "bench_kd_kl_div.py"), "-k", "128x10 and not compile",
                        "--benchmark-only", "--benchmark-max-time=0.02", "--benchmark-min-rounds=3",
                        f"--benchmark-json={out}"], ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {row["case"]: row for row in data[summary.JSON_KEY]["rows"]}
    assert set(rows) == {"128x10", "128x10 weighted"}
    own = _ratios_from_own_timings(data)
    for case, row in rows.items():
        assert row["speedups"] == pytest.approx(own[(row["op"], case)], rel=1e-12)
        assert set(row["speedups"]) == {"eager"}
        assert row["saved_bytes"] <= 128 * 10 * 4 + 64 < row["baseline_saved_bytes"]["eager"]
    assert rows["128x10"]["weighted_over_unweighted"] > 0


def _row(op="op", case="c", **speedups):
    return {"op": op, "case": case, "speedups": speedups, "weighted_over_unweighted": speedups.pop("wu", None)}


def test_build_rows_pairs_each_case_with_its_baselines():
    records = [
        {"op": "a", "case": "1", "impl": "fastabsld", "median_s": 2.0, "nbytes": 4e9, "device": "cpu", "dtype": "fp32"},
        {"op": "a", "case": "1", "impl": "eager", "median_s": 6.0, "device": "cpu", "dtype": "fp32"},
        {"op": "a", "case": "2", "impl": "fastabsld", "median_s": 1.0, "device": "cuda NVIDIA H100 80GB HBM3",
         "nbytes": 3.35e12 * 0.5, "dtype": "bf16"},
        {"op": "a", "case": "2", "impl": "eager", "median_s": 5.0, "device": "cpu", "dtype": "bf16"},
        {"op": "a", "case": None, "impl": "released", "median_s": 10.0, "device": "cpu", "dtype": "fp32"},
        {"op": "b", "case": "1", "impl": "eager", "median_s": 1.0, "device": "cpu", "dtype": "fp32"},
    ]
    rows = summary.build_rows(records)
    assert [(r.op, r.case) for r in rows] == [("a", "1"), ("a", "2")]
    assert rows[0].speedups == {"eager": 3.0, "released": 5.0} and rows[0].gbps == 2.0
    assert rows[1].speedups == {"eager": 5.0, "released": 10.0} and rows[1].peak_percent == pytest.approx(50.0)
    assert rows[0].peak_percent is None
    table = summary.format_table(rows)
    assert table.splitlines()[0].split() == ["case", "dtype", "fastabsld", "x", "eager", "x", "released", "GB/s",
                                             "%", "peak"]


def test_the_context_warns_when_the_load_exceeds_the_cores():
    context = {"cpu": "x", "cores": 2, "threads": 2, "torch": "2", "load_average": 3.5, "gpu": None}
    assert "WARNING: load average 3.50 > 2 cores" in summary.format_summary([], context)
    assert "WARNING" not in summary.format_summary([], {**context, "load_average": 1.0})
    assert 1 <= summary.physical_cores() <= os.cpu_count()


def test_compare_runs_flags_ratios_that_fell_beyond_the_tolerance():
    base = {("op", "c"): _row(eager=4.0, compile=2.0, wu=1.0)}
    new = {("op", "c"): _row(eager=2.9, compile=1.9, wu=1.3)}
    found = {item["ratio"]: item for item in compare_runs.compare(base, new, tolerance=0.2)}
    assert found["x eager"]["fell"] and found["x eager"]["change"] == pytest.approx(-0.275)
    assert not found["x compile"]["fell"]
    assert found["w/unw"]["fell"]  # a cost ratio that rose
    assert not compare_runs.compare(base, new, tolerance=0.5)[0]["fell"]


def test_compare_runs_command(tmp_path, capsys):
    def write(name, rows):
        path = tmp_path / name
        path.write_text(json.dumps({summary.JSON_KEY: {"context": {}, "rows": rows}}))
        return str(path)

    base = write("base.json", [_row(eager=4.0)])
    same = write("same.json", [_row(eager=3.9)])
    worse = write("worse.json", [_row(eager=2.0)])
    assert compare_runs.main([base, same]) == 0
    assert compare_runs.main([base, worse]) == 1
    assert "FELL" in capsys.readouterr().out
    (tmp_path / "plain.json").write_text(json.dumps({"benchmarks": []}))
    assert compare_runs.main([base, str(tmp_path / "plain.json")]) == 2
    assert "holds no fastabsld summary" in capsys.readouterr().err
