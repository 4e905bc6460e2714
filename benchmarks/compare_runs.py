"""Compares the speed-ups of two benchmark runs and flags those that fell beyond the run-to-run spread.

Save a baseline, change the code, run again, compare::

    python -m pytest benchmarks --benchmark-only --benchmark-json base.json
    python -m pytest benchmarks --benchmark-only --benchmark-json new.json
    python -m benchmarks.compare_runs base.json new.json

Ratios are compared, not times: fastabsld's speed-up over each baseline measured in the same run
(``x eager``, ``x compile``, ...) and the weighted / unweighted cost. Both runs' times depend on the
machine's load, their ratios much less. A speed-up that fell by more than ``--tolerance`` (relative),
or a weighted / unweighted cost that rose by more, is flagged, and the exit status is 1.

The default tolerance is the run-to-run spread of these ratios measured on a 2-core machine with
nothing else running (``DEFAULT_TOLERANCE``): over three runs of the same code there (29 ratios,
every pair of runs) the median change of a ratio was 10%, the 95th percentile 49% in either
direction and the largest fall of a speed-up 37%, mostly at the shapes whose cases run for a
millisecond or more and the training step. On a loaded machine the spread is far larger: compare
runs made under the same conditions, and pin the threads (``--bench-threads``).
"""

import argparse
import json
import sys

from benchmarks.summary import JSON_KEY, TABLE_WIDTH

# Above the largest fall of a speed-up between repeated runs of the same code (37%; 2-core CPU, idle machine).
DEFAULT_TOLERANCE = 0.4


def load_rows(path):
    """The summary rows of a ``--benchmark-json`` file, keyed by (op, case).

    Args:
        path: the JSON file.

    Returns:
        dict: ``{(op, case): row dict}``.

    Raises:
        ValueError: the file is not JSON or holds no fastabsld summary (run with ``--benchmark-only``).
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {path}: {error}") from error
    summary = data.get(JSON_KEY) if isinstance(data, dict) else None
    if not summary or not summary.get("rows"):
        raise ValueError(f"{path} holds no fastabsld summary: write it with "
                         f"`pytest benchmarks --benchmark-only --benchmark-json {path}`")
    return {(row["op"], row["case"]): row for row in summary["rows"]}


def ratios(row):
    """A row's comparable ratios, each with the direction that is better.

    Args:
        row: a summary row (dict).

    Returns:
        dict: ``{name: (value, higher_is_better)}``.
    """
    found = {f"x {name}": (value, True) for name, value in row["speedups"].items()}
    if row.get("weighted_over_unweighted") is not None:
        found["w/unw"] = (row["weighted_over_unweighted"], False)
    return found


def compare(base, new, tolerance=DEFAULT_TOLERANCE):
    """Every ratio the two runs share, with its relative change and whether it fell beyond ``tolerance``.

    Args:
        base: ``load_rows`` of the baseline run.
        new: ``load_rows`` of the new run.
        tolerance: the relative change that counts as a regression.

    Returns:
        list of dict: ``op``, ``case``, ``ratio``, ``base``, ``new``, ``change`` (new / base - 1), ``fell`` (bool).
    """
    found = []
    for key in (k for k in base if k in new):
        new_ratios = ratios(new[key])
        for name, (old_value, higher_is_better) in ratios(base[key]).items():
            if name not in new_ratios:
                continue
            value = new_ratios[name][0]
            change = value / old_value - 1
            fell = change < -tolerance if higher_is_better else change > tolerance
            found.append({"op": key[0], "case": key[1], "ratio": name, "base": old_value, "new": value,
                          "change": change, "fell": fell})
    return found


def format_comparison(found, tolerance):
    """The comparison as text: one line per ratio, grouped by op, regressions marked.

    Args:
        found: what :func:`compare` returns.
        tolerance: the tolerance used (stated in the header).

    Returns:
        str: the text.
    """
    lines = [f"ratios of the new run against the baseline (flagged: fell by more than {tolerance:.0%})"]
    for op in dict.fromkeys(item["op"] for item in found):
        lines += ["", op[:TABLE_WIDTH]]
        for item in (i for i in found if i["op"] == op):
            flag = "  FELL" if item["fell"] else ""
            lines.append(f"  {item['case']:<22} {item['ratio']:<12} {item['base']:>9.3f} -> {item['new']:>9.3f} "
                         f"({item['change']:+.0%}){flag}")
    fell = sum(item["fell"] for item in found)
    lines += ["", f"{fell} of {len(found)} ratios fell beyond the tolerance"]
    return "\n".join(lines)


def main(argv=None):
    """Command line: ``python -m benchmarks.compare_runs BASE.json NEW.json [--tolerance T]``.

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).

    Returns:
        int: 0 when no ratio fell, 1 when some did, 2 on bad input.
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare_runs", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("base", help="--benchmark-json file of the baseline run")
    parser.add_argument("new", help="--benchmark-json file of the new run")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"relative change that counts as a regression (default {DEFAULT_TOLERANCE}: the measured "
                             "run-to-run spread on an idle 2-core machine)")
    args = parser.parse_args(argv)
    if not args.tolerance > 0:
        parser.error(f"--tolerance must be positive, got {args.tolerance}")
    try:
        base, new = load_rows(args.base), load_rows(args.new)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    found = compare(base, new, args.tolerance)
    if not found:
        print("error: the two runs share no benchmark case", file=sys.stderr)
        return 2
    print(format_comparison(found, args.tolerance))
    return 1 if any(item["fell"] for item in found) else 0


if __name__ == "__main__":
    sys.exit(main())
