"""Workers' epoch bars on the driver's console (``ray.experimental.tqdm_ray``): every epoch
shown as it ends, and the bars of trials Tune ended closed. States reach the driver's bar
manager as the log monitor hands them over (``process_state_update``); no Ray is started."""

from __future__ import annotations

import copy
import re
import uuid
from types import SimpleNamespace

import pytest
from ray.experimental import tqdm_ray

from raytumor.sweep.progress import ENDED_SUFFIX, CloseEndedTrialBars, close_worker_bars


@pytest.fixture
def manager(monkeypatch):
    """A fresh driver-side bar manager in place of the process's own."""
    fresh = tqdm_ray._BarManager()
    monkeypatch.setattr(tqdm_ray, "_manager", fresh)
    yield fresh
    for group in fresh.bar_groups.values():
        for bar in group.bars_by_uuid.values():
            bar.bar.close()


def worker_state(desc: str, pid: int, x: int = 1, bar_id: str | None = None) -> dict:
    return {"__magic_token__": tqdm_ray.RAY_TQDM_MAGIC, "x": x, "pos": 0, "desc": desc, "total": 12,
            "unit": "epoch", "ip": "10.0.0.9", "pid": pid, "uuid": bar_id or uuid.uuid4().hex, "closed": False}


def open_descs(manager) -> list[str]:
    """The open bars' descriptions without the manager's coloured ``(pid=..., ip=...)`` prefix."""
    descs = [bar.state["desc"] for group in manager.bar_groups.values() for bar in group.bars_by_uuid.values()]
    return sorted(re.sub(r"\x1b\[[0-9;]*m", "", desc).split(") ", 1)[-1] for desc in descs)


def test_closing_a_trials_bars_leaves_the_other_trials_bars(manager):
    stopped = worker_state("train 0fa430e6 loss 0.6439 val Recall_M 0.094", pid=7966, x=3)
    manager.process_state_update(copy.deepcopy(stopped))
    manager.process_state_update(worker_state("pretrain 0fa430e6 loss 1.2", pid=7967))
    running = worker_state("train 4ad830a4 loss 0.5", pid=7970)
    manager.process_state_update(copy.deepcopy(running))
    manager.process_state_update(worker_state("train 0fa430e", pid=7971))  # a prefix of the id is another trial

    assert close_worker_bars("0fa430e6") == 2
    assert open_descs(manager) == ["train 0fa430e", "train 4ad830a4 loss 0.5"]
    # The running trial's bar still takes its worker's updates.
    manager.process_state_update({**running, "x": 2})
    (group,) = [g for g in manager.bar_groups.values() if g.pid == 7970]
    assert group.bars_by_uuid[running["uuid"]].bar.n == 2

    assert close_worker_bars() == 2 and open_descs(manager) == []


def test_the_ended_bar_line_says_so(manager, capsys):
    manager.process_state_update(worker_state("train 0fa430e6 loss 0.64", pid=7966, x=3))
    close_worker_bars("0fa430e6")
    assert "train 0fa430e6 loss 0.64" + ENDED_SUFFIX in capsys.readouterr().err


def test_callback_closes_ended_trials_again_when_a_late_state_reopens_them(manager):
    callback = CloseEndedTrialBars()
    stopped = worker_state("train 0fa430e6 loss 0.64", pid=7966, x=3)
    manager.process_state_update(copy.deepcopy(stopped))
    callback.on_trial_complete(iteration=5, trials=[], trial=SimpleNamespace(trial_id="0fa430e6"))
    assert open_descs(manager) == []

    # The worker's last state arrives after Tune ended the trial: the bar opens again ...
    manager.process_state_update(copy.deepcopy(stopped))
    assert len(open_descs(manager)) == 1
    # ... until Tune's next step.
    callback.on_step_begin(iteration=6, trials=[])
    assert open_descs(manager) == []


def test_a_recovered_trials_new_bars_stay(manager):
    callback = CloseEndedTrialBars()
    manager.process_state_update(worker_state("train 4ad830a4 loss 0.5", pid=7970))
    callback.on_trial_recover(iteration=5, trials=[], trial=SimpleNamespace(trial_id="4ad830a4"))
    assert open_descs(manager) == []
    # Tune restarts the trial under the same id, on a new worker.
    manager.process_state_update(worker_state("train 4ad830a4", pid=8100, x=0))
    callback.on_step_begin(iteration=6, trials=[])
    assert len(open_descs(manager)) == 1


def test_worker_epoch_bar_shows_every_epoch_as_it_ends(manager, monkeypatch):
    """Each epoch's end, well within a second of the last, reaches the driver as one state
    (each state the driver gets is drawn: one log line, not two, per epoch)."""
    from raytumor.train.loops import _epoch_done, _progress

    sent = []
    process = manager.process_state_update
    monkeypatch.setattr(manager, "process_state_update", lambda state: (sent.append(state), process(state)))
    bar = _progress(rank=0, total=12, start=0, description="train 0fa430e6")
    (state,) = [b.state for g in manager.bar_groups.values() for b in g.bars_by_uuid.values()]
    assert state["x"] == 0 and state["total"] == 12  # drawn before the first epoch ends
    for epoch in range(1, 4):
        _epoch_done(bar, f"train 0fa430e6 loss {1 / epoch:.4f}")
        (state,) = [b.state for g in manager.bar_groups.values() for b in g.bars_by_uuid.values()]
        assert state["x"] == epoch and state["desc"].endswith(f"loss {1 / epoch:.4f}")
    assert [s["x"] for s in sent] == [0, 1, 2, 3]
    _epoch_done(None, "rank 1 has no bar")
    bar.close()
    assert open_descs(manager) == []
    assert _progress(rank=1, total=12, start=0, description="train 0fa430e6") is None
    resumed = _progress(rank=0, total=12, start=5, description="train 0fa430e6")
    (state,) = [b.state for g in manager.bar_groups.values() for b in g.bars_by_uuid.values()]
    assert state["x"] == 5
    resumed.close()


def test_a_restarted_trial_keeps_its_bars_and_a_resumed_sweep_has_nothing_pending(manager):
    import pickle

    callback = CloseEndedTrialBars()
    callback.on_trial_error(iteration=5, trials=[], trial=SimpleNamespace(trial_id="4ad830a4"))
    saved = pickle.loads(pickle.dumps(callback))  # as Tune keeps it in the sweep's state

    # A resumed sweep retries errored trials under their ids: the new run's bars stay,
    # whether Tune has told the callback that the trial started ...
    callback.on_trial_start(iteration=6, trials=[], trial=SimpleNamespace(trial_id="4ad830a4"))
    manager.process_state_update(worker_state("train 4ad830a4", pid=8200, x=0))
    callback.on_step_begin(iteration=7, trials=[])
    assert len(open_descs(manager)) == 1
    close_worker_bars()
    # ... or, in a new process, has not yet.
    manager.process_state_update(worker_state("train 4ad830a4", pid=8300, x=0))
    saved.on_step_begin(iteration=1, trials=[])
    assert len(open_descs(manager)) == 1
