"""The BERT encoder and the pooler against transformers' BertModel (fp32), on every backend
this machine runs: several sequences of different lengths in one step (padded into one SDPA)
and one alone, with MEAN, CLS and LAST pooling, and the bf16 path close to fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedllm.config import PoolerConfig
from pagedllm.model_executor.loader import iter_weights, load_hf_config, resolve_model
from pagedllm.model_executor.model_runner import ModelRunner
from pagedllm.model_executor.models.hf_config import arch_config_from_hf
from pagedllm.pooling_params import PoolingParams
from pagedllm.sampling_params import SamplingParams
from pagedllm.scheduler_output import NewRequestData, SchedulerOutput
from tests.utils import backend_names, get_backend

LENGTHS = [5, 17, 1, 40]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> str:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=320,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        architectures=["BertModel"],
    )
    model = BertModel(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
    out = str(tmp_path_factory.mktemp("tiny_bert"))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(1, 320, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def reference(bert_dir, prompts) -> list[torch.Tensor]:
    """transformers' final hidden states, each sequence alone."""
    from transformers import BertModel

    hf = BertModel.from_pretrained(bert_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [hf(torch.tensor([p])).last_hidden_state[0] for p in prompts]


def _pool(
    bert_dir, prompts, pooling_type, backend, dtype="float32", params=None
) -> list[torch.Tensor]:
    source = resolve_model(bert_dir)
    arch = arch_config_from_hf(load_hf_config(source))
    torch_dtype = getattr(torch, dtype)
    runner = ModelRunner(
        arch,
        dtype,
        torch.device("cpu"),
        backend=get_backend(backend, torch_dtype),
        pooler_config=PoolerConfig(pooling_type, normalize=False),
    )
    runner.load_weights(iter_weights(source))
    runner.allocate_kv_cache(0, 16)
    assert not runner.uses_kv_cache
    out = SchedulerOutput()
    for i, ids in enumerate(prompts):
        out.new_requests.append(
            NewRequestData(
                f"r{i}", ids, [], SamplingParams(max_tokens=1), [], 0, params or PoolingParams()
            )
        )
        out.num_scheduled_tokens[f"r{i}"] = len(ids)
    result = runner.execute_model(out).pooled
    finished = SchedulerOutput(finished_req_ids={f"r{i}" for i in range(len(prompts))})
    runner.execute_model(finished)
    assert len(runner.requests) == 0  # the runner keeps nothing of finished requests
    return [result[f"r{i}"] for i in range(len(prompts))]


def _expected(reference, pooling_type) -> list[torch.Tensor]:
    pick = {"MEAN": lambda h: h.mean(0), "CLS": lambda h: h[0], "LAST": lambda h: h[-1]}
    return [pick[pooling_type](h) for h in reference]


@pytest.mark.parametrize("backend", backend_names())
@pytest.mark.parametrize("pooling_type", ["MEAN", "CLS", "LAST"])
def test_bert_batched_matches_transformers(bert_dir, prompts, reference, backend, pooling_type):
    got = _pool(bert_dir, prompts, pooling_type, backend)
    for mine, ref in zip(got, _expected(reference, pooling_type)):
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", backend_names())
def test_bert_one_sequence_matches_transformers(bert_dir, prompts, reference, backend):
    got = _pool(bert_dir, prompts[1:2], "MEAN", backend)
    torch.testing.assert_close(got[0], reference[1].mean(0), rtol=1e-4, atol=1e-4)


def test_bert_bf16_close_to_fp32(bert_dir, prompts, reference):
    backend = backend_names()[0]
    got = _pool(bert_dir, prompts, "MEAN", backend, dtype="bfloat16")
    for mine, ref in zip(got, _expected(reference, "MEAN")):
        assert F.cosine_similarity(mine, ref, dim=0) > 0.999


def test_pooler_normalizes_and_cuts_dimensions(bert_dir, prompts, reference):
    got = _pool(
        bert_dir, prompts, "CLS", "torch", params=PoolingParams(dimensions=16, normalize=True)
    )
    for mine, ref in zip(got, _expected(reference, "CLS")):
        assert mine.shape == (16,)
        torch.testing.assert_close(mine, F.normalize(ref[:16], dim=0), rtol=1e-4, atol=1e-4)
