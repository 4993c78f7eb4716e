"""LLMEngine: the synchronous engine loop. ``step()`` = schedule -> execute -> update.

It owns the tokenizer, the scheduler (with its KV cache manager), the model runner and the
output processor; the offline ``LLM`` class and the async server wrapper both drive it.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
from typing import Any

import torch

from pagedllm import envs
from pagedllm.config import (
    EngineArgs,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    default_kv_cache_memory,
)
from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.engine.draft_policy import DraftPolicy
from pagedllm.engine.kv_cache_manager import KVCacheManager, NoKVCacheManager
from pagedllm.engine.model_task import resolve_model_task
from pagedllm.engine.ngram_proposer import NgramProposer
from pagedllm.engine.output_processor import OutputProcessor, RequestState, SampleState
from pagedllm.engine.request import Request, RequestStatus
from pagedllm.engine.scheduler import Scheduler, SchedulerStats
from pagedllm.engine.structured_output import StructuredOutputManager
from pagedllm.executor import create_executor
from pagedllm.lora import LoRARequest, read_peft_config
from pagedllm.model_executor.loader import (
    load_hf_config,
    load_tokenizer,
    resolve_model,
    resolve_quantization,
)
from pagedllm.model_executor.model_runner import ModelRunner
from pagedllm.model_executor.models.hf_config import arch_config_from_hf
from pagedllm.model_executor.models.registry import get_model_class
from pagedllm.model_executor.worker import WorkerConfig
from pagedllm.outputs import EmbeddingRequestOutput, RequestOutput
from pagedllm.pooling_params import PoolingParams
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PromptType = str | dict | list[int]


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        source = resolve_model(args.model, revision=args.revision)
        hf_config = load_hf_config(source)
        # A quantized checkpoint's own method (AWQ, GPTQ, compressed-tensors), else the flag.
        self.quantization = resolve_quantization(source, args.quantization)
        self.tokenizer = load_tokenizer(source, args.tokenizer)
        arch = arch_config_from_hf(hf_config)
        model_cls = get_model_class(arch)
        self.task = resolve_model_task(args, arch, model_cls, source)
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        max_model_len = _max_model_len(args.max_model_len, arch, self.task.max_len)
        self.model_config = ModelConfig(
            model=source.model,
            dtype=args.dtype,
            max_model_len=max_model_len,
            vocab_size=arch.vocab_size,
            num_layers=arch.num_layers,
            num_kv_heads=arch.num_kv_heads,
            head_dim=arch.head_dim,
            eos_token_ids=_eos_token_ids(hf_config, self.tokenizer),
            runner_type=self.task.runner_type,
            pooler_config=self.task.pooler_config,
            matryoshka_dimensions=(
                list(arch.matryoshka_dimensions) if arch.matryoshka_dimensions else None
            ),
        )
        if args.enable_lora:
            _check_lora_support(self.task.runner_type, model_cls)
        if args.tensor_parallel_size > 1:  # before any worker starts
            model_cls.check_tensor_parallel(arch, args.tensor_parallel_size)
        binds = envs.cpu_threads_bind()
        if binds is not None and len(binds) != args.tensor_parallel_size:
            raise ValueError(
                f"PAGEDLLM_CPU_THREADS_BIND lists {len(binds)} ranks' cores; "
                f"--tensor-parallel-size is {args.tensor_parallel_size}"
            )
        worker_config = WorkerConfig(
            source=source,
            arch=arch,
            dtype=args.dtype,
            device=str(self.device),
            kv_cache_dtype=args.kv_cache_dtype,
            quantization=self.quantization,
            block_size=args.block_size,
            seed=args.seed,
            world_size=args.tensor_parallel_size,
            cpu_binds=binds,
            dist_timeout_s=envs.dist_timeout(),
            pooler_config=self.task.pooler_config,
            max_lora_rank=args.max_lora_rank if args.enable_lora else None,
            deterministic=args.deterministic,
        )
        # Loaded LoRA adapters: id -> (request, prefix-cache salt of this load).
        self.loras: dict[int, tuple[LoRARequest, bytes]] = {}
        self._lora_loads = itertools.count()
        self.executor = create_executor(
            worker_config, args.distributed_executor_backend, args.ray_address
        )
        try:
            self._init_cache_and_scheduler(args, arch, max_model_len)
        except BaseException:
            self.executor.shutdown()
            raise
        logger.info(
            "engine ready in %.1f s (model %s, %s, tensor parallel %d, runner %s%s)",
            time.perf_counter() - t0,
            source.model,
            args.dtype,
            args.tensor_parallel_size,
            self.task.runner_type,
            f", pooling {self.task.pooler_config}" if self.task.pooler_config else "",
        )

    @property
    def is_pooling(self) -> bool:
        return self.task.runner_type == "pooling"

    def _init_cache_and_scheduler(self, args: EngineArgs, arch: Any, max_model_len: int) -> None:
        # MEAN / CLS pooling reads every token of the prompt in the step that ends it: no
        # chunks, no prefix-cache hits.
        whole_prompts = self.is_pooling and self.task.pooler_config.pooling_type != "LAST"
        chunked = args.enable_chunked_prefill and not whole_prompts
        max_batched = args.max_num_batched_tokens or (2048 if chunked else max(2048, max_model_len))
        self.scheduler_config = SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=max_batched,
            max_model_len=max_model_len,
            enable_chunked_prefill=chunked,
            max_loras=args.max_loras if args.enable_lora else None,
        )
        if self.task.is_encoder:
            self.executor.collective_rpc("allocate_kv_cache", 0, args.block_size)
            self.kv_cache_manager = NoKVCacheManager(args.block_size)
        else:
            self._init_kv_cache(args, arch, max_model_len, caching=not whole_prompts)
        self.speculative_config = None
        if not self.is_pooling:
            self.speculative_config = SpeculativeConfig.parse(args.speculative_config)
        attention = self.runner.backend.attention
        if (
            self.speculative_config is not None
            and args.speculative_config == "auto"
            and not attention.drafts_by_default
        ):
            logger.info(
                "speculative decoding is off by default on the %s backend (checking drafts "
                "costs more there than they win); --speculative-config turns it on",
                attention.name,
            )
            self.speculative_config = None
        proposer, draft_policy = None, None
        if self.speculative_config is not None:
            rows = (self.speculative_config.num_speculative_tokens + 1) * (
                arch.num_heads // arch.num_kv_heads
            )
            limit = self.runner.backend.attention.max_verify_rows
            if limit is not None and rows > limit:
                raise ValueError(
                    f"speculative_config: (num_speculative_tokens + 1) x query heads per kv "
                    f"head is {rows}, more than the {self.runner.backend.name} verify kernel "
                    f"takes ({limit}): lower num_speculative_tokens"
                )
            proposer = NgramProposer(self.speculative_config)
            if self.speculative_config.adaptive:
                draft_policy = DraftPolicy()
        self.structured_output = None
        if not self.is_pooling:
            self.structured_output = StructuredOutputManager(
                self.tokenizer, arch.vocab_size, self.model_config.eos_token_ids
            )
        self.scheduler = Scheduler(
            self.scheduler_config,
            self.kv_cache_manager,
            proposer,
            draft_policy,
            self.structured_output,
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self.num_steps = 0
        self._step_req_ids: list[str] = []  # the requests of the step running now

    def _init_kv_cache(
        self, args: EngineArgs, arch: Any, max_model_len: int, caching: bool
    ) -> None:
        num_blocks = self._num_kv_blocks(args)
        # Every layer sliding (Mistral): blocks behind the window go back to the pool, and a
        # sequence holds about one window plus one step.
        window = get_model_class(arch).kv_window(arch)
        self.kv_cache_manager = KVCacheManager(
            num_blocks,
            args.block_size,
            enable_caching=args.enable_prefix_caching and caching,
            sliding_window=window,
            max_step_tokens=self.scheduler_config.max_num_batched_tokens if window else None,
        )
        if not self.kv_cache_manager.can_fit(max_model_len):
            held = self.kv_cache_manager.max_blocks_held(max_model_len)
            raise ValueError(
                f"the KV cache ({num_blocks} blocks of {args.block_size} tokens) cannot hold one "
                f"sequence of max_model_len={max_model_len} tokens ({held} blocks"
                f"{f' with its sliding window of {window}' if window else ''}): raise "
                f"kv_cache_memory or lower max_model_len"
            )
        self.executor.collective_rpc("allocate_kv_cache", num_blocks, args.block_size)
        kv_mib = num_blocks * self.runner.kv_bytes_per_block(args.block_size) / 2**20
        logger.info(
            "# KV blocks: %d (block size %d, %.1f MiB, kv_cache_dtype %s)",
            num_blocks,
            args.block_size,
            kv_mib,
            args.kv_cache_dtype,
        )
        logger.info(
            "Maximum concurrency for %d tokens per request: %.2fx%s",
            max_model_len,
            num_blocks / self.kv_cache_manager.max_blocks_held(max_model_len),
            f" (blocks behind the {window}-token sliding window freed early)" if window else "",
        )

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args)

    @property
    def max_model_len(self) -> int:
        return self.model_config.max_model_len

    @property
    def runner(self) -> ModelRunner:
        """Rank 0's model runner."""
        return self.executor.runner

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (idempotent)."""
        self.executor.shutdown()

    # ---- requests ------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | PoolingParams | None = None,
        arrival_time: float | None = None,
        group_id: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Validate and queue a request; raises ValueError (and changes nothing) on bad input.
        Its n samples, and requests given the same ``group_id``, take turns as one group.
        A pooling engine takes PoolingParams (embeddings), a generating one SamplingParams.
        ``lora_request``: run it with that LoRA adapter (loaded on first use)."""
        if self.output_processor.has(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        lora_id, salt = self._use_lora(lora_request)
        if self.is_pooling:
            self._add_pooling_request(request_id, prompt, params, arrival_time, group_id)
            return
        if isinstance(params, PoolingParams):
            raise ValueError(
                "this model runs as a generative model: embeddings need a pooling model "
                "(--runner pooling, or --convert embed for a decoder)"
            )
        params = params or SamplingParams()
        prompt_text, prompt_ids = self._tokenize(prompt)
        params = self._finalize_params(params, len(prompt_ids))
        if params.structured_outputs is not None:
            # A cache hit when the server compiled it beforehand, off this thread.
            self.structured_output.compile(params.structured_outputs)
        samples, requests = {}, []
        for i in range(params.n):
            child_params = params
            if params.n > 1:
                child_params = params.clone()
                if params.seed is not None:
                    child_params.seed = params.seed + i
            child_id = request_id if params.n == 1 else f"{i}_{request_id}"
            grammar = None
            if params.structured_outputs is not None:
                grammar = self.structured_output.new_matcher(params.structured_outputs)
            req = Request(
                child_id,
                prompt_ids,
                child_params,
                arrival_time,
                group_id or request_id,
                grammar,
                lora_id=lora_id,
                cache_salt=salt,
            )
            requests.append(req)
            samples[child_id] = SampleState(
                index=i,
                detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids, child_params),
                logprobs=[] if params.logprobs is not None else None,
            )
        for req in requests:
            try:
                self.scheduler.add_request(req)
            except ValueError:
                self.scheduler.finish_requests(
                    [r.req_id for r in requests if r is not req], RequestStatus.FINISHED_ABORTED
                )
                raise
        self.output_processor.add_request(
            RequestState(request_id, prompt_text, prompt_ids, params, samples)
        )

    def _add_pooling_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | PoolingParams | None,
        arrival_time: float | None,
        group_id: str | None,
    ) -> None:
        if isinstance(params, SamplingParams):
            raise ValueError(
                "this model runs as a pooling (embedding) model: it makes embeddings, not "
                "text (LLM.embed, /v1/embeddings); serve a generative model for completions"
            )
        params = params or PoolingParams()
        self._check_dimensions(params.dimensions)
        prompt_text, prompt_ids = self._tokenize(prompt, params.truncate_prompt_tokens)
        # Only the prompt runs: its length bound is the prompt (max_tokens 1, never sampled).
        request = Request(
            request_id,
            prompt_ids,
            SamplingParams(max_tokens=1),
            arrival_time,
            group_id,
            pooling_params=params,
        )
        self.scheduler.add_request(request)
        self.output_processor.add_pooling_request(request_id, prompt_text, prompt_ids)

    # ---- LoRA adapters ---------------------------------------------------------------------------
    def add_lora(self, lora_request: LoRARequest) -> None:
        """Load an adapter on every rank (ValueError naming the problem for a bad one). Its
        KV is cached apart from the base model's and every other adapter's."""
        if not self.args.enable_lora:
            raise ValueError("LoRA adapters need enable_lora=True (--enable-lora)")
        loaded = self.loras.get(lora_request.lora_int_id)
        if loaded is not None:
            if loaded[0] != lora_request:
                raise ValueError(
                    f"lora_int_id {lora_request.lora_int_id} is already in use by adapter "
                    f"{loaded[0].lora_name!r} ({loaded[0].lora_path})"
                )
            return
        read_peft_config(lora_request.lora_path, self.args.max_lora_rank)  # fails fast
        errors = self.executor.collective_rpc("add_lora", lora_request, all_ranks=True)
        error = next((e for e in errors if e is not None), None)
        if error is not None:
            self.executor.collective_rpc("remove_lora", lora_request.lora_int_id)
            raise ValueError(error)
        key = f"lora:{lora_request.lora_int_id}:{next(self._lora_loads)}"
        self.loras[lora_request.lora_int_id] = (
            lora_request,
            hashlib.blake2b(key.encode(), digest_size=16).digest(),
        )

    def remove_lora(self, lora_id: int) -> bool:
        """Unload an adapter; ValueError while requests still run with it."""
        if lora_id not in self.loras:
            return False
        if any(r.lora_id == lora_id for r in self.scheduler.requests.values()):
            raise ValueError(f"LoRA adapter {self.loras[lora_id][0].lora_name!r} is in use")
        self.executor.collective_rpc("remove_lora", lora_id)
        del self.loras[lora_id]
        return True

    def list_loras(self) -> set[int]:
        return set(self.loras)

    def _use_lora(self, lora_request: LoRARequest | None) -> tuple[int | None, bytes | None]:
        if lora_request is None:
            return None, None
        if not isinstance(lora_request, LoRARequest):
            raise ValueError("lora_request must be a LoRARequest")
        self.add_lora(lora_request)
        return lora_request.lora_int_id, self.loras[lora_request.lora_int_id][1]

    def _check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is None:
            return
        hidden = self.runner.arch.hidden_size
        allowed = self.model_config.matryoshka_dimensions
        if dimensions == hidden or (allowed and dimensions in allowed):
            return
        if not allowed:
            raise ValueError(
                f"dimensions={dimensions}: this model's embeddings have {hidden} values and it "
                "was not trained to be cut shorter (no Matryoshka dimensions in its config)"
            )
        raise ValueError(
            f"dimensions={dimensions}: this model's embeddings can be cut to "
            f"{_describe_dims(allowed)} values"
        )

    def abort_request(
        self, request_id: str | list[str]
    ) -> list[RequestOutput | EmbeddingRequestOutput]:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        outputs = []
        for rid in ids:
            children = self.output_processor.child_ids(rid)
            self.scheduler.finish_requests(children, RequestStatus.FINISHED_ABORTED)
            out = self.output_processor.abort(rid)
            if out is not None:
                outputs.append(out)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.get_num_unfinished_requests()

    # ---- the loop ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput | EmbeddingRequestOutput]:
        self._step_req_ids = []
        scheduler_output = self.scheduler.schedule()
        self._step_req_ids = list(scheduler_output.num_scheduled_tokens)
        t0 = time.perf_counter()
        runner_output = self.executor.execute_model(scheduler_output)
        seconds = time.perf_counter() - t0
        core_outputs = self.scheduler.update_from_output(scheduler_output, runner_output, seconds)
        outputs, stopped = self.output_processor.process(core_outputs)
        if stopped:
            self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        self.num_steps += 1
        return outputs

    def abort_failed_step(self) -> list[RequestOutput | EmbeddingRequestOutput]:
        """After step() raised: abort the requests that step ran (their state may be half
        updated: tokens scheduled, never computed), freeing their blocks; the rest (waiting,
        or not scheduled in it) go on. -> their final (aborted) outputs. The runner drops
        their state with the next step's finished ids, as for any abort."""
        failed = {self.output_processor.child_to_parent.get(c, c) for c in self._step_req_ids}
        failed &= {*self.output_processor.requests, *self.output_processor.pooling}
        self._step_req_ids = []
        return self.abort_request(sorted(failed))

    def get_stats(self) -> SchedulerStats:
        return self.scheduler.make_stats()

    # ---- helpers -------------------------------------------------------------------------------
    def _tokenize(
        self, prompt: PromptType, truncate: int | None = None
    ) -> tuple[str | None, list[int]]:
        """``truncate``: keep that many tokens (-1: max_model_len), cutting the end of the
        text as the tokenizer does (its special tokens kept, as sentence-transformers) or of
        the token ids, instead of refusing a prompt over max_model_len."""
        if truncate == -1:
            truncate = self.max_model_len
        if truncate is not None and truncate > self.max_model_len:
            raise ValueError(
                f"truncate_prompt_tokens={truncate} is more than max_model_len={self.max_model_len}"
            )
        if isinstance(prompt, dict) and "prompt_token_ids" not in prompt and "prompt" in prompt:
            prompt = prompt["prompt"]
        if isinstance(prompt, str) and truncate is not None:
            text = prompt
            ids = self.tokenizer(prompt, truncation=True, max_length=truncate)["input_ids"]
        elif isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, ids = prompt.get("prompt"), list(prompt["prompt_token_ids"])
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            text, ids = None, list(prompt)
        else:
            raise ValueError(
                "prompt must be a string, a list of token ids, or a dict with 'prompt' or "
                f"'prompt_token_ids', got {type(prompt).__name__}"
            )
        if not ids:
            raise ValueError("prompt must not be empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        if truncate is not None:
            ids = ids[:truncate]
        if len(ids) > self.max_model_len:
            hint = " (or pass truncate_prompt_tokens to cut it)" if self.is_pooling else ""
            raise ValueError(
                f"prompt has {len(ids)} tokens, more than max_model_len={self.max_model_len}{hint}"
            )
        return text, ids

    def _finalize_params(self, params: SamplingParams, num_prompt_tokens: int) -> SamplingParams:
        vocab = self.model_config.vocab_size
        if any(t >= vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be below the vocabulary size {vocab}")
        if params.seed is not None and params.n > 1 and params.seed + params.n > 2**63:
            raise ValueError("seed + n must fit in 64 bits")
        params = params.clone()
        if params.max_tokens is None:
            params.max_tokens = max(1, self.max_model_len - num_prompt_tokens)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.model_config.eos_token_ids)
        params.all_stop_token_ids = stop_ids
        return params

    def _num_kv_blocks(self, args: EngineArgs) -> int:
        if args.num_kv_blocks is not None:
            return args.num_kv_blocks
        per_block = self.runner.kv_bytes_per_block(args.block_size)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(total * args.gpu_memory_utilization) - (total - free)
        else:
            budget = args.kv_cache_memory or default_kv_cache_memory()
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise ValueError(
                f"KV cache budget of {budget} bytes holds no block of {per_block} bytes"
            )
        return num_blocks


def _check_lora_support(runner_type: str, model_cls: type) -> None:
    if runner_type != "generate":
        raise ValueError("LoRA adapters are served on generative models only (--runner generate)")
    if getattr(model_cls, "packed_modules_mapping", None) is None:
        raise ValueError(f"{model_cls.__name__} does not support LoRA adapters")


def _describe_dims(dims: list[int]) -> str:
    if dims == list(range(1, dims[-1] + 1)):
        return f"any number from 1 to {dims[-1]}"
    return ", ".join(map(str, dims))


def _max_model_len(requested: int | None, arch: Any, trained_len: int | None = None) -> int:
    """``trained_len``: the length an embedder was trained for (sentence-transformers'
    max_seq_length, e.g. 256 for all-MiniLM-L6-v2 over its 512 positions)."""
    limit = arch.max_position_embeddings
    if trained_len:
        limit = min(limit, trained_len)
    if requested is None:
        return limit
    if requested > limit:
        raise ValueError(
            f"max_model_len={requested} exceeds the model's limit of {limit} positions"
        )
    return requested


def _eos_token_ids(hf_config: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    for source in (
        getattr(hf_config, "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(t) for t in source)
    return sorted(ids)
