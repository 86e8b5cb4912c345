"""The application a Serve config deploys (`import_path: ops.rayservice:app_builder`, as the Helm
chart's RayService renders it): the settings file named in `args["config"]`, with the
environment's overrides, built by `serving.wiring.build_app`."""

from __future__ import annotations

from ray import serve

from ops.settings import load_settings
from serving.wiring import build_app


def app_builder(args: dict) -> serve.Application:
    """`args["config"]`: the path of a protege settings file."""
    if not args.get("config"):
        raise ValueError("args.config: missing (the path of a protege settings file)")
    return build_app(load_settings(args["config"]))
