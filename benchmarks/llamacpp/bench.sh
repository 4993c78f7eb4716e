#!/usr/bin/env bash
# llama.cpp side by side with pagedllm on this machine (after benchmarks/llamacpp/install.sh):
#  1. batch-1: llama-bench, one request with a 512-token prompt then 128 new tokens (pp512+tg128),
#     and decode alone at depth 512 (tg128 @ d512); pagedllm bench latency on the same shape.
#  2. serving: llama-server with 16 slots, then `pagedllm bench serve` (100 prompts, 256 in /
#     128 out, concurrency 16) against it and against `pagedllm serve`, one after the other.
#
# usage: bash benchmarks/llamacpp/bench.sh [F16|BF16|Q4_1]  results under $OUT (default /tmp/llamacpp-bench)
#   Q4_1: llama.cpp on the default model's own file, pagedllm with --quantization gguf (its blocks
#   kept as they are) and drafts off, as llama-bench decodes without them.
set -euo pipefail
cd "$(dirname "$0")/../.."
HOME_DIR="${LLAMACPP_HOME:-$HOME/.cache/pagedllm-peers/llamacpp}"
TYPE="${1:-F16}"
OUT="${OUT:-/tmp/llamacpp-bench}"
BIN="$HOME_DIR/build/bin"
MODEL="$HOME_DIR/models/SmolLM2-135M-Instruct-$TYPE.gguf"
THREADS="$(nproc)"
OURS=()
[ "$TYPE" = Q4_1 ] && OURS=(--quantization gguf --speculative-config none)
mkdir -p "$OUT"
wait_healthy() { for _ in $(seq 180); do curl -sf "$1/health" >/dev/null && return 0; sleep 1; done; return 1; }

echo "== batch-1 ($(date -u +%FT%TZ), load: $(cut -d' ' -f1-3 /proc/loadavg))"
"$BIN/llama-bench" -m "$MODEL" -t "$THREADS" -p 512 -n 0 -pg 512,128 -r 5 | tee "$OUT/llama_bench_$TYPE.txt"
"$BIN/llama-bench" -m "$MODEL" -t "$THREADS" -p 0 -n 128 -d 512 -r 3 | tee -a "$OUT/llama_bench_$TYPE.txt"
.venv/bin/pagedllm bench latency --batch-size 1 --input-len 512 --output-len 128 --num-iters 5 \
  --max-model-len 2048 "${OURS[@]}" --output-json "$OUT/pagedllm_latency.json" | tee "$OUT/pagedllm_latency.txt"

echo "== serving"
SERVE_ARGS=(--num-prompts 100 --max-concurrency 16 --input-len 256 --output-len 128)
"$BIN/llama-server" -m "$MODEL" --host 127.0.0.1 --port 8012 --parallel 16 -c 16384 \
  -t "$THREADS" > "$OUT/llama_server_$TYPE.log" 2>&1 &
pid=$!
wait_healthy http://127.0.0.1:8012
.venv/bin/pagedllm bench serve --base-url http://127.0.0.1:8012 "${SERVE_ARGS[@]}" \
  --output-json "$OUT/serve_llamacpp_$TYPE.json" | tee "$OUT/serve_llamacpp_$TYPE.txt"
kill "$pid"; wait "$pid" || true

.venv/bin/pagedllm serve --port 8011 --max-model-len 2048 "${OURS[@]}" > "$OUT/pagedllm_server.log" 2>&1 &
pid=$!
wait_healthy http://127.0.0.1:8011
.venv/bin/pagedllm bench serve --base-url http://127.0.0.1:8011 "${SERVE_ARGS[@]}" \
  --output-json "$OUT/serve_pagedllm.json" | tee "$OUT/serve_pagedllm.txt"
kill "$pid"; wait "$pid" || true
