"""The SLURM launcher without a cluster: its options, its command line, and its runs through submitit's local executor.

The local executor runs each job as a process of this machine through the same submitit machinery (pickled
callables, result files, logs) that a cluster's jobs go through; tests/study/test_slurm_cluster.py runs the
same launcher on a real SLURM cluster.
"""

import json
import os
import types

import pytest

from fastabsld.recipe import report
from fastabsld.study import cli, compare as compare_mod
from fastabsld.study.compare import compare
from fastabsld.recipe.config import TrainConfig
from fastabsld.study.launcher_options import collect_command
from fastabsld.study import slurm
from fastabsld.study.slurm import JOBS_FILE, SLURM_FOLDER, SlurmLauncher, SlurmOptions, parse_sbatch_option
from tests.study.launch_helpers import assert_same_runs, cache_fixed_teacher

pytest.importorskip("submitit", reason="the SLURM launcher needs submitit (pip install 'fastabsld[slurm]')")



@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """The run plots are tested with the recipe's report; here they would only cost time."""
    monkeypatch.setattr(report, "plot_run", lambda *args, **kwargs: [])


STUDY = dict(methods=["trades", "rslad"], seeds=[0], reference="rslad", attacks=["clean"])


def test_options_are_checked_where_given():
    for bad in (dict(cpus_per_run=0), dict(gpus_per_run=-1), dict(time_min=0), dict(max_requeues=1.5),
                dict(mem_gb=0), dict(partition=""), dict(sbatch={"": "x"}), dict(array_parallelism=True)):
        with pytest.raises(ValueError, match=f"SlurmOptions.{next(iter(bad))}"):
            SlurmOptions(**bad)
    assert parse_sbatch_option("constraint=a100") == ("constraint", "a100")
    assert parse_sbatch_option("--exclusive=") == ("exclusive", "")
    for bad in ("constraint", "=a100"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            parse_sbatch_option(bad)
    with pytest.raises(ValueError, match="choose one"):
        SlurmLauncher("out", collect=True, resubmit=True)
    with pytest.raises(ValueError, match="cluster must be"):
        SlurmLauncher("out", cluster="pbs")


def test_command_line_errors_and_collect_command(capsys):
    assert cli.main(["compare", "--no-wait"]) == 2
    assert "error: --no-wait only apply to --launcher slurm" in capsys.readouterr().err
    assert cli.main(["compare", "--launcher", "slurm", "--collect", "--resubmit"]) == 2
    assert "choose one" in capsys.readouterr().err
    assert cli.main(["compare", "--launcher", "slurm", "--sbatch", "exclusive"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    argv = ["compare", "trades", "--launcher", "slurm", "--no-wait", "--out", "runs/my study"]
    assert collect_command("fastabsld", argv) == ("fastabsld compare trades --launcher slurm --out 'runs/my study' "
                                                  "--collect")


def test_jobs_give_the_figures_and_weights_of_local_runs(tmp_path, digits):
    config = cache_fixed_teacher(tmp_path / "cache")
    local_out, job_out = str(tmp_path / "local"), str(tmp_path / "jobs")
    local = compare(local_out, **STUDY, config=config, data=digits, log=lambda *_: None)
    lines = []
    launcher = SlurmLauncher(job_out, cluster="local", poll_s=0.2, log=lines.append)
    jobs = compare(job_out, **STUDY, config=config, data=digits, log=lines.append, launcher=launcher)
    assert_same_runs(local, jobs, local_out, job_out)
    assert any(line.startswith("submitted 2 runs as job array") for line in lines), lines
    with open(os.path.join(job_out, SLURM_FOLDER, JOBS_FILE)) as f:
        assert sorted(json.load(f)["runs"]) == ["rslad-seed0", "trades-seed0"]
    # Collecting again reads the finished runs; nothing is submitted.
    again = compare(job_out, **STUDY, config=config, data=digits, log=lines.append,
                    launcher=SlurmLauncher(job_out, cluster="local", collect=True, log=lines.append))
    assert len(again["reused"]) == 2 and again["trained"] == []
    assert_same_runs(local, again, local_out, job_out)


def test_no_wait_collect_failure_report_and_resubmit(tmp_path, digits):
    config = cache_fixed_teacher(tmp_path / "cache")
    out = str(tmp_path / "jobs")
    broken = os.path.join(out, "trades-seed0")
    os.makedirs(broken)
    with open(os.path.join(broken, "last.pt"), "wb") as f:
        f.write(b"not a checkpoint")  # the run's job fails reading it

    def launcher(lines, **kwargs):
        return SlurmLauncher(out, cluster="local", poll_s=0.2, collect_command="COLLECT --collect",
                             log=lines.append, **kwargs)

    lines = []
    left = compare(out, **STUDY, config=config, data=digits, log=lines.append, launcher=launcher(lines, wait=False))
    assert sorted(left["unfinished"]) == ["rslad-seed0", "trades-seed0"] and left["collect"] == "COLLECT --collect"
    assert any("collect the runs later with: COLLECT --collect" in line for line in lines), lines

    lines = []
    with pytest.raises(ValueError, match=r"1 job failed \(trades seed 0; reported above\); submit them again "
                                         r"with: COLLECT --resubmit"):
        compare(out, **STUDY, config=config, data=digits, log=lines.append, launcher=launcher(lines, collect=True))
    report = "\n".join(lines)
    assert "trades seed 0 (job " in report and f"run folder {broken}" in report
    assert "failed: it raised fastabsld.recipe.errors.CheckpointError" in report, report
    stderr = [line for line in lines if line.startswith("    | ")]  # the traceback's end, its last line the error
    assert lines[lines.index(stderr[0]) - 1].startswith("  last lines of its stderr (")
    assert "is not a fastabsld checkpoint" in stderr[-1]
    records = json.load(open(os.path.join(out, SLURM_FOLDER, JOBS_FILE)))

    # Collecting again names the same failure and submits nothing; the plain call does not retry it either.
    for kwargs in (dict(collect=True), dict()):
        with pytest.raises(ValueError, match="1 job failed"):
            compare(out, **STUDY, config=config, data=digits, log=lambda *_: None, launcher=launcher([], **kwargs))
        assert json.load(open(os.path.join(out, SLURM_FOLDER, JOBS_FILE))) == records

    os.remove(os.path.join(broken, "last.pt"))
    lines = []
    result = compare(out, **STUDY, config=config, data=digits, log=lines.append,
                     launcher=launcher(lines, resubmit=True))
    assert any(line.startswith("submitted 1 run as job array") for line in lines), lines
    assert sorted(result["runs"]) == ["rslad", "trades"] and len(result["reused"]) == 1


class _RunningJob:
    """A job the scheduler says runs (no result yet)."""

    job_id = "41_0"
    state = "RUNNING"
    paths = types.SimpleNamespace(result_pickle=types.SimpleNamespace(exists=lambda: False))


def test_a_job_ending_between_two_looks_is_read_before_it_counts_as_done(tmp_path):
    launcher = SlurmLauncher(str(tmp_path), cluster="local")
    ended = types.SimpleNamespace(job_id="42_0", state="COMPLETED", paths=_RunningJob.paths)
    key = ("trades", 0)
    assert launcher._counts({key: ended}, None, set())[0] == {"pending": 0, "running": 1, "done": 0, "failed": 0}
    assert launcher._counts({key: ended}, None, {key})[0] == {"pending": 0, "running": 0, "done": 1, "failed": 0}


def test_ctrl_c_while_waiting_leaves_the_jobs_and_says_how_to_collect(tmp_path, monkeypatch, capsys):
    lines = []
    launcher = SlurmLauncher(str(tmp_path), cluster="local", collect_command="COLLECT --collect", log=lines.append)
    key = ("trades", 0)
    monkeypatch.setattr(launcher, "_submit", lambda *args: {key: _RunningJob()})
    monkeypatch.setattr(slurm.time, "sleep", lambda seconds: (_ for _ in ()).throw(KeyboardInterrupt))
    pending = [(key, TrainConfig(method="trades"), str(tmp_path / "trades-seed0"))]
    with pytest.raises(KeyboardInterrupt):
        list(launcher.train(pending, None, None, None, lines.append))
    assert lines[-1] == ("stopped waiting; the jobs keep running on the cluster. Collect them with: "
                         "COLLECT --collect")
    assert lines[-2].endswith("runs: 0 pending, 1 running, 0 done, 0 failed")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare_mod, "compare", interrupted)
    assert cli.main(["compare", "trades", "--launcher", "slurm", "--out", str(tmp_path / "cmp")]) == 130
    assert capsys.readouterr().err.strip() == "interrupted; the SLURM jobs keep running (collect them as said above)"
