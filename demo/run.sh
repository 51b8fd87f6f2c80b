#!/usr/bin/env bash
# The main job on one machine: a worker on the embedded signaling server; a client that
# trains a small model on a synthetic dataset through it, then runs inference with that
# model and downloads the predictions. Ends the worker at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=demo-output
rm -rf "$OUT" && mkdir -p "$OUT"
export SLEAP_RTC_ICE_HOSTS=${SLEAP_RTC_ICE_HOSTS:-127.0.0.1}  # stay on this machine

echo "== a tiny synthetic project (sleap-io)"
"$PYTHON" tests/tiny_data.py "$OUT/data" --frames 24 --epochs 5

"$PYTHON" worker.py --working-dir "$OUT/worker" --mount "$PWD/$OUT/data:data" > "$OUT/worker.log" 2>&1 &
worker_pid=$!
trap 'kill -INT $worker_pid 2>/dev/null; wait $worker_pid 2>/dev/null || true' EXIT
for _ in $(seq 240); do
  grep -q "registered as" "$OUT/worker.log" 2>/dev/null && break
  kill -0 $worker_pid 2>/dev/null || { cat "$OUT/worker.log"; exit 1; }
  sleep 0.5
done
grep -q "created room" "$OUT/worker.log" || {
  echo "demo: another signaling server already listens on 127.0.0.1:8080; stop it first" >&2; exit 1; }
source "$OUT/worker/room.env"

echo "== workers in room $SLEAP_RTC_ROOM"
"$PYTHON" client.py workers
echo "== training on the worker"
"$PYTHON" client.py train --config "$PWD/$OUT/data/config.yaml" --max-epochs 5 --run-name demo \
  --log-dir "$OUT/client" | tee "$OUT/train.txt"
model=$(sed -n 's/^model on the worker: //p' "$OUT/train.txt")
echo "== inference with that model"
"$PYTHON" client.py track --data-path "$PWD/$OUT/data/video.mp4" --model-paths "$model" \
  --peak-threshold 0 --download "$OUT/predictions" --log-dir "$OUT/client"
echo "== the worker's job ledger"
"$PYTHON" client.py jobs
echo
echo "demo: predictions in $OUT/predictions/, loss plot and logs in $OUT/client/"
