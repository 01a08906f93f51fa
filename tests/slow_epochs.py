"""A Hydra callback for the cluster tests: every epoch takes `seconds` longer, so that a 1-minute SLURM time limit
falls in the middle of training whatever the machine's speed. It only sleeps: the numbers are unchanged.

    +hydra.callbacks.slow._target_=tests.slow_epochs.SlowEpochs +hydra.callbacks.slow.seconds=0.5
"""

from __future__ import annotations

import time

from hydra.experimental.callback import Callback


class SlowEpochs(Callback):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_job_start(self, config, **kwargs) -> None:
        from reglab import tracking

        log_epoch = tracking.RunRecord.log_epoch
        if getattr(log_epoch, "slowed", False):  # jobs that share a process (basic launcher) patch it once
            return
        seconds = self.seconds

        def slow_log_epoch(record, metrics):
            time.sleep(seconds)
            log_epoch(record, metrics)

        slow_log_epoch.slowed = True
        tracking.RunRecord.log_epoch = slow_log_epoch
