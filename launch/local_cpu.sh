#!/usr/bin/env bash
# N jaxlora processes on this machine, each with its own simulated CPU devices: the multi-process
# path of a pod or cluster, runnable on a laptop (tests/test_launch.py runs it with N=2).
#
#   launch/local_cpu.sh N CONFIG OUT [jaxlora train options...]
#
# Environment: JAXLORA_CPU_DEVICES (CPU devices per process, default 1), JAXLORA_PORT (the
# coordinator's port, default random), JAXLORA_CMD (how to run jaxlora, default `jaxlora`).
# SIGTERM/SIGINT are passed on to every process, which checkpoint and exit; if one process fails
# the others are stopped, and the first failure's exit status is returned.
set -euo pipefail
# needs bash >= 5.1 (wait -n -p)

if [[ $# -lt 3 ]]; then
  echo "usage: $0 N CONFIG OUT [jaxlora train options...]" >&2
  exit 2
fi
n=$1 config=$2 out=$3
shift 3
if ! [[ $n =~ ^[1-9][0-9]*$ ]]; then
  echo "$0: N must be a positive number of processes, got '$n'" >&2
  exit 2
fi

port=${JAXLORA_PORT:-$((20000 + RANDOM % 20000))}
export JAXLORA_COORDINATOR=127.0.0.1:$port JAXLORA_NUM_PROCESSES=$n
export JAXLORA_CPU_DEVICES=${JAXLORA_CPU_DEVICES:-1}
read -r -a cmd <<<"${JAXLORA_CMD:-jaxlora}"

pids=()
for ((i = 0; i < n; i++)); do
  JAXLORA_PROCESS_ID=$i "${cmd[@]}" train "$config" --out "$out" "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT

status=0
left=$n
while ((left > 0)); do
  rc=0 done_pid=
  wait -n -p done_pid || rc=$?
  [[ -n ${done_pid:-} ]] || continue # a trapped signal interrupted the wait; no process ended
  left=$((left - 1))
  if ((rc != 0 && status == 0)); then
    status=$rc
    kill -TERM "${pids[@]}" 2>/dev/null || true
  fi
done
exit "$status"
