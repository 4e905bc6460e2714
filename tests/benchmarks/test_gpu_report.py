"""The CPU-testable parts of benchmarks/gpu_report.py: byte counts, bandwidth, peak lookup, arguments."""

import pytest
import torch

from benchmarks import gpu_report


def test_bytes_per_op():
    # KD, fp32: s + t read, gradient written, the backward's read + write: 20 B/element, plus 16 B/row
    # (label 8, temperature 4, loss 4). The tile form moves that, and its finishing reduction reads each
    # row's loss and label once more (12 B/row).
    assert gpu_report.kd_bytes(128, 10) == (128 * 10 * 20 + 128 * 16, 128 * 10 * 20 + 128 * (16 + 12))
    assert gpu_report.kd_bytes(128, 10, torch.bfloat16)[0] == 128 * 10 * 10 + 128 * 16
    # The split form (few long rows) re-reads both inputs from L2, not DRAM: the minimum plus its
    # per-row workspace and statistics, well under the 8 B/element a DRAM re-read would add.
    minimum, moved = gpu_report.kd_bytes(8, 32000)
    assert minimum == 8 * 32000 * 20 + 8 * 16 and minimum < moved < minimum + 8 * 32000 * 0.1
    # PGD: x_adv, x, grad read and the output written, whichever norm.
    assert gpu_report.pgd_bytes((2, 3, 4, 4)) == (96 * 4 * 4, 96 * 4 * 4)
    assert gpu_report.pgd_bytes((2, 3, 4, 4), "l2", "bfloat16") == (96 * 2 * 4, 96 * 2 * 4)
    # A large sample takes the persistent L2 kernel: 4 element passes plus the partial sums.
    minimum, moved = gpu_report.pgd_bytes((512, 3, 224, 224), "l2")
    assert minimum == 512 * 3 * 224 * 224 * 16 and minimum < moved < 1.001 * minimum
    with pytest.raises(ValueError, match="norm"):
        gpu_report.pgd_bytes((2, 3), "l1")
    assert gpu_report.gbs(3e9, 1.5) == pytest.approx(2.0)


def test_shapes_are_the_models():
    assert (64, 262144) in gpu_report.KD_SHAPES and (4096, 32000) in gpu_report.KD_SHAPES
    assert set(gpu_report.KD_DTYPES) == {"fp32", "bf16"}
    assert gpu_report.PGD_SHAPES == ((128, 3, 32, 32), (512, 3, 32, 32), (512, 3, 224, 224))


def test_peak_bandwidth():
    # H100 SXM: HBM3 at 2619 MHz on a 5120-bit bus -> ~3352 GB/s.
    assert gpu_report.peak_gbs("NVIDIA H100 80GB HBM3", 2_619_000, 5120) == pytest.approx(3352.3, abs=0.1)
    assert gpu_report.peak_gbs("NVIDIA H200") == 4800.0
    assert gpu_report.peak_gbs("NVIDIA A100-SXM4-80GB") == 2039.0
    assert gpu_report.peak_gbs("Some GPU") is None


def test_arguments_and_cpu_exit(capsys):
    args = gpu_report.parse_args(["--iters", "7", "--skip-train", "--json", "r.json"])
    assert (args.iters, args.skip_train, args.skip_ops, args.json) == (7, True, False, "r.json")
    assert tuple(gpu_report.parse_args([]).models) == ("resnet18", "wrn-34-10")
    with pytest.raises(SystemExit):
        gpu_report.parse_args(["--iters", "0"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exc:
            gpu_report.main(["--skip-train"])
        assert exc.value.code == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_format_rows():
    rows = [{"case": "pgd linf", "impl": "fastabsld", "us": 12.5, "GB/s": 800.0, "peak%": 23.9,
             "kernel GB/s": 1600.0, "kernel peak%": 47.8},
            {"case": "train", "impl": "released", "us": 1000.0, "GB/s": None, "peak%": None, "speed-up": 1.0}]
    text = gpu_report.format_rows(rows)
    assert "12.5us" in text and "800.0" in text and "23.9%" in text and "1.00" in text
    assert "1600.0" in text and "47.8%" in text


def test_smoke_run_on_the_cpu(capsys):
    """--smoke runs every code path of the report (ops and training steps) on the CPU at tiny sizes."""
    assert gpu_report.main(["--smoke"]) is None
    out = capsys.readouterr().out
    for case in ("kd fwd+bwd fp32 (128, 10)", "pgd linf fp32", "pgd l2 fp32", "train step cnn-s/cnn-l B=4"):
        assert case in out
    assert "fastabsld amp+channels-last" in out and "released" in out
