"""``launcher=slurm``: hydra-submitit-launcher's ``submitit_slurm`` with readable submission failures.

``conf/launcher/slurm.yaml`` points ``hydra.launcher._target_`` here (Hydra instantiates launchers only from its
``hydra_plugins`` namespace package, hence this package); every setting and the whole run-time flow
(one array, blocking submitter, requeue) stay submitit's. What this adds, before and around the submission only:

* **A GPU check before anything is submitted.** The default asks one GPU per task (``gpus_per_node: 1``, right for
  users); on a CPU-only partition sbatch refuses that with ``Invalid generic resource (gres) specification`` and
  submitit raises it as a traceback. When ``sinfo`` shows that no node of the partition has any generic resource,
  the launcher stops with one line naming the setting to change (``hydra.launcher.gpus_per_node=null``).
* **sbatch's own refusal as one line** (any other bad option, or when ``sinfo`` could not tell): the first line of
  sbatch's error, with the same hint when it is about GRES.
* **A consistent sweep directory**: when nothing was submitted, the files this launch wrote (submitit's pickles and
  submission script under ``.submitit/``) are removed, and so is the sweep directory itself when only Hydra's
  ``multirun.yaml`` is left in it; results of an earlier sweep in the same directory are never touched.

The failure is raised as ``SystemExit`` (message on stderr, exit status 1), like the sweep summary's failure exit.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

from .checks import gpu_mismatch, partition_gres, sbatch_refusal, tree_of, undo_submission


class CheckedSlurmLauncher(SlurmLauncher):
    """submitit's SLURM launcher that fails before submitting, in one line, where sbatch would refuse (see module).
    :meth:`submit` is the submission itself (``launcher=sbatch`` replaces it)."""

    waits = True  # submit() returns once the jobs have run

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        from submitit.core.utils import FailedJobError

        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        before = tree_of(sweep_dir)
        problem = gpu_mismatch(self.params, partition_gres(self.params.get("partition")))
        if problem is None and not (shutil.which("sbatch") and shutil.which("srun")):
            problem = "vtw: sbatch/srun not found: this launcher needs a SLURM cluster. Nothing was submitted."
        if problem is None:
            try:
                return self.submit(job_overrides, initial_job_idx)
            except FailedJobError as e:
                if "sbatch" not in str(e):  # not a refused submission (a job's own failure): submitit's error
                    raise
                problem = sbatch_refusal(str(e))
            except BaseException:
                if not self.waits:  # nothing ran yet (launcher=sbatch): nothing half-submitted stays
                    undo_submission(sweep_dir, before)
                raise
        undo_submission(sweep_dir, before)
        raise SystemExit(problem)

    def submit(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        """submitit's submission of the sweep as one array, waiting for its results."""
        return super().launch(job_overrides, initial_job_idx)
