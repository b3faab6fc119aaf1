"""vtw experiment entry point: ``python run.py [overrides]``, ``python run.py -m key=a,b`` for a sweep.

Thin on purpose: Hydra composes ``conf/``; :func:`vtw.pipeline.job.run_job` does the work (docs/pipeline.md). A
bad config value is one line on stderr (exit status 1); in a sweep a failing job is recorded (``job.json``) and the
sweep goes on; the sweep summary marks it.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from vtw.pipeline.resolvers import register_resolvers, share_launch
from vtw.pipeline.schema import register_schema

register_resolvers()  # the conf/ interpolations ${vtw_uid:}, ${vtw_slug:...}, ${vtw_asset:...}
register_schema()  # conf/config.yaml's first default: the typed schema of every group
log = logging.getLogger("vtw")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> str:
    from vtw.pipeline.config import ConfigError
    from vtw.pipeline.job import JobContext, run_job

    ctx = JobContext.from_hydra()
    try:
        return run_job(cfg, ctx).status
    except Exception as e:
        if not ctx.multirun:
            if isinstance(e, ConfigError):  # a bad value: its one line (recorded in job.json too), exit status 1
                raise SystemExit(f"error: {e}") from None
            raise
        log.exception("job %s failed (recorded in %s/job.json); the sweep goes on", ctx.job_num, ctx.output_dir)
        return "failed"


if __name__ == "__main__":
    share_launch()  # data parallel (torchrun / accelerate launch): every rank in rank 0's output directory
    main()
