#!/usr/bin/env bash
# Set up (./.venv) and run shmkv's main job: a live fleet of 4 rank processes sharing one G2
# pool in shared memory, behind a KV-aware router, publishing vLLM-format KV events, on a
# built-in prefix-sharing workload; prints the report. Extra arguments go to `shmkv fleet`,
# e.g. `scripts/demo.sh --request-count 2000 --speedup-ratio 20`.
set -euo pipefail
source "$(dirname "$0")/_env.sh"
exec python -m shmkv fleet \
  --data-parallel-size 4 --router-mode kv \
  --request-count 400 --input-tokens 1024 --output-tokens 64 --replay-concurrency 32 \
  --shared-prefix-ratio 0.5 --num-prefix-groups 8 \
  --num-gpu-blocks-override 384 --num-g2-blocks 2048 --kv-bytes-per-token 65536 \
  --speedup-ratio inf --zmq-kv-events-port 0 --zmq-replay-port 0 --event-codec vllm "$@"
