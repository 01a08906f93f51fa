"""Against a real SLURM cluster (`make cluster-up`): sweeps through `hydra/launcher=slurm`, time limits, pre-emption
and requeue. Skipped when no SLURM controller answers; `.ci/run` brings a one-node cluster up for them.

Timing: SLURM checks time limits about every 30 s and sends the warning (SIGUSR2) when the limit minus
`signal_delay_s` falls before its next check, so with a 1-minute limit and `signal_delay_s=15` it arrives 15 to 45 s
into a job. Epochs are slowed (tests/slow_epochs.py) so that training outlasts that window whatever the machine.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, job_dirs, read_metrics, read_summary, run_train

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

RUN = [
    "logger=none",
    "trainer.plots=false",
    "dataset.n_train=300",
    "regularizer=dropout",  # dropout draws random masks: a resume must restore the RNG exactly
    "regularizer.dropout.p=0.3",
]


def slow(seconds: float) -> list[str]:
    return [
        "+hydra.callbacks.slow._target_=tests.slow_epochs.SlowEpochs",
        f"+hydra.callbacks.slow.seconds={seconds}",
    ]


def controller_answers() -> bool:
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return ping.returncode == 0 and "UP" in ping.stdout


@pytest.fixture(scope="module")
def warm_matplotlib(tmp_path_factory) -> Path:
    """One matplotlib config directory for every job, its font cache built once (not once per job)."""
    if not controller_answers():
        if os.environ.get(
            "REGLAB_REQUIRE_CLUSTER"
        ):  # set by .ci/run, which started a cluster: never skip there
            pytest.fail("REGLAB_REQUIRE_CLUSTER is set but no SLURM cluster answers (scontrol ping)")
        pytest.skip("no SLURM cluster answers (scontrol ping); `make cluster-up` starts one")
    folder = tmp_path_factory.mktemp("matplotlib")
    env = {**os.environ, "MPLCONFIGDIR": str(folder)}
    subprocess.run([sys.executable, "-c", "import matplotlib.font_manager"], env=env, check=True)
    return folder


@pytest.fixture(autouse=True)
def cluster_env(warm_matplotlib, monkeypatch):
    """What the sweep and, through sbatch's exported environment, its jobs see."""
    monkeypatch.setenv("MPLCONFIGDIR", str(warm_matplotlib))
    monkeypatch.setenv("PYTHONPATH", f"{ROOT / 'src'}{os.pathsep}{ROOT}")  # tests.slow_epochs for the jobs


def start_sweep(args: list[str], sweep: Path, cwd: Path, data_root: Path) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=slurm", *args]
    command += [f"dataset.root={data_root}", f"hydra.sweep.dir={sweep}"]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float) -> str:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"the sweep failed ({process.returncode}):\n{out}\n{err}"
    return out


def slurm_job_ids(sweep: Path) -> list[str]:
    """The SLURM ids of the sweep's jobs, as submitit names their folders (`12` alone, `12_0` in an array)."""
    return sorted(p.parent.name for p in (sweep / ".submitit").glob("*/*_submitted.pkl"))


def job_log(sweep: Path, job_id: str) -> str:
    return "".join(path.read_text() for path in (sweep / ".submitit" / job_id).glob("*_log.out"))


def wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def epochs_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def uninterrupted(args: list[str], tmp_path: Path, data_root: Path) -> list[dict]:
    """The metrics of the same run straight through, on this machine without SLURM."""
    run_dir = tmp_path / "straight"
    run_train([*args, f"hydra.run.dir={run_dir}"], tmp_path, data_root)
    return without_time(read_metrics(run_dir))


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]


def test_a_sweep_through_slurm_records_a_failed_job_and_reports_them_all(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    args = [*RUN, "trainer.epochs=3", "dataset.n_train=300,400,99999"]
    finish(start_sweep(args, sweep, tmp_path, data_root), timeout=180)
    assert len(slurm_job_ids(sweep)) == 3  # each job ran as a SLURM array task
    statuses = [read_summary(job)["status"] for job in job_dirs(sweep)]
    assert statuses == ["completed", "completed", "failed"]
    assert "dataset.n_train=99999" in read_summary(job_dirs(sweep)[2])["error"]
    report = (sweep / "report.md").read_text()
    assert "3 jobs in 3 groups (2 completed, 1 failed)" in report and "dataset.n_train=99999" in report


def test_time_limits_requeue_until_max_num_timeout_then_the_job_is_recorded_as_interrupted(
    tmp_path, data_root
):
    limit = ["hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=15"]
    # 100 epochs x 0.5 s outlast the first warning (at most 45 s in); 5 attempts of at least 11 s each finish them
    requeued_args = [*RUN, "trainer.epochs=100"]
    requeued = start_sweep(
        [*limit, "hydra.launcher.max_num_timeout=4", *slow(0.5), *requeued_args],
        tmp_path / "a",
        tmp_path,
        data_root,
    )
    # the same limit with no resubmission allowed, at the same time (the cluster has a core for each)
    stopped_args = [*RUN, "trainer.epochs=400"]
    stopped = start_sweep(
        [*limit, "hydra.launcher.max_num_timeout=0", *slow(0.5), *stopped_args],
        tmp_path / "b",
        tmp_path,
        data_root,
    )
    finish(stopped, timeout=120)
    finish(requeued, timeout=400)

    (job_id,) = slurm_job_ids(tmp_path / "a")
    log = job_log(tmp_path / "a", job_id)
    assert "this job is timed-out" in log and "restart 1 by SLURM: resuming" in log
    assert read_summary(tmp_path / "a" / "0")["status"] == "completed"
    assert without_time(read_metrics(tmp_path / "a" / "0")) == uninterrupted(
        requeued_args, tmp_path, data_root
    )

    summary = read_summary(tmp_path / "b" / "0")
    assert summary["status"] == "interrupted" and "timed-out too many times" in summary["stop_reason"]
    report = (tmp_path / "b" / "report.md").read_text()
    assert "interrupted" in report and summary["resume"] in report
    # the recorded command finishes the job, here without SLURM
    _python, script, *overrides = shlex.split(summary["resume"])
    subprocess.run(
        [sys.executable, str(ROOT / script), *overrides], cwd=tmp_path, check=True, capture_output=True
    )
    finished = read_summary(tmp_path / "b" / "0")
    assert finished["status"] == "completed" and finished["epochs_run"] == 400


def test_a_preempted_then_requeued_job_ends_exactly_like_an_uninterrupted_run(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    args = [*RUN, "trainer.epochs=60"]
    # a 20-minute limit: submitit counts the SIGUSR2 below as a pre-emption, which max_num_timeout=0 still allows
    process = start_sweep(
        ["hydra.launcher.timeout_min=20", "hydra.launcher.max_num_timeout=0", *slow(0.5), *args],
        sweep,
        tmp_path,
        data_root,
    )
    wait_for(lambda: epochs_logged(sweep / "0") >= 5, "epoch 5", process)
    (job_id,) = slurm_job_ids(sweep)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # submitit's pre-emption notice
    wait_for(lambda: "[reglab] resumed " in job_log(sweep, job_id), "the requeued job's start", process)
    resumed_at = epochs_logged(sweep / "0")
    wait_for(lambda: epochs_logged(sweep / "0") >= resumed_at + 3, "3 more epochs", process)
    subprocess.run(["scontrol", "requeue", job_id], check=True)  # what PreemptMode=REQUEUE does
    finish(process, timeout=180)

    log = job_log(sweep, job_id)
    assert "this job is preempted" in log and "SIGTERM: checkpoint written" in log
    assert "restart 2 by SLURM: resuming" in log
    assert read_summary(sweep / "0")["status"] == "completed"
    assert without_time(read_metrics(sweep / "0")) == uninterrupted(args, tmp_path, data_root)


def test_an_unreachable_controller_gives_one_line_and_no_sweep(tmp_path, data_root, monkeypatch):
    unreachable = tmp_path / "slurm.conf"  # this cluster's configuration, its controller on a closed port
    lines = Path("/etc/slurm/slurm.conf").read_text().splitlines()
    unreachable.write_text("\n".join([*lines, "SlurmctldPort=1"]) + "\n")
    monkeypatch.setenv("SLURM_CONF", str(unreachable))
    sweep = tmp_path / "sweep"
    started = time.monotonic()
    result = run_train(
        ["-m", "hydra/launcher=slurm", *RUN, f"hydra.sweep.dir={sweep}"], tmp_path, data_root, check=False
    )
    assert time.monotonic() - started < 60
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("reglab: error: hydra/launcher=slurm: the SLURM controller does not answer")
    assert not sweep.exists()


def test_the_cluster_keeps_accounting():
    """submitit needs sacct: without accounting a job that dies without its result leaves the sweep waiting."""
    assert subprocess.run(["sacct", "-n", "-X"], capture_output=True, timeout=20).returncode == 0


def start_stacked_sweep(args: list[str], sweep: Path, cwd: Path, data_root: Path) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=stacked_slurm", *args]
    command += [f"dataset.root={data_root}", f"hydra.sweep.dir={sweep}"]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_stacked_sweep_is_one_slurm_job_per_stack_with_the_records_of_a_local_one(tmp_path, data_root):
    args = [*RUN, "trainer.epochs=3", "trainer.seed=0,1,2,3", "hydra.launcher.max_stack=2"]
    args += ["hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2"]
    out = finish(start_stacked_sweep(args, tmp_path / "slurm", tmp_path, data_root), timeout=240)
    assert "4 jobs in 2 SLURM job(s)" in out
    assert len(slurm_job_ids(tmp_path / "slurm")) == 2
    local = tmp_path / "local"
    run_train(
        [
            "-m",
            *args[:-2],
            "hydra/launcher=stacked",
            "hydra.launcher.max_stack=2",
            f"hydra.sweep.dir={local}",
        ],
        tmp_path,
        data_root,
    )
    for mine, theirs in zip(job_dirs(tmp_path / "slurm"), job_dirs(local), strict=True):
        assert read_summary(mine)["stack"]["size"] == 2
        assert without_time(read_metrics(mine)) == without_time(read_metrics(theirs))
    assert (tmp_path / "slurm" / "report.md").exists()


def test_a_preempted_stack_is_requeued_whole_and_every_member_ends_exactly(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    args = [*RUN, "trainer.epochs=40", "trainer.seed=0,1"]
    process = start_stacked_sweep(
        ["hydra.launcher.timeout_min=20", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2"]
        + [*slow(0.2), *args],
        sweep,
        tmp_path,
        data_root,
    )
    wait_for(lambda: epochs_logged(sweep / "0") >= 5, "epoch 5", process)
    (job_id,) = slurm_job_ids(sweep)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # submitit's pre-emption notice
    finish(process, timeout=240)
    assert "this job is preempted" in job_log(sweep, job_id)
    local = tmp_path / "local"
    run_train(["-m", *args, "hydra/launcher=stacked", f"hydra.sweep.dir={local}"], tmp_path, data_root)
    for mine, theirs in zip(job_dirs(sweep), job_dirs(local), strict=True):
        assert read_summary(mine)["status"] == "completed"
        assert without_time(read_metrics(mine)) == without_time(read_metrics(theirs))
