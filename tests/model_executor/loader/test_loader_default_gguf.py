"""The real default model (SmolLM2-135M-Instruct Q4_1): config, tokenizer fix-ups, exact weights."""

from __future__ import annotations

import importlib.util
import os

import torch

from pagedllm.model_executor.loader import (
    ModelSource,
    iter_weights,
    load_hf_config,
    resolve_model,
)


def test_config(default_source):
    config = load_hf_config(default_source)
    assert config.model_type == "llama"
    assert (config.hidden_size, config.num_hidden_layers) == (576, 30)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.tie_word_embeddings
    assert config.rope_parameters["rope_theta"] == 100000.0


def test_digits_are_split_like_llama_cpp(default_tokenizer):
    ids = default_tokenizer.encode("12345", add_special_tokens=False)
    assert len(ids) == 5
    assert [default_tokenizer.decode([i]) for i in ids] == list("12345")
    # Without the Digits pre-tokenizer "\n\n2." becomes "\n" "\n2" ... -> [198, 198, 34, 30];
    # llama.cpp and SmolLM2's tokenizer.json keep "\n\n" together.
    assert default_tokenizer.encode("hello world\n\n2.", add_special_tokens=False) == [
        28120,
        905,
        1116,
        34,
        30,
    ]


def test_chat_template(default_tokenizer):
    assert "<|im_start|>" in default_tokenizer.chat_template
    prompt = default_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_default_resolves_to_same_file(default_source, default_gguf_path):
    assert resolve_model(os.path.dirname(default_gguf_path)).gguf_file == default_source.gguf_file


def _transformers_state_dict(source: ModelSource) -> dict[str, torch.Tensor]:
    """The float32 state dict transformers builds from the same GGUF."""
    directory, filename = os.path.split(source.gguf_file)
    from transformers import AutoModelForCausalLM

    if importlib.util.find_spec("accelerate") is not None:
        model = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=filename, dtype=torch.float32
        )
        return model.state_dict()
    # transformers' GGUF from_pretrained insists on accelerate; without it, call the function it
    # uses for llama GGUFs (load_gguf_checkpoint) on a meta-device model of the same config.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(load_hf_config(source))
    return load_gguf_checkpoint(
        source.gguf_file, return_tensors=True, model_to_load=skeleton, torch_dtype=torch.float32
    )["tensors"]


def test_weights_identical_to_transformers(default_source):
    expected = _transformers_state_dict(default_source)
    expected.pop("lm_head.weight", None)  # tied to embed_tokens; the GGUF has no output.weight
    seen = set()
    for name, tensor in iter_weights(default_source):
        assert name not in seen
        seen.add(name)
        ref = expected[name]
        assert tensor.dtype == ref.dtype == torch.float32, name
        assert torch.equal(tensor, ref), name
    assert seen == set(expected)
    assert len(seen) == 272
