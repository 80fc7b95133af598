"""``resnet-serve``: options from the command line or ``RESNET_SERVE_*``, then uvicorn."""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType

import uvicorn
from pydantic import ValidationError

from service import logs
from service.app import create_app
from service.metrics import Metrics
from service.repository import RepositoryError
from service.runtime import Runtime
from service.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="resnet-serve",
        description="Serve the models of an ONNX model repository (made by resnet-export) over "
        "HTTP. Every option can also be set as RESNET_SERVE_<OPTION> in the environment.",
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"RESNET_SERVE_{name.upper()}"
        default = field.get_default(call_default_factory=True)
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        help_text = f"{field.description} [env {env}; default: {shown}]"
        if field.annotation in (bool, bool | None):
            p.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            p.add_argument(flag, default=None, help=help_text)
    return p


def settings_from_args(argv: list[str] | None = None) -> Settings:
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    return Settings(**given)


class DrainingServer(uvicorn.Server):
    """Readiness turns 503 the moment SIGTERM/SIGINT arrives; uvicorn then stops
    accepting, lets in-flight requests finish (``timeout_graceful_shutdown``) and runs
    the lifespan shutdown, which drains the batchers."""

    runtime: Runtime | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.runtime is not None:
            self.runtime.draining = True
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            # uvicorn re-raises captured signals after shutdown, so the process would die
            # "by SIGTERM"; a completed drain is a clean exit (0) for orchestrators.
            self._captured_signals.remove(sig)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = settings_from_args(argv)
    except ValidationError as exc:
        print(f"resnet-serve: invalid option: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    try:
        # Loaded before the server starts, so a bad repository fails fast with a message.
        runtime = Runtime.load(settings, Metrics())
    except RepositoryError as exc:
        print(f"resnet-serve: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # onnxruntime refusing a model file, typically
        print(f"resnet-serve: cannot load models: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings, runtime)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # ours (service.access) carries request IDs and models
        log_config=None,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
        lifespan="on",
    )
    server = DrainingServer(config)
    server.runtime = runtime
    server.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
