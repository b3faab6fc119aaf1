"""Hydra callback: after a sweep (``-m``), summarise it and log it to W&B (:func:`finish_sweep`).

Registered in ``conf/config.yaml`` under ``hydra.callbacks.sweep_summary``. ``on_multirun_end`` runs once in the
submitting process, after the launcher returned: for the local launcher and submitit's (``launcher=slurm``), after
every job has finished. It writes ``summary.csv`` / ``summary.md`` / ``pareto.png`` into the sweep directory, prints
the table, logs the sweep's W&B summary run, and then exits with status 1 if any job failed (after everything is
written). ``launcher=sbatch`` returns as soon as the jobs are queued, so its config sets ``summarize: false`` here and
a dependent SLURM job calls :func:`finish_sweep` after the array instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("vtw")


def finish_sweep(config: DictConfig, sweep_dir: str | Path, *, console=None):
    """Summarise the sweep in ``sweep_dir`` and log its W&B sweep run with the sweep's ``logger`` settings (from
    ``config``, the sweep's primary config); returns the :class:`~vtw.pipeline.summary.SweepSummary`."""
    from .config import logger_conf
    from .summary import summarize_sweep
    from .wandb_logger import default_group, log_sweep

    sweep_dir = Path(sweep_dir)
    summary = summarize_sweep(sweep_dir, console=console)
    try:
        logger = logger_conf(OmegaConf.to_container(config.get("logger"), resolve=True))
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
    return summary


class SweepSummaryCallback(Callback):
    def __init__(self, exit_on_failure: bool = True, summarize: bool = True) -> None:
        self.exit_on_failure = exit_on_failure
        self.summarize = summarize

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from ..lmms.distributed import world

        if not self.summarize or not world().main:  # data parallel: rank 0 summarises
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        summary = finish_sweep(config, sweep_dir)
        if self.exit_on_failure and summary.failed:
            raise SystemExit(f"{summary.failed} of {summary.jobs} jobs failed; see {sweep_dir}/summary.md")
