"""llama-cpp-python's own OpenAI-compatible server (`llama_cpp.server`), running pi_backend.

    python -m pi_backend.adapters.llamacpp.server --model model.powerinfer.gguf --backend powerinfer \\
        [--mode sparse] [--threshold 0.0] [--vram_budget 4] [--ffn_act reglu] [--pi_options '{"device": "cpu"}']
        [every llama_cpp.server flag]
    python -m pi_backend.adapters.llamacpp.server --config_file models.json   # multi-model, per-model "backend"

This is a launcher, not a fork: the FastAPI app, routes, locking and streaming are the stock ones. It
only (1) extends the stock model settings with `backend` and pi_backend's engine options (CLI flags,
config-file keys, and environment variables PI_BACKEND, PI_MODE, PI_THRESHOLD, PI_VRAM_BUDGET,
PI_FFN_ACT, PI_OPTIONS), and (2) wraps the stock model loader (`LlamaProxy.load_llama_from_model_settings`) so those
settings reach `llama_cpp.Llama(...)` as keywords. Needs the server extras: fastapi, uvicorn,
sse-starlette, starlette-context, pydantic-settings.

`main(argv)` returns an exit status, for `pi-backend serve`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Literal, Optional

try:
    from pydantic import Field
    from llama_cpp.server.settings import ModelSettings, ServerSettings
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError("the llama-cpp-python server needs its extras: pip install fastapi uvicorn sse-starlette "
                      "starlette-context pydantic-settings") from e

from . import BACKEND, default_options, engine_options  # noqa: F401  (also installs the backend= hook)
from .backend import STOCK_BACKENDS

# the settings fields that become pi_backend keywords of llama_cpp.Llama (besides backend)
ENGINE_FIELDS = ("mode", "threshold", "vram_budget", "ffn_act")


PI_FIELDS = ("backend",) + ENGINE_FIELDS + ("pi_options",)


def _env_name(field: str) -> str:
    return field.upper() if field.startswith("pi_") else f"PI_{field.upper()}"


class PiModelSettings(ModelSettings):
    """The stock model settings plus the backend and pi_backend's engine options."""

    backend: Literal["llama.cpp", "powerinfer"] = Field(
        default="llama.cpp",
        description="Inference backend: 'llama.cpp' (stock) or 'powerinfer' (pi_backend's sparse FFN).")
    mode: Optional[Literal["sparse", "oracle", "dense", "threshold"]] = Field(
        default=None, description="pi_backend FFN mode (backend powerinfer; default: the file's natural mode).")
    threshold: Optional[float] = Field(
        default=None, description="pi_backend: override every layer's predictor / threshold-mode cut.")
    vram_budget: Optional[float] = Field(
        default=None, description="pi_backend: GiB of GPU memory for hot neurons.")
    ffn_act: Optional[Literal["reglu", "drelu", "relu", "swiglu"]] = Field(
        default=None, description="pi_backend: FFN activation, for dense ReLU GGUFs whose metadata does not say.")
    pi_options: Optional[Dict[str, Any]] = Field(
        default=None, description="pi_backend: further engine options as a JSON object, e.g. "
                                  '\'{"device": "cpu", "hot_threads": 1}\' (see pi_backend.engine.model.EngineOptions).')

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        """Our fields come from the environment only as PI_BACKEND, PI_MODE, ..., PI_OPTIONS: names such as
        MODE or THRESHOLD in the shell must not leak in (the stock fields keep their stock names)."""

        def environment() -> dict:
            values = env_settings()
            for name in PI_FIELDS:
                values.pop(name, None)
                value = os.environ.get(_env_name(name))
                if value not in (None, ""):
                    values[name] = json.loads(value) if name == "pi_options" else value
            return values

        return init_settings, environment, dotenv_settings, file_secret_settings


class PiSettings(ServerSettings, PiModelSettings):
    pass


class PiConfigFileSettings(ServerSettings):
    """Config-file format: the stock one, each model with its own `backend` and engine options."""

    models: List[PiModelSettings] = Field(default=[], description="Model configs")


def llama_options(settings) -> dict:
    """The keywords a model's settings add to llama_cpp.Llama(...) ({} for stock llama.cpp)."""
    backend = getattr(settings, "backend", None) or "llama.cpp"
    opts = dict(getattr(settings, "pi_options", None) or {})
    opts.update({k: getattr(settings, k) for k in ENGINE_FIELDS if getattr(settings, k, None) is not None})
    unknown = sorted(set(opts) - set(engine_options()))
    if unknown:
        raise ValueError(f"model {getattr(settings, 'model', '?')}: unknown pi_backend option(s) {', '.join(unknown)}; "
                         f"expected some of {', '.join(engine_options())}")
    if backend in STOCK_BACKENDS:
        if opts:
            raise ValueError(f"model {getattr(settings, 'model', '?')}: {', '.join(opts)} need backend powerinfer")
        return {}
    return {"backend": backend, **opts}


def install_server_hook() -> None:
    """Wrap the stock server's model loader so settings' `backend` / engine options reach Llama(...).
    Idempotent; stock ModelSettings (no `backend`) load exactly as before."""
    from llama_cpp.server.model import LlamaProxy

    current = LlamaProxy.__dict__["load_llama_from_model_settings"]
    current = getattr(current, "__func__", current)
    if getattr(current, "_pi_backend_hook", False):
        return

    def load_llama_from_model_settings(settings):
        opts = llama_options(settings)
        if not opts:
            return current(settings)
        with default_options(**opts):
            return current(settings)

    load_llama_from_model_settings._pi_backend_hook = True  # type: ignore[attr-defined]
    load_llama_from_model_settings.__wrapped__ = current  # type: ignore[attr-defined]
    LlamaProxy.load_llama_from_model_settings = staticmethod(load_llama_from_model_settings)


def create_app(settings: Optional[PiSettings] = None, server_settings: Optional[ServerSettings] = None,
               model_settings: Optional[List[PiModelSettings]] = None):
    """The stock `llama_cpp.server.app.create_app`, with the backend hook installed."""
    from llama_cpp.server.app import create_app as stock_create_app

    install_server_hook()
    if server_settings is None and model_settings is None:
        settings = settings if settings is not None else PiSettings()
        server_settings = ServerSettings.model_validate(settings.model_dump(include=set(ServerSettings.model_fields)))
        model_settings = [PiModelSettings.model_validate(
            settings.model_dump(include=set(PiModelSettings.model_fields)))]
    return stock_create_app(server_settings=server_settings, model_settings=model_settings)


def load_config_file(path: str) -> tuple[ServerSettings, List[PiModelSettings]]:
    if not os.path.exists(path):
        raise ValueError(f"Config file {path} not found!")
    with open(path, "rb") as f:
        if path.endswith((".yaml", ".yml")):
            import yaml

            cfg = PiConfigFileSettings.model_validate_json(json.dumps(yaml.safe_load(f)))
        else:
            cfg = PiConfigFileSettings.model_validate_json(f.read())
    return ServerSettings.model_validate(cfg), cfg.models


def build_parser() -> argparse.ArgumentParser:
    from llama_cpp.server.cli import add_args_from_model

    parser = argparse.ArgumentParser(
        prog="python -m pi_backend.adapters.llamacpp.server",
        description="llama-cpp-python's OpenAI-compatible server with pi_backend as a backend "
                    "(--backend powerinfer)")
    add_args_from_model(parser, PiSettings)
    parser.add_argument("--config_file", type=str, help="Path to a config file to load (JSON or YAML).")
    return parser


def parse_settings(argv=None) -> tuple[ServerSettings, List[PiModelSettings]]:
    """argv -> (server settings, model settings), as the stock `python -m llama_cpp.server` does."""
    from llama_cpp.server.cli import parse_model_from_args

    parser = build_parser()
    args = parser.parse_args(argv)
    config_file = os.environ.get("CONFIG_FILE", args.config_file)
    if config_file:
        return load_config_file(config_file)
    return parse_model_from_args(ServerSettings, args), [parse_model_from_args(PiModelSettings, args)]


def main(argv=None) -> int:
    try:
        server_settings, model_settings = parse_settings(argv)
    except SystemExit as e:  # argparse: --help or a bad flag
        return int(e.code or 0)
    except Exception as e:  # invalid settings: a clear message, not a traceback
        print(f"pi-backend serve: error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    app = create_app(server_settings=server_settings, model_settings=model_settings)
    uvicorn.run(app, host=os.getenv("HOST", server_settings.host),
                port=int(os.getenv("PORT", server_settings.port)),
                ssl_keyfile=server_settings.ssl_keyfile, ssl_certfile=server_settings.ssl_certfile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
