"""Synchronous successive halving for Ray Tune: every trial is judged at each rung before any goes on.

Asynchronous ASHA (Tune's ``ASHAScheduler``) decides as each trial reaches a
rung, against whoever got there first. With few trials and few slots the
first trials to start reach every rung with nobody to beat and run to the
end, whatever their loss. Here a trial that reaches a rung is paused (its
last report carries a checkpoint) until the whole cohort has reported there;
then the best ``1/reduction_factor`` resume from their checkpoints and the
rest stop. Tune ships this only inside ``HyperBandScheduler``, whose first
bracket never stops anything; this is the single aggressive bracket alone.

Paused trials hold no resources, so the concurrency cap must not count them:
``CohortGenerator`` is Tune's grid/random generator with that cap, and the
scheduler resumes promoted trials only while fewer than the cap are running.
The cohort has to be known up front, so this works with grid and random
sampling, not with a searcher that proposes trials as results come in.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator

__all__ = ["CohortGenerator", "SyncHalving"]


class CohortGenerator(BasicVariantGenerator):
    """Grid and random sampling whose concurrency cap leaves out the trials parked at a rung.

    Tune's own cap counts a paused trial as running until it ends, so a synchronous rung would
    wait forever for trials the cap never lets start.
    """

    def __init__(self, max_concurrent: int, parked: set[str], **kw: Any) -> None:
        super().__init__(max_concurrent=0, **kw)
        self.cap = max_concurrent
        self.parked = parked  # the scheduler's set, shared: both live in the driver

    def next_trial(self) -> Trial | None:
        if self.cap and len(self._live_trials - self.parked) >= self.cap:
            return None
        return super().next_trial()


class SyncHalving(FIFOScheduler):
    """Successive halving in lock-step: at each rung, wait for every trial, keep the best 1/rf.

    ``stopped`` holds the ids of the trials it stopped, so the leaderboard can state the decision.
    """

    label = "SHA"
    _supports_buffered_results = False  # every report must reach on_trial_result: a rung may pause it

    def __init__(self, *, grace_period: int, reduction_factor: int, cohort: CohortGenerator,
                 max_t: int | None = None, time_attr: str = "training_iteration") -> None:
        super().__init__()
        self.grace, self.rf, self.time_attr = grace_period, reduction_factor, time_attr
        self.max_t = max_t  # reports in a whole trial, where known: no rung at or past the last one
        self.cohort = cohort
        self.sign = 1.0  # ranks are sign * metric, lowest first
        self.trials: dict[str, Trial] = {}
        self.rungs: dict[int, dict[str, float]] = {}  # rung iteration -> trial id -> metric there
        self.decided: set[int] = set()
        self.passed: dict[str, int] = {}  # trial id -> last rung iteration it was promoted past
        self.done: set[str] = set()  # ended (completed, stopped, failed): no rung waits for them
        self.parked = cohort.parked  # paused at an undecided rung
        self.to_resume: list[str] = []
        self.stopped: set[str] = set()
        self.restored = False

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        self.sign = -1.0 if mode == "max" else 1.0
        return super().set_search_properties(metric, mode, **spec)

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        self.trials[trial.trial_id] = trial
        if trial.status == Trial.TERMINATED or (trial.last_result or {}).get(self.time_attr):
            self._resumed()

    def _resumed(self) -> None:
        """A restored search (``tune --resume``): which rungs were decided, and for whom, died with the
        driver, so every unfinished trial runs to the end, as Tune's own FIFO would run it."""
        if not self.restored:
            self.restored = True
            self.cohort.parked.clear()  # the generator's set is a restored copy: cap every live trial

    def _next_rung(self, tid: str) -> int:
        passed = self.passed.get(tid)
        return self.grace if passed is None else passed * self.rf

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        if self.restored:
            return TrialScheduler.CONTINUE
        tid, it = trial.trial_id, int(result.get(self.time_attr, 0))
        rung = self._next_rung(tid)
        if it < rung or (self.max_t is not None and rung >= self.max_t):
            return TrialScheduler.CONTINUE
        value = result.get(self._metric) if self._metric else None
        value = float(value) if value is not None else math.nan
        self.rungs.setdefault(rung, {})[tid] = math.inf if math.isnan(value) else self.sign * value
        if not self._complete(rung):
            self.parked.add(tid)
            return TrialScheduler.PAUSE
        winners = self._decide(rung, tune_controller, current=tid)
        return TrialScheduler.CONTINUE if tid in winners else TrialScheduler.STOP

    def _complete(self, rung: int) -> bool:
        """Every trial of the cohort has reported at this rung or ended before reaching it."""
        if rung in self.decided or len(self.trials) < self.cohort.total_samples:
            return False
        at = self.rungs.get(rung, {})
        return all(tid in at or tid in self.done for tid in self.trials)

    def _decide(self, rung: int, tune_controller: Any, current: str | None = None) -> set[str]:
        """Keep the best ceil(n/rf) of the rung (never none); resume them, stop the rest."""
        self.decided.add(rung)
        at = self.rungs.get(rung, {})
        ranked = sorted(at, key=lambda t: at[t])
        winners = set(ranked[:max(1, math.ceil(len(ranked) / self.rf))])
        for tid in ranked:
            was_parked = tid in self.parked
            self.parked.discard(tid)
            if tid in winners:
                self.passed[tid] = rung
                if was_parked:
                    self.to_resume.append(tid)
                continue
            self.stopped.add(tid)
            if tid != current and was_parked:
                tune_controller.stop_trial(self.trials[tid])
        return winners

    def _trial_ended(self, tune_controller: Any, trial: Trial) -> None:
        """A trial no rung waits for any more: a rung that only waited on it can be decided now."""
        self.done.add(trial.trial_id)
        self.parked.discard(trial.trial_id)
        for rung in sorted(self.rungs):
            if self._complete(rung):
                self._decide(rung, tune_controller)

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        self._trial_ended(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        self._trial_ended(tune_controller, trial)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self._trial_ended(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        if self.restored:
            return super().choose_trial_to_run(tune_controller)
        trials = tune_controller.get_trials()
        for trial in trials:
            if trial.status == Trial.PENDING:
                return trial
        running = sum(t.status in (Trial.RUNNING, Trial.PENDING) for t in trials)
        while self.to_resume and (not self.cohort.cap or running < self.cohort.cap):
            trial = self.trials[self.to_resume.pop(0)]
            if trial.status == Trial.PAUSED:
                return trial
        return None

    def debug_string(self) -> str:
        waiting = {r: len(v) for r, v in sorted(self.rungs.items()) if r not in self.decided}
        return (f"Synchronous successive halving (rf {self.rf}): {len(self.parked)} trial(s) waiting at rungs "
                f"{waiting or '-'}, {len(self.stopped)} stopped")
