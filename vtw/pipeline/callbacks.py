"""Hydra callback: after a sweep (``-m``), summarise it on the submitting machine and log it to W&B.

Registered in ``conf/config.yaml`` under ``hydra.callbacks.sweep_summary``. ``on_multirun_end`` runs once, after
every job of the sweep returned (the local launcher, or the submitit launcher's wait). It writes
``summary.csv`` / ``summary.md`` / ``pareto.png`` into the sweep directory, prints the table, logs the sweep's W&B
summary run, and then exits with status 1 if any job failed (after everything is written).
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("vtw")


class SweepSummaryCallback(Callback):
    def __init__(self, exit_on_failure: bool = True) -> None:
        self.exit_on_failure = exit_on_failure

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from .config import logger_spec
        from .summary import summarize_sweep
        from .wandb_logger import default_group, log_sweep

        sweep_dir = Path(str(config.hydra.sweep.dir))
        summary = summarize_sweep(sweep_dir)
        try:
            logger = logger_spec(OmegaConf.to_container(config.get("logger"), resolve=True))
        except ValueError as e:
            log.warning("sweep summary: not logging to W&B: %s", e)
        else:
            info = log_sweep(logger, summary, group=default_group(sweep_dir))
            if info.get("status") == "logged":
                log.info(
                    "W&B sweep run %s (%s)%s",
                    info["run_id"],
                    info["mode"],
                    f"; upload with `{info['sync']}`" if info.get("sync") else "",
                )
        if self.exit_on_failure and summary.failed:
            raise SystemExit(f"{summary.failed} of {summary.jobs} jobs failed; see {sweep_dir}/summary.md")
