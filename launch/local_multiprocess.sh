#!/usr/bin/env bash
# N training processes on this host, joined through jax.distributed (parcae/train/distributed.py).
#   launch/local_multiprocess.sh N CONFIG WORKDIR [overrides...]
# Environment knobs:
#   CPU_DEVICES_PER_PROCESS  fake CPU devices per process (default 1); the global mesh has N x this many.
#   GPUS_PER_PROCESS         if set (e.g. 1), run on GPUs instead: process i sees GPUs i*G..i*G+G-1.
#   PORT                     coordinator port on 127.0.0.1 (default 12355).
#   PARCAE                   the command to run (default: `parcae`, else `python -m parcae.cli`).
# Logs: WORKDIR/proc_<i>.log for i>0; process 0 prints to this terminal. Ctrl-C stops all processes.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 N CONFIG WORKDIR [overrides...]" >&2; exit 2
fi
N=$1; CONFIG=$2; WORKDIR=$3; shift 3
if ! [[ "$N" =~ ^[1-9][0-9]*$ ]]; then echo "N must be a positive integer, got '$N'" >&2; exit 2; fi
PORT=${PORT:-12355}
if [[ -n "${PARCAE:-}" ]]; then read -r -a CMD <<< "$PARCAE"
elif command -v parcae >/dev/null; then CMD=(parcae)
else CMD=(python -m parcae.cli); fi
mkdir -p "$WORKDIR"

pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
trap cleanup INT TERM

for ((i = N - 1; i >= 0; i--)); do  # workers first, process 0 (the coordinator) last
  env_vars=(JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES="$N" JAX_PROCESS_ID="$i")
  if [[ -n "${GPUS_PER_PROCESS:-}" ]]; then
    first=$((i * GPUS_PER_PROCESS))
    env_vars+=(CUDA_VISIBLE_DEVICES="$(seq -s, "$first" $((first + GPUS_PER_PROCESS - 1)))")
  else
    # the caller's other XLA flags are kept; a device count among them is replaced
    other_flags=$(sed -E 's/--xla_force_host_platform_device_count=[^ ]*//g' <<< "${XLA_FLAGS:-}")
    env_vars+=(JAX_PLATFORMS=cpu XLA_FLAGS="$other_flags --xla_force_host_platform_device_count=${CPU_DEVICES_PER_PROCESS:-1}")
  fi
  if [[ $i -eq 0 ]]; then
    env "${env_vars[@]}" "${CMD[@]}" train --config "$CONFIG" --workdir "$WORKDIR" "$@" &
  else
    env "${env_vars[@]}" "${CMD[@]}" train --config "$CONFIG" --workdir "$WORKDIR" "$@" \
      > "$WORKDIR/proc_$i.log" 2>&1 &
  fi
  pids+=($!)
done

status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
