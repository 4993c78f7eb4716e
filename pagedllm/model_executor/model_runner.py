"""ModelRunner: owns the model weights and the KV cache tensors; turns a SchedulerOutput into
one forward pass over the whole batch and samples the next tokens. Makes no scheduling
decisions."""

from __future__ import annotations

import logging

import numpy as np
import torch

from pagedllm.config import KV_CACHE_DTYPES, PoolerConfig
from pagedllm.distributed import TensorParallelGroup, single_rank
from pagedllm.model_executor.backends import Backend, select_backend
from pagedllm.model_executor.hugepages import zeros_hugepage
from pagedllm.model_executor.input_batch import ModelInputs, build_encoder_inputs, build_inputs
from pagedllm.model_executor.layers.linear import (
    pack_linear_weights,
    quantize_linear_weights_int8,
)
from pagedllm.model_executor.layers.pooler import Pooler
from pagedllm.model_executor.lora import LoRAManager
from pagedllm.model_executor.malloc_tuning import release_free_memory, tune_glibc_malloc
from pagedllm.model_executor.models.hf_config import ArchConfig
from pagedllm.model_executor.models.registry import get_model_class
from pagedllm.model_executor.request_state import RequestStates
from pagedllm.model_executor.sampler import ExactLogits, Sampler
from pagedllm.model_executor.sampling_metadata import build_sampling_batch
from pagedllm.scheduler_output import ModelRunnerOutput, SampledToken, SchedulerOutput

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelRunner:
    def __init__(
        self,
        arch: ArchConfig,
        dtype: str,
        device: torch.device,
        kv_cache_dtype: str = "auto",
        quantization: str | None = None,
        block_size: int = 16,
        backend: Backend | None = None,
        tp: TensorParallelGroup | None = None,
        pooler_config: PoolerConfig | None = None,
        max_lora_rank: int | None = None,
        deterministic: bool = False,
    ) -> None:
        """``backend``: the kernels to run on; by default the selector's choice for this
        device, dtype and CPU (PAGEDLLM_CPU_ISA), made here once. ``tp``: the tensor-parallel
        rank this runner is (its shard of the weights and of the KV cache's heads); rank 0
        samples, the others only take part in the forward pass. ``pooler_config``: a pooling
        runner, which returns each finished prompt's embedding instead of sampling.
        ``max_lora_rank``: serve LoRA adapters up to that rank (None: no LoRA).
        ``deterministic``: batch-invariant kernels (backends/batch_invariant.py)."""
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}")
        self.arch = arch
        self.dtype = TORCH_DTYPES[dtype]
        if kv_cache_dtype == "bfloat16" and self.dtype == torch.float16:
            raise ValueError("kv_cache_dtype='bfloat16' needs dtype float32 or bfloat16")
        # The cache's dtype: the model's, int8 records, or bf16 (also under an fp32 model:
        # half the bytes the decode kernel streams, the matmuls and residual stay fp32).
        self.kv_dtype = {"int8": torch.int8, "bfloat16": torch.bfloat16}.get(
            kv_cache_dtype, self.dtype
        )
        self.kv_int8 = self.kv_dtype == torch.int8
        self.quantization = quantization
        self.device = device
        if device.type == "cpu":
            tune_glibc_malloc()
        self.backend = select_backend(
            device,
            self.dtype,
            arch.head_dim,
            block_size,
            self.kv_int8,
            backend=backend,
            deterministic=deterministic,
        )
        self.tp = tp or single_rank()
        self.model = get_model_class(arch)(arch, self.tp)
        # An encoder keeps no KV cache: each step is whole prompts, attending both ways.
        self.uses_kv_cache = getattr(self.model, "uses_kv_cache", True)
        if deterministic and not self.uses_kv_cache:
            raise ValueError(
                "--deterministic covers decoders; an encoder's attention (encoder_forward) is "
                "not batch-invariant"
            )
        self.pooler = Pooler(pooler_config) if pooler_config is not None else None
        self.lora = None
        if max_lora_rank is not None:
            self.lora = LoRAManager(
                self.model, self.tp, self.dtype, device, max_lora_rank, self.backend.kernels
            )
        self.num_kv_heads = self.model.num_kv_heads  # this rank's
        self.backend.bind(self.model)
        self.sampler = Sampler(self.backend.kernels)
        self.generators: dict[str, torch.Generator] = {}
        self.requests = RequestStates()  # kept between steps: the scheduler sends deltas
        self.block_size: int | None = None
        self.pad_rows = False  # set by load_weights
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []

    # ---- set-up --------------------------------------------------------------------------------
    def load_weights(self, weights) -> None:
        self.model.load_weights(weights)
        # Matmul weights take the engine dtype; norm weights (and RoPE tables) stay fp32.
        keeps_fp32 = getattr(self.model, "keeps_fp32", lambda name: name.endswith("norm.weight"))
        for name, param in self.model.named_parameters():
            dtype = torch.float32 if keeps_fp32(name) else self.dtype
            param.data = param.data.to(device=self.device, dtype=dtype)
        self.model.compute_dtype = self.dtype
        for layer in self.model.model.layers:
            layer.compute_dtype = self.dtype
        if self.quantization == "int8":
            quantize_linear_weights_int8(self.model)
        # Packed (oneDNN) weights build a GEMM kernel per row count: pad the rows to buckets.
        # The lm_head keeps its plain weight too: _exact_logits reads rows of it.
        lm_head = getattr(self.model, "lm_head", None)
        keep = (lm_head,) if lm_head is not None else ()
        packed = pack_linear_weights(self.model, keep_plain=keep)
        self.pad_rows = packed > 0 and self.backend.linear.pads_rows
        for name, buf in self.model.named_buffers():
            module_name, _, attr = name.rpartition(".")
            self.model.get_submodule(module_name)._buffers[attr] = buf.to(self.device)
        self.model.eval()
        if self.device.type == "cpu":
            # The fp32 tensors of loading (the checkpoint's, the layers' initial weights) are
            # freed; hand them back rather than keep them resident (malloc is told not to trim).
            release_free_memory()

    def kv_bytes_per_block(self, block_size: int) -> int:
        # int8: one byte per value plus a 4-byte scale per token and head.
        per_token_head = (
            self.arch.head_dim + 4
            if self.kv_int8
            else self.arch.head_dim * torch.empty((), dtype=self.kv_dtype).element_size()
        )
        return 2 * self.arch.num_layers * block_size * self.num_kv_heads * per_token_head

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        if not self.uses_kv_cache:
            return
        h, d = self.num_kv_heads, self.arch.head_dim
        # Layouts: see layers/attention.py. Zeroed: the torch fallback multiplies masked-out
        # slots by 0, so they must not hold NaNs.
        if self.kv_int8:
            shapes = [(num_blocks, h, block_size * (d + 4))] * 2
        else:
            shapes = [(num_blocks, h, d, block_size), (num_blocks, h, block_size, d)]
        self.kv_caches = [
            (self._zeros(shapes[0], self.kv_dtype), self._zeros(shapes[1], self.kv_dtype))
            for _ in range(self.arch.num_layers)
        ]
        for layer, cache in zip(self.model.attention_layers(), self.kv_caches):
            layer.kv_cache = cache

    def _zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.device.type == "cpu":
            return zeros_hugepage(shape, dtype)
        return torch.zeros(shape, dtype=dtype, device=self.device)

    # ---- one step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward_logits(
        self, scheduler_output: SchedulerOutput, all_positions: bool = False
    ) -> tuple[list, torch.Tensor]:
        """Run the model; return the req ids and logits of the sampling requests, in the model's
        dtype (the sampler widens them to fp32 where it needs to), or, with ``all_positions``,
        the step's requests (StepRequest) and every scheduled token's fp32 logits in batch
        order: for tests. The logits are None on tensor-parallel ranks other than 0."""
        if all_positions:
            inputs, hidden = self._forward(scheduler_output)
            logits = self.model.compute_logits(hidden[: inputs.num_tokens])
            return list(inputs.requests), None if logits is None else logits.float()
        inputs, hidden = self._forward_sampled(scheduler_output)
        req_ids = [inputs.requests[i].req_id for i in inputs.sample_rows]
        logits = self.model.compute_logits(hidden)
        return req_ids, None if logits is None else logits[: len(req_ids)]

    def _forward(self, scheduler_output: SchedulerOutput) -> tuple[ModelInputs, torch.Tensor]:
        assert self.block_size is not None, "allocate_kv_cache first"
        if not self.uses_kv_cache:
            inputs = build_encoder_inputs(self.requests.update(scheduler_output), self.device)
            return inputs, self.model(inputs.input_ids, inputs.positions, inputs.attn)
        inputs = build_inputs(
            self.requests.update(scheduler_output),
            self.requests.block_table.table,
            self.block_size,
            self.backend.attention,
            self.device,
            int8_cache=self.kv_int8,
            pad=self.pad_rows,
        )
        if self.lora is not None:
            self.lora.set_step(
                [s.state.lora_id for s in inputs.requests],
                inputs.query_start,
                inputs.input_ids.shape[0],
            )
        return inputs, self.model(inputs.input_ids, inputs.positions, inputs.attn)

    def _forward_sampled(
        self, scheduler_output: SchedulerOutput
    ) -> tuple[ModelInputs, torch.Tensor]:
        """The step's inputs and the fp32 final hidden states of its logit rows (see
        ModelInputs.sample_token_index; then pad rows, if any)."""
        inputs, hidden = self._forward(scheduler_output)
        return inputs, hidden.index_select(0, inputs.sample_token_index)

    def _exact_logits(self, hidden: torch.Tensor) -> ExactLogits | None:
        """fp32 logits of a few tokens from the fp32 final hidden states: the greedy sampler
        settles near-ties of bf16 logits with them."""
        lm_head = getattr(self.model, "lm_head", None)
        if lm_head is None or self.dtype == torch.float32 or self.tp.world_size > 1:
            return None  # (with TP each rank holds a slice of the vocabulary's rows)
        if lm_head.qweight is not None:  # quantized: decode just those rows, in fp32
            if len(lm_head.qweight) != 1:
                return None
            (table,) = lm_head.qweight

            def exact_rows(row: int, token_ids: torch.Tensor) -> torch.Tensor:
                rows = lm_head.linear_backend.quantized_rows(table, token_ids, torch.float32)
                return rows @ hidden[row].float()

            return exact_rows
        weight = lm_head.weight
        if weight.numel() == 0 or weight.dtype == torch.float32:
            return None

        def exact(row: int, token_ids: torch.Tensor) -> torch.Tensor:
            return weight[token_ids].float() @ hidden[row].float()

        return exact

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in scheduler_output.finished_req_ids:
            self.generators.pop(req_id, None)
        if scheduler_output.is_empty:
            self.requests.update(scheduler_output)  # drops the finished ones
            return ModelRunnerOutput(sampled={})
        if self.pooler is not None:
            return self._execute_pooling(scheduler_output)
        inputs, hidden = self._forward_sampled(scheduler_output)
        sampling_reqs = [inputs.requests[i] for i in inputs.sample_rows]
        if not sampling_reqs:
            return ModelRunnerOutput(sampled={})
        logits = self.model.compute_logits(hidden)
        if logits is None:  # a tensor-parallel rank other than 0: rank 0 samples
            return ModelRunnerOutput(sampled={})
        logits = logits[: sum(inputs.sample_num_rows)]
        if scheduler_output.grammar_bitmasks:
            self._apply_grammars(logits, sampling_reqs, inputs.sample_num_rows, scheduler_output)
        batch = build_sampling_batch(
            sampling_reqs, self.generators, self.arch.vocab_size, self.device
        )
        out = self.sampler(logits, batch, self._exact_logits(hidden))
        token_ids = out.token_ids.tolist()
        sampled: dict[str, list[SampledToken]] = {}
        lp = out.logprobs.tolist() if out.logprobs is not None else None
        ranks = out.ranks.tolist() if out.ranks is not None else None
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        row = 0
        for req, m in zip(sampling_reqs, inputs.sample_num_rows):
            if m > 1:  # drafts: keep those the model agrees with, and the token after them
                sampled[req.req_id] = [
                    SampledToken(t)
                    for t in accepted_tokens(req.spec_token_ids, token_ids[row : row + m])
                ]
                row += m
                continue
            tok = SampledToken(token_id=token_ids[row])
            k = req.sampling_params.logprobs
            if k is not None and lp is not None:
                tok.logprob, tok.rank = lp[row], ranks[row]
                tok.top_token_ids = top_ids[row][:k] if top_ids else []
                tok.top_logprobs = top_lps[row][:k] if top_lps else []
            sampled[req.req_id] = [tok]
            row += 1
        return ModelRunnerOutput(sampled=sampled)

    def _execute_pooling(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Pool the requests whose prompt ends this step (rank 0; the others only join the
        forward pass). The pooler checks it got what it needs: the whole prompt in this step
        where it reads every token."""
        assert self.pooler is not None
        inputs, hidden = self._forward(scheduler_output)
        if not self.tp.is_driver:
            return ModelRunnerOutput(sampled={})
        rows = inputs.sample_rows
        if not rows:  # only prompt chunks that do not end their prompt
            return ModelRunnerOutput(sampled={})
        reqs = [inputs.requests[i] for i in rows]
        if self.pooler.needs_whole_prompt:
            assert all(r.start_pos == 0 for r in reqs), "a pooled prompt must run in one step"
        vectors = self.pooler(
            hidden[: inputs.num_tokens],
            [int(inputs.query_start[i]) for i in rows],
            [inputs.requests[i].num_tokens for i in rows],
            [r.state.pooling_params for r in reqs],
        )
        return ModelRunnerOutput(sampled={}, pooled={r.req_id: v for r, v in zip(reqs, vectors)})

    def _apply_grammars(
        self, logits: torch.Tensor, reqs: list, num_rows: list[int], out: SchedulerOutput
    ) -> None:
        """Structured outputs: forbid what each constrained row's grammar does not allow (its
        rows only; the others keep their logits untouched)."""
        rows, masks, row = [], [], 0
        for req, m in zip(reqs, num_rows):
            mask = out.grammar_bitmasks.get(req.req_id)
            if mask is not None:
                assert mask.shape[0] == m, "one mask per sampled position"
                rows.extend(range(row, row + m))
                masks.append(mask)
            row += m
        if rows:
            bitmask = torch.from_numpy(masks[0] if len(masks) == 1 else np.concatenate(masks))
            self.backend.kernels.apply_token_bitmask(
                logits, torch.tensor(rows), bitmask.to(logits.device)
            )


def accepted_tokens(drafts: list[int], sampled: list[int]) -> list[int]:
    """Greedy verification: ``sampled[t]`` is the model's token after the newest token and
    ``drafts[:t]``. Drafts count while they equal it; the output is the sampled tokens up to and
    including the first disagreement (or the one after the last draft)."""
    n = 0
    while n < len(drafts) and drafts[n] == sampled[n]:
        n += 1
    return sampled[: n + 1]
