"""``pagedllm serve`` flags: the server's own (vLLM's names) plus every engine flag, generated
from EngineArgs; ``ServerConfig`` is what the server runs with once the flags are checked."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

from pagedllm import envs
from pagedllm.config import EngineArgs
from pagedllm.entrypoints.engine_cli_args import add_engine_args, engine_args_from_namespace
from pagedllm.entrypoints.openai.lora_modules import parse_lora_module
from pagedllm.entrypoints.openai.metrics import METRICS_PREFIXES
from pagedllm.entrypoints.openai.serving import DEFAULT_MAX_SEQS_PER_REQUEST
from pagedllm.entrypoints.openai.tool_parsers import TOOL_PARSER_CHOICES
from pagedllm.lora import read_peft_config
from pagedllm.model_executor.loader import DEFAULT_MODEL_NAME

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
# /live fails once one engine step has run this long: the loop is stuck, restart the process.
DEFAULT_STALL_TIMEOUT_S = 120.0
DEFAULT_HEADER_READ_TIMEOUT_S = 10.0
DEFAULT_BODY_READ_TIMEOUT_S = 60.0
UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass
class ServerConfig:
    served_model_name: str
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = None
    metrics_api_key: str | None = None
    chat_template: str | None = None  # the template text, not its path
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_seqs_per_request: int = DEFAULT_MAX_SEQS_PER_REQUEST
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    stall_timeout: float = DEFAULT_STALL_TIMEOUT_S
    # Metric names under pagedllm:, vllm: (vLLM's dashboards work unchanged) or both.
    metrics_prefix: str = "pagedllm"
    header_read_timeout: float = DEFAULT_HEADER_READ_TIMEOUT_S
    body_read_timeout: float = DEFAULT_BODY_READ_TIMEOUT_S
    uvicorn_log_level: str = "info"
    access_log: bool = True
    data_parallel_size: int = 1
    tool_call_parser: str = "auto"
    max_waiting_requests: int | None = None  # None: sized from max_num_seqs and the KV cache
    request_timeout: float | None = None  # seconds; None: no server-side deadline
    # LoRA adapters served as models of their own: (name, peft adapter directory).
    lora_modules: tuple[tuple[str, str], ...] = ()
    allow_runtime_lora_updating: bool = False
    # CORS: none by default (browsers on other origins get no access); "*" allows any.
    allowed_origins: tuple[str, ...] = ()
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    # Log each request (id, route, parameters, prompt: first max_log_len chars and ids).
    enable_log_requests: bool = False
    max_log_len: int | None = None

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ValueError("served_model_name must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be positive, got {self.max_request_bytes}")
        if self.max_seqs_per_request < 1:
            raise ValueError(
                f"max_seqs_per_request must be positive, got {self.max_seqs_per_request}"
            )
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")
        for name in ("header_read_timeout", "body_read_timeout", "stall_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.tool_call_parser not in TOOL_PARSER_CHOICES:
            raise ValueError(
                f"tool_call_parser must be one of {', '.join(TOOL_PARSER_CHOICES)}, got "
                f"{self.tool_call_parser!r}"
            )
        if self.max_waiting_requests is not None and self.max_waiting_requests < 1:
            raise ValueError(
                f"max_waiting_requests must be at least 1, got {self.max_waiting_requests}"
            )
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ValueError(f"request_timeout must be positive, got {self.request_timeout}")
        if self.metrics_prefix not in METRICS_PREFIXES:
            raise ValueError(
                f"metrics_prefix must be one of {', '.join(METRICS_PREFIXES)}, got "
                f"{self.metrics_prefix!r}"
            )
        if self.data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {self.data_parallel_size}")
        if self.api_key == "":
            raise ValueError("api_key must not be empty")
        if self.metrics_api_key == "":
            raise ValueError("metrics_api_key must not be empty")
        if self.allow_credentials and "*" in self.allowed_origins:
            raise ValueError(
                "--allow-credentials with --allowed-origins '*' would let any site send "
                "credentialed requests: list the origins"
            )
        if self.max_log_len is not None and self.max_log_len < 0:
            raise ValueError(f"max_log_len must be >= 0, got {self.max_log_len}")


def make_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagedllm serve",
        description="Start the OpenAI-compatible HTTP server (see docs/server.md).",
    )
    parser.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="model to serve (same as --model); default: the embedded SmolLM2-135M-Instruct",
    )
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address to listen on; 127.0.0.1 keeps the server local (vLLM's default is "
        "0.0.0.0: pass it explicitly to accept remote clients) (default: %(default)s)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="TCP port, 0 = any free one (default: %(default)s)",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer <key>' on every route but /health and /version "
        "(/metrics: see --metrics-api-key) (default: env PAGEDLLM_API_KEY; unset = no "
        "authentication)",
    )
    parser.add_argument(
        "--metrics-api-key",
        default=None,
        help="the key /metrics requires, so a Prometheus scraper needs no API key (default: env "
        "PAGEDLLM_METRICS_API_KEY, else the --api-key; neither set = /metrics is open)",
    )
    parser.add_argument(
        "--served-model-name",
        default=None,
        help="model name in the API (the 'model' field); default: the MODEL argument, or "
        f"{DEFAULT_MODEL_NAME} for the default model",
    )
    parser.add_argument(
        "--chat-template",
        default=None,
        help="file with a Jinja chat template that replaces the model's own (an inline "
        "template string is accepted too)",
    )
    parser.add_argument(
        "--tool-call-parser",
        default="auto",
        choices=TOOL_PARSER_CHOICES,
        help="how tool calls are read out of an answer to a request with tools and "
        "tool_choice auto: hermes (<tool_call>{...}</tool_call>), xlam (a JSON list, "
        "SmolLM2's format), llama3_json; auto: the format of the chat template in use "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--max-waiting-requests",
        type=int,
        default=None,
        help="most sequences that may wait for their first token; more get HTTP 429 with a "
        "Retry-After header (default: twice max(--max-num-seqs, the max-length sequences the "
        "KV cache holds))",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        help="seconds a request may take from arrival to its last token; then it is aborted "
        "(its KV blocks freed) and answered 504 (streams: an error event). A client's own "
        "X-Stainless-Timeout header (the openai client sends its timeout) can only shorten it "
        "(default: none)",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="largest request body in bytes; larger ones get HTTP 413 (default: %(default)s)",
    )
    parser.add_argument(
        "--max-seqs-per-request",
        type=int,
        default=DEFAULT_MAX_SEQS_PER_REQUEST,
        help="most sequences one request may fan out into (prompts x n); more get HTTP 400 "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=DEFAULT_SHUTDOWN_TIMEOUT_S,
        help="seconds SIGTERM/SIGINT waits for in-flight requests before aborting them "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--metrics-prefix",
        choices=METRICS_PREFIXES,
        default="pagedllm",
        help="name the /metrics series pagedllm:... , vllm:... (vLLM's own names, so dashboards "
        "and alerts written for vLLM work unchanged) or both (default: %(default)s)",
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=DEFAULT_STALL_TIMEOUT_S,
        help="seconds one engine step may run before GET /live reports the engine loop stuck "
        "(500), so an orchestrator restarts the process (default: %(default)s)",
    )
    parser.add_argument(
        "--header-read-timeout",
        type=float,
        default=DEFAULT_HEADER_READ_TIMEOUT_S,
        help="seconds a client has to send a request's headers before the connection is "
        "closed with 408 (default: %(default)s)",
    )
    parser.add_argument(
        "--body-read-timeout",
        type=float,
        default=DEFAULT_BODY_READ_TIMEOUT_S,
        help="seconds a client has to send a request's whole body before it gets 408 "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--allowed-origins",
        default=None,
        help="CORS: origins browsers may call the API from, as a JSON list "
        "('[\"https://app.example\"]') or comma-separated; '*' = any (default: none, CORS "
        "off: other origins' pages cannot read the answers)",
    )
    parser.add_argument(
        "--allowed-methods",
        default=None,
        help="CORS: allowed methods, JSON list or comma-separated (default: all)",
    )
    parser.add_argument(
        "--allowed-headers",
        default=None,
        help="CORS: allowed request headers, JSON list or comma-separated (default: all)",
    )
    parser.add_argument(
        "--allow-credentials",
        action="store_true",
        help="CORS: allow credentialed requests (cookies, Authorization) from the allowed "
        "origins (never with '*')",
    )
    parser.add_argument(
        "--enable-log-requests",
        "--log-requests",
        action="store_true",
        help="log every request (id, route, model, sampling parameters, prompt text and token "
        "ids); off by default, so no prompt text reaches the logs",
    )
    parser.add_argument(
        "--max-log-len",
        type=int,
        default=None,
        help="with --enable-log-requests: log at most this many prompt characters and token "
        "ids (default: all)",
    )
    parser.add_argument(
        "--uvicorn-log-level",
        default="info",
        choices=UVICORN_LOG_LEVELS,
        help="log level of uvicorn's own loggers (default: %(default)s)",
    )
    parser.add_argument(
        "--disable-uvicorn-access-log",
        action="store_true",
        help="do not log one line per HTTP request",
    )
    parser.add_argument(
        "--data-parallel-size",
        type=int,
        default=1,
        help="run this many engine replicas (each a server process on loopback with its share "
        "of the cores) behind this one, which routes each request to the least-loaded replica "
        "or to the one that cached its prompt's prefix (see docs/distributed.md) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--lora-modules",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help="LoRA adapters (peft directories) to serve, each under its own model name: "
        'name=path, or vLLM\'s JSON \'{"name": ..., "path": ...}\'; needs --enable-lora',
    )
    parser.add_argument(
        "--allow-runtime-lora-updating",
        action="store_true",
        default=envs.allow_runtime_lora_updating(),
        help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (default: env "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING, else off)",
    )
    engine = parser.add_argument_group("engine", "engine options (EngineArgs fields)")
    add_engine_args(engine)  # type: ignore[arg-type]
    return parser


# The server's step budget is smaller than the offline default (2048), as vLLM sizes it by usage:
# prompts arriving together are prefilled in shorter chunks, so the first of them answer sooner.
# Measured with vLLM's client (100 prompts, 256 in / 128 out, concurrency 16, bf16, 2026-11-25):
# TTFT median 300-322 ms at 367-371 output tok/s, against 400-446 ms at 363-377 tok/s with 1024
# (and 504-629 ms with 2048, earlier); a lone 1,800-token prompt's first token: 621 vs 631 ms.
SERVE_MAX_NUM_BATCHED_TOKENS = 512


def config_from_namespace(ns: argparse.Namespace) -> tuple[ServerConfig, EngineArgs]:
    """Check the flags; raises ValueError (or OSError for an unreadable template file)."""
    if ns.model_tag is not None and ns.model is not None and ns.model_tag != ns.model:
        raise ValueError(f"model given twice: {ns.model_tag!r} and --model {ns.model!r}")
    ns.model = ns.model_tag if ns.model_tag is not None else ns.model
    if ns.max_num_batched_tokens is None and ns.enable_chunked_prefill:
        ns.max_num_batched_tokens = SERVE_MAX_NUM_BATCHED_TOKENS
    engine_args = engine_args_from_namespace(ns)
    lora_modules = tuple(parse_lora_module(v) for v in ns.lora_modules)
    if (lora_modules or ns.allow_runtime_lora_updating) and not engine_args.enable_lora:
        raise ValueError("--lora-modules and --allow-runtime-lora-updating need --enable-lora")
    for _, path in lora_modules:  # a bad adapter stops the start, not its first request
        read_peft_config(path, engine_args.max_lora_rank)
    server = ServerConfig(
        served_model_name=ns.served_model_name or ns.model or DEFAULT_MODEL_NAME,
        host=ns.host,
        port=ns.port,
        api_key=ns.api_key if ns.api_key is not None else envs.api_key(),
        metrics_api_key=(
            ns.metrics_api_key if ns.metrics_api_key is not None else envs.metrics_api_key()
        ),
        chat_template=load_chat_template(ns.chat_template),
        max_request_bytes=ns.max_request_bytes,
        max_seqs_per_request=ns.max_seqs_per_request,
        shutdown_timeout=ns.shutdown_timeout,
        stall_timeout=ns.stall_timeout,
        metrics_prefix=ns.metrics_prefix,
        header_read_timeout=ns.header_read_timeout,
        body_read_timeout=ns.body_read_timeout,
        uvicorn_log_level=ns.uvicorn_log_level,
        access_log=not ns.disable_uvicorn_access_log,
        data_parallel_size=ns.data_parallel_size,
        tool_call_parser=ns.tool_call_parser,
        max_waiting_requests=ns.max_waiting_requests,
        request_timeout=ns.request_timeout,
        lora_modules=lora_modules,
        allow_runtime_lora_updating=ns.allow_runtime_lora_updating,
        allowed_origins=_name_list(ns.allowed_origins, "--allowed-origins") or (),
        allowed_methods=_name_list(ns.allowed_methods, "--allowed-methods") or ("*",),
        allowed_headers=_name_list(ns.allowed_headers, "--allowed-headers") or ("*",),
        allow_credentials=ns.allow_credentials,
        enable_log_requests=ns.enable_log_requests,
        max_log_len=ns.max_log_len,
    )
    return server, engine_args


def _name_list(value: str | None, flag: str) -> tuple[str, ...] | None:
    """A JSON list of strings (vLLM's form) or a comma-separated list."""
    if value is None:
        return None
    if value.lstrip().startswith("["):
        try:
            items = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"{flag}: invalid JSON ({err})") from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError(f"{flag}: expected a JSON list of strings")
    else:
        items = value.split(",")
    return tuple(i.strip() for i in items if i.strip())


def load_chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template: no such file: {value!r}")
