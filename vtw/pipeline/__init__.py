"""The vtw experiment pipeline (Hydra + lmms-eval + W&B): used by ``run.py``; tests call these modules directly.

| module | what |
|---|---|
| :mod:`~vtw.pipeline.schema` | one dataclass per config group: the Hydra schema, its checks, the runtime spec |
| :mod:`~vtw.pipeline.config` | compose ``conf/``; :func:`~vtw.pipeline.config.validate_config` → checked :class:`~vtw.pipeline.schema.Config` |
| :mod:`~vtw.pipeline.job` | :func:`~vtw.pipeline.job.run_job`: one job, start to end |
| :mod:`~vtw.pipeline.evaluate` | lmms-eval glue: task index, ``simple_evaluate``, metrics, per-sample rows |
| :mod:`~vtw.pipeline.layer` | :func:`~vtw.pipeline.layer.resolve_layer`: ``vtw.layer`` → ``K`` (KL search for ``auto``) |
| :mod:`~vtw.pipeline.layer_search` | the cached KL layer search on task samples |
| :mod:`~vtw.pipeline.results` | results dataclasses, ``results.json`` / ``samples.jsonl`` |
| :mod:`~vtw.pipeline.status` | ``job.json``, the state of a job directory, the index of finished jobs by config hash |
| :mod:`~vtw.pipeline.summary` | :func:`~vtw.pipeline.summary.summarize_sweep`: csv / md / rich table / Pareto plot |
| :mod:`~vtw.pipeline.summarize` | ``python -m vtw.pipeline.summarize SWEEP_DIR`` |
| :mod:`~vtw.pipeline.callbacks` | Hydra ``on_multirun_end`` → sweep summary |
| :mod:`~vtw.pipeline.wandb_logger` | W&B runs (job and sweep) |

Importing this package imports nothing heavy; each module imports what it needs.
"""
