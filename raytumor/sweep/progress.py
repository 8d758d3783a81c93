"""The Train workers' epoch bars on a sweep's console, closed when Tune ends their trial.

A worker's bar (``ray.experimental.tqdm_ray``) is drawn by the driver from the states the
worker prints, and only the worker can close it. A trial that ASHA stops, or that fails, is
killed mid-run, so its bar stayed open: redrawn under the other trials' bars, its elapsed
time still counting, and drawn once more below the sweep's leaderboard. Ray has no public
call for this; the driver's bar manager is reached through its documented module, and a
Ray whose manager looks different leaves the bars as they are.
"""

from __future__ import annotations

import re
import time

from ray import tune

ENDED_SUFFIX = " (ended)"
# A worker's last bar state travels through its log file to the driver, and its last result
# through Ray Train and Tune: the state can arrive after Tune ended the trial, and would open
# the bar again. An ended trial's bars are closed again at each Tune step for this long.
LATE_STATE_S = 30.0


def close_worker_bars(trial_id: str | None = None) -> int:
    """Close the driver's open worker bars whose description names ``trial_id`` (as a word),
    or all of them with None. Returns how many were closed."""
    from ray.experimental import tqdm_ray

    manager = tqdm_ray._manager
    if manager is None:
        return 0
    pattern = None if trial_id is None else re.compile(rf"\b{re.escape(trial_id)}\b")
    closed = 0
    try:
        with manager.lock:
            for group in list(manager.bar_groups.values()):
                for bar in list(group.bars_by_uuid.values()):
                    if pattern is None or pattern.search(bar.state["desc"]):
                        bar.bar.set_description(bar.state["desc"] + ENDED_SUFFIX, refresh=False)
                        group.close_bar(bar.state)
                        closed += 1
            if closed:
                manager._update_offsets()
    except (AttributeError, KeyError, TypeError):  # another Ray's internals: leave the bars
        pass
    return closed


class CloseEndedTrialBars(tune.Callback):
    """Closes a trial's worker bars when Tune ends it: stopped early, failed, or done (a bar
    of a trial that finished on its own is already closed by its worker)."""

    def __init__(self):
        self._ended: dict[str, float] = {}

    def _ended_trial(self, trial) -> None:
        self._ended[trial.trial_id] = time.monotonic()
        close_worker_bars(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended_trial(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended_trial(trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        # Only now: the trial restarts under the same id, and its new bars must stay.
        close_worker_bars(trial.trial_id)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._ended.pop(trial.trial_id, None)  # an errored trial that a resumed sweep runs again

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        for trial_id, ended in list(self._ended.items()):
            close_worker_bars(trial_id)
            if now - ended > LATE_STATE_S:
                del self._ended[trial_id]

    def __getstate__(self):
        # Tune saves its callbacks with the sweep; a resumed sweep starts with none pending.
        return {}

    def __setstate__(self, state):
        self._ended = {}
