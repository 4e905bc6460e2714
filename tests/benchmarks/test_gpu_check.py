"""``make gpu-check`` (benchmarks/gpu_check.py) without a GPU: a simulated GPU run of the real test list,
the preflight's judgements, the phases' time limits, the plugin's results and the summary."""

import json
import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[2]


def _pytest(args, cwd=ROOT, timeout=900):
    """Runs pytest in a fresh interpreter with the gpu_check plugin (the GPU simulation must patch torch
    before the conftests import it)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("FASTABSLD_CUDA", None)  # the default build, as on a GPU machine
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "benchmarks.gpu_check",
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def predictions(tmp_path_factory):
    """Every test's predicted skip, here and on a simulated 1-GPU H100: ``{"cpu": {...}, "gpu": {...}}``,
    each node id -> ``{"skip", "how", "undecided", "gpu"}``. The two collections run side by side."""
    folder = tmp_path_factory.mktemp("predict")

    def collect(name, extra):
        out = folder / f"{name}.json"
        done = _pytest(["--collect-only", "-q", f"--gpu-predict={out}", *extra, "tests"])
        assert out.exists(), f"{name} collection failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert done.returncode == 0, f"{name} collection errors:\n{done.stdout[-3000:]}"
        return {entry["nodeid"]: entry for entry in json.loads(out.read_text())}

    with ThreadPoolExecutor(2) as pool:
        cpu, gpu = pool.map(lambda args: collect(*args), [("cpu", []), ("gpu", ["--simulate-h100"])])
    return {"cpu": cpu, "gpu": gpu}


def test_simulated_gpu_run_accounts_for_every_skip(predictions):
    """On an H100, every skip of a test the check runs, and every skip that only a GPU causes anywhere in the
    suite, is one of EXPECTED_SKIPS; and every entry there still skips something."""
    cpu, gpu = predictions["cpu"], predictions["gpu"]
    assert set(cpu) == set(gpu), "the test list depends on the GPU"
    accountable = {nodeid: entry["skip"] for nodeid, entry in gpu.items()
                   if entry["skip"] and (entry["gpu"] or cpu[nodeid]["skip"] != entry["skip"])}
    unexpected = sorted(f"{nodeid}: {reason}" for nodeid, reason in accountable.items()
                        if gpu_check.expected_skip(nodeid, reason) is None)
    assert not unexpected, "skips on a GPU that EXPECTED_SKIPS does not declare:\n" + "\n".join(unexpected)
    stale = [pattern for pattern, fragment, _ in gpu_check.EXPECTED_SKIPS
             if not any(gpu_check.expected_skip(nodeid, reason) == (pattern, fragment, _)
                        for nodeid, reason in accountable.items())]
    assert not stale, f"EXPECTED_SKIPS entries that skip nothing on a GPU any more: {stale}"


def test_simulated_gpu_run_leaves_no_skip_undecided(predictions):
    """A run-time skip whose condition needs the run is allowed only where the environment phase rules it out."""
    undecided = sorted({reason for entry in predictions["gpu"].values() if entry["gpu"]
                        for reason in entry["undecided"]
                        if not any(fragment in reason for fragment, _ in gpu_check.ENVIRONMENT_SKIPS)})
    assert not undecided, f"run-time skips of GPU tests that the prediction and the environment leave open: {undecided}"


def test_every_test_that_needs_a_gpu_is_run_by_the_check(predictions):
    """A test that skips here but runs on a GPU is selected; the CPU-only bulk and the ahead-of-time compiles
    are not."""
    cpu, gpu = predictions["cpu"], predictions["gpu"]
    missed = sorted(nodeid for nodeid, entry in gpu.items() if cpu[nodeid]["skip"] and not entry["skip"]
                    and not entry["gpu"])
    assert not missed, f"tests that run only on a GPU but not in gpu-check: {missed}"
    selected = {nodeid for nodeid, entry in gpu.items() if entry["gpu"]}
    assert any(nodeid.startswith("tests/cuda/") for nodeid in selected)
    assert any("[cuda" in nodeid or "-cuda" in nodeid for nodeid in selected if nodeid.startswith("tests/ops/"))
    assert any(nodeid.startswith("tests/kernels/test_kd_kl_div_triton.py") for nodeid in selected)
    assert not any(nodeid.startswith(("tests/kernels/test_kd_kl_div_aot.py", "tests/recipe/")) for nodeid in selected)
    assert len(selected) < len(gpu) / 3


def test_prediction_finds_marker_and_run_time_skips(tmp_path):
    """Markers, guarded pytest.skip calls in the test, its helpers and fixtures, and importorskip."""
    (tmp_path / "conftest.py").write_text(textwrap.dedent("""
        import pytest
        FLAG = True

        @pytest.fixture
        def needs_flag():
            if FLAG:
                pytest.skip("fixture skip")
    """))
    (tmp_path / "test_sample.py").write_text(textwrap.dedent("""
        import pytest
        ON = True

        def helper(backend):
            if backend == "b" and ON:
                pytest.skip("helper skip")
            return backend

        @pytest.mark.skipif(ON, reason="marker skip")
        def test_marked():
            pass

        @pytest.mark.parametrize("backend", ["a", "b"])
        def test_param(backend):
            if backend == "a":
                return
            else:
                pytest.skip("else skip")

        @pytest.mark.parametrize("backend", ["a", "b"])
        def test_helper(backend):
            with pytest.raises(ZeroDivisionError):
                helper(backend)
                1 / 0

        def test_undecided():
            value = object()
            if value is None:
                pytest.skip("needs the run")

        def test_fixture(needs_flag):
            pass

        def test_module_missing():
            pytest.importorskip("no_such_module_here")
            pytest.skip(reason="not reached in the prediction")
    """))
    out = tmp_path / "p.json"
    done = _pytest(["--collect-only", "-q", f"--gpu-predict={out}", "test_sample.py"], cwd=tmp_path, timeout=120)
    assert out.exists(), done.stdout + done.stderr
    found = {entry["nodeid"]: entry for entry in json.loads(out.read_text())}
    assert found["test_sample.py::test_marked"]["skip"] == "marker skip"
    assert found["test_sample.py::test_marked"]["how"] == "marker"
    assert found["test_sample.py::test_param[a]"]["skip"] is None
    assert found["test_sample.py::test_param[b]"]["skip"] == "else skip"
    assert found["test_sample.py::test_helper[a]"]["skip"] is None
    assert found["test_sample.py::test_helper[b]"]["skip"] == "helper skip"
    assert found["test_sample.py::test_undecided"]["skip"] is None
    assert found["test_sample.py::test_undecided"]["undecided"] == ["needs the run"]
    assert found["test_sample.py::test_fixture"]["skip"] == "fixture skip"
    assert found["test_sample.py::test_module_missing"]["skip"] == "importorskip no_such_module_here"


def test_results_deadline_and_selection(tmp_path):
    """--gpu-results records each outcome (setup errors as errors); past --gpu-deadline nothing more starts."""
    (tmp_path / "test_outcomes.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.fixture
        def broken():
            raise RuntimeError("fixture broke")

        def test_pass():
            pass

        def test_fail():
            assert 1 == 2, "one is not two"

        def test_skip():
            pytest.skip("skipped here")

        def test_error(broken):
            pass

        @pytest.mark.cuda
        def test_on_gpu():
            pass
    """))
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    cuda: needs a CUDA device\n")
    out = tmp_path / "r.json"
    _pytest([f"--gpu-results={out}", "test_outcomes.py"], cwd=tmp_path, timeout=120)
    tests = json.loads(out.read_text())
    outcomes = {nodeid.split("::")[1]: entry["outcome"] for nodeid, entry in tests["tests"].items()}
    assert outcomes == {"test_pass": "passed", "test_fail": "failed", "test_skip": "skipped", "test_error": "error",
                        "test_on_gpu": "passed"}
    assert tests["tests"]["test_outcomes.py::test_skip"]["message"] == "skipped here"
    assert "one is not two" in tests["tests"]["test_outcomes.py::test_fail"]["message"]
    assert not tests["out_of_time"] and tests["collected"] == 5

    _pytest([f"--gpu-results={out}", "--gpu-only", "test_outcomes.py"], cwd=tmp_path, timeout=120)
    assert list(json.loads(out.read_text())["tests"]) == ["test_outcomes.py::test_on_gpu"]

    _pytest([f"--gpu-results={out}", f"--gpu-deadline={time.time() - 1}", "test_outcomes.py"], cwd=tmp_path,
            timeout=120)
    late = json.loads(out.read_text())
    assert late["out_of_time"] and late["tests"] == {}


def test_judged_outcomes_name_what_fails_the_check():
    results = {"collected": 5, "out_of_time": False, "tests": {
        "tests/cuda/test_a.py::test_ok": {"outcome": "passed", "message": "", "seconds": 0.1},
        "tests/cuda/test_a.py::test_bad": {"outcome": "failed", "message": "AssertionError: 1 != 2", "seconds": 0.1},
        "tests/cuda/test_nccl.py::test_two_gpus_over_nccl_with_sync_batchnorm": {
            "outcome": "skipped", "message": "needs 2 GPUs for a 2-process nccl run", "seconds": 0.0},
        "tests/ops/test_kd_loss.py::test_bad_values_raise[tau_nan-triton]": {
            "outcome": "skipped", "message": "needs CUDA", "seconds": 0.0},
        "tests/ops/test_kd_loss.py::test_bad_values_raise[tau_zero-triton]": {
            "outcome": "skipped", "message": "on a GPU a bad value gives a NaN row, not an error (device asserts are opt-in)",
            "seconds": 0.0},
        "tests/ops/test_kd_loss.py::test_bad_values_raise[tau_zero-cpp]": {
            "outcome": "skipped", "message": "on a GPU a bad value gives a NaN row, not an error (device asserts are opt-in)",
            "seconds": 0.0},
        "tests/ops/test_x.py::test_setup": {"outcome": "error", "message": "RuntimeError: boom", "seconds": 0.0}}}
    tests = gpu_check.judge_tests(results)
    counts = (tests["passed"], tests["failed"], tests["errors"], tests["skipped"], tests["expected_skips"])
    assert counts == (1, 1, 1, 4, 2)
    assert [(p["test"], p["kind"]) for p in tests["problems"]] == [
        ("tests/cuda/test_a.py::test_bad", "failed"),
        ("tests/ops/test_kd_loss.py::test_bad_values_raise[tau_nan-triton]", "unexpected skip"),
        ("tests/ops/test_kd_loss.py::test_bad_values_raise[tau_zero-cpp]", "unexpected skip"),
        ("tests/ops/test_x.py::test_setup", "error")]


GOOD_MACHINE = {"python": (3, 11, 7), "required_python": ((3, 11), (3, 15)), "venv_module": True,
                "nvcc": "/usr/local/cuda/bin/nvcc",
                "nvcc_release": "13.0", "free_disk_gib": 200.0, "gpu_error": "",
                "gpus": [{"name": "NVIDIA H100 80GB HBM3", "driver": "580.82.07", "free_mib": 80000.0,
                          "total_mib": 81559.0}]}


@pytest.mark.parametrize("change,expected", [
    ({}, None),
    ({"python": (3, 10, 12)}, "python: 3.10.12 is not the >=3.11,<3.15"),
    ({"python": (3, 15, 0)}, "python: 3.15.0 is not the >=3.11,<3.15"),
    ({"venv_module": False}, "python: "),
    ({"gpus": None, "gpu_error": "nvidia-smi not found"}, "driver: no NVIDIA GPU or driver (nvidia-smi not found)"),
    ({"gpus": [dict(GOOD_MACHINE["gpus"][0], driver="570.133.20")]}, "driver: 570.133.20 is too old for torch's "
                                                                      "CUDA 13.0 build (needs R580 or newer)"),
    ({"gpus": [dict(GOOD_MACHINE["gpus"][0], free_mib=4096.0)]}, "gpu memory: 4.0 GiB free"),
    ({"nvcc": None, "nvcc_release": None}, "nvcc: no CUDA toolkit found"),
    ({"nvcc_release": "12.8"}, "nvcc: /usr/local/cuda/bin/nvcc is CUDA 12.8, torch is built with CUDA 13.0"),
    ({"free_disk_gib": 3.0}, "disk: 3.0 GiB free"),
])
def test_preflight_gives_one_line_per_failed_prerequisite(change, expected):
    problems = gpu_check.preflight_problems(dict(GOOD_MACHINE, **change))
    if expected is None:
        assert problems == []
        return
    assert len(problems) == 1 and problems[0].startswith(expected) and "\n" not in problems[0], problems


def test_preflight_judges_the_driver_by_torch_s_cuda():
    old = dict(GOOD_MACHINE, gpus=[dict(GOOD_MACHINE["gpus"][0], driver="535.104.05")], nvcc_release="12.4")
    assert gpu_check.preflight_problems(old, torch_cuda="12.8") == []
    assert len(gpu_check.preflight_problems(old)) == 2  # the driver and nvcc against CUDA 13.0


def test_pinned_torch_cuda_is_the_installed_pinned_torch_s():
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line)
    if torch.__version__.split("+")[0] != pins["torch"]:
        pytest.fail(f"torch {torch.__version__} is installed, requirements.txt pins {pins['torch']}")
    assert torch.version.cuda == gpu_check.PINNED_TORCH_CUDA


def test_environment_names_the_kernels_and_its_problems():
    env = gpu_check.environment()
    assert {"torch", "cuda", "extension", "extension_cuda_kernels", "triton", "cuda_available", "gpus"} <= set(env)
    good = dict(env, cuda="13.0", cuda_available=True, extension=True, extension_cuda_kernels=True, triton=True)
    assert gpu_check.environment_problems(good) == []
    problems = gpu_check.environment_problems(dict(good, cuda_available=False, extension_cuda_kernels=False),
                                              driver="570.1")
    assert len(problems) == 2 and "driver 570.1" in problems[0] and "without its CUDA kernels" in problems[1]
    assert "CPU build" in gpu_check.environment_problems(dict(good, cuda=None))[0]


def test_a_phase_is_stopped_at_its_time_limit(tmp_path):
    began = time.perf_counter()
    done = gpu_check.run_phase([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                               limit=2, log=tmp_path / "slow.log")
    assert done["timed_out"] and done["returncode"] is None and time.perf_counter() - began < 20
    assert "started" in (tmp_path / "slow.log").read_text()
    quick = gpu_check.run_phase([sys.executable, "-c", "raise SystemExit(3)"], limit=30)
    assert not quick["timed_out"] and quick["returncode"] == 3


def test_without_a_gpu_the_preflight_says_so_and_nothing_else_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "query_gpus", lambda: (None, "nvidia-smi not found"))
    monkeypatch.setattr(gpu_check, "run_phase", lambda *a, **k: pytest.fail("a phase ran after a failed preflight"))
    out = tmp_path / "g.json"
    assert gpu_check.main(["--json", str(out)]) == 1
    text = capsys.readouterr().out
    assert "driver: no NVIDIA GPU or driver (nvidia-smi not found)" in text
    assert text.splitlines()[-1].startswith("FAIL (preflight failed; not run: install, build, environment, tests, "
                                            "report-ops, report-train) in ")
    result = json.loads(out.read_text())
    assert [p["status"] for p in result["phases"]] == ["FAIL"] + ["NOT RUN"] * 6


PHASES_OK = [{"name": name, "status": "PASS", "seconds": budget / 2, "budget": budget, "reasons": []}
             for name, budget in gpu_check.PHASES]
ENV = {"device": "NVIDIA H100", "capability": "9.0", "sms": 132, "gpus": 1, "torch": "2.14.1", "cuda": "13.0",
       "triton_version": "3.8.0"}


def test_summary_names_the_phase_that_ran_out_of_time():
    phases = [dict(p) for p in PHASES_OK]
    phases[4] = dict(phases[4], status="TIMEOUT", seconds=125.0,
                     reasons=["ran out of its 120 s after 300 of 560 tests"])
    tests = {"passed": 299, "failed": 1, "errors": 0, "skipped": 0, "expected_skips": 0, "out_of_time": True,
             "collected": 560, "problems": [{"test": "tests/cuda/t.py::test_x", "kind": "failed", "message": "boom"}]}
    lines = gpu_check.summary_lines({"phases": phases, "environment": ENV, "tests": tests, "report": None,
                                     "seconds": 300.0, "json": "gpu-check.json"})
    text = "\n".join(lines)
    assert "tests         TIMEOUT     125 s of  120 s  ran out of its 120 s after 300 of 560 tests" in text
    assert "tests/cuda/t.py::test_x: boom" in text and "NVIDIA H100" in text
    assert lines[-1].startswith("FAIL (tests ran out of time) in 300 s of 480 s")
    clean = gpu_check.summary_lines({"phases": PHASES_OK, "environment": ENV, "tests": None, "report": None,
                                     "seconds": 240.0, "json": "g.json"})
    assert clean[-1].startswith("PASS in 240 s of 480 s")


def test_the_phases_fit_eight_minutes_as_documented():
    assert sum(budget for _, budget in gpu_check.PHASES) <= 480
    readme = (ROOT / "README.md").read_text()
    for name, budget in gpu_check.PHASES:
        assert f"\n{name:<16}{budget:>6}  " in gpu_check.__doc__, f"the docstring does not state {name}'s budget"
        assert f"\n| {name} | {budget} | " in readme, f"the README does not state {name}'s budget"


def test_the_build_uses_every_core():
    """One compile job per core, and nvcc's architectures of a unit in parallel."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAX_JOBS", "MAKEFLAGS", "NVCC_APPEND_FLAGS")}
    done = subprocess.run(["make", "--no-print-directory", "--eval",
                           "print-jobs: ; @echo $$MAX_JOBS; echo $$NVCC_APPEND_FLAGS", "print-jobs"],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.stdout.split("\n")[:2] == [str(len(os.sched_getaffinity(0))), "--threads 0"], done.stdout + done.stderr


def test_full_report_fits_one_screen():
    """Every case the report times, as one line each with fastabsld's speed-up over the others."""
    from benchmarks import gpu_report

    cases = [f"kd fwd+bwd {d} {shape}" for shape in gpu_report.KD_SHAPES for d in gpu_report.KD_DTYPES]
    cases += [f"pgd {n} {d} {shape}" for shape in gpu_report.PGD_SHAPES for d in gpu_report.PGD_DTYPES
              for n in ("linf", "l2")]
    rows = []
    for case in cases:
        rows.append({"case": case, "impl": "fastabsld", "us": 10.0, "GB/s": 3000.0, "peak%": 89.6,
                     "kernel GB/s": 3100.0, "kernel peak%": 92.5})
        rows.append({"case": case, "impl": "eager", "us": 25.0, "GB/s": 1200.0, "peak%": 35.8})
        rows.append({"case": case, "impl": "compile", "us": 15.0, "GB/s": 2000.0, "peak%": 59.7})
    rows += [{"case": "train step resnet18/wrn-34-10 B=128", "impl": impl, "us": us, "GB/s": None, "peak%": None,
              "speed-up": 100.0 / us} for impl, us in (("released", 100.0), ("fastabsld", 50.0))]
    tests = {"passed": 560, "failed": 0, "errors": 0, "skipped": 22, "expected_skips": 22, "problems": [],
             "out_of_time": False, "collected": 582}
    lines = gpu_check.summary_lines({"phases": PHASES_OK, "environment": ENV, "tests": tests, "report": rows,
                                     "seconds": 400.0, "json": "gpu-check.json"})
    assert len(lines) <= 70 and all(len(line) <= 120 for line in lines)
    assert sum("vs eager 2.50x, compile 1.50x" in line for line in lines) == len(cases)
    assert any("vs released 2.00x" in line for line in lines) and lines[-1].startswith("PASS")


def test_phases_run_in_order_with_the_venv_s_python(tmp_path, monkeypatch, capsys):
    """Each phase's command, with the venv's own python (its bin/python link, not the interpreter it points to)."""
    commands = []
    env_facts = dict(ENV, python="3.11.7", fastabsld="0.1.0", extension=True, extension_cuda_kernels=True,
                     triton=True, cuda_available=True)

    def fake_run(command, limit, env=None, log=None):
        commands.append((command, limit))
        output = json.dumps(env_facts) if "--environment" in command else ""
        for argument in command:
            if argument.startswith("--gpu-results="):
                Path(argument.split("=", 1)[1]).write_text(json.dumps({"collected": 2, "out_of_time": False, "tests": {
                    "tests/cuda/test_a.py::test_ok": {"outcome": "passed", "message": "", "seconds": 1.0},
                    "tests/cuda/test_nccl.py::test_two_gpus_over_nccl_with_sync_batchnorm": {
                        "outcome": "skipped", "message": "needs 2 GPUs for a 2-process nccl run", "seconds": 0.0}}}))
        if "benchmarks.gpu_report" in command:
            Path(command[command.index("--json") + 1]).write_text(json.dumps({"rows": [
                {"case": f"case of {command[3]}", "impl": "fastabsld", "us": 10.0, "GB/s": 100.0, "peak%": 3.0}]}))
        return {"returncode": 0, "timed_out": False, "seconds": 1.0, "output": output}

    monkeypatch.setattr(gpu_check, "machine_facts", lambda: dict(GOOD_MACHINE))
    monkeypatch.setattr(gpu_check, "run_phase", fake_run)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    out = tmp_path / "g.json"
    assert gpu_check.main(["--json", str(out), "--venv", str(venv)]) == 0, capsys.readouterr().out
    python = str(venv / "bin" / "python")
    assert [c[0][-1] for c in commands[:2]] == ["install", "build"]
    assert [c[0][0] for c in commands[2:]] == [python] * 4
    assert [c[0][2] for c in commands[2:]] == ["benchmarks.gpu_check", "pytest", "benchmarks.gpu_report",
                                                "benchmarks.gpu_report"]
    assert "--skip-compile" in commands[-1][0] and "--skip-compile" not in commands[-2][0]
    tests_command, tests_limit = commands[3]
    assert "--gpu-only" in tests_command and tests_limit > dict(gpu_check.PHASES)["tests"]
    result = json.loads(out.read_text())
    assert [p["status"] for p in result["phases"]] == ["PASS"] * 7
    assert result["tests"]["expected_skips"] == 1 and len(result["report"]) == 2


def test_gpus_are_read_from_nvidia_smi(tmp_path, monkeypatch):
    """nvidia-smi's CSV, with "[N/A]" memory (as on a MIG instance) read as unknown and not judged."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 580.82.07, 80000, 81559'\n"
                    "echo 'NVIDIA H100 80GB HBM3 MIG 1g.10gb, 580.82.07, [N/A], [N/A]'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    gpus, error = gpu_check.query_gpus()
    assert error == "" and [g["driver"] for g in gpus] == ["580.82.07"] * 2
    assert (gpus[0]["free_mib"], gpus[1]["free_mib"], gpus[1]["total_mib"]) == (80000.0, None, None)
    assert gpu_check.preflight_problems(dict(GOOD_MACHINE, gpus=gpus[1:])) == []
