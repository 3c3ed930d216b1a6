"""The finetune recipe as components: settings declared once, steps, a divergence monitor, a run lock.

* :mod:`.settings` / :mod:`.flags`: a setting is one dataclass field (default, help, choices,
  check); validation and absl flags both come from it;
* :mod:`.config`: :class:`FinetuneConfig`, every setting of the finetune;
* :mod:`.steps`: ``setup_model``, ``setup_data``, ``setup_optimizer``, ``restore_or_init``,
  ``train_loop``, ``write_outputs`` and the checks before them, each usable alone;
* :mod:`.divergence`: :class:`DivergenceMonitor`, when a run has died and which state was last alive;
* :mod:`.run_lock`: :class:`RunLock`, one run per output directory (a crashed run's lock is taken over);
* :mod:`.io_errors`: a full disk or a folder we may not write, as one line (:class:`OutputDirError`).

:func:`qlora_jax.finetune.run` is the recipe: those steps in sequence.
"""

from qlora_jax.recipe.config import FinetuneConfig
from qlora_jax.recipe.divergence import DivergenceMonitor, Health
from qlora_jax.recipe.io_errors import OutputDirError
from qlora_jax.recipe.run_lock import RunLock, RunLockedError, StaleRunLockError
from qlora_jax.recipe.settings import ConfigError, setting, validate
from qlora_jax.recipe.steps import FinetuneResult, TrainingCollapsedError, TrainState

__all__ = ["ConfigError", "DivergenceMonitor", "FinetuneConfig", "FinetuneResult", "Health", "OutputDirError",
           "RunLock", "RunLockedError", "StaleRunLockError", "TrainState", "TrainingCollapsedError", "setting",
           "validate"]
