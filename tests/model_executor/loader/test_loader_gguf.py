"""GGUF weights and config from tiny files written like llama.cpp: names, dequant, q/k order."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from pagedllm.model_executor.loader import (
    gguf_weights,
    iter_weights,
    load_hf_config,
    load_tokenizer,
    resolve_model,
    resolve_quantization,
)
from pagedllm.model_executor.loader.gguf_weights import hf_tensor_name, unpermute_qk
from tests.model_executor.loader.loader_tiny_models import (
    LLAMA_QUANT_PLAN,
    gguf_name,
    permute_qk,
    tiny_llama,
    tiny_qwen2,
    write_gguf,
)

Q = GGMLQuantizationType


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory):
    model = tiny_llama()
    path = str(tmp_path_factory.mktemp("llama") / "tiny-llama.gguf")
    expected = write_gguf(model, path, LLAMA_QUANT_PLAN)
    return model, path, expected


def _tolerance(qtype: GGMLQuantizationType, amax: float) -> float:
    """Worst-case error of one quantized value, from the block formats' step sizes."""
    if qtype in (Q.Q4_0, Q.Q4_1):
        return amax / 7
    if qtype == Q.Q8_0:
        return amax / 100
    if qtype == Q.F16:
        return amax * 1e-3
    return 0.0


def test_llama_round_trip(llama_gguf):
    model, path, expected = llama_gguf
    original = model.state_dict()
    names = []
    for name, tensor in iter_weights(resolve_model(path)):
        names.append(name)
        assert tensor.dtype == torch.float32
        # exactly gguf-py's dequantization of the stored blocks, with the HF row order back
        assert torch.equal(tensor, torch.from_numpy(expected[name])), name
        # and close to the weights the file was made from
        leaf = gguf_name(name).split(".")[-2]
        qtype = LLAMA_QUANT_PLAN.get(leaf, Q.F32) if tensor.ndim == 2 else Q.F32
        ref = original[name]
        assert float((tensor - ref).abs().max()) <= _tolerance(qtype, float(ref.abs().max())), name
    assert names == list(expected)  # file order, nothing skipped or invented
    assert "lm_head.weight" in names
    assert "model.layers.1.self_attn.q_proj.bias" in names


def test_unquantized_llama_is_exact_and_qk_unpermuted(tmp_path):
    model = tiny_llama(tie_word_embeddings=True, attention_bias=False)
    path = str(tmp_path / "f32.gguf")
    write_gguf(model, path)
    got = dict(iter_weights(resolve_model(path)))
    original = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert set(got) == set(original)  # tied: no lm_head in the file, none yielded
    for name, tensor in original.items():
        assert torch.equal(got[name], tensor), name


def test_llama_config_from_gguf(llama_gguf):
    model, path, _ = llama_gguf
    config = load_hf_config(resolve_model(path))
    ref = model.config
    assert config.model_type == "llama"
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "max_position_embeddings",
    ):
        assert getattr(config, key) == getattr(ref, key), key
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert config.tie_word_embeddings is False


def test_qwen2_is_not_permuted_and_keeps_biases(tmp_path):
    model = tiny_qwen2()
    path = str(tmp_path / "qwen2.gguf")
    plan = {"attn_q": Q.Q8_0, "attn_k": Q.Q8_0, "ffn_up": Q.Q4_0}
    expected = write_gguf(model, path, plan)
    got = dict(iter_weights(resolve_model(path)))
    assert set(got) == set(expected)
    assert "model.layers.0.self_attn.k_proj.bias" in got and "lm_head.weight" not in got
    for name, values in expected.items():
        assert torch.equal(got[name], torch.from_numpy(values)), name
    config = load_hf_config(resolve_model(path))
    assert config.model_type == "qwen2" and config.num_key_value_heads == 2


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4 * 16, 8)).astype(np.float32)
    for heads in (1, 2, 4):
        assert np.array_equal(unpermute_qk(permute_qk(w, heads), heads), w)
    bias = rng.standard_normal(32).astype(np.float32)
    assert np.array_equal(unpermute_qk(permute_qk(bias, 2), 2), bias)


def test_tensor_names():
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    post_norm = "model.layers.12.post_attention_layernorm.weight"
    assert hf_tensor_name("blk.12.ffn_norm.weight") == post_norm
    assert hf_tensor_name("blk.3.attn_output.bias") == "model.layers.3.self_attn.o_proj.bias"
    assert hf_tensor_name("rope_freqs.weight") is None
    assert hf_tensor_name("blk.0.attn_rot_embd") is None


def test_unsupported_quant_type_names_tensor(llama_gguf, monkeypatch):
    _, path, _ = llama_gguf

    def refuse(data, qtype):
        raise NotImplementedError(f"Dequantization for {qtype.name} is not yet implemented")

    monkeypatch.setattr(gguf_weights, "dequantize", refuse)
    with pytest.raises(ValueError, match=r"tensor token_embd\.weight has GGML type Q8_0"):
        next(iter_weights(resolve_model(path)))


def _corrupt_files(llama_gguf, tmp_path):
    _, path, _ = llama_gguf
    random_file = tmp_path / "random.gguf"
    random_file.write_bytes(np.random.default_rng(0).bytes(4096))
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    header_only = tmp_path / "header-only.gguf"
    header_only.write_bytes(data[:100])
    return [str(random_file), str(truncated), str(header_only)]


def test_corrupt_gguf_raises_value_error_naming_file(llama_gguf, tmp_path):
    for bad in _corrupt_files(llama_gguf, tmp_path):
        source = resolve_model(bad)
        with pytest.raises(ValueError, match="is not a valid GGUF file") as info:
            load_hf_config(source)
        assert bad in str(info.value)
        with pytest.raises(ValueError, match="is not a valid GGUF file") as info:
            iter_weights(source)
        assert bad in str(info.value)
        with pytest.raises(ValueError, match="is not a valid GGUF file"):
            load_tokenizer(source)


def test_unsupported_architecture(tmp_path):
    from gguf import GGUFWriter

    path = str(tmp_path / "mamba.gguf")
    writer = GGUFWriter(path, "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture 'mamba' is not supported"):
        iter_weights(resolve_model(path))
    assert os.path.getsize(path) > 0


def test_keep_quantized_yields_the_files_blocks(llama_gguf):
    """--quantization gguf: every 2-D weight comes as its blocks (q/k rows back in HF order),
    decoding to exactly what the dequantizing loader yields; norms and biases come dense."""
    from pagedllm.model_executor.layers.quant_tensor import QuantTensor

    _, path, expected = llama_gguf
    kinds = {}
    for name, tensor in iter_weights(resolve_model(path), "gguf"):
        if isinstance(tensor, QuantTensor):
            kinds[name] = tensor.qtype
            assert tensor.name == gguf_name(name)
            assert torch.equal(tensor.dequantize(), torch.from_numpy(expected[name])), name
        else:
            assert tensor.ndim == 1 and torch.equal(tensor, torch.from_numpy(expected[name]))
    assert kinds["model.layers.0.self_attn.q_proj.weight"] == Q.Q4_0
    assert kinds["model.layers.0.self_attn.v_proj.weight"] == Q.F16  # stored unquantized
    assert kinds["model.embed_tokens.weight"] == Q.Q8_0
    assert len(kinds) == sum(v.ndim == 2 for v in expected.values())


def test_keep_quantized_refuses_a_type_without_a_kernel(llama_gguf, monkeypatch):
    _, path, _ = llama_gguf
    monkeypatch.setattr(
        gguf_weights, "KERNEL_TYPES", gguf_weights.KERNEL_TYPES - {GGMLQuantizationType.Q4_0}
    )
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.weight has GGML type Q4_0.*without"):
        iter_weights(resolve_model(path), "gguf")


def test_keep_quantized_needs_a_gguf_file(tiny_llama_dir):
    with pytest.raises(ValueError, match="not a GGUF model"):
        resolve_quantization(resolve_model(tiny_llama_dir), "gguf")
