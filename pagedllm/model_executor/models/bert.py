"""BERT encoder (``BertModel``: all-MiniLM, BGE, E5, ...) for embeddings.

Every token of a sequence attends to every other (no causal mask), the whole prompt runs in one
step and nothing is cached: the runner gives it an EncoderMetadata instead of paged-attention
metadata and the pooler reduces its final hidden states to one vector per prompt.
Checkpoint names map onto fused layers: attention.self.query/key/value -> attention.qkv_proj.

Precision as in llama.py: the residual stream, LayerNorms and embeddings stay fp32; the
matmuls run in the engine dtype.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed import TensorParallelGroup, single_rank
from pagedllm.model_executor.backends.attention_metadata import EncoderMetadata
from pagedllm.model_executor.backends.base import TORCH_BACKEND
from pagedllm.model_executor.layers.linear import ColumnParallelLinear, Linear
from pagedllm.model_executor.models.hf_config import ArchConfig

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
_QKV = {"query": 0, "key": 1, "value": 2}


def check_tensor_parallel(cfg: ArchConfig, world_size: int) -> None:
    if world_size != 1:
        raise ValueError(
            f"{cfg.architecture} runs on one rank (--tensor-parallel-size 1): an encoder this "
            "size gains nothing from splitting; serve replicas with --data-parallel-size instead"
        )


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(max(cfg.type_vocab_size, 1), cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Token type 0 for every token: one text per prompt (pairs are scored as two texts).
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.LayerNorm(x + self.token_type_embeddings.weight[0])


class BertLayer(nn.Module):
    attention_backend = TORCH_BACKEND.attention  # bound by the model runner (Backend.bind)

    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.head_dim = h // cfg.num_heads
        self.scale = self.head_dim**-0.5
        self.qkv_proj = ColumnParallelLinear(h, [(h, 0, h)] * 3, bias=True)
        self.attn_out = Linear(h, h, bias=True)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.rms_norm_eps)
        self.intermediate = Linear(h, cfg.intermediate_size, bias=True)
        self.output = Linear(cfg.intermediate_size, h, bias=True)
        self.output_norm = nn.LayerNorm(h, eps=cfg.rms_norm_eps)
        try:
            self.act = _ACTIVATIONS[cfg.hidden_act]
        except KeyError:
            raise ValueError(
                f"hidden_act {cfg.hidden_act!r} is not supported "
                f"(supported: {sorted(_ACTIVATIONS)})"
            ) from None
        self.compute_dtype = torch.float32  # the matmul dtype, set by the model runner

    def forward(self, x: torch.Tensor, meta: EncoderMetadata) -> torch.Tensor:
        """x: fp32 [T, hidden] -> fp32 [T, hidden] (post-LayerNorm, as BERT)."""
        dtype = self.compute_dtype
        q, k, v = self.qkv_proj(x.to(dtype)).view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        attn = self.attention_backend.encoder_forward(q, k, v, meta, self.scale)
        x = self.attn_norm(x + self.attn_out(attn.reshape(x.shape[0], -1)).float())
        h = self.act(self.intermediate(x.to(dtype)))
        return self.output_norm(x + self.output(h).float())


class BertBody(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_layers))


class BertModel(nn.Module):
    """-> final hidden states; a pooler (layers/pooler.py) makes the embeddings."""

    check_tensor_parallel = staticmethod(check_tensor_parallel)
    uses_kv_cache = False

    def __init__(self, cfg: ArchConfig, tp: TensorParallelGroup | None = None) -> None:
        super().__init__()
        check_tensor_parallel(cfg, (tp or single_rank()).world_size)
        self.config = cfg
        self.num_kv_heads = 0  # nothing cached
        self.model = BertBody(cfg)

    @staticmethod
    def keeps_fp32(param_name: str) -> bool:
        """Embedding tables and LayerNorms stay fp32 under a bf16 engine."""
        return "embeddings." in param_name or "_norm." in param_name

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: EncoderMetadata
    ) -> torch.Tensor:
        x = self.model.embeddings(input_ids, positions)
        for layer in self.model.layers:
            x = layer(x, meta)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{self.config.architecture} is an encoder: it has no logits")

    def attention_layers(self) -> list:
        return []

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """HF BERT names (``bert.`` prefix of task heads dropped; the pooler head, used only by
        next-sentence prediction, and the MLM heads are skipped)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("bert.")
            if name.startswith(("pooler.", "cls.")) or name.endswith("position_ids"):
                continue
            target, shard = _our_name(name)
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} matches no model parameter")
            param = params[target]
            if shard is not None:
                full = param.shape[0] // 3
                if tensor.shape[0] != full:
                    raise ValueError(f"{name}: {tensor.shape[0]} rows, expected {full}")
                param.data[shard * full : (shard + 1) * full].copy_(tensor)
                loaded.add(f"{target}#{shard}")
                continue
            if param.shape != tensor.shape:
                raise ValueError(
                    f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(param.shape)}"
                )
            param.data.copy_(tensor)
            loaded.add(target)
        missing = []
        for name in params:
            if ".qkv_proj." in name:
                missing += [f"{name}#{i}" for i in range(3) if f"{name}#{i}" not in loaded]
            elif name not in loaded:
                missing.append(name)
        if missing:
            raise ValueError(f"checkpoint is missing weights: {missing[:8]}")


def _our_name(name: str) -> tuple[str, int | None]:
    """A HF BERT parameter name -> (our parameter name, qkv shard or None)."""
    if name.startswith("embeddings."):
        return "model." + name, None
    if not name.startswith("encoder.layer."):
        return name, None
    idx, _, rest = name.removeprefix("encoder.layer.").partition(".")
    prefix = f"model.layers.{idx}."
    for ckpt, shard in _QKV.items():
        if rest.startswith(f"attention.self.{ckpt}."):
            return prefix + "qkv_proj." + rest.rsplit(".", 1)[1], shard
    renames = {
        "attention.output.dense.": "attn_out.",
        "attention.output.LayerNorm.": "attn_norm.",
        "intermediate.dense.": "intermediate.",
        "output.dense.": "output.",
        "output.LayerNorm.": "output_norm.",
    }
    for ckpt, ours in renames.items():
        if rest.startswith(ckpt):
            return prefix + ours + rest[len(ckpt) :], None
    return name, None
