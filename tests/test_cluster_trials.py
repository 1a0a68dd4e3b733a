"""Work across a multi-node Ray: trials one per GPU slot, spread over the nodes, never more at once than
slots; evaluate's actors and Serve's replicas counted on the node that must hold each of them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import hold_cpus
from ray_qlora import evaluate, storage
from ray_qlora.config import parse_config
from ray_qlora.data.sample import SYSTEM_PROMPT
from ray_qlora.demo import upload_sample
from ray_qlora.errors import UserError
from ray_qlora.pipeline import Run, run_stage

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_gpu_nodes() -> Iterator[list[str]]:
    """A head without GPUs and two worker nodes advertising one GPU slot each (no real GPU needed:
    Ray schedules on the advertised slot, and the trial trains on the CPU it finds)."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    workers = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    ray.init(address=cluster.address, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    cluster.wait_for_nodes()
    yield [w.node_id for w in workers]
    ray.shutdown()
    cluster.shutdown()


def test_one_trial_per_gpu_slot_across_nodes(tmp_path: Path, tiny_model_dir: Path, two_gpu_nodes: list[str]) -> None:
    cfg = parse_config({
        "run": {"output_uri": str(tmp_path / "out"), "run_id": "nodes", "seed": 5},
        "data": {"input_uris": [str(tmp_path / "raw")], "system_prompt": SYSTEM_PROMPT, "max_seq_length": 128},
        "model": {"base": str(tiny_model_dir)},
        "lora": {"r": 4, "alpha": 8},
        "training": {"max_steps": 6, "eval_steps": 3, "batch_size": 4},
        "tune": {"search_space": {"learning_rate": {"values": [1e-3, 3e-3, 1e-2]}}, "max_concurrent_trials": 3,
                 "gpus_per_trial": 1, "cpus_per_trial": 1, "asha": {"enabled": False}},
    })
    upload_sample(str(tmp_path / "raw"), cfg.storage)
    run = Run(cfg, "nodes")
    run_stage(run, "prepare")
    result = run_stage(run, "tune")
    assert result["resources_per_trial"] == {"cpu": 1, "gpu": 1.0}
    board = storage.read_json(result["leaderboard_uri"], cfg.storage)
    assert [row["status"] for row in board] == ["completed"] * 3
    assert {row["node_id"] for row in board} <= set(two_gpu_nodes), "trials run only where a GPU slot is"
    assert len({row["node_id"] for row in board}) == 2, "trials spread over both GPU nodes"
    # Each trial's training span, from its worker's clock. Not started_at + wall_s: Tune's time_total_s
    # also counts the model load before started_at, so a trial that loaded slowly (beside another)
    # seemed to run on past the start of the next trial on its node.
    spans = [(row["started_at"], row["last_report_at"], row["node_id"]) for row in board]
    for start, _, _ in spans:  # at any trial's start: at most one trial per slot, never two on a node
        running = [node for s, e, node in spans if s <= start < e]
        assert len(running) <= 2 and len(set(running)) == len(running)


def _until_free_cpus_are(expected: dict[str, float]) -> None:
    """Wait (10 s at most) until Ray's per-node view shows these free CPUs: it follows actors by a moment."""
    from ray._private.state import available_resources_per_node

    deadline = time.monotonic() + 10
    while {n: available_resources_per_node().get(n, {}).get("CPU", 0.0) for n in expected} != expected:
        assert time.monotonic() < deadline, f"free CPUs never became {expected}: {available_resources_per_node()}"
        time.sleep(0.2)


def test_evaluate_counts_free_cpus_on_the_node_that_would_hold_the_actor(
        tmp_path: Path, two_gpu_nodes: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """1 CPU held on each GPU node leaves 4 CPUs and 2 GPUs free in all, which a sum would read as room for
    two 2-CPU, 1-GPU actors; no single node holds one, so evaluate says so instead of starting a pool
    that would wait until its start timeout."""
    import ray

    monkeypatch.setattr(evaluate, "FREE_WAIT_S", 2)
    cfg = parse_config({"run": {"output_uri": str(tmp_path)}, "data": {"input_uris": [str(tmp_path)]},
                        "eval": {"batch_size": 1, "cpus_per_actor": 2}})
    first, second = two_gpu_nodes
    holders = [hold_cpus(1, first), hold_cpus(1, second)]
    try:
        _until_free_cpus_are({first: 1.0, second: 1.0})
        with pytest.raises(UserError, match=r"no generation actor \(2 CPU and 1 GPU\) fits .*4 of 6 CPU free, 2 GPU;"
                                            r" free on each node: 2 CPU \+ 0 GPU, 1 CPU \+ 1 GPU, 1 CPU \+ 1 GPU;"
                                            r" waited 2s\)"):
            evaluate._start_actors(cfg, 10)
        ray.kill(holders[0])
        _until_free_cpus_are({first: 2.0, second: 1.0})
        assert evaluate._start_actors(cfg, 10) == (1, {"CPU": 2.0, "GPU": 1.0})  # the first node holds one
    finally:
        for holder in holders:
            ray.kill(holder)


def test_a_cpu_trial_runs_threads_on_idle_cpus_of_its_node_and_gives_them_back(two_gpu_nodes: list[str]) -> None:
    """A 1-CPU trial on a 2-CPU node trains on both while the other CPU is idle (its sibling stopped),
    drops to one thread once Ray places an actor there, and takes it again when that actor is gone."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    first = two_gpu_nodes[0]

    @ray.remote(num_cpus=1, scheduling_strategy=NodeAffinitySchedulingStrategy(first, soft=False))
    class Trial:
        def __init__(self) -> None:
            from ray_qlora.train import idle_cpus_callback

            self.callback = idle_cpus_callback(reserved=1, every_s=0)

        def step(self) -> int:
            import torch
            from transformers import TrainerState

            self.callback.on_step_begin(None, TrainerState(), None)
            return torch.get_num_threads()

    def threads_become(expected: int) -> None:  # Ray's per-node view follows actors by a moment
        deadline = time.monotonic() + 10
        while (threads := ray.get(trial.step.remote())) != expected:
            assert time.monotonic() < deadline, f"{threads} torch threads, never {expected}"
            time.sleep(0.2)

    trial = Trial.remote()
    try:
        threads_become(2)
        holder = hold_cpus(1, first)
        threads_become(1)
        ray.kill(holder)
        threads_become(2)
    finally:
        ray.kill(trial)


def test_serve_replicas_are_counted_node_by_node(two_gpu_nodes: list[str]) -> None:
    """Serve would wait forever for a replica no node has room for, though the cluster's sums have room."""
    from ray_qlora.config import ConfigError
    from ray_qlora.serve.deployment import check_fits

    def cfg(**serve: Any) -> Any:
        return parse_config({"run": {"output_uri": "s3://b/o"}, "data": {"input_uris": ["x"]},
                             "serve": {"auth": "none", **serve}})

    check_fits(cfg(num_replicas=3, cpus_per_replica=2, gpus_per_replica=0), engines=1)  # one on each node
    check_fits(cfg(num_replicas=2, cpus_per_replica=1.5), engines=1)  # auto: a GPU each, one per GPU node
    # 4 x 1.5 = 6 CPUs, the cluster's sum; one per node holds 3
    with pytest.raises(ConfigError, match=r"4 replica\(s\) .* of 1.5 CPU each do not fit this cluster: its nodes "
                                          r"hold 3, each replica on one node \(6 CPU, 2 GPU in 3 node\(s\)\)"):
        check_fits(cfg(num_replicas=4, cpus_per_replica=1.5, gpus_per_replica=0), engines=1)
    # 4.5 CPUs and 1.5 GPUs of the sums; the head has no GPU, and each GPU node 2 CPUs: room for 2
    with pytest.raises(ConfigError, match=r"of 1.5 CPU and 0.5 GPU each do not fit this cluster: its nodes hold 2"):
        check_fits(cfg(num_replicas=3, cpus_per_replica=1.5, gpus_per_replica=0.5), engines=1)
