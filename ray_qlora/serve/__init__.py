"""Ray Serve application: an OpenAI-compatible endpoint for a run's merged model.

``api`` (schemas, limits, error bodies) imports neither Ray nor torch; the
deployment, which needs Ray, is loaded only when ``build_app``/``deploy`` are used.
"""

from typing import Any

__all__ = ["build_app", "deploy"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ray_qlora.serve import deployment

        return getattr(deployment, name)
    raise AttributeError(name)
