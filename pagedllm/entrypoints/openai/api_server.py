"""The OpenAI-compatible HTTP server: ``build_app`` (the FastAPI app and its routes),
``build_server`` (app + engine + bound socket) and ``main`` (``pagedllm serve``,
``python -m pagedllm.entrypoints.openai.api_server``).

All per-server state lives on ``app.state`` (engine, servings, metrics, drain state); the module
holds none, so tests can run several servers in one process.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from pagedllm import __version__, envs
from pagedllm.config import EngineArgs
from pagedllm.engine.async_llm import AsyncLLM, EngineState
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.entrypoints.openai.cli_args import (
    ServerConfig,
    config_from_namespace,
    make_arg_parser,
)
from pagedllm.entrypoints.openai.errors import OpenAIError, error_response, install_error_handlers
from pagedllm.entrypoints.openai.launcher import (
    FINAL_FLUSH_TIMEOUT_S,
    GracefulServer,
    bind_socket,
    socket_url,
)
from pagedllm.entrypoints.openai.lora_modules import LoRAModules, LoRANameInUseError
from pagedllm.entrypoints.openai.metrics import PrometheusStatLogger
from pagedllm.entrypoints.openai.middleware import (
    APIKeyAuth,
    BodySizeLimit,
    HTTPMetrics,
    RequestGate,
    ServerState,
)
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    PoolingRequest,
    ScoreRequest,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoRAAdapterRequest,
)
from pagedllm.entrypoints.openai.read_timeouts import BodyReadTimeout, header_timeout_protocol
from pagedllm.entrypoints.openai.request_logger import RequestLogger
from pagedllm.entrypoints.openai.serving import CLIENT_TIMEOUT_HEADER, cancel_on_disconnect
from pagedllm.entrypoints.openai.serving_chat import (
    OpenAIServingChat,
    check_messages,
    messages_to_dicts,
)
from pagedllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagedllm.entrypoints.openai.serving_embedding import OpenAIServingEmbedding
from pagedllm.entrypoints.openai.tokenizer import AsyncTokenizer

logger = logging.getLogger(__name__)


async def health(raw_request: Request) -> Response:
    state = raw_request.app.state
    engine: AsyncLLM = state.engine
    if engine.state in (EngineState.FAILED, EngineState.STOPPED):
        reason = f"it failed: {engine.error}" if engine.error is not None else "it has stopped"
        return error_response(f"the engine is not running: {reason}", 500, code="engine_dead")
    if state.server.draining:
        return error_response("the server is shutting down", 503, code="shutting_down")
    if not engine.is_ready:
        return error_response("the model is still loading", 503, code="model_loading")
    return Response(status_code=200)


async def live(raw_request: Request) -> Response:
    """Liveness (Kubernetes' livenessProbe): the process answers and its engine loop is not
    stuck. 500 once the engine has died or one step has run longer than --stall-timeout; 200
    while the model loads (the startupProbe waits for /ready) and while draining."""
    state = raw_request.app.state
    engine: AsyncLLM = state.engine
    if engine.state in (EngineState.FAILED, EngineState.STOPPED):
        reason = f"it failed: {engine.error}" if engine.error is not None else "it has stopped"
        return error_response(f"the engine is not running: {reason}", 500, code="engine_dead")
    running = engine.step_running_for()
    if running > state.config.stall_timeout:
        return error_response(
            f"the engine loop is stuck: one step has run {running:.0f} s "
            f"(--stall-timeout {state.config.stall_timeout:g})",
            500,
            code="engine_stalled",
        )
    return Response(status_code=200)


async def ready(raw_request: Request) -> Response:
    """Readiness (readinessProbe, load balancers): 200 only when the model is loaded, a real
    forward pass has run (the warm-up request) and the server is not draining; else 503, so
    traffic goes elsewhere without the process being restarted."""
    state = raw_request.app.state
    engine: AsyncLLM = state.engine
    if state.server.draining:
        return error_response("the server is shutting down", 503, code="shutting_down")
    if engine.state == EngineState.LOADING:
        return error_response("the model is still loading", 503, code="model_loading")
    if not engine.is_ready:
        return error_response("the engine is not running", 503, code="engine_dead")
    return Response(status_code=200)


async def version() -> JSONResponse:
    return JSONResponse({"version": __version__})


async def metrics(raw_request: Request) -> Response:
    body, content_type = raw_request.app.state.stat_logger.render()
    return Response(body, media_type=content_type)


def _model_cards(raw_request: Request) -> list[ModelCard]:
    """The base model, then its LoRA adapters (parent: the base model), as vLLM lists them."""
    state = raw_request.app.state
    info = state.engine.info
    base = state.config.served_model_name
    cards = [ModelCard(id=base, root=info.model, max_model_len=info.max_model_len)]
    for lora in list(state.lora_modules.requests.values()):
        cards.append(
            ModelCard(
                id=lora.lora_name,
                root=lora.lora_path,
                parent=base,
                max_model_len=info.max_model_len,
            )
        )
    return cards


async def list_models(raw_request: Request) -> JSONResponse:
    return JSONResponse(ModelList(data=_model_cards(raw_request)).model_dump())


async def retrieve_model(model_id: str, raw_request: Request) -> JSONResponse:
    for card in _model_cards(raw_request):
        if card.id == model_id:
            return JSONResponse(card.model_dump())
    raise OpenAIError(
        f"the model `{model_id}` does not exist", 404, param="model", code="model_not_found"
    )


def _check_runtime_lora(raw_request: Request) -> LoRAModules:
    state = raw_request.app.state
    if not state.config.allow_runtime_lora_updating:
        raise OpenAIError(
            "loading and unloading LoRA adapters at runtime is off: start the server with "
            "--enable-lora --allow-runtime-lora-updating (or VLLM_ALLOW_RUNTIME_LORA_UPDATING=1)",
            404,
            code="not_found",
        )
    return state.lora_modules


async def load_lora_adapter(request: LoadLoRAAdapterRequest, raw_request: Request) -> Response:
    """Check and load the adapter on the engine now (a bad one is a 400 here, not later)."""
    modules = _check_runtime_lora(raw_request)
    engine: AsyncLLM = raw_request.app.state.engine
    try:
        lora = modules.add(request.lora_name, request.lora_path)
    except ValueError as err:
        param = "lora_name" if isinstance(err, LoRANameInUseError) else "lora_path"
        raise OpenAIError(str(err), param=param) from None
    try:
        await engine.call_engine(lambda eng: eng.add_lora(lora))
    except BaseException:
        modules.remove(request.lora_name)
        raise
    return JSONResponse(
        {"message": f"Success: LoRA adapter '{request.lora_name}' added successfully."}
    )


async def unload_lora_adapter(request: UnloadLoRAAdapterRequest, raw_request: Request) -> Response:
    """Unload an adapter no request is running with (400 while one is)."""
    modules = _check_runtime_lora(raw_request)
    engine: AsyncLLM = raw_request.app.state.engine
    lora = modules.get(request.lora_name)
    if lora is None:
        raise OpenAIError(
            f"no LoRA adapter named {request.lora_name!r} is loaded", param="lora_name"
        )
    await engine.call_engine(lambda eng: eng.remove_lora(lora.lora_int_id))
    modules.remove(request.lora_name)
    return JSONResponse(
        {"message": f"Success: LoRA adapter '{request.lora_name}' removed successfully."}
    )


async def _serve(raw_request: Request, handler, request) -> Response:
    """Run a serving's ``handler(request, deadline)`` under the request's deadline (the
    server's, shortened by the client's timeout header), cancelled if the client hangs up."""
    serving = handler.__self__
    deadline = serving.deadline(raw_request.headers.get(CLIENT_TIMEOUT_HEADER))
    return await cancel_on_disconnect(raw_request, handler(request, deadline))


async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
    serving: OpenAIServingCompletion = raw_request.app.state.completion
    return await _serve(raw_request, serving.create, request)


async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
    serving: OpenAIServingChat = raw_request.app.state.chat
    return await _serve(raw_request, serving.create, request)


async def create_embedding(request: EmbeddingRequest, raw_request: Request) -> Response:
    serving: OpenAIServingEmbedding = raw_request.app.state.embedding
    return await _serve(raw_request, serving.create, request)


async def create_pooling(request: PoolingRequest, raw_request: Request) -> Response:
    serving: OpenAIServingEmbedding = raw_request.app.state.embedding
    return await _serve(raw_request, serving.create, request)


async def create_score(request: ScoreRequest, raw_request: Request) -> Response:
    serving: OpenAIServingEmbedding = raw_request.app.state.embedding
    return await _serve(raw_request, serving.score, request)


async def tokenize(request: TokenizeRequest, raw_request: Request) -> JSONResponse:
    state = raw_request.app.state
    state.chat.check_model(request.model)
    tokenizer: AsyncTokenizer = state.tokenizer
    if (request.prompt is None) == (request.messages is None):
        raise OpenAIError("give exactly one of prompt and messages", param="prompt")
    if request.messages is not None:
        check_messages(request.messages)
        add_generation_prompt = request.add_generation_prompt is not False
        tools = [t.model_dump(mode="json", exclude_none=True) for t in request.tools or []]
        _, tokens = await tokenizer.apply_chat_template(
            messages_to_dicts(request.messages), add_generation_prompt, tools or None
        )
    else:
        assert request.prompt is not None
        tokens = await tokenizer.encode(request.prompt, request.add_special_tokens is not False)
    token_strs = (
        await tokenizer.convert_ids_to_tokens(tokens) if request.return_token_strs else None
    )
    response = TokenizeResponse(
        count=len(tokens),
        max_model_len=state.engine.info.max_model_len,
        tokens=tokens,
        token_strs=token_strs,
    )
    return JSONResponse(response.model_dump(exclude_none=True))


async def detokenize(request: DetokenizeRequest, raw_request: Request) -> JSONResponse:
    state = raw_request.app.state
    state.chat.check_model(request.model)
    prompt = await state.tokenizer.decode(request.tokens)
    return JSONResponse(DetokenizeResponse(prompt=prompt).model_dump())


def build_router() -> APIRouter:
    """The routes; their handlers find everything they need on ``request.app.state``."""
    router = APIRouter()
    router.add_api_route("/health", health, methods=["GET"])
    router.add_api_route("/live", live, methods=["GET"])
    router.add_api_route("/ready", ready, methods=["GET"])
    router.add_api_route("/version", version, methods=["GET"])
    router.add_api_route("/metrics", metrics, methods=["GET"])
    router.add_api_route("/v1/models", list_models, methods=["GET"])
    router.add_api_route("/v1/models/{model_id:path}", retrieve_model, methods=["GET"])
    router.add_api_route("/v1/completions", create_completion, methods=["POST"])
    router.add_api_route("/v1/chat/completions", create_chat_completion, methods=["POST"])
    router.add_api_route("/v1/embeddings", create_embedding, methods=["POST"])
    router.add_api_route("/pooling", create_pooling, methods=["POST"])
    router.add_api_route("/score", create_score, methods=["POST"])
    router.add_api_route("/v1/score", create_score, methods=["POST"])
    router.add_api_route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"])
    router.add_api_route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"])
    router.add_api_route("/tokenize", tokenize, methods=["POST"])
    router.add_api_route("/detokenize", detokenize, methods=["POST"])
    return router


def build_app(engine: AsyncLLM, config: ServerConfig, stat_logger: PrometheusStatLogger) -> FastAPI:
    """The FastAPI app over a not-yet-started AsyncLLM; its lifespan starts and stops it."""
    tokenizer = AsyncTokenizer(engine, config.chat_template)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.shutdown)
            tokenizer.shutdown()

    # NOTE: no trailing-slash redirects: their Location echoes the client's Host header.
    app = FastAPI(
        title="pagedllm OpenAI-compatible server",
        version=__version__,
        lifespan=lifespan,
        redirect_slashes=False,
    )
    app.include_router(build_router())
    install_error_handlers(app)
    state = ServerState()
    app.state.config = config
    app.state.engine = engine
    app.state.server = state
    app.state.stat_logger = stat_logger
    app.state.tokenizer = tokenizer
    app.state.lora_modules = LoRAModules(
        config.lora_modules, config.served_model_name, engine.args.max_lora_rank
    )
    servings = (
        engine,
        tokenizer,
        config.served_model_name,
        config.max_seqs_per_request,
        config.request_timeout,
        app.state.lora_modules,
        RequestLogger(config.max_log_len) if config.enable_log_requests else None,
    )
    app.state.completion = OpenAIServingCompletion(*servings)
    app.state.chat = OpenAIServingChat(*servings, tool_call_parser=config.tool_call_parser)
    app.state.embedding = OpenAIServingEmbedding(*servings)
    # Added innermost first: a request meets the gate, then auth, the body limit, the deadline.
    app.add_middleware(BodyReadTimeout, state=state, timeout=config.body_read_timeout)
    app.add_middleware(BodySizeLimit, max_bytes=config.max_request_bytes)
    if config.api_key or config.metrics_api_key:
        app.add_middleware(
            APIKeyAuth, api_key=config.api_key, metrics_api_key=config.metrics_api_key
        )
    app.add_middleware(
        RequestGate, state=state, is_loading=lambda: engine.state == EngineState.LOADING
    )
    if config.allowed_origins:  # outermost: preflights are answered before the key check
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allowed_origins),
            allow_methods=list(config.allowed_methods),
            allow_headers=list(config.allowed_headers),
            allow_credentials=config.allow_credentials,
        )
    routes = frozenset(app.openapi()["paths"]) | {"/docs", "/redoc", "/openapi.json"}
    app.add_middleware(HTTPMetrics, routes=routes, record=stat_logger.record_http)
    return app


def build_server(
    config: ServerConfig,
    engine_args: EngineArgs,
    engine_factory: Callable[[EngineArgs], LLMEngine] = LLMEngine,
) -> tuple[GracefulServer, socket.socket]:
    """-> (server, bound socket): ``server.run(sockets=[sock])`` serves until shut down.
    ``engine_factory`` builds the LLMEngine on the worker thread (tests inject failures)."""
    stat_logger = PrometheusStatLogger(config.served_model_name, config.metrics_prefix)
    engine = AsyncLLM(
        engine_args,
        stat_loggers=[stat_logger],
        engine_factory=engine_factory,
        max_waiting_requests=config.max_waiting_requests,
    )
    app = build_app(engine, config, stat_logger)
    sock = bind_socket(config.host, config.port)
    url = socket_url(sock)
    uvicorn_config = uvicorn.Config(
        app,
        log_level=config.uvicorn_log_level,
        access_log=config.access_log,
        timeout_graceful_shutdown=FINAL_FLUSH_TIMEOUT_S,
        lifespan="on",
        http=header_timeout_protocol(config.header_read_timeout),
    )
    server = GracefulServer(
        uvicorn_config,
        engine=engine,
        state=app.state.server,
        url=url,
        served_model_name=config.served_model_name,
        shutdown_timeout=config.shutdown_timeout,
    )
    return server, sock


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = make_arg_parser().parse_args(argv)
    logging.basicConfig(
        level=envs.log_level(), format="%(levelname)s %(asctime)s %(name)s: %(message)s"
    )
    try:
        config, engine_args = config_from_namespace(ns)
        if config.data_parallel_size > 1:
            from pagedllm.entrypoints.openai.dp_server import serve_data_parallel

            return serve_data_parallel(config, argv)
        server, sock = build_server(config, engine_args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logger.info(
        "listening on %s; loading model %s (/health answers 503 until it is ready)",
        server.url,
        engine_args.model or config.served_model_name,
    )
    server.run(sockets=[sock])
    return server.exit_code


if __name__ == "__main__":
    sys.exit(main())
