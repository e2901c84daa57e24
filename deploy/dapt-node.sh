#!/usr/bin/env bash
# One node's dapt workers: a `dapt-worker` per local GPU (`--device cuda:i`), each with its own
# collective port, all joining the coordinator at $DAPT_COORDINATOR. Slurm (deploy/slurm) and
# Kubernetes (deploy/k8s) run this once per node; it also runs by hand.
#
#   DAPT_COORDINATOR=http://HOST:7070 DAPT_JOB=NAME DAPT_TOKEN=... deploy/dapt-node.sh
#
# Environment:
#   DAPT_COORDINATOR   the coordinator's URL (required): http://HOST:PORT, or https://HOST:PORT
#                      with DAPT_COORDINATOR_CA
#   DAPT_JOB, DAPT_TOKEN  the job's name and token (required; dapt-worker reads them itself);
#                      DAPT_TOKEN_FILE instead of DAPT_TOKEN: a file that holds the token
#   DAPT_COORDINATOR_CA, DAPT_CLIENT_CERT, DAPT_CLIENT_KEY, DAPT_COORDINATOR_DOMAIN
#                      TLS to the coordinator: its CA (pinned), this node's client certificate
#                      and key, the name in its certificate (dapt-worker reads them itself)
#   DAPT_DEVICE        cuda or cpu (default: cuda when `nvidia-smi -L` lists a GPU, else cpu)
#   DAPT_NODE_WORKERS  workers on this node (default: one per GPU `nvidia-smi -L` lists; 1 on cpu)
#   DAPT_PRECISION     f32 or bf16 (default f32)
#   DAPT_HOST          the address the other nodes reach this one at (default: the first of
#                      `hostname -I`)
#   DAPT_PORT          worker i's collective listens on DAPT_PORT + i (default 29500)
#   DAPT_NODE_NAME     worker ids are NAME-w0, NAME-w1, ... (default: SLURMD_NODENAME, the pod's
#                      HOSTNAME, or `hostname -s`): unique per node and the same after a restart
#   DAPT_WORKER_BIN    the dapt-worker binary (default: dapt-worker on PATH)
#   DAPT_CONNECT_TIMEOUT_S  how long each worker keeps trying to reach the coordinator at the
#                      start (default 600: a coordinator may still be preparing the corpus)
#   DAPT_LOG_FORMAT    text or json (default text); each worker's lines go to this script's
#                      stderr, or to DAPT_LOG_DIR/<id>.log when DAPT_LOG_DIR is set
#
# The node is the unit of failure, as with torchrun: when one worker exits with an error, the
# others are stopped and the script exits with that worker's status, so that the scheduler
# (Kubernetes' restart policy, Slurm's requeue) restarts the node and its workers join the job
# again at the next generation. SIGTERM and SIGINT go to every worker (they leave the job
# cleanly) and the script exits once they are gone. It exits 0 when every worker saw the job
# complete.
set -uo pipefail

die() { echo "dapt-node: $*" >&2; exit 2; }
[ -n "${DAPT_COORDINATOR:-}" ] || die "set DAPT_COORDINATOR to the coordinator's URL (http://HOST:PORT)"
[ -n "${DAPT_JOB:-}" ] || die "set DAPT_JOB to the job's name (\`job:\` in its file)"
if [ -n "${DAPT_TOKEN_FILE:-}" ]; then
  [ -r "$DAPT_TOKEN_FILE" ] || die "DAPT_TOKEN_FILE: cannot read $DAPT_TOKEN_FILE"
  export DAPT_TOKEN_FILE
  unset DAPT_TOKEN
else
  [ -n "${DAPT_TOKEN:-}" ] || die "set DAPT_TOKEN to the job's token (or DAPT_TOKEN_FILE to a file with it)"
  export DAPT_TOKEN
fi
export DAPT_JOB

bin=${DAPT_WORKER_BIN:-$(command -v dapt-worker)}
[ -n "$bin" ] && [ -x "$bin" ] || die "no dapt-worker: put it on PATH or set DAPT_WORKER_BIN"

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
fi
device=${DAPT_DEVICE:-$([ "$gpus" -gt 0 ] && echo cuda || echo cpu)}
case $device in
  cuda) workers=${DAPT_NODE_WORKERS:-$gpus}
        [ "$workers" -gt 0 ] || die "DAPT_DEVICE=cuda but nvidia-smi lists no GPU" ;;
  cpu) workers=${DAPT_NODE_WORKERS:-1} ;;
  *) die "DAPT_DEVICE must be cuda or cpu, not \`$device\`" ;;
esac
host=${DAPT_HOST:-$(hostname -I 2>/dev/null | awk '{print $1}')}
[ -n "$host" ] || die "cannot tell this node's address: set DAPT_HOST"
port=${DAPT_PORT:-29500}
name=${DAPT_NODE_NAME:-${SLURMD_NODENAME:-${HOSTNAME:-$(hostname -s)}}}
format=${DAPT_LOG_FORMAT:-text}

# A log is appended to only when it is a regular file (or absent), checked and opened before
# any worker starts (and checked again once open): never through a symlink (a link to a user's
# ~/.bashrc got a worker's output) or into anything else.
logs=()
if [ -n "${DAPT_LOG_DIR:-}" ]; then
  mkdir -p "$DAPT_LOG_DIR" || die "cannot make DAPT_LOG_DIR $DAPT_LOG_DIR"
  not_ours() { [ -L "$1" ] || { [ -e "$1" ] && [ ! -f "$1" ]; }; }
  for ((i = 0; i < workers; i++)); do
    log="$DAPT_LOG_DIR/$name-w$i.log"
    not_ours "$log" && die "$log is a symlink or not a regular file: dapt writes its logs only to files of its own"
    exec {fd}>>"$log" || die "cannot open $log"
    # The file opened is the one checked (a link swapped in and out meanwhile is not).
    if not_ours "$log" || [ "$(stat -Lc %d:%i "/dev/fd/$fd")" != "$(stat -c %d:%i "$log")" ]; then
      die "$log changed while it was opened: dapt writes its logs only to files of its own"
    fi
    logs+=("$fd")
  done
fi

pids=()
for ((i = 0; i < workers; i++)); do
  id="$name-w$i"
  dev=$([ "$device" = cuda ] && echo "cuda:$i" || echo cpu)
  args=(--log-format "$format" --coordinator "$DAPT_COORDINATOR" --id "$id"
        --listen "0.0.0.0:$((port + i))" --advertise "$host:$((port + i))"
        --device "$dev" --precision "${DAPT_PRECISION:-f32}"
        --connect-timeout-s "${DAPT_CONNECT_TIMEOUT_S:-600}")
  if [ -n "${DAPT_LOG_DIR:-}" ]; then
    "$bin" "${args[@]}" >&"${logs[i]}" 2>&1 &
  else
    "$bin" "${args[@]}" &
  fi
  pids+=($!)
  echo "dapt-node: started $id (pid ${pids[-1]}) on $dev, collective $host:$((port + i))" >&2
done

stop_all() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
}
stopping=0
trap 'stopping=1; echo "dapt-node: stopping the workers" >&2; stop_all' TERM INT

status=0
live=("${pids[@]}")
while [ "${#live[@]}" -gt 0 ]; do
  done=
  wait -n -p done "${live[@]}"
  rc=$?
  [ -n "${done:-}" ] || continue # a trapped signal interrupted the wait
  rest=()
  for p in "${live[@]}"; do [ "$p" = "$done" ] || rest+=("$p"); done
  live=("${rest[@]}")
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$rc
    if [ "$stopping" -eq 0 ]; then
      echo "dapt-node: worker pid $done exited with status $rc: stopping the others" >&2
      stopping=1
      stop_all
    fi
  fi
done
exit "$status"
