"""The benchmark summary: one compact table per op with fastabsld's time and its speed-up over each baseline.

Each benchmark names what it times with :func:`record` (the op, the case, the implementation, and
whether it is fastabsld's or a baseline); after ``pytest --benchmark-only`` the plugin in
``benchmarks/conftest.py`` prints, per op, fastabsld's median time, ``x <baseline>`` = the baseline's
median over fastabsld's (above 1: fastabsld is faster), the weighted / unweighted ratio where it
applies, the achieved GB/s from the bytes the op must move (and % of the GPU's peak bandwidth on a
GPU), and the bytes the loss keeps for its backward. The same rows go into ``--benchmark-json`` under
``"fastabsld_summary"``, which ``python -m benchmarks.compare_runs`` compares between two runs.

The machine context heads the summary: CPU model, the threads torch used, torch's version and the
load average, with a warning when the load exceeds the cores (the timings then say little).
"""

import dataclasses
import os
import platform

KEY = "summary"
JSON_KEY = "fastabsld_summary"
SUBJECT = "fastabsld"
# Peak DRAM bandwidth (bytes/s) of the GPUs whose % of peak the summary shows, by name fragment.
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}
TABLE_WIDTH = 100


def record(benchmark, *, op, case, impl, nbytes=None, device="cpu", dtype="fp32", saved_bytes=None,
           weighted_over_unweighted=None):
    """Names what ``benchmark`` times, for the summary (stored in its ``extra_info``).

    Args:
        benchmark: the pytest-benchmark fixture.
        op: the table it belongs to (``"kd_kl_div fwd+bwd"``).
        case: the row within the table (``"128x10"``); None for a baseline that serves every row of the op.
        impl: ``"fastabsld"`` for the timed fastabsld call; any other name is a baseline (its column is
            ``x <impl>``); None for a benchmark that only adds ``weighted_over_unweighted`` to the row.
        nbytes: the bytes the operation must read and write at least (for GB/s), or None.
        device: ``"cpu"`` or a CUDA device name (for % of peak bandwidth).
        dtype: the data type shown in the row.
        saved_bytes: bytes kept for the backward beyond the inputs, or None.
        weighted_over_unweighted: a measured time ratio to show in the row's ``w/unw`` column, or None.

    Returns:
        None
    """
    benchmark.extra_info[KEY] = {"op": op, "case": case, "impl": impl, "nbytes": nbytes, "device": str(device),
                                 "dtype": dtype, "saved_bytes": saved_bytes,
                                 "weighted_over_unweighted": weighted_over_unweighted}


@dataclasses.dataclass
class Row:
    """One row of an op's table: fastabsld's median time and its ratios over the baselines."""

    op: str
    case: str
    dtype: str
    median_s: float
    speedups: dict
    weighted_over_unweighted: float = None
    gbps: float = None
    peak_percent: float = None
    saved_bytes: int = None
    baseline_saved_bytes: dict = dataclasses.field(default_factory=dict)

    def to_json(self):
        """The row as plain JSON values.

        Returns:
            dict: every field.
        """
        return dataclasses.asdict(self)


def _peak_bandwidth(device):
    return next((peak for name, peak in PEAK_BANDWIDTH.items() if name in device), None)


def collect(benchmarks):
    """The summary records of finished benchmarks with their medians.

    Args:
        benchmarks: pytest-benchmark's Metadata objects (``config._benchmarksession.benchmarks``), or dicts
            of its JSON (``{"extra_info": ..., "stats": {"median": ...}}``).

    Returns:
        list of dict: the records of :func:`record` plus ``median_s``.
    """
    found = []
    for bench in benchmarks:
        if isinstance(bench, dict):
            extra, stats = bench.get("extra_info", {}), bench.get("stats") or {}
            median = stats.get("median")
        else:
            extra, median = bench.extra_info, (bench.stats.median if bench.stats else None)
        if KEY in extra and median:
            found.append({**extra[KEY], "median_s": float(median)})
    return found


def build_rows(records):
    """The summary rows, in the order the ops and cases were first timed.

    Args:
        records: what :func:`collect` returns.

    Returns:
        list of Row: one per (op, case) that fastabsld was timed on.
    """
    rows = []
    for subject in (r for r in records if r["impl"] == SUBJECT):
        baselines = [r for r in records if r["op"] == subject["op"] and r["impl"] not in (SUBJECT, None)
                     and r["case"] in (subject["case"], None)]
        speedups = {b["impl"]: b["median_s"] / subject["median_s"] for b in baselines}
        ratio = next((r["weighted_over_unweighted"] for r in records if r["op"] == subject["op"]
                      and r["case"] == subject["case"] and r.get("weighted_over_unweighted") is not None), None)
        gbps = subject["nbytes"] / subject["median_s"] / 1e9 if subject.get("nbytes") else None
        peak = _peak_bandwidth(subject["device"])
        rows.append(Row(op=subject["op"], case=subject["case"], dtype=subject["dtype"], median_s=subject["median_s"],
                        speedups=speedups, weighted_over_unweighted=ratio, gbps=gbps,
                        peak_percent=100 * gbps * 1e9 / peak if gbps and peak else None,
                        saved_bytes=subject.get("saved_bytes"),
                        baseline_saved_bytes={b["impl"]: b["saved_bytes"] for b in baselines
                                              if b.get("saved_bytes") is not None}))
    return rows


def _time(seconds):
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _bytes(n):
    return "-" if n is None else (f"{n / 1024:.0f} KiB" if n >= 1024 else f"{n} B")


def format_table(rows):
    """One op's rows as an aligned text table (columns only for what some row has).

    Args:
        rows: the Rows of one op.

    Returns:
        str: the table, header first, no wider than needed (the default columns fit 100 characters).
    """
    baselines = list(dict.fromkeys(name for row in rows for name in row.speedups))
    columns = [("case", lambda r: r.case), ("dtype", lambda r: r.dtype), ("fastabsld", lambda r: _time(r.median_s))]
    columns += [(f"x {name}", lambda r, n=name: f"{r.speedups[n]:.2f}" if n in r.speedups else "-")
                for name in baselines]
    if any(r.weighted_over_unweighted is not None for r in rows):
        columns.append(("w/unw", lambda r: "-" if r.weighted_over_unweighted is None
                        else f"{r.weighted_over_unweighted:.3f}"))
    if any(r.gbps is not None for r in rows):
        columns.append(("GB/s", lambda r: "-" if r.gbps is None else f"{r.gbps:.3g}"))
    if any(r.peak_percent is not None for r in rows):
        columns.append(("% peak", lambda r: "-" if r.peak_percent is None else f"{r.peak_percent:.0f}"))
    if any(r.saved_bytes is not None for r in rows):
        columns.append(("saved", lambda r: _bytes(r.saved_bytes)))
        for name in dict.fromkeys(n for r in rows for n in r.baseline_saved_bytes):
            columns.append((f"saved {name}", lambda r, n=name: _bytes(r.baseline_saved_bytes.get(n))))
    cells = [[title for title, _ in columns]] + [[cell(row) for _, cell in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(text.ljust(w) if i == 0 else text.rjust(w) for i, (text, w) in enumerate(zip(line, widths)))
             for line in cells]
    return "\n".join(lines)


def physical_cores():
    """The machine's physical cores (hyper-threads not counted), as far as this process may use them.

    Returns:
        int: at least 1.
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/proc/cpuinfo") as f:
            cores, physical = set(), None
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    physical = value.strip()
                elif key == "core id":
                    cores.add((physical, value.strip()))
    except OSError:
        cores = set()
    return max(1, min(usable, len(cores) or usable))


def cpu_model():
    """The CPU's model name (``/proc/cpuinfo``, else ``platform.processor()``).

    Returns:
        str: the name, or ``"unknown CPU"``.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_context(threads):
    """What the timings depend on: CPU, threads, torch, load.

    Args:
        threads: the threads torch ran with.

    Returns:
        dict: ``cpu``, ``cores``, ``threads``, ``torch``, ``load_average`` (1 minute) and ``gpu`` (a name or None).
    """
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cores": physical_cores(), "threads": threads, "torch": torch.__version__,
            "load_average": load, "gpu": gpu}


def format_summary(rows, context):
    """The whole summary: the machine context, a warning when loaded, then one table per op.

    Args:
        rows: every Row.
        context: what :func:`machine_context` returns.

    Returns:
        str: the text to print.
    """
    load = context.get("load_average")
    lines = [f"fastabsld benchmark summary: {context['cpu']}" + (f", GPU {context['gpu']}" if context["gpu"] else ""),
             f"{context['cores']} cores, torch threads {context['threads']}, torch {context['torch']}"
             + (f", load average {load:.2f}" if load is not None else ""),
             "x <baseline>: the baseline's median time over fastabsld's (above 1: fastabsld is faster)"]
    if load is not None and load > context["cores"]:
        lines.append(f"WARNING: load average {load:.2f} > {context['cores']} cores: other work shares the machine, "
                     f"timings unreliable")
    for op in dict.fromkeys(row.op for row in rows):
        lines += ["", op, format_table([row for row in rows if row.op == op])]
    return "\n".join(lines)
