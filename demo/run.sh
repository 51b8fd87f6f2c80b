#!/usr/bin/env bash
# The main job on one machine: a worker on the embedded signaling server, and a client
# that finds it, opens a WebRTC link and moves a file both ways. Ends the worker at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=demo-output
rm -rf "$OUT" && mkdir -p "$OUT"
export SLEAP_RTC_ICE_HOSTS=${SLEAP_RTC_ICE_HOSTS:-127.0.0.1}  # stay on this machine

"$PYTHON" worker.py --working-dir "$OUT/worker" > "$OUT/worker.log" 2>&1 &
worker_pid=$!
trap 'kill -INT $worker_pid 2>/dev/null; wait $worker_pid 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  grep -q "registered as" "$OUT/worker.log" 2>/dev/null && break
  kill -0 $worker_pid 2>/dev/null || { cat "$OUT/worker.log"; exit 1; }
  sleep 0.5
done
grep -q "created room" "$OUT/worker.log" || {
  echo "demo: another signaling server already listens on 127.0.0.1:8080; stop it first" >&2; exit 1; }
source "$OUT/worker/room.env"

echo "== workers in room $SLEAP_RTC_ROOM"
"$PYTHON" client.py workers
echo "== ping over WebRTC"
"$PYTHON" client.py ping --count 3
echo "== upload and download 5 MB"
head -c 5000000 /dev/urandom > "$OUT/sample.bin"
"$PYTHON" client.py upload "$OUT/sample.bin"
"$PYTHON" client.py download "$PWD/$OUT/worker/uploads/sample.bin" --download "$OUT/returned"
cmp "$OUT/sample.bin" "$OUT/returned/sample.bin" && echo "demo: the file came back intact"
