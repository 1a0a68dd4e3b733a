"""Ray Serve application: an OpenAI-compatible endpoint for a run's merged model."""

from ray_qlora.serve.deployment import build_app, deploy

__all__ = ["build_app", "deploy"]
