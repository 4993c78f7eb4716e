"""Offline embeddings (LLM.embed): all-MiniLM-L6-v2 against sentence-transformers on the same
files, SmolLM2 as an embedder (convert="embed") against transformers' last hidden state, the
limits (256 tokens, Matryoshka dimensions) and the runner checks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pagedllm import LLM, PoolingParams, SamplingParams
from tests.utils import assert_no_leak

TOPICS = ["cats", "the stock market", "paged attention", "a rainy day", "Python", "the moon"]
SENTENCES = [
    f"Sentence {i}: {'a short one about' if i % 3 else 'a rather longer sentence, with more words in it, about'} {TOPICS[i % len(TOPICS)]}."  # noqa: E501
    for i in range(50)
]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _vectors(outs) -> np.ndarray:
    return np.array([o.outputs.embedding for o in outs])


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def minilm(request, minilm_dir):
    llm = LLM(minilm_dir, dtype=request.param)
    yield llm
    llm.shutdown()


def _assert_idle(llm: LLM) -> None:
    assert not llm.engine.has_unfinished_requests()
    llm.engine.step()  # the last finished ids reach the runner with the next step
    assert len(llm.engine.runner.requests) == 0
    assert not llm.engine.output_processor.pooling


def test_minilm_matches_sentence_transformers(minilm, minilm_st):
    assert minilm.engine.max_model_len == 256  # sentence_bert_config.json's max_seq_length
    assert minilm.engine.model_config.pooler_config.pooling_type == "MEAN"
    ref = minilm_st.encode(SENTENCES, convert_to_numpy=True)
    batched = _vectors(minilm.embed(SENTENCES, use_tqdm=False))
    alone = np.array([minilm.embed(s, use_tqdm=False)[0].outputs.embedding for s in SENTENCES])
    assert batched.shape == (50, 384)
    assert _cosines(batched, ref).min() > 0.9999
    assert _cosines(alone, ref).min() > 0.9999
    # normalized, as the model's Normalize module says
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    _assert_idle(minilm)


def test_minilm_long_input_refused_or_truncated(minilm, minilm_st):
    text = " ".join(["embedding"] * 300)
    with pytest.raises(ValueError, match="max_model_len=256"):
        minilm.embed(text, use_tqdm=False)
    # truncated as sentence-transformers truncates (the first 256 tokens, [SEP] kept)
    ours = minilm.embed(text, use_tqdm=False, truncate_prompt_tokens=-1)[0]
    assert len(ours.prompt_token_ids) == 256
    assert ours.prompt_token_ids[-1] == minilm.get_tokenizer().sep_token_id
    ref = minilm_st.encode([text], convert_to_numpy=True)
    assert _cosines(np.array([ours.outputs.embedding]), ref)[0] > 0.9999
    short = minilm.embed(text, PoolingParams(truncate_prompt_tokens=10), use_tqdm=False)[0]
    assert len(short.prompt_token_ids) == 10
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        minilm.embed(text, PoolingParams(truncate_prompt_tokens=300), use_tqdm=False)
    _assert_idle(minilm)


def test_token_id_inputs_equal_text(minilm):
    tok = minilm.get_tokenizer()
    text = "Token ids and text give one embedding."
    by_text = minilm.embed(text, use_tqdm=False)[0].outputs.embedding
    by_ids = minilm.embed([tok.encode(text)], use_tqdm=False)[0].outputs.embedding
    np.testing.assert_allclose(by_ids, by_text, atol=1e-6)


def test_generate_on_a_pooling_model_is_refused(minilm):
    with pytest.raises(ValueError, match="pooling"):
        minilm.generate("hello", SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(ValueError, match="not trained to be cut shorter"):
        minilm.embed("hello", PoolingParams(dimensions=64), use_tqdm=False)
    _assert_idle(minilm)


def test_matryoshka_dimensions(minilm_dir, tmp_path):
    """A model whose config declares Matryoshka sizes: cut to the first d values, then
    normalized; other sizes are refused with the allowed ones named."""
    model_dir = shutil.copytree(minilm_dir, tmp_path / "minilm-matryoshka")
    config = json.loads((model_dir / "config.json").read_text())
    config["matryoshka_dimensions"] = [64, 128, 384]
    (model_dir / "config.json").write_text(json.dumps(config))
    llm = LLM(str(model_dir), dtype="float32")
    full = np.array(llm.embed("A Matryoshka doll", use_tqdm=False)[0].outputs.embedding)
    cut = llm.embed("A Matryoshka doll", PoolingParams(dimensions=64), use_tqdm=False)[0]
    assert len(cut.outputs.embedding) == 64
    np.testing.assert_allclose(
        cut.outputs.embedding, full[:64] / np.linalg.norm(full[:64]), atol=1e-6
    )
    raw = llm.embed("A Matryoshka doll", PoolingParams(normalize=False), use_tqdm=False)[0]
    assert abs(np.linalg.norm(raw.outputs.embedding) - 1.0) > 0.01  # really unnormalized
    with pytest.raises(ValueError, match="64, 128, 384"):
        llm.embed("x", PoolingParams(dimensions=100), use_tqdm=False)


def test_embed_on_a_generative_model_is_refused(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="float32", num_kv_blocks=64)
    with pytest.raises(ValueError, match="runner='pooling'"):
        llm.embed("hello", use_tqdm=False)
    with pytest.raises(ValueError, match="embeddings need a pooling model"):
        llm.engine.add_request("x", "hello", PoolingParams())


def test_encoder_cannot_generate(minilm_dir):
    with pytest.raises(ValueError, match="encoder"):
        LLM(minilm_dir, runner="generate")


def test_smollm2_as_embedder_matches_transformers(default_gguf, smol_hf):
    """convert="embed": the last token's final hidden state (after the final norm),
    normalized; a 64-token budget runs the long prompt in chunks (LAST pooling needs only
    the chunk that ends the prompt)."""
    llm = LLM(
        default_gguf,
        dtype="float32",
        convert="embed",
        max_model_len=1024,
        max_num_batched_tokens=64,
        kv_cache_memory=64 * 2**20,
    )
    assert llm.engine.model_config.runner_type == "pooling"
    tok = llm.get_tokenizer()
    texts = ["What is the capital of France?", "Paged attention " * 60, "Hi"]
    prompts = [tok.encode(t) for t in texts]
    assert len(prompts[1]) > 64
    outs = llm.embed(prompts, use_tqdm=False)
    for ids, out in zip(prompts, outs):
        with torch.no_grad():
            hidden = smol_hf.model(torch.tensor([ids])).last_hidden_state[0, -1]
        ref = torch.nn.functional.normalize(hidden, dim=0)
        torch.testing.assert_close(torch.tensor(out.outputs.embedding), ref, rtol=1e-4, atol=1e-4)
    assert_no_leak(llm.engine)
    llm.engine.step()
    assert len(llm.engine.runner.requests) == 0
