"""``make gpu-check``: everything fastabsld can only show on a GPU, in one command, with a one-screen summary.

On a CUDA machine, after the build (``make gpu-check`` builds first):

1. the environment: device, torch / triton / CUDA versions, whether ``fastabsld._C`` holds its CUDA
   kernels and whether the Triton kernels import;
2. every test marked ``cuda`` (the Triton KD kernels and the CUDA PGD extension against the reference
   at the benchmark shapes and dtypes, ``torch.compile(fullgraph=True)`` on CUDA tensors, the README's
   CUDA-graph capture replayed against an uncaptured run, a 2-process nccl run when 2 GPUs exist) and
   the op-level test modules, whose ``device`` fixture then includes CUDA;
3. ``benchmarks.gpu_report``: time and achieved GB/s against the device's peak per op and shape.

Everything lands in one JSON file (``--json``, default ``gpu-check.json``). Every skipped test is listed
with its reason; a failure, an error, or a skip other than the 2-GPU test on a 1-GPU machine makes the
exit status non-zero. Without a GPU it says so and exits with status 1.

    python -m benchmarks.gpu_check [--json gpu-check.json] [--iters 30] [--skip-report]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# The test modules run on the GPU: the CUDA-only ones and the op-level ones with a CUDA device parameter.
TEST_TARGETS = ("tests/cuda", "tests/ops", "tests/kernels", "tests/methods", "tests/test_loss.py", "tests/test_attack.py",
                "tests/test_metrics.py", "tests/test_temperature.py")
# Skips that are expected on some GPU machines (substring of the reason).
ALLOWED_SKIPS = ("needs 2 GPUs",)


def environment():
    """What the check runs on: device, versions, and which kernels are there.

    Returns:
        dict: JSON-friendly facts.
    """
    import fastabsld

    facts = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "fastabsld": fastabsld.__version__, "extension": fastabsld.HAS_EXTENSION,
             "extension_cuda_kernels": fastabsld.has_cuda_kernels(), "triton": fastabsld.HAS_TRITON,
             "gpus": torch.cuda.device_count()}
    try:
        import triton

        facts["triton_version"] = triton.__version__
    except ImportError:
        facts["triton_version"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                     memory_gib=round(props.total_memory / 2 ** 30, 1))
    return facts


def parse_junit(path):
    """Counts and the non-passing cases of a pytest JUnit XML report.

    Args:
        path: the XML file.

    Returns:
        dict: ``{"passed", "failed", "errors", "skipped": int, "problems": [{"test", "kind", "message"}]}``.
    """
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    problems = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
            continue
        kind = {"failure": "failed", "error": "errors", "skipped": "skipped"}[outcome.tag]
        counts[kind] += 1
        message = (outcome.get("message") or outcome.text or "").strip().splitlines()
        problems.append({"test": name, "kind": kind, "message": message[0][:200] if message else ""})
    return dict(counts, problems=problems)


def unexpected(tests):
    """The non-passing tests that make the check fail (everything but the allowed skips).

    Args:
        tests: the dict of :func:`parse_junit`.

    Returns:
        list of dict: the offending entries of ``tests["problems"]``.
    """
    return [p for p in tests["problems"]
            if not (p["kind"] == "skipped" and any(reason in p["message"] for reason in ALLOWED_SKIPS))]


def run_tests(junit_path):
    """Runs the GPU test modules in a subprocess (its own CUDA context, no interpreter); returns parse_junit's dict."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit_path}",
               *TEST_TARGETS]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    tail = "\n".join(done.stdout.strip().splitlines()[-15:])
    if not Path(junit_path).exists():
        raise RuntimeError(f"pytest wrote no report (exit {done.returncode}):\n{tail}\n{done.stderr[-2000:]}")
    return dict(parse_junit(junit_path), exit_status=done.returncode, tail=tail)


def report_lines(rows):
    """One line per report case: fastabsld's time and bandwidth, and its speed-up over the others.

    Args:
        rows: the rows of ``benchmarks.gpu_report`` (``case``, ``impl``, ``us``, ``GB/s``, ``peak%``,
            ``kernel peak%``, ``speed-up``).

    Returns:
        list of str: a header and one line per case.
    """
    cases = {}
    for row in rows:
        cases.setdefault(row["case"], {})[row["impl"]] = row
    lines = [f"{'case':<38} {'us':>9} {'GB/s':>7} {'peak%':>6} {'kern%':>6}  speed-up"]
    for case, impls in cases.items():
        if "fastabsld" not in impls:  # the training step rows carry their own speed-up
            for impl, row in impls.items():
                lines.append(f"{case[:38]:<38} {row['us']:>9.1f} {'':>7} {'':>6} {'':>6}  "
                             f"{impl}: {row.get('speed-up', 1.0):.2f}x")
            continue
        ours = impls["fastabsld"]

        def figure(key, digits=0):
            return "" if ours.get(key) is None else f"{ours[key]:.{digits}f}"

        ups = ", ".join(f"{impl} {row['us'] / ours['us']:.2f}x" for impl, row in impls.items() if impl != "fastabsld")
        lines.append(f"{case[:38]:<38} {ours['us']:>9.1f} {figure('GB/s'):>7} {figure('peak%'):>6} "
                     f"{figure('kernel peak%'):>6}  vs {ups}")
    return lines


def summary_lines(result):
    """The one-screen summary of a check's result.

    Args:
        result: ``{"environment", "tests", "report" (rows of gpu_report, or None), "seconds"}``.

    Returns:
        list of str: the lines.
    """
    env, tests = result["environment"], result["tests"]
    lines = [f"gpu-check on {env.get('device', '?')} (sm_{env.get('capability', '?').replace('.', '')}, "
             f"{env.get('sms', '?')} SMs, {env.get('gpus')} GPU(s)); torch {env['torch']} (CUDA {env['cuda']}), "
             f"triton {env['triton_version']}",
             f"extension CUDA kernels: {'yes' if env['extension_cuda_kernels'] else 'NO'}; "
             f"Triton kernels: {'yes' if env['triton'] else 'NO'}",
             f"tests: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
             f"{tests['skipped']} skipped"]
    for problem in tests["problems"]:
        lines.append(f"  {problem['kind']:<8} {problem['test']}: {problem['message']}")
    if result.get("report"):
        lines += report_lines(result["report"])
    bad = unexpected(tests)
    verdict = "PASS" if not bad and env["extension_cuda_kernels"] and env["triton"] else "FAIL"
    lines.append(f"{verdict} in {result['seconds']:.0f} s; full results: {result['json']}")
    return lines


def main(argv=None):
    """Runs the check.

    Args:
        argv: command-line arguments (None: ``sys.argv[1:]``).

    Returns:
        int: exit status (0 when everything passed).
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default="gpu-check.json", help="where to write the results (default: gpu-check.json)")
    p.add_argument("--iters", type=int, default=30, help="timed iterations per case of the report (default: 30)")
    p.add_argument("--skip-report", action="store_true", help="run the tests only")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False); run `make gpu-check` on a "
              "machine with an NVIDIA GPU and a CUDA build of torch", file=sys.stderr)
        return 1
    began = time.perf_counter()
    result = {"environment": environment(), "json": args.json}
    junit = Path(args.json).with_suffix(".junit.xml")
    result["tests"] = run_tests(str(junit))
    result["report"] = None
    if not args.skip_report:
        from benchmarks import gpu_report

        report_json = Path(args.json).with_suffix(".report.json")
        gpu_report.main(["--iters", str(args.iters), "--json", str(report_json)])
        result["report"] = json.loads(report_json.read_text())["rows"]
    result["seconds"] = time.perf_counter() - began
    Path(args.json).write_text(json.dumps(result, indent=1))
    lines = summary_lines(result)
    print("\n".join(lines))
    return 0 if lines[-1].startswith("PASS") else 1


if __name__ == "__main__":
    sys.exit(main())
