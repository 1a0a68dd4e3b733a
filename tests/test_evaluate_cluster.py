"""Evaluate's actor pool against a real local Ray (4 CPUs): what the cluster can hold, what other work
(a stand-in for a served model's replicas: a real actor reserving CPUs) leaves free, and the errors a
user gets instead of a wait until Ray Data's start timeout.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from conftest import hold_cpus
from ray_qlora.config import ConfigError, parse_config
from ray_qlora.errors import UserError

pytestmark = pytest.mark.integration


def _cfg(tmp_path: Path, **eval_cfg: Any) -> Any:
    return parse_config({"run": {"output_uri": str(tmp_path)}, "data": {"input_uris": [str(tmp_path)]},
                         "eval": eval_cfg})


def test_actors_are_counted_from_the_nodes_and_impossible_pools_name_the_key(ray_local: None,
                                                                              tmp_path: Path) -> None:
    from ray_qlora.evaluate import _actors

    assert _actors(_cfg(tmp_path, batch_size=1), 100)[0] == 4  # auto: 4 CPUs / 1 CPU each
    assert _actors(_cfg(tmp_path, batch_size=1, cpus_per_actor=2), 100)[0] == 2
    assert _actors(_cfg(tmp_path, batch_size=8), 10)[0] == 2  # never more actors than batches
    with pytest.raises(ConfigError, match=r"eval.cpus_per_actor: .*1 generation actor\(s\) of 8 CPU.*holds 0 "
                                          r".*largest with 4 CPU"):
        _actors(_cfg(tmp_path, cpus_per_actor=8), 10)
    with pytest.raises(ConfigError, match=r"eval.num_actors: evaluate wants 3 generation actor\(s\) of 2 CPU "
                                          r"each on one node, and this cluster holds 2"):
        _actors(_cfg(tmp_path, cpus_per_actor=2, num_actors=3), 10)


def test_other_work_holding_every_cpu_is_a_clear_error_not_a_wait(ray_local: None, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa
    import ray

    from ray_qlora import evaluate

    monkeypatch.setattr(evaluate, "FREE_WAIT_S", 2)
    table = pa.table({"content_hash": [f"h{i}" for i in range(8)]})
    holder = hold_cpus(4)
    try:
        with pytest.raises(UserError, match=r"no generation actor \(1 CPU\) fits .*0 of 4 CPU free.*serve "
                                            r"shutdown"):
            evaluate.generate_on_cluster(_cfg(tmp_path, batch_size=2), table, "base")
    finally:
        ray.kill(holder)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_pool_that_never_starts_ends_at_the_start_timeout_with_a_message(
        ray_local: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    """Where the cluster is said to add nodes on demand nothing is refused up front; a pool that never
    starts (here: 2-CPU actors while other work holds 3 of 4 CPUs) ends at the start timeout, with our
    message alone on the console: Ray Data's stack trace of it goes to its log file only."""
    import pyarrow as pa
    import ray
    from ray.data._internal.logging import HiddenRecordFilter, get_log_directory

    from ray_qlora import evaluate

    monkeypatch.setattr(evaluate, "ACTOR_START_TIMEOUT_S", 3)
    cfg = _cfg(tmp_path, batch_size=2, cpus_per_actor=2).with_overrides({"tune.cluster_autoscales": True})
    seen = _Records()
    logging.getLogger("ray.data").addHandler(seen)
    holder = hold_cpus(3)
    capfd.readouterr()
    try:
        with pytest.raises(UserError, match=r"2 generation actor\(s\) did not start within 3s.*ray status"):
            evaluate.generate_on_cluster(cfg, pa.table({"content_hash": [f"h{i}" for i in range(8)]}), "base")
    finally:
        ray.kill(holder)
        logging.getLogger("ray.data").removeHandler(seen)
    # Ray Data reported the timeout, and every record of that report is one its console handler drops
    report = [r for r in seen.records if r.exc_info or "internal code" in r.getMessage()
              or "Full stack trace" in r.getMessage()]
    assert report and not any(HiddenRecordFilter().filter(r) for r in report)
    console = capfd.readouterr()
    assert "internal code" not in console.err + console.out and "while starting actors" not in console.err
    logged = "".join(p.read_text() for p in Path(get_log_directory()).glob("ray-data*.log"))
    assert "Timed out while starting actors" in logged, "the trace is kept where Ray Data keeps its logs"
    assert not logging.getLogger("ray.data.exceptions").filters, "the filter goes with the pool"


def test_a_pool_shrinks_to_what_is_free_and_waits_for_what_is_being_given_back(
        ray_local: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from ray_qlora import evaluate

    cfg = _cfg(tmp_path, batch_size=1)
    monkeypatch.setattr(evaluate, "FREE_WAIT_S", 2)
    holder = hold_cpus(3)
    try:
        assert evaluate._start_actors(cfg, 10)[0] == 1  # 1 CPU of 4 free: one actor, not a wait for four
    finally:
        ray.kill(holder)
    # resources given back while evaluate waits (a pool or trial that just ended) are waited for
    monkeypatch.setattr(evaluate, "FREE_WAIT_S", 60)
    holder = hold_cpus(4)
    threading.Timer(2.0, ray.kill, args=(holder,)).start()
    assert evaluate._start_actors(cfg, 10)[0] == 4
