"""The parts of ``make gpu-check`` (benchmarks/gpu_check.py) that run without a GPU."""

import pytest
import torch

from benchmarks import gpu_check

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.cuda.test_a" name="test_ok" time="0.1"/>
<testcase classname="tests.cuda.test_a" name="test_bad" time="0.1"><failure message="AssertionError: 1 != 2">x</failure></testcase>
<testcase classname="tests.cuda.test_nccl" name="test_two" time="0"><skipped message="needs 2 GPUs for a 2-process nccl run"/></testcase>
<testcase classname="tests.ops.test_x" name="test_y" time="0"><skipped message="needs CUDA"/></testcase>
</testsuite></testsuites>
"""


def test_junit_report_is_counted_and_unexpected_outcomes_named(tmp_path):
    path = tmp_path / "r.xml"
    path.write_text(JUNIT)
    tests = gpu_check.parse_junit(path)
    assert (tests["passed"], tests["failed"], tests["errors"], tests["skipped"]) == (1, 1, 0, 2)
    bad = gpu_check.unexpected(tests)
    assert [p["test"] for p in bad] == ["tests.cuda.test_a::test_bad", "tests.ops.test_x::test_y"]


def test_summary_names_every_problem_and_the_verdict(tmp_path):
    path = tmp_path / "r.xml"
    path.write_text(JUNIT)
    env = {"device": "NVIDIA H100", "capability": "9.0", "sms": 132, "gpus": 1, "torch": "2.14", "cuda": "13.0",
           "triton_version": "3.8", "extension_cuda_kernels": True, "triton": True}
    rows = [{"case": "kd fwd+bwd (8, 32000)", "impl": "fastabsld", "us": 12.5, "GB/s": 2400.0, "peak%": 71.6}]
    lines = gpu_check.summary_lines({"environment": env, "tests": gpu_check.parse_junit(path), "report": rows,
                                     "seconds": 300.0, "json": "gpu-check.json"})
    text = "\n".join(lines)
    assert "test_bad" in text and "needs 2 GPUs" in text and "kd fwd+bwd (8, 32000)" in text and "2400" in text
    assert lines[-1].startswith("FAIL") and len(lines) < 40
    path.write_text(JUNIT.replace('<failure message="AssertionError: 1 != 2">x</failure>', "")
                    .replace('<skipped message="needs CUDA"/>', ""))
    clean = gpu_check.summary_lines({"environment": env, "tests": gpu_check.parse_junit(path), "report": None,
                                     "seconds": 1.0, "json": "g.json"})
    assert clean[-1].startswith("PASS")
    assert gpu_check.summary_lines({"environment": dict(env, extension_cuda_kernels=False),
                                    "tests": gpu_check.parse_junit(path), "report": None, "seconds": 1.0,
                                    "json": "g.json"})[-1].startswith("FAIL")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_without_a_gpu_it_says_so_and_fails(capsys):
    assert gpu_check.main(["--json", "unused.json"]) == 1
    assert "no CUDA device here" in capsys.readouterr().err


def test_environment_names_the_kernels():
    env = gpu_check.environment()
    assert {"torch", "extension", "extension_cuda_kernels", "triton", "gpus"} <= set(env)


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
    env = {"device": "NVIDIA H100", "capability": "9.0", "sms": 132, "gpus": 1, "torch": "2.14", "cuda": "13.0",
           "triton_version": "3.8", "extension_cuda_kernels": True, "triton": True}
    tests = {"passed": 900, "failed": 0, "errors": 0, "skipped": 0, "problems": []}
    lines = gpu_check.summary_lines({"environment": env, "tests": tests, "report": rows, "seconds": 400.0,
                                     "json": "gpu-check.json"})
    assert len(lines) <= 60 and all(len(line) <= 120 for line in lines)
    assert sum("vs eager 2.50x, compile 1.50x" in line for line in lines) == len(cases)
    assert any("vs released 2.00x" in line for line in lines) and lines[-1].startswith("PASS")
