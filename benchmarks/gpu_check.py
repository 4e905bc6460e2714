"""``make gpu-check``: what fastabsld can only show on a GPU, from a clean clone, in phases with time limits.

    python3 -m benchmarks.gpu_check [--json gpu-check.json] [--venv .venv] [--iters 20] [--skip-report]
                                    [--keep-going]

Run it with the Python that should build the environment (``make gpu-check`` passes ``$(PYTHON)``): this
module's command line uses the standard library only, because it runs before the pinned packages exist.
The phases, each in its own process with its own time limit (seconds, budgeted for an H100 machine with
16 cores, a clean clone and a cold pip cache; 480 in all):

==============  ======  ============================================================================
phase           budget  what it does
==============  ======  ============================================================================
preflight           10  one line per failed prerequisite: Python against ``requires-python``, the
                        NVIDIA driver against the pinned torch's CUDA build, nvcc's major version
                        against torch's, free GPU memory and disk
install            150  ``make install``: the virtual environment and the pinned requirements
                        (~3.5 GB of torch and CUDA 13 wheels)
build               90  ``make build``: fastabsld._C with its CUDA kernels, MAX_JOBS = the cores
environment         15  in the new environment: torch is a CUDA build and sees the GPU,
                        fastabsld._C holds its CUDA kernels, the Triton kernels import
tests              120  the tests only a GPU can show (:func:`is_gpu_test`): the ``cuda``-marked ones
                        (torch.compile, CUDA graphs, nccl, the CUDA tensors of the op tests) and the
                        Triton kernels compiled and run on CUDA tensors; not the CPU-only bulk of the
                        suite nor the ahead-of-time Triton compiles
report-ops          65  ``benchmarks.gpu_report --skip-train``: each op against eager and torch.compile
report-train        30  ``benchmarks.gpu_report --skip-ops --skip-compile``: the CIFAR-10 training step
                        against the released loop (its torch.compile variant's cold compile alone
                        would take longer)
==============  ======  ============================================================================

A phase that runs out of time is stopped and named in the summary (the tests stop starting new tests
at their deadline, so the ones run are still reported). A failed preflight, install, build or
environment stops the run (``--keep-going`` carries on regardless). Every skipped test must be one
of :data:`EXPECTED_SKIPS`; anything else, a failure or an error, fails the check. The summary has one
line per phase (PASS / FAIL / TIMEOUT / NOT RUN, its time against its budget, the reason) and the
results land in one JSON file. Without an NVIDIA driver the preflight says so and the exit status is 1.

The module is also a pytest plugin (``-p benchmarks.gpu_check``) with the options the tests phase uses
(``--gpu-only``, ``--gpu-results``, ``--gpu-deadline``) and ``--gpu-predict``/``--simulate-h100``, which
collect the suite as on a 1-GPU H100 and predict every test's skip without running it: the suite's
``tests/benchmarks/test_gpu_check.py`` compares that prediction with :data:`EXPECTED_SKIPS`.
"""

import argparse
import ast
import functools
import importlib.util
import inspect
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (phase, time limit in seconds); see the module docstring for what each does and why it takes that long.
PHASES = (("preflight", 10), ("install", 150), ("build", 90), ("environment", 15), ("tests", 120),
          ("report-ops", 65), ("report-train", 30))
STOPPING_PHASES = ("preflight", "install", "build", "environment")

# The CUDA build of the pinned torch wheel (requirements.txt), known before it is installed; the suite
# checks it against the installed torch's torch.version.cuda.
PINNED_TORCH_CUDA = "13.0"
# Lowest Linux driver per CUDA major version (minor-version compatibility: any 13.x runs on R580).
MIN_DRIVER = {11: 450, 12: 525, 13: 580}
# The report's training step (WRN-34-10 teacher, ResNet-18 student, batch 128, torch.compile) and the
# Triton autotuning workspaces fit comfortably in this much free memory.
MIN_FREE_GPU_GIB = 16.0
# The venv with torch and its CUDA 13 libraries, plus the build.
MIN_FREE_DISK_GIB = 12.0

# Every test that skips on a GPU machine, with the reason it gives and why that is right there: (node id
# pattern with * for any text, a fragment of the skip reason, why). The suite simulates a GPU run and
# fails when a skip appears that is not here or an entry here no longer skips anything.
EXPECTED_SKIPS = (
    ("tests/cuda/test_nccl.py::test_two_gpus_over_nccl_with_sync_batchnorm", "needs 2 GPUs",
     "the 2-process nccl run needs a second GPU; it runs on a 2-GPU machine"),
    ("tests/ops/test_kd_loss.py::test_bad_values_raise[*-triton]", "on a GPU a bad value gives a NaN row",
     "the Triton kernels check no values on the device (no sync; asserts only with FASTABSLD_DEVICE_ASSERTS=1): "
     "tests/cuda/test_kd_loss_cuda.py::test_bad_rows_are_nan_without_device_asserts checks the NaN rows there"),
    ("tests/kernels/test_kd_kl_div_triton.py::test_bad_values_are_checked_on_cpu[*]",
     "on a GPU a bad value gives a NaN row", "as above: on CUDA tensors the same values give NaN rows"),
    ("tests/kernels/test_kd_kl_div_triton.py::test_unused_bad_temperature_is_not_an_error", "CPU-only path",
     "the check of used temperatures reads values on the host, which only CPU tensors do"),
    ("tests/kernels/test_kd_kl_div_triton.py::test_bad_weight_values_are_value_errors[*]",
     "weight values are read on the host only for CPU tensors", "on CUDA tensors the kernel does not sync to check"),
)
# Run-time skips whose condition the prediction cannot evaluate, with the environment check that rules
# them out on a machine that passed the preflight and environment phases: (skip reason fragment, check).
ENVIRONMENT_SKIPS = (
    ("the Triton kernel is not importable", "environment: the Triton kernels import"),
)
# Tests run on the GPU: every test marked ``cuda`` (tests/cuda, the CUDA parameter of the ``device``
# fixture), the Triton-backend parameter of the op tests and these modules and tests, which run on CUDA
# tensors where a GPU exists without saying so in a marker.
GPU_MODULES = ("tests/kernels/test_kd_kl_div_triton.py",)
GPU_TESTS = ("tests/ops/test_pgd_numerics.py::test_cuda_and_cpu_arguments_do_not_mix",)


def expected_skip(nodeid, reason):
    """The entry of :data:`EXPECTED_SKIPS` that accounts for a skip, or None.

    Args:
        nodeid: the test's pytest node id (``path::name[params]``).
        reason: the reason its skip gave.

    Returns:
        tuple or None: the matching ``(pattern, fragment, why)``.
    """
    return next((entry for entry in EXPECTED_SKIPS if matches(nodeid, entry[0]) and entry[1] in (reason or "")), None)


def matches(nodeid, pattern):
    """Whether a node id matches a pattern in which ``*`` stands for any text (brackets are literal).

    Args:
        nodeid: ``path::name[params]``.
        pattern: e.g. ``tests/ops/test_kd_loss.py::test_bad_values_raise[*-triton]``.

    Returns:
        bool.
    """
    return re.fullmatch(re.escape(pattern).replace(r"\*", ".*"), nodeid) is not None


# ---------------------------------------------------------------------------------------------------
# Preflight: standard library only (it runs before the environment exists).

def _run_text(command, timeout=10):
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, str(exc)
    return done.stdout if done.returncode == 0 else None, (done.stderr or done.stdout).strip()


def required_python(pyproject=ROOT / "pyproject.toml"):
    """The Python versions ``pyproject.toml``'s ``requires-python`` (``">=X.Y"`` or ``">=X.Y,<X.Z"``) accepts.

    Args:
        pyproject: the file.

    Returns:
        tuple: ((major, minor) lowest accepted, (major, minor) first refused or None).
    """
    match = re.search(r'^requires-python\s*=\s*">=\s*(\d+)\.(\d+)\s*(?:,\s*<\s*(\d+)\.(\d+)\s*)?"',
                      Path(pyproject).read_text(), re.M)
    if not match:
        raise ValueError(f'{pyproject}: requires-python is not of the form ">=X.Y" or ">=X.Y,<X.Z"')
    low = (int(match.group(1)), int(match.group(2)))
    return low, ((int(match.group(3)), int(match.group(4))) if match.group(3) else None)


def find_nvcc():
    """The nvcc the build uses: ``$CUDA_HOME/bin/nvcc`` when CUDA_HOME is set, else the first on the PATH.

    Returns:
        str or None: its path.
    """
    home = os.environ.get("CUDA_HOME")
    if home:
        return os.path.join(home, "bin", "nvcc") if os.path.isfile(os.path.join(home, "bin", "nvcc")) else None
    return shutil.which("nvcc")


def query_gpus():
    """The GPUs as ``nvidia-smi`` sees them.

    Returns:
        tuple: (list of dicts with ``name``, ``driver``, ``free_mib``, ``total_mib`` (None where the
        driver does not say); or None, and the error text when nvidia-smi is missing or fails).
    """
    if shutil.which("nvidia-smi") is None:
        return None, "nvidia-smi not found"
    out, err = _run_text(["nvidia-smi", "--query-gpu=name,driver_version,memory.free,memory.total",
                          "--format=csv,noheader,nounits"])
    if out is None:
        return None, err.splitlines()[0] if err else "nvidia-smi failed"
    def mib(field):  # "[N/A]" where the driver does not say (a MIG instance, for one)
        try:
            return float(field)
        except ValueError:
            return None

    gpus = []
    for line in out.strip().splitlines():
        name, driver, free, total = (field.strip() for field in line.split(","))
        gpus.append({"name": name, "driver": driver, "free_mib": mib(free), "total_mib": mib(total)})
    return gpus, ""


def nvcc_release(nvcc):
    """The CUDA release of an nvcc (``"13.0"``), or None when it does not run."""
    out, _ = _run_text([nvcc, "--version"])
    match = re.search(r"release (\d+\.\d+)", out or "")
    return match.group(1) if match else None


def preflight_problems(facts, torch_cuda=PINNED_TORCH_CUDA):
    """The prerequisites a machine's facts fail, one line each.

    Args:
        facts: ``{"python": (major, minor, micro), "required_python": required_python's pair, "gpus": list of
            query_gpus dicts or None, "gpu_error": str, "nvcc": path or None, "nvcc_release": "13.0" or None,
            "free_disk_gib": float, "venv_module": bool}``.
        torch_cuda: the CUDA build of the torch that will be installed.

    Returns:
        list of str: empty when everything is in order.
    """
    problems = []
    torch_major = int(torch_cuda.split(".")[0])
    (low, high), python = facts["required_python"], tuple(facts["python"][:2])
    if python < tuple(low) or (high is not None and python >= tuple(high)):
        accepted = f">={low[0]}.{low[1]}" + (f",<{high[0]}.{high[1]}" if high else "")
        problems.append(f"python: {'.'.join(map(str, facts['python'][:3]))} is not the {accepted} that pyproject.toml "
                        f"requires; run `make gpu-check PYTHON=python{low[0]}.{low[1]}` (or a newer accepted one)")
    elif not facts.get("venv_module", True):
        problems.append(f"python: {sys.executable} cannot create a virtual environment (no ensurepip; on Debian "
                        f"and Ubuntu install python{python[0]}.{python[1]}-venv)")
    gpus = facts["gpus"]
    if not gpus:
        problems.append(f"driver: no NVIDIA GPU or driver ({facts.get('gpu_error') or 'nvidia-smi lists none'}); "
                        "run this on a machine with an NVIDIA GPU")
    else:
        driver = gpus[0]["driver"]
        minimum = MIN_DRIVER.get(torch_major)
        if minimum is not None and int(driver.split(".")[0]) < minimum:
            problems.append(f"driver: {driver} is too old for torch's CUDA {torch_cuda} build "
                            f"(needs R{minimum} or newer)")
        free_gib = None if gpus[0]["free_mib"] is None else gpus[0]["free_mib"] / 1024
        if free_gib is not None and free_gib < MIN_FREE_GPU_GIB:
            problems.append(f"gpu memory: {free_gib:.1f} GiB free on {gpus[0]['name']}, the check needs "
                            f"{MIN_FREE_GPU_GIB:.0f} GiB (other processes hold the rest)")
    if facts["nvcc"] is None:
        problems.append(f"nvcc: no CUDA toolkit found (CUDA_HOME unset or without bin/nvcc, none on the PATH): "
                        f"fastabsld._C would build without its CUDA kernels; install the CUDA {torch_major} toolkit")
    elif facts["nvcc_release"] is None:
        problems.append(f"nvcc: {facts['nvcc']} --version does not run")
    elif int(facts["nvcc_release"].split(".")[0]) != torch_major:
        problems.append(f"nvcc: {facts['nvcc']} is CUDA {facts['nvcc_release']}, torch is built with CUDA "
                        f"{torch_cuda}: the major versions must match; point CUDA_HOME at a CUDA {torch_major} toolkit")
    if facts["free_disk_gib"] < MIN_FREE_DISK_GIB:
        problems.append(f"disk: {facts['free_disk_gib']:.1f} GiB free in {ROOT}, the environment and build need "
                        f"{MIN_FREE_DISK_GIB:.0f} GiB")
    return problems


def machine_facts():
    """The facts :func:`preflight_problems` judges, read from this machine.

    Returns:
        dict: see :func:`preflight_problems`.
    """
    gpus, error = query_gpus()
    nvcc = find_nvcc()
    return {"python": tuple(sys.version_info[:3]), "required_python": required_python(), "gpus": gpus,
            "gpu_error": error, "nvcc": nvcc, "nvcc_release": nvcc_release(nvcc) if nvcc else None,
            "free_disk_gib": shutil.disk_usage(ROOT).free / 2 ** 30, "cores": os.cpu_count(),
            "venv_module": importlib.util.find_spec("ensurepip") is not None}


# ---------------------------------------------------------------------------------------------------
# Environment phase (runs inside the new environment: ``python -m benchmarks.gpu_check --environment``).

def environment():
    """What the check runs on: device, versions, and which kernels are there.

    Returns:
        dict: JSON-friendly facts.
    """
    import torch

    import fastabsld

    facts = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "fastabsld": fastabsld.__version__, "extension": fastabsld.HAS_EXTENSION,
             "extension_cuda_kernels": fastabsld.has_cuda_kernels(), "triton": fastabsld.HAS_TRITON,
             "cuda_available": torch.cuda.is_available(), "gpus": torch.cuda.device_count()}
    try:
        import triton

        facts["triton_version"] = triton.__version__
    except ImportError:
        facts["triton_version"] = None
    if facts["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        facts.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                     memory_gib=round(props.total_memory / 2 ** 30, 1))
    return facts


def environment_problems(env, driver=None):
    """The environment's failures, one line each.

    Args:
        env: the dict of :func:`environment`.
        driver: the NVIDIA driver version from the preflight, when known.

    Returns:
        list of str.
    """
    problems = []
    if env["cuda"] is None:
        problems.append(f"torch: {env['torch']} is a CPU build; the pinned CUDA {PINNED_TORCH_CUDA} build is needed")
    elif not env["cuda_available"]:
        problems.append(f"torch: CUDA {env['cuda']} build, but torch.cuda.is_available() is False"
                        + (f" (driver {driver})" if driver else ""))
    if not env["extension"]:
        problems.append("fastabsld._C: not built or failed to load (see build/install.log)")
    elif not env["extension_cuda_kernels"]:
        problems.append("fastabsld._C: built without its CUDA kernels (no nvcc at build time, or FASTABSLD_CUDA=0)")
    if not env["triton"]:
        problems.append("triton: the Triton kernels do not import")
    return problems


# ---------------------------------------------------------------------------------------------------
# The pytest plugin: GPU test selection, deadline, results, and the predicted outcome of a GPU run.

try:  # the plugin runs under pytest; the command line runs before pytest is installed
    import pytest

    _hookimpl = pytest.hookimpl
except ImportError:
    def _hookimpl(**options):
        return lambda function: function


def pytest_addoption(parser):
    """The plugin's options (see the module docstring)."""
    group = parser.getgroup("gpu-check")
    group.addoption("--gpu-only", action="store_true", help="run only the tests a GPU is needed for")
    group.addoption("--gpu-results", metavar="JSON", help="write every test's outcome to this file")
    group.addoption("--gpu-deadline", type=float, metavar="UNIX_TIME", help="start no test after this time")
    group.addoption("--gpu-predict", metavar="JSON",
                    help="write every collected test's predicted skip (markers and run-time pytest.skip calls)")
    group.addoption("--simulate-h100", action="store_true",
                    help="collect as on a machine with one H100 (torch.cuda patched; nothing can run)")


@_hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    """Patches torch.cuda before the conftests import it, when ``--simulate-h100`` asks for it."""
    if early_config.known_args_namespace.simulate_h100:
        simulate_h100()


def simulate_h100():
    """Makes torch.cuda answer as on a machine with one H100 (compute capability 9.0, 132 SMs, 80 GiB).

    Only the queries that decide skips and parameters are patched: nothing can run on the fake device.
    """
    from types import SimpleNamespace

    import torch

    props = SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132,
                            total_memory=80 * 2 ** 30)
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    torch.cuda.get_device_name = lambda device=None: props.name
    torch.cuda.get_device_properties = lambda device=None: props
    torch.cuda.is_bf16_supported = lambda *args, **kwargs: True


def is_gpu_test(item):
    """Whether the tests phase runs a test: it needs a GPU, or shows on one what the CPU cannot.

    Args:
        item: a collected pytest item.

    Returns:
        bool.
    """
    if item.get_closest_marker("cuda") is not None:
        return True
    if item.nodeid.split("::")[0] in GPU_MODULES:
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "triton":
        return True
    return any(matches(item.nodeid, pattern) for pattern in GPU_TESTS)


@_hookimpl(trylast=True)  # after the conftests have added their skip markers
def pytest_collection_modifyitems(session, config, items):
    """Keeps the GPU tests (``--gpu-only``) and writes the prediction (``--gpu-predict``)."""
    if config.getoption("gpu_predict"):
        prediction = [dict(predict_skip(item), nodeid=item.nodeid, gpu=is_gpu_test(item)) for item in items]
        Path(config.getoption("gpu_predict")).write_text(json.dumps(prediction, indent=0))
    if config.getoption("gpu_only"):
        kept = [item for item in items if is_gpu_test(item)]
        config.hook.pytest_deselected(items=[item for item in items if not is_gpu_test(item)])
        items[:] = kept




def pytest_runtest_protocol(item, nextitem):
    """Starts no test after ``--gpu-deadline``: pytest stops there and the results so far are written."""
    deadline = item.config.getoption("gpu_deadline")
    if deadline is not None and time.time() > deadline:
        item.session.shouldstop = "gpu-check: the tests phase ran out of time"
        _RESULTS["out_of_time"] = True
        return True  # not run
    return None


def pytest_configure(config):
    """Turns the result collection on when ``--gpu-results`` is given."""
    _RESULTS.clear()
    if config.getoption("gpu_results", None):
        _RESULTS["tests"] = {}


def pytest_runtest_logreport(report):
    """Records each test's outcome: its first phase (setup, call, teardown) that did not pass, else passed."""
    if "tests" not in _RESULTS:
        return
    entry = _RESULTS["tests"].setdefault(report.nodeid, {"outcome": "passed", "message": "", "seconds": 0.0})
    entry["seconds"] += report.duration
    if report.passed or entry["outcome"] != "passed":
        return
    entry["outcome"] = "skipped" if report.skipped else ("failed" if report.when == "call" else "error")
    entry["message"] = _message(report)


# The outcomes of the tests run in this process (filled when --gpu-results is given).
_RESULTS = {}


def pytest_sessionfinish(session, exitstatus):
    """Writes ``--gpu-results``: every test's outcome and whether the deadline stopped the run."""
    path = session.config.getoption("gpu_results", None)
    if path:
        out = {"tests": _RESULTS.get("tests", {}), "collected": session.testscollected,
               "out_of_time": _RESULTS.get("out_of_time", False)}
        Path(path).write_text(json.dumps(out, indent=0))


def _message(report):
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    text = str(report.longrepr or "").strip().splitlines()
    errors = [line for line in text if line.startswith("E ")]
    return (errors[0][1:].strip() if errors else (text[-1] if text else ""))[:300]


# The prediction of a test's skip without running it: its skip markers as pytest evaluates them, then
# the pytest.skip / pytest.importorskip calls in its body, its fixtures and the test helpers they call,
# each under the `if` conditions that guard it, evaluated with the module's globals and the test's
# parameters. A condition that needs a value only the run has (a local variable) leaves the skip
# undecided, and the suite requires every undecided skip to be one of ENVIRONMENT_SKIPS.

def predict_skip(item):
    """The skip a test would take where it is collected.

    Args:
        item: a collected pytest item.

    Returns:
        dict: ``{"skip": reason or None, "how": "marker" | "run time" | None, "undecided": [reasons]}``.
    """
    from _pytest.skipping import evaluate_skip_marks

    marked = evaluate_skip_marks(item)
    if marked is not None:
        return {"skip": marked.reason, "how": "marker", "undecided": []}
    undecided, root, seen = [], item.config.rootpath, set()
    params = dict(getattr(getattr(item, "callspec", None), "params", {}))
    functions = [(getattr(item, "function", None), params)]
    fixture_info = getattr(item, "_fixtureinfo", None)  # the fixtures the test uses, its conftests' included
    for name in getattr(item, "fixturenames", ()):
        for definition in (fixture_info.name2fixturedefs.get(name, ()) if fixture_info else ()):
            functions.append((definition.func, {}))
    for function, bindings in functions:
        if function is None or not _is_test_code(function, root):
            continue
        for reason, taken in _skip_sites(function, bindings, root, 0, seen):
            if taken is True:
                return {"skip": reason, "how": "run time", "undecided": undecided}
            if taken is None:
                undecided.append(reason)
    return {"skip": None, "how": None, "undecided": undecided}


def _is_test_code(function, root):
    """Whether a function is the project's own (under the root folder, not an installed package)."""
    try:
        path = Path(inspect.getsourcefile(inspect.unwrap(function))).resolve()
    except (TypeError, OSError):
        return False
    return path.is_relative_to(root) and "site-packages" not in path.parts


@functools.lru_cache(maxsize=None)
def _definition(function):
    """The ast of a function's definition, or None when its source is not available."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return None
    definition = tree.body[0] if tree.body else None
    return definition if isinstance(definition, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def _skip_sites(function, bindings, root, depth, seen):
    """Yields ``(reason, taken)`` for each skip call reachable from ``function``; taken is True, False or None."""
    function = inspect.unwrap(function)
    definition = _definition(function)
    if definition is None or function in seen or depth > 3:
        return
    seen.add(function)
    scope = function.__globals__

    def evaluate(expression):
        try:
            return bool(eval(compile(ast.Expression(expression), "<guard>", "eval"), scope, dict(bindings)))
        except Exception:  # a run-time value: undecidable here
            return None

    def holds(test, positive):
        value = evaluate(test)
        return value if value is None or positive else not value

    def verdict(guards):
        values = [holds(test, positive) for test, positive in guards]
        return False if False in values else (None if None in values else True)

    def visit(node, guards):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            return
        if isinstance(node, ast.If):
            yield from visit_all(node.body, guards + [(node.test, True)])
            yield from visit_all(node.orelse, guards + [(node.test, False)])
            return
        if isinstance(node, ast.Call):
            kind = _skip_call(node, scope)
            if kind == "skip":
                yield _reason(node), verdict(guards)
            elif kind == "importorskip":
                yield f"importorskip {_reason(node)}", verdict(guards + [(_missing_module(node), True)])
            else:
                yield from _callee_sites(node, scope, bindings, guards, verdict, root, depth, seen)
        for child in ast.iter_child_nodes(node):
            yield from visit(child, guards)

    def visit_all(nodes, guards):
        for node in nodes:
            yield from visit(node, guards)

    yield from visit_all(definition.body, [])


def _skip_call(call, scope):
    func = call.func
    target = None
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        owner = scope.get(func.value.id)
        target = getattr(owner, func.attr, None) if owner is not None else None
    elif isinstance(func, ast.Name):
        target = scope.get(func.id)
    if target is pytest.skip:
        return "skip"
    if target is pytest.importorskip:
        return "importorskip"
    return None


def _reason(call):
    argument = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "reason"), None)
    if isinstance(argument, ast.Constant):
        return str(argument.value)
    return ast.unparse(argument) if argument is not None else ""


def _missing_module(call):
    """The guard ``importlib.util.find_spec(<name>) is None`` of an importorskip call."""
    name = ast.unparse(call.args[0]) if call.args else "''"
    return ast.parse(f"__import__('importlib.util').util.find_spec({name}) is None", mode="eval").body


def _callee_sites(call, scope, bindings, guards, verdict, root, depth, seen):
    """The skip sites of a test helper a call reaches, its arguments bound where they are known."""
    if not isinstance(call.func, ast.Name):
        return
    callee = scope.get(call.func.id)
    if not inspect.isfunction(callee) or not _is_test_code(callee, root):
        return
    known = {}

    def value(expression):
        try:
            return True, eval(compile(ast.Expression(expression), "<argument>", "eval"), scope, dict(bindings))
        except Exception:
            return False, None

    parameters = list(inspect.signature(callee).parameters)
    for name, argument in zip(parameters, call.args):
        if isinstance(argument, ast.Starred):
            break
        found, result = value(argument)
        if found:
            known[name] = result
    for keyword in call.keywords:
        if keyword.arg is not None:
            found, result = value(keyword.value)
            if found:
                known[keyword.arg] = result
    for reason, taken in _skip_sites(callee, known, root, depth + 1, seen):
        outer = verdict(guards)
        yield reason, (False if False in (outer, taken) else (None if None in (outer, taken) else True))


# ---------------------------------------------------------------------------------------------------
# The phases and the summary.

def run_phase(command, limit, env=None, log=None):
    """Runs one phase's command in its own process group, stopped at its time limit.

    Args:
        command: the argument list.
        limit: seconds.
        env: the environment (None: this process's).
        log: a file to which its output is written (None: kept in memory only).

    Returns:
        dict: ``{"returncode": int or None, "timed_out": bool, "seconds": float, "output": str}``
        (the last 4000 characters of its output).
    """
    began = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    timed_out = False
    try:
        output, _ = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
    if log is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        Path(log).write_text(output or "")
    return {"returncode": None if timed_out else process.returncode, "timed_out": timed_out,
            "seconds": time.perf_counter() - began, "output": (output or "")[-4000:]}


def judge_tests(results):
    """Counts the tests phase's outcomes and names the ones that fail the check.

    Args:
        results: the ``--gpu-results`` dict (``tests``: node id -> ``{"outcome", "message", "seconds"}``).

    Returns:
        dict: ``{"passed", "failed", "errors", "skipped", "expected_skips": int, "problems":
        [{"test", "kind", "message"}], "out_of_time": bool, "collected": int}``.
    """
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    problems, expected = [], 0
    for nodeid, entry in sorted(results["tests"].items()):
        counts[entry["outcome"]] = counts.get(entry["outcome"], 0) + 1
        if entry["outcome"] == "passed":
            continue
        if entry["outcome"] == "skipped" and expected_skip(nodeid, entry["message"]):
            expected += 1
            continue
        kind = {"skipped": "unexpected skip", "failed": "failed", "error": "error"}[entry["outcome"]]
        problems.append({"test": nodeid, "kind": kind, "message": entry["message"]})
    return {"passed": counts["passed"], "failed": counts["failed"], "errors": counts["error"],
            "skipped": counts["skipped"], "expected_skips": expected, "problems": problems,
            "out_of_time": results.get("out_of_time", False), "collected": results.get("collected", 0)}


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


# The summary's longest line: reasons and test messages are cut there (the JSON keeps them whole).
LINE = 150


def summary_lines(result):
    """The one-screen summary of a check's result.

    Args:
        result: ``{"phases": [{"name", "status", "seconds", "budget", "reasons"}], "environment": dict or None,
            "tests": judge_tests's dict or None, "report": rows or None, "seconds", "json"}``.

    Returns:
        list of str: the lines; the last starts with PASS or FAIL.
    """
    lines = []
    env = result.get("environment")
    if env:
        capability = str(env.get("capability", "?")).replace(".", "")
        lines.append(f"gpu-check on {env.get('device', '?')} (sm_{capability}, {env.get('sms', '?')} SMs, "
                     f"{env.get('gpus')} GPU(s)); torch {env['torch']} (CUDA {env['cuda']}), "
                     f"triton {env.get('triton_version')}")
    for phase in result["phases"]:
        head = f"{phase['name']:<13} {phase['status']:<8} {phase['seconds']:>6.0f} s of {phase['budget']:>4} s"
        lines.append((head + (f"  {phase['reasons'][0]}" if phase["reasons"] else ""))[:LINE])
        lines += [f"{'':<16}{reason}"[:LINE] for reason in phase["reasons"][1:]]
    tests = result.get("tests")
    if tests:
        lines.append(f"tests: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                     f"{tests['skipped']} skipped ({tests['expected_skips']} expected, see EXPECTED_SKIPS)")
        shown = tests["problems"][:15]
        lines += [f"  {p['kind']:<15} {p['test']}: {p['message']}"[:LINE] for p in shown]
        if len(tests["problems"]) > len(shown):
            lines.append(f"  ... {len(tests['problems']) - len(shown)} more in {result['json']}")
    if result.get("report"):
        lines += report_lines(result["report"])
    problems = [f"{p['name']} {'ran out of time' if p['status'] == 'TIMEOUT' else 'failed'}"
                for p in result["phases"] if p["status"] in ("FAIL", "TIMEOUT")]
    not_run = [p["name"] for p in result["phases"] if p["status"] == "NOT RUN"]
    problems += [f"not run: {', '.join(not_run)}"] if not_run else []
    total = sum(budget for _, budget in PHASES)
    verdict = f"FAIL ({'; '.join(problems)})" if problems else "PASS"
    lines.append(f"{verdict} in {result['seconds']:.0f} s of {total} s; full results: {result['json']}")
    return lines


def _phase(name, status, seconds, reasons=()):
    return {"name": name, "status": status, "seconds": seconds, "budget": dict(PHASES)[name], "reasons": list(reasons)}


def _last_lines(output, count=3):
    return [line for line in output.strip().splitlines() if line.strip()][-count:]


def _command_phase(name, command, env, logs):
    """A phase that is one command: PASS when it exits 0, else the end of its output as the reasons."""
    limit, log = dict(PHASES)[name], logs / f"{name}.log"
    done = run_phase(command, limit, env=env, log=log)
    if done["timed_out"]:
        return _phase(name, "TIMEOUT", done["seconds"], [f"ran out of its {limit} s (log: {log})"])
    if done["returncode"] != 0:
        return _phase(name, "FAIL", done["seconds"],
                      [f"exit {done['returncode']} (log: {log})"] + _last_lines(done["output"]))
    return _phase(name, "PASS", done["seconds"])


def _preflight_phase(result):
    began = time.perf_counter()
    facts = machine_facts()
    problems = preflight_problems(facts)
    result["preflight"] = dict(facts, problems=problems)
    return _phase("preflight", "FAIL" if problems else "PASS", time.perf_counter() - began, problems)


def _environment_phase(result, python, env):
    done = run_phase([python, "-m", "benchmarks.gpu_check", "--environment"], dict(PHASES)["environment"], env=env)
    if done["returncode"] != 0:
        return _phase("environment", "TIMEOUT" if done["timed_out"] else "FAIL", done["seconds"],
                      _last_lines(done["output"]))
    result["environment"] = json.loads(done["output"].strip().splitlines()[-1])
    driver = (result["preflight"]["gpus"] or [{}])[0].get("driver")
    problems = environment_problems(result["environment"], driver)
    return _phase("environment", "FAIL" if problems else "PASS", done["seconds"], problems)


def _tests_phase(result, python, env, logs):
    limit, path = dict(PHASES)["tests"], logs / "tests.json"
    path.unlink(missing_ok=True)
    # pytest starts no test after the deadline, so the results so far are written; the process limit
    # beyond it only catches a test that hangs.
    command = [python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "benchmarks.gpu_check",
               "--gpu-only", f"--gpu-results={path}", f"--gpu-deadline={time.time() + limit - 5}", "tests"]
    done = run_phase(command, limit + 30, env=env, log=logs / "tests.log")
    if not path.exists():
        return _phase("tests", "TIMEOUT" if done["timed_out"] else "FAIL", done["seconds"],
                      [f"pytest wrote no results (log: {logs / 'tests.log'})"] + _last_lines(done["output"]))
    outcomes = json.loads(path.read_text())
    result["tests"] = tests = judge_tests(outcomes)
    reasons = [f"ran out of its {limit} s after {len(outcomes['tests'])} of {tests['collected']} tests"
               ] if tests["out_of_time"] else []
    if tests["problems"]:
        reasons.append(f"{len(tests['problems'])} tests failed, errored or skipped unexpectedly")
    status = "TIMEOUT" if tests["out_of_time"] else ("FAIL" if tests["problems"] else "PASS")
    return _phase("tests", status, done["seconds"], reasons)


def _report_phase(result, name, python, env, logs, iters):
    path = logs / f"{name}.json"
    path.unlink(missing_ok=True)
    # The training step's torch.compile variant is left out: its cold compile alone takes longer than the
    # phase (`python -m benchmarks.gpu_report --skip-ops` times it when there is time).
    half = ["--skip-train"] if name == "report-ops" else ["--skip-ops", "--skip-compile"]
    phase = _command_phase(name, [python, "-m", "benchmarks.gpu_report", *half, "--iters", str(iters),
                                  "--json", str(path)], env, logs)
    if path.exists():
        result["report"] = (result["report"] or []) + json.loads(path.read_text())["rows"]
    return phase


def check(args):
    """Runs the phases in order (see the module docstring).

    Args:
        args: the parsed command line (``venv``, ``iters``, ``skip_report``, ``keep_going``, ``json``).

    Returns:
        dict: the result (see :func:`summary_lines`).
    """
    began = time.perf_counter()
    logs = ROOT / "build" / "gpu-check"
    logs.mkdir(parents=True, exist_ok=True)
    python = os.path.abspath(ROOT / args.venv / "bin" / "python")  # not resolved: the link is the venv
    make = ["make", "--no-print-directory", f"PYTHON={sys.executable}", f"VENV={args.venv}"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler on a GPU
    result = {"phases": [], "preflight": None, "environment": None, "tests": None, "report": None, "json": args.json}
    runs = {"preflight": lambda: _preflight_phase(result),
            "install": lambda: _command_phase("install", make + ["install"], env, logs),
            "build": lambda: _command_phase("build", make + ["build"], env, logs),
            "environment": lambda: _environment_phase(result, python, env),
            "tests": lambda: _tests_phase(result, python, env, logs),
            "report-ops": lambda: _report_phase(result, "report-ops", python, env, logs, args.iters),
            "report-train": lambda: _report_phase(result, "report-train", python, env, logs, args.iters)}
    stopped = False
    for name, _ in PHASES:
        if stopped:
            phase = _phase(name, "NOT RUN", 0.0)
        elif args.skip_report and name.startswith("report"):
            phase = _phase(name, "SKIPPED", 0.0)
        else:
            phase = runs[name]()
            stopped = phase["status"] != "PASS" and name in STOPPING_PHASES and not args.keep_going
        result["phases"].append(phase)
    result["seconds"] = time.perf_counter() - began
    return result


def main(argv=None):
    """Runs the check (or, with ``--environment``, prints :func:`environment` as one JSON line).

    Args:
        argv: command-line arguments (None: ``sys.argv[1:]``).

    Returns:
        int: exit status (0 when every phase passed).
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default="gpu-check.json", help="where to write the results (default: gpu-check.json)")
    p.add_argument("--venv", default=".venv", help="the virtual environment to create and use (default: .venv)")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per case of the report (default: 20)")
    p.add_argument("--skip-report", action="store_true", help="run the tests only, not the GPU report")
    p.add_argument("--keep-going", action="store_true",
                   help="carry on after a failed preflight, install, build or environment phase")
    p.add_argument("--environment", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.environment:
        print(json.dumps(environment()))
        return 0
    result = check(args)
    Path(args.json).write_text(json.dumps(result, indent=1))
    lines = summary_lines(result)
    print("\n".join(lines))
    return 0 if lines[-1].startswith("PASS") else 1


if __name__ == "__main__":
    sys.exit(main())
