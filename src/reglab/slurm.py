"""Before a `hydra/launcher=slurm` sweep submits anything: is there a SLURM cluster that answers?

Without this check an unreachable controller shows up as submitit's traceback from sbatch, and a cluster without
accounting as a sweep that never ends once a job dies without its result (submitit polls job states with sacct).
"""

from __future__ import annotations

import subprocess
import sys

from hydra.experimental.callback import Callback

TIMEOUT_S = 20  # scontrol gives up on an unreachable controller within ~10 s by itself


class CheckCluster(Callback):
    """Hydra callback: a SLURM sweep stops at once, with one line and exit status 1, when `scontrol ping` finds
    no controller; it warns when accounting is off."""

    def on_multirun_start(self, config, **kwargs) -> None:
        if "SlurmLauncher" not in str(config.hydra.launcher.get("_target_", "")):
            return
        problem = controller_problem()
        if problem:
            print(f"reglab: error: hydra/launcher=slurm: {problem}; no job was submitted", file=sys.stderr)
            raise SystemExit(1)
        if not accounting_works():
            print(
                "[reglab] warning: SLURM accounting (slurmdbd) is off: submitit cannot see a job that dies without "
                "its result, and the sweep would then wait forever",
                file=sys.stderr,
            )


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


def controller_problem() -> str | None:
    """None when the SLURM controller answers, else what is wrong, in a few words."""
    try:
        ping = _run(["scontrol", "ping"])
    except FileNotFoundError:
        return "SLURM's commands are not installed here (no scontrol on PATH)"
    except subprocess.TimeoutExpired:
        return f"the SLURM controller did not answer within {TIMEOUT_S} s (scontrol ping)"
    if ping.returncode != 0 or "UP" not in ping.stdout:
        first = next((line for line in (ping.stdout + ping.stderr).splitlines() if line.strip()), "no output")
        return f"the SLURM controller does not answer (scontrol ping: {first.strip()})"
    return None


def accounting_works() -> bool:
    try:
        return _run(["sacct", "-n", "-X", "-j", "1"]).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
