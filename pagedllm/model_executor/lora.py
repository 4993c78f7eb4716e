"""Multi-LoRA on the model runner: each loaded adapter's A and B per projection (this rank's
shard, the scale folded into B), and the step's grouping of token rows by adapter.

One batch mixes adapters and the base model. Each LoRA-capable Linear (q/k/v/o, gate/up/down)
computes its base output on the backend's kernel, then the backend's ``lora_apply`` adds every
token's own adapter's ``(x A^T) B^T`` in one call (tokens of the base model get nothing): the
step's adapters are stacked per layer (StackedLoRA, cached per set of adapters) and each token
reads its own slot. Measured on the shared workload with 4 adapters mixed (AMD EPYC Zen 5,
bf16): one torch matmul per adapter on its gathered rows cost 50% of the base model's
throughput, one stacked matmul with a mask (L times the flops) 18%; the native kernel, which
does each token's own flops only, see docs/benchmarks.md.

Tensor parallelism: a column-parallel layer's B is cut to this rank's output rows; a
row-parallel layer's A to its input columns, and its partial products join the base output in
the layer's all-reduce (x A^T summed over ranks is the whole x A^T).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pagedllm.distributed import TensorParallelGroup
from pagedllm.lora import LoRARequest, read_peft_config
from pagedllm.model_executor.layers.linear import ColumnParallelLinear, Linear, RowParallelLinear


@dataclass
class LoRALayerWeights:
    """One adapter on one Linear, per shard (checkpoint projection): its output columns in
    the layer, A [r, in] and B [rows, r] (scaled), this rank's part."""

    shards: list[tuple[int, int, torch.Tensor, torch.Tensor]]  # (out offset, rows, A, B)


@dataclass
class LoRAAdapter:
    lora_id: int
    name: str
    rank: int
    layers: dict[str, LoRALayerWeights]


@dataclass
class StackedLoRA:
    """The step's adapters on one Linear, in the kernel's layout (ops/csrc/generic/lora.cpp):
    ``a`` [slots, shards * r, in], ``bt`` [slots, r, out] (B transposed), the shards' output
    ``bounds``; ranks zero-padded to the largest, a shard an adapter does not target zero."""

    a: torch.Tensor
    bt: torch.Tensor
    bounds: list[int]


class LoRAStep:
    """The current step's adapters; every LoRA Linear holds this one object."""

    def __init__(self, kernels) -> None:
        self.kernels = kernels  # the backend's: lora_apply
        self.layers: dict[str, StackedLoRA] | None = None  # None: no adapter in this step
        self.token_slot: torch.Tensor | None = None  # [rows]: adapter slot, -1 = base model

    def set(self, layers: dict[str, StackedLoRA] | None, token_slot: torch.Tensor | None) -> None:
        self.layers, self.token_slot = layers, token_slot

    def apply(self, layer_name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        assert self.layers is not None and self.token_slot is not None
        layer = self.layers.get(layer_name)
        if layer is not None:
            self.kernels.lora_apply(y, x, self.token_slot, layer.a, layer.bt, layer.bounds)


def layer_bounds(layer: Linear) -> list[int]:
    """A Linear's output columns per checkpoint projection (q, k, v of a fused qkv)."""
    if isinstance(layer, ColumnParallelLinear) and len(layer.shards) > 1:
        return [*layer.shard_offsets, layer.out_features]
    return [0, layer.out_features]


def stack_adapters(
    adapters: list[LoRAAdapter], linears: dict[str, Linear], kernels
) -> dict[str, StackedLoRA]:
    """Per Linear any of them targets, their StackedLoRA (slot i = adapters[i]), in the
    layout the backend's kernel wants (``kernels.lora_pack``)."""
    out = {}
    for name in sorted({name for a in adapters for name in a.layers}):
        layer = linears[name]
        bounds = layer_bounds(layer)
        weights = [a.layers.get(name) for a in adapters]
        rank = max(a_.shape[0] for w in weights if w for _, _, a_, _ in w.shards)
        rank += rank % 2  # even: the bf16 kernel takes rank pairs
        shards = len(bounds) - 1
        ref = next(w for w in weights if w).shards[0][2]
        a = ref.new_zeros(len(adapters), shards * rank, layer.in_features)
        bt = ref.new_zeros(len(adapters), rank, layer.out_features)
        for slot, w in enumerate(weights):
            for offset, rows, a_s, b_s in w.shards if w else ():
                k, r = bounds.index(offset), a_s.shape[0]
                a[slot, k * rank : k * rank + r] = a_s
                bt[slot, :r, offset : offset + rows] = b_s.t()
        out[name] = StackedLoRA(*kernels.lora_pack(a, bt), bounds)
    return out


class LoRAManager:
    """The runner's adapters: load, remove, and set each step's row groups."""

    def __init__(
        self,
        model: nn.Module,
        tp: TensorParallelGroup,
        dtype: torch.dtype,
        device: torch.device,
        max_lora_rank: int,
        kernels,
    ) -> None:
        """``kernels``: the backend's (its ``lora_apply`` runs each step's adapters)."""
        packed = getattr(model, "packed_modules_mapping", None)
        if packed is None:
            raise ValueError(f"{type(model).__name__} does not support LoRA adapters")
        self.model = model
        self.packed = packed
        self.tp = tp
        self.dtype = dtype
        self.device = device
        self.max_lora_rank = max_lora_rank
        self.adapters: dict[int, LoRAAdapter] = {}
        # Stacked weights per set of adapters in a step (steps repeat their set for long).
        self._stacked: dict[tuple[int, ...], dict[str, StackedLoRA]] = {}
        self.step = LoRAStep(kernels)
        self.linears: dict[str, Linear] = {}
        for name, module in model.named_modules():
            if isinstance(module, Linear) and name.rsplit(".", 1)[-1] in _OUR_TARGETS:
                module.lora_step, module.lora_name = self.step, name
                self.linears[name] = module

    # ---- adapters ------------------------------------------------------------------------------
    def add(self, request: LoRARequest) -> None:
        if request.lora_int_id in self.adapters:
            return
        config = read_peft_config(request.lora_path, self.max_lora_rank)
        tensors = _read_tensors(config.weights_file)
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            module, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
            if kind not in ("A.weight", "B.weight"):
                raise ValueError(f"{request.lora_path}: unexpected adapter tensor {key!r}")
            pairs.setdefault(module, {})[kind[0]] = tensor
        per_layer: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        for module, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise ValueError(f"{request.lora_path}: {module} lacks lora_A or lora_B")
            ours, shard = self._our_module(module, request.lora_path)
            per_layer.setdefault(ours, []).append((shard, ab["A"], ab["B"] * config.scale))
        layers = {
            name: self._shard(self.linears[name], parts, request.lora_path)
            for name, parts in per_layer.items()
        }
        self.adapters[request.lora_int_id] = LoRAAdapter(
            request.lora_int_id, request.lora_name, config.rank, layers
        )

    def remove(self, lora_id: int) -> bool:
        self._stacked = {key: v for key, v in self._stacked.items() if lora_id not in key}
        return self.adapters.pop(lora_id, None) is not None

    # ---- one step ------------------------------------------------------------------------------
    def set_step(self, lora_ids: list[int | None], query_start: np.ndarray, num_rows: int) -> None:
        """The step's adapters: one per request in batch order, whose tokens start at
        ``query_start`` (ModelInputs'); ``num_rows`` counts the pad rows too."""
        ids = sorted({i for i in lora_ids if i is not None})
        if not ids:
            self.step.set(None, None)
            return
        key = tuple(ids)
        layers = self._stacked.get(key)
        if layers is None:
            if len(self._stacked) >= _MAX_STACKED_SETS:
                self._stacked.pop(next(iter(self._stacked)))
            layers = self._stacked[key] = stack_adapters(
                [self.adapters[i] for i in ids], self.linears, self.step.kernels
            )
        slot = np.full(num_rows, -1, dtype=np.int64)
        for i, lora_id in enumerate(lora_ids):
            if lora_id is not None:
                slot[query_start[i] : query_start[i + 1]] = ids.index(lora_id)
        self.step.set(layers, torch.from_numpy(slot).to(self.device))

    # ---- helpers -------------------------------------------------------------------------------
    def _our_module(self, module: str, path: str) -> tuple[str, int | None]:
        """A checkpoint module (model.layers.0.self_attn.q_proj) -> (our Linear, shard)."""
        prefix, _, proj = module.rpartition(".")
        if proj in self.packed:
            fused, shard = self.packed[proj]
            name = f"{prefix}.{fused}"
        else:
            name, shard = module, None
        if name not in self.linears:
            raise ValueError(
                f"{path}: adapter module {module!r} is not a projection LoRA can change"
            )
        return name, shard

    def _shard(
        self,
        layer: Linear,
        parts: list[tuple[int | None, torch.Tensor, torch.Tensor]],
        path: str,
    ) -> LoRALayerWeights:
        """This rank's A and B of each shard of one layer, in the engine dtype."""
        shards = []
        for shard, a, b in sorted(parts, key=lambda p: -1 if p[0] is None else p[0]):
            if a.shape[0] > self.max_lora_rank:
                raise ValueError(f"{path}: rank {a.shape[0]} over --max-lora-rank")
            if isinstance(layer, RowParallelLinear):
                cols = layer.in_features
                a = a[:, self.tp.rank * cols : (self.tp.rank + 1) * cols]
                offset, rows = 0, layer.out_features
            elif isinstance(layer, ColumnParallelLinear) and shard is not None:
                full, start, rows = layer.shards[shard]
                if b.shape[0] != full:
                    raise ValueError(f"{path}: lora_B has {b.shape[0]} rows, expected {full}")
                b = b[start : start + rows]
                offset = layer.shard_offsets[shard]
            else:
                offset, rows = 0, layer.out_features
            if a.shape[1] != layer.in_features or b.shape != (rows, a.shape[0]):
                raise ValueError(f"{path}: adapter shapes do not fit the model's projections")
            shards.append((offset, rows, self._cast(a), self._cast(b)))
        return LoRALayerWeights(shards)

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=self.device, dtype=self.dtype).contiguous()


_MAX_STACKED_SETS = 16

# Our Linear names that adapters can target (the fused ones and the row-parallel ones).
_OUR_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:
            raise ValueError(f"{path} is not a valid safetensors file ({err})") from None
    return torch.load(path, map_location="cpu", weights_only=True)
