"""The benchmarks' pytest plugin: pinned threads, narrow tables, and the summary after ``--benchmark-only``.

- ``--bench-threads N`` (default: the physical cores) sets torch's threads before any benchmark runs, so
  eager PyTorch, torch.compile and fastabsld run on equal terms whatever else the machine does.
- pytest-benchmark's own tables show median, IQR and rounds unless ``--benchmark-columns`` says otherwise.
- After the run, :mod:`benchmarks.summary` prints one table per op (fastabsld's median and its speed-up over
  each baseline) under the machine's context, and adds the same rows to ``--benchmark-json``.
"""

import pytest
import torch

from benchmarks import summary

NARROW_COLUMNS = ["median", "iqr", "rounds"]
THREADS = pytest.StashKey[int]()


def pytest_addoption(parser):
    parser.addoption("--bench-threads", type=int, default=None, metavar="N",
                     help="torch threads of every benchmark (default: the machine's physical cores)")


def _benchmarking(config):
    return not config.getoption("benchmark_disable", default=False) and config.pluginmanager.hasplugin("benchmark")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if not _benchmarking(config):
        return
    threads = config.getoption("bench_threads")
    if threads is not None and threads < 1:
        raise pytest.UsageError(f"--bench-threads must be a positive integer, got {threads}")
    threads = threads or summary.physical_cores()
    torch.set_num_threads(threads)
    config.stash[THREADS] = threads
    if config.getoption("benchmark_columns", default=None) is None:
        config.option.benchmark_columns = NARROW_COLUMNS



def _rows_and_context(config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or THREADS not in config.stash:
        return None, None
    rows = summary.build_rows(summary.collect(session.benchmarks))
    return rows, summary.machine_context(config.stash[THREADS])


def pytest_benchmark_update_json(config, benchmarks, output_json):
    rows, context = _rows_and_context(config)
    if rows:
        output_json[summary.JSON_KEY] = {"context": context, "rows": [row.to_json() for row in rows]}


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    rows, context = _rows_and_context(config)
    if rows:
        terminalreporter.write_line("")
        for line in summary.format_summary(rows, context).splitlines():
            terminalreporter.write_line(line)
