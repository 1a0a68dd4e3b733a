"""What the nodes of the connected Ray cluster hold, counted node by node.

An actor (a trial, a generation actor, a Serve replica) lives on one node, so room is counted per node:
1 CPU free on each of two nodes holds no 2-CPU actor, though a cluster-wide sum says 2 are free.
"""

from __future__ import annotations

__all__ = ["capacity", "free_per_node", "live_nodes", "room"]


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
