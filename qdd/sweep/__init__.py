"""``qdd-cli sweep SWEEP.yaml [--out DIR] [--seed N]`` (`qdd.api.sweep`): a W&B sweep, run
offline on one machine. The package's seams: `schema` (what a local sweep runs), `sampling`
(grid and random draws), `macros` (W&B's command macros), `runner` (the trials).

The YAML is the one ``wandb sweep`` takes (``configs/sweeps/``), and is read as W&B reads it:

- ``method: grid`` (every combination, in the YAML's order, the last parameter varying
  fastest) or ``method: random`` (``run_cap`` draws, seeded by ``--seed``: trial i's
  parameters depend only on the seed and i). ``bayes`` needs W&B's server and is refused.
- ``parameters:`` with W&B's distributions (`DISTRIBUTIONS`), inferred from the keys as W&B
  does when ``distribution`` is absent (``values`` → categorical, ``value`` → constant,
  integer ``min``/``max`` → int_uniform, other ``min``/``max`` → uniform). A grid takes
  categorical, constant, int_uniform and q_uniform parameters, as W&B's grid does.
- ``run_cap`` (at most that many trials), ``metric`` (``name``, ``goal``, ``target``: the
  sweep stops once a trial reaches it).
- ``command:`` running ``qdd-cli fit ...`` with W&B's macros (`expand_command`). Every macro
  is expanded or refused before the first trial starts.

Keys a local run cannot honour (``early_terminate``, ``scheduler``, ``metrics``, Launch
keys) are refused in one line rather than ignored. Where W&B's own validator (the
``sweeps`` package of ``wandb[sweeps]``) is installed, its schema is checked too.

Every trial is a `qdd.api.fit` call (`runner`) into ``DIR/trial-NNN``, a normal fit run
folder, its output in ``trial-NNN/sweep.log``. ``DIR/sweep.json`` records the seed, the
trials, their parameters, exit codes (0 or 1) and the sweep's metric; a trial that already
finished with the same arguments is not run again, so an interrupted sweep resumes, and
trials a lowered ``run_cap`` no longer plans stay recorded. A metric that no trial logged
(a misspelt ``metric.name``) is a warning naming the metrics that were logged, and a
non-zero exit.
"""

from qdd.sweep.macros import ARGS_MACROS, expand_command
from qdd.sweep.runner import Trial, logged_metrics, run_sweep
from qdd.sweep.sampling import grid, sample, trials
from qdd.sweep.schema import DISTRIBUTIONS, distribution, load_sweep, read_sweep

__all__ = [
    "ARGS_MACROS",
    "DISTRIBUTIONS",
    "Trial",
    "distribution",
    "expand_command",
    "grid",
    "load_sweep",
    "logged_metrics",
    "read_sweep",
    "run_sweep",
    "sample",
    "trials",
]
