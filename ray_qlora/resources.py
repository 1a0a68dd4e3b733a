"""What the nodes of the connected Ray cluster hold, counted node by node.

An actor (a trial, a generation actor, a Serve replica) lives on one node, so room is counted per node:
1 CPU free on each of two nodes holds no 2-CPU actor, though a cluster-wide sum says 2 are free.
"""

from __future__ import annotations

__all__ = ["capacity", "cpu_threads", "free_per_node", "live_nodes", "node_free_cpus", "node_total_cpus", "room"]


def live_nodes() -> list[dict[str, float]]:
    """The total resources of each live node."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def free_per_node() -> list[dict[str, float]]:
    """What is free now on each live node."""
    from ray._private.state import available_resources_per_node  # a DeveloperAPI; Serve's scheduler reads it

    return list(available_resources_per_node().values())


def room(resources: dict[str, float], need: dict[str, float]) -> int:
    """How many actors of ``need`` (resource: amount each, at least one of them above zero) the
    ``resources`` of one node hold."""
    return min(int(resources.get(k, 0.0) // v) for k, v in need.items() if v > 0)


def capacity(nodes: list[dict[str, float]], need: dict[str, float]) -> int:
    """How many actors of ``need`` these nodes hold between them, each on a single node."""
    return sum(room(node, need) for node in nodes)


def node_total_cpus(node_id: str) -> float:
    """The CPUs node ``node_id`` has in all (fixed for the node's life)."""
    import ray

    return next((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["NodeID"] == node_id), 0.0)


def node_free_cpus(node_id: str) -> float:
    """The CPUs no one holds on node ``node_id`` now."""
    from ray._private.state import available_resources_per_node

    return available_resources_per_node().get(node_id, {}).get("CPU", 0.0)


def cpu_threads(reserved: int, node_total: float, node_free: float, cores: int | None = None) -> int:
    """Threads for a CPU worker holding ``reserved`` CPUs on a node where ``node_free`` of ``node_total``
    are held by no one: its own, plus an even share of the free ones, and no more than the node's
    ``cores`` (Ray may be told of more CPUs than the machine has).

    Every ``reserved`` CPUs held on the node count as one more worker that may take its share too, so
    other work on the node (a served model's replica, a data task) makes each worker take less, never
    more: two cores are never asked to run three threads.
    """
    held = max(node_total - node_free, float(reserved))
    sharers = max(1, int(held // reserved))
    threads = reserved + int(max(node_free, 0.0) // sharers)
    return max(reserved, min(threads, cores)) if cores else threads
