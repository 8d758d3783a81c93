"""The sweep's Optuna searcher (imported only where a sweep starts: it imports Ray Tune)."""

from __future__ import annotations

import warnings

from ray.tune.search.optuna import OptunaSearch

# Optuna's warning for a second value at a step it already holds (it keeps the first).
REPEATED_STEP_WARNING = r"The reported value is ignored because this `step=\d+` is already reported"


class ResumableOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that takes a resumed trial's repeated epochs quietly.

    A trial resumed from its last checkpoint (``raytumor sweep --resume``, or a retried
    failure) reports again the epochs it had reported after that checkpoint. Optuna keeps
    the first value for each step, as pruning needs, and warned once per repeat.
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=REPEATED_STEP_WARNING, category=UserWarning)
            super().on_trial_result(trial_id, result)
