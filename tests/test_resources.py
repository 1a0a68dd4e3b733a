"""Room counted node by node: how many actors of a given need fit what one node or several hold."""

from __future__ import annotations

from ray_qlora.resources import capacity, cpu_threads, room


def test_room_is_the_scarcest_resource_and_ignores_what_is_not_asked() -> None:
    assert room({"CPU": 8.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}) == 1  # the GPU runs out first
    assert room({"CPU": 8.0}, {"CPU": 3.0, "GPU": 0.0}) == 2  # no GPU asked: a GPU-less node holds them
    assert room({"CPU": 4.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 0.5}) == 2  # fractions of a GPU
    assert room({"CPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}) == 0  # a GPU asked where there is none


def test_capacity_counts_each_actor_on_one_node() -> None:
    two_small = [{"CPU": 1.0}, {"CPU": 1.0}]
    assert capacity(two_small, {"CPU": 2.0}) == 0  # 2 CPUs in all, but no node has 2
    assert capacity([{"CPU": 2.0}, {"CPU": 2.0}], {"CPU": 1.5}) == 2  # not the sum's 2.67
    assert capacity([], {"CPU": 1.0}) == 0


def test_a_cpu_worker_borrows_its_share_of_the_free_cpus_on_its_node() -> None:
    assert cpu_threads(1, node_total=2, node_free=1) == 2  # its sibling stopped: both cores
    assert cpu_threads(1, node_total=2, node_free=0) == 1  # the sibling is back: its own only
    assert cpu_threads(1, node_total=4, node_free=2) == 2  # two trials share the two free CPUs
    assert cpu_threads(2, node_total=8, node_free=4) == 4  # the share is per reservation, not per CPU
    assert cpu_threads(1, node_total=4, node_free=1) == 1  # 3 held: as many takers as reservations
    assert cpu_threads(1, node_total=2, node_free=0.5) == 1  # half a CPU free is no thread
    assert cpu_threads(3, node_total=3, node_free=0) == 3  # never fewer than its own
    assert cpu_threads(1, node_total=8, node_free=7, cores=2) == 2  # Ray told of 8 CPUs on a 2-core machine
    assert cpu_threads(4, node_total=8, node_free=4, cores=2) == 4  # the reservation stands, as asked
