"""HF checkpoint dirs: safetensors (single and sharded), pytorch_model.bin, config, tokenizer."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pagedllm.model_executor.loader import (
    iter_weights,
    load_hf_config,
    load_tokenizer,
    resolve_model,
)
from tests.model_executor.loader.loader_tiny_models import tiny_llama


def _assert_same_state(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_safetensors_dir_yields_state_dict(tmp_path):
    model = tiny_llama(tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    source = resolve_model(str(tmp_path))
    got = dict(iter_weights(source))
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    _assert_same_state(got, expected)  # tied lm_head is not saved, so not yielded
    config = load_hf_config(source)
    assert config.num_key_value_heads == 2 and config.tie_word_embeddings


def test_untied_and_stored_dtype_kept(tmp_path):
    model = tiny_llama(tie_word_embeddings=False).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    got = dict(iter_weights(resolve_model(str(tmp_path))))
    _assert_same_state(got, model.state_dict())
    assert got["lm_head.weight"].dtype == torch.bfloat16


def test_sharded_safetensors(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = [name for name in os.listdir(tmp_path) if name.endswith(".safetensors")]
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    # a stray file outside the index (e.g. consolidated.safetensors) must not be read
    torch.save({}, tmp_path / "ignored.pt")
    from safetensors.torch import save_file

    save_file({"stray": torch.zeros(1)}, str(tmp_path / "consolidated.safetensors"))
    _assert_same_state(dict(iter_weights(resolve_model(str(tmp_path)))), model.state_dict())


def test_missing_shard_is_reported(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    missing = sorted(set(index["weight_map"].values()))[-1]
    os.remove(tmp_path / missing)
    with pytest.raises(FileNotFoundError, match=missing):
        list(iter_weights(resolve_model(str(tmp_path))))


def test_pytorch_bin_fallback(tmp_path):
    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    _assert_same_state(dict(iter_weights(resolve_model(str(tmp_path)))), model.state_dict())


def test_no_weights(tmp_path):
    tiny_llama().config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no weights"):
        list(iter_weights(resolve_model(str(tmp_path))))


def test_tokenizer_from_hf_dir_and_override(tmp_path, default_source, default_tokenizer):
    # The GGUF-built tokenizer saved as an HF dir loads back with the same behavior.
    tok = default_tokenizer
    tok.save_pretrained(tmp_path)
    tiny_llama().config.save_pretrained(tmp_path)
    text = "hello world\n\n2. 12345"
    from_dir = load_tokenizer(resolve_model(str(tmp_path)))
    assert from_dir.encode(text) == tok.encode(text)
    override = load_tokenizer(default_source, tokenizer=str(tmp_path))
    assert override.encode(text) == tok.encode(text)


def _with_qconfig(src: str, dst, qconfig: dict) -> str:
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = qconfig
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


@pytest.mark.parametrize(
    "qconfig,named",
    [
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "'fp8'"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "'gemv'"),
    ],
)
def test_unsupported_quantized_checkpoints_are_refused_by_name(
    tiny_llama_dir, tmp_path, qconfig, named
):
    """A method or scheme without kernels gets a ValueError at load that names it, not a
    failure on a packed tensor or garbage output."""
    quantized = _with_qconfig(tiny_llama_dir, tmp_path / "quantized", qconfig)
    with pytest.raises(ValueError, match=named):
        load_hf_config(resolve_model(quantized))


def test_quantization_flag_must_agree_with_the_checkpoint(tiny_llama_dir, tmp_path):
    from pagedllm.model_executor.loader import resolve_quantization

    awq = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm"}
    quantized = resolve_model(_with_qconfig(tiny_llama_dir, tmp_path / "awq", awq))
    assert resolve_quantization(quantized, None) == "awq"  # read from config.json, as vLLM
    assert resolve_quantization(quantized, "awq") == "awq"
    for flag in ("gptq", "int8", "gguf"):
        with pytest.raises(ValueError):
            resolve_quantization(quantized, flag)
    plain = resolve_model(tiny_llama_dir)
    with pytest.raises(ValueError, match="no quantization_config"):
        resolve_quantization(plain, "compressed-tensors")
    assert resolve_quantization(plain, "int8") == "int8"
