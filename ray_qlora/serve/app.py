"""A Serve application builder for ``serve run``/``serve deploy`` and KubeRay's RayService.

Serve config files name an application by ``import_path`` and pass it
``args``; a builder is a one-argument function that turns those args into a
bound application. This one serves a finished run's merged model with the
same application ``ray-qlora serve`` deploys (on the engine serve.engine picks)::

    applications:
      - name: ray-qlora
        import_path: ray_qlora.serve.app:build_from_args
        args: {config: /config/cluster.yaml, run_id: run-001}

No ``from __future__ import annotations`` here: Serve validates ``args``
against the parameter's pydantic model only when the annotation is a class.
"""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ServeArgs", "build_from_args"]


class ServeArgs(BaseModel):
    """The ``args`` of the Serve application; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")

    config: str = Field(description="Pipeline YAML file on the cluster's nodes (e.g. a mounted ConfigMap).")
    run_id: str = Field(description="Run whose merged model is served: <run.output_uri>/runs/<run_id>/merged.")
    overrides: list[str] = Field(
        default_factory=list, description="KEY=VALUE config overrides, as the CLI's --set: serve.gpus_per_replica=1.")


def build_from_args(args: ServeArgs) -> Any:
    """Load the config, check the API keys, and bind the run's merged model (a ``serve.Application``).

    Checking the keys here fails the deploy with the message that says what
    to set, instead of replicas that crash while starting.
    """
    from ray_qlora import storage
    from ray_qlora.config import load_config
    from ray_qlora.serve.deployment import api_keys, build_application

    if isinstance(args, dict):  # called directly rather than by Serve
        args = ServeArgs.model_validate(args)
    cfg = load_config(args.config, args.overrides)
    api_keys(cfg)
    paths = storage.RunPaths.for_run(cfg.run.output_uri, args.run_id)
    return build_application(cfg, paths.merged, cfg.serve.model_name or args.run_id)[0]
