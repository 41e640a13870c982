#!/usr/bin/env bash
# A real SLURM cluster test of profiles/slurm: one node on loopback, one fake GPU, the tiny-model workflow.
#
#   tests/slurm/run_slurm_test.sh [PYTHON]     (root; Debian; PYTHON has e1, snakemake and the [slurm] extra)
#
# What it does, in order:
#   1. installs Debian's slurmctld, slurmd, slurm-client and munge if any of them is missing (idempotent);
#   2. writes munge and SLURM configuration into a fresh temporary directory (nothing under /etc is
#      touched): slurm.conf on 127.0.0.1 with free ports, one node with the machine's CPUs and one fake
#      GPU (gres.conf: Name=gpu File=/dev/null, so jobs that ask for --gres=gpu:1 are scheduled as on a
#      real GPU cluster and see CUDA_VISIBLE_DEVICES=0);
#   3. starts munged, slurmctld and slurmd in the foreground as background jobs, recording each PID, and
#      waits until the node is idle;
#   4. runs a small grid (tests/small_grid.yaml narrowed to 1 image x 1 prompt x 2 decode lengths, cpu) through
#      `snakemake --profile profiles/slurm` (profiles/default is loaded with it, as for a user), then the
#      same grid locally in another directory;
#   5. tests/slurm/check_slurm_run.py checks that every job went through sbatch with the profile's
#      resources (GPU rules given the GPU) and that both runs wrote the same outputs (see that file for
#      what "same" means);
#   6. on exit, whatever happened: cancels our jobs and kills every daemon it started, by PID.
# Every step is bounded in time; on failure the daemon logs and the snakemake output are printed.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${1:-${PYTHON:-python3}}
SLURM_RUN_TIMEOUT=${SLURM_RUN_TIMEOUT:-900}   # seconds for the cluster run of the workflow
LOCAL_RUN_TIMEOUT=${LOCAL_RUN_TIMEOUT:-600}   # seconds for the local run of the same grid
NODE=localhost

say() { printf '[slurm-test %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { say "FAIL: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (installs Debian packages, runs slurmd as root)"
"$PY" -c 'import e1, snakemake, snakemake_executor_plugin_slurm' 2>/dev/null \
  || die "$PY cannot import e1, snakemake and snakemake_executor_plugin_slurm: pip install -e '.[slurm]'"

# --- 1. packages --------------------------------------------------------------------------------------
need=()
for exe in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/bin/squeue /usr/sbin/munged; do
  [ -x "$exe" ] || need+=("$exe")
done
if [ ${#need[@]} -gt 0 ]; then
  say "missing ${need[*]}: installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  # The packages' scripts would start munge and SLURM daemons of their own (on /etc's configuration):
  # forbid service starts during the install unless the machine already has a policy.
  own_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && own_policy=1
  fi
  ok=1
  timeout 300 apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 || {
    timeout 300 apt-get update -qq && \
    timeout 300 apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge
  } || ok=
  [ -z "$own_policy" ] || rm -f /usr/sbin/policy-rc.d
  [ -n "$ok" ] || die "apt-get install slurmctld slurmd slurm-client munge failed"
fi
say "$(slurmd -V)"

# --- 2. configuration in a temporary directory -------------------------------------------------------
T=$(mktemp -d /tmp/e1-slurm-test.XXXXXX)
chmod 755 "$T"
PIDS=()        # daemons we started, killed by PID on exit
DAEMONS=()     # their names, same order

show_logs() {
  for f in "$T"/log/*.log; do
    [ -f "$f" ] || continue
    echo "----- $f (last 60 lines) -----"
    tail -n 60 "$f"
  done
}

teardown() {
  local rc=$?
  set +e
  if [ "$rc" != 0 ]; then
    say "failed (exit $rc): daemon logs follow"
    show_logs
  fi
  if [ -n "${CTLD_PID:-}" ] && kill -0 "$CTLD_PID" 2>/dev/null; then
    timeout 10 scancel --user=root >/dev/null 2>&1   # jobs still queued or running, if any
  fi
  local i pid
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do    # slurmd, slurmctld, then munged
    pid=${PIDS[$i]}
    kill -0 "$pid" 2>/dev/null || continue
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      say "${DAEMONS[$i]} (pid $pid) ignored SIGTERM: SIGKILL"
      kill -KILL "$pid" 2>/dev/null
    fi
  done
  say "stopped ${DAEMONS[*]:-nothing} (pids ${PIDS[*]:-none})"
  if [ "$rc" = 0 ] && [ -z "${KEEP_SLURM_TEST_DIR:-}" ]; then
    rm -rf "$T"
  else
    say "kept $T"
  fi
  exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM

free_port() {  # a TCP port on 127.0.0.1 that nothing listens on now
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
CTLD_PORT=$(free_port)
SLURMD_PORT=$(free_port)
[ "$CTLD_PORT" != "$SLURMD_PORT" ] || SLURMD_PORT=$(free_port)

mkdir -p "$T"/munge "$T"/log "$T"/ctld "$T"/spool "$T"/run
chown munge:munge "$T"/munge && chmod 700 "$T"/munge
# munged insists on a private key file owned by its user
dd if=/dev/urandom of="$T"/munge/munge.key bs=1024 count=1 status=none
chown munge:munge "$T"/munge/munge.key && chmod 600 "$T"/munge/munge.key
MUNGE_SOCKET="$T/munge/munge.socket"
chmod 711 "$T"/munge   # clients (root) reach the socket; nobody lists the directory

# hardware of this machine as slurmd sees it (CPUs=.. Boards=.. SocketsPerBoard=.. CoresPerSocket=..)
HW=$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ *RealMemory=[0-9]*//')
MEM=$(( $(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p') * 8 / 10 ))
# GPU rules ask for 16000 MB in profiles/slurm: declare at least 20000 MB (config_overrides lets slurmd
# accept it on a smaller machine; memory is not enforced here, as the GPU is not real either).
[ "$MEM" -ge 20000 ] || MEM=20000

echo "NodeName=$NODE Name=gpu File=/dev/null" > "$T"/gres.conf
cat > "$T"/slurm.conf <<EOF
# written by tests/slurm/run_slurm_test.sh: one node on loopback, one fake GPU
ClusterName=e1test
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$T/ctld
SlurmdSpoolDir=$T/spool
SlurmctldPidFile=$T/run/slurmctld.pid
SlurmdPidFile=$T/run/slurmd.pid
SlurmctldLogFile=$T/log/slurmctld.log
SlurmdLogFile=$T/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$T/log/jobcomp.log
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
# without it every job takes the whole node's memory and jobs run one at a time
DefMemPerCPU=1000
# finished jobs stay visible to squeue/scontrol this long: the status command is squeue (no slurmdbd)
MinJobAge=600
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 $HW RealMemory=$MEM Gres=gpu:1 State=UNKNOWN
PartitionName=e1test Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$T/slurm.conf"   # clients (sbatch, squeue, scontrol, scancel) read this file
# Inside each job the plugin's jobstep runs `srun` with every SLURM_* variable removed, SLURM_CONF
# included, so srun would look for /etc/slurm/slurm.conf (a real cluster has one). Rather than write
# under /etc, the jobs find this srun first on PATH, which points it at our file.
mkdir -p "$T/bin"
printf '#!/bin/sh\nSLURM_CONF=%s exec /usr/bin/srun "$@"\n' "$SLURM_CONF" > "$T/bin/srun"
chmod 755 "$T/bin/srun"
export PATH="$T/bin:$PATH"

wait_until() {  # wait_until SECONDS WHAT CMD...: poll CMD every half second while the last daemon lives
  local secs=$1 what=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    daemon_alive
    [ $SECONDS -lt $end ] || die "$what not reached within ${secs}s"
    sleep 0.5
  done
}

# --- 3. daemons -----------------------------------------------------------------------------------------
start() {  # start NAME CMD...: run a daemon in the foreground of a background job, record its PID
  local name=$1; shift
  "$@" >"$T/log/$name.out" 2>&1 &
  PIDS+=("$!"); DAEMONS+=("$name")
  say "started $name (pid $!)"
}
daemon_alive() {  # the last started daemon is still running
  kill -0 "${PIDS[-1]}" 2>/dev/null && return 0
  tail -n 20 "$T/log/${DAEMONS[-1]}.out" >&2 2>/dev/null || true
  die "${DAEMONS[-1]} (pid ${PIDS[-1]}) exited"
}

start runuser-munged runuser -u munge -- /usr/sbin/munged --foreground --socket="$MUNGE_SOCKET" \
  --key-file="$T/munge/munge.key" --pid-file="$T/munge/munged.pid" --log-file="$T/log/munged.log" \
  --seed-file="$T/munge/munged.seed"
wait_until 15 "munged answering on $MUNGE_SOCKET" timeout 5 munge -n --socket="$MUNGE_SOCKET"
PIDS+=("$(cat "$T/munge/munged.pid")"); DAEMONS+=("munged")   # munged itself, under runuser: stopped first
start slurmctld /usr/sbin/slurmctld -D -i -f "$SLURM_CONF"
CTLD_PID=${PIDS[-1]}
wait_until 30 "slurmctld answering on 127.0.0.1:$CTLD_PORT" timeout 10 scontrol ping
start slurmd /usr/sbin/slurmd -D -N "$NODE" -f "$SLURM_CONF"
node_idle() { [ "$(timeout 10 sinfo -h -n "$NODE" -o %t)" = idle ]; }
wait_until 60 "node $NODE idle" node_idle
daemon_alive
scontrol show node "$NODE" | grep -q 'Gres=gpu:1' || die "node $NODE does not advertise the fake GPU"
say "cluster up: $(sinfo -h -o '%P %D %t %c CPUs %m MB %G')"

# --- 4. the same small grid on the cluster and locally --------------------------------------------------
# tests/small_grid.yaml, as every workflow test, narrowed with --config (1 image x 1 prompt x 2 decode lengths)
GRID=(--configfile "$REPO/tests/small_grid.yaml" --config "images=[336x336]" "select_prompts=[short]" "decode_tokens=[2,4]")
SLURM_WD="$T/cluster"; LOCAL_WD="$T/local"
mkdir -p "$SLURM_WD" "$LOCAL_WD"

cd "$REPO"
say "cluster run: snakemake --profile profiles/slurm (timeout ${SLURM_RUN_TIMEOUT}s)"
t0=$SECONDS
# squeue as the status command: this cluster has no accounting database (sacct would hang the plugin);
# it needs MinJobAge >= 3 x the initial status-check delay. No account: there is no accounting either.
# SIGINT, not SIGTERM, stops snakemake (it then cancels its SLURM jobs).
if ! timeout -s INT -k 30 "$SLURM_RUN_TIMEOUT" "$PY" -m snakemake --snakefile "$REPO/Snakefile" \
    --directory "$SLURM_WD" "${GRID[@]}" --profile profiles/slurm \
    --slurm-status-command squeue --slurm-init-seconds-before-status-checks 5 \
    --slurm-no-account --slurm-keep-successful-logs >"$T/log/snakemake-cluster.log" 2>&1; then
  tail -n 80 "$T/log/snakemake-cluster.log"
  for f in "$SLURM_WD"/.snakemake/slurm_logs/*/*/*.log; do [ -f "$f" ] && { echo "----- $f"; tail -n 20 "$f"; }; done
  squeue --states=all -o '%i %j %T %r %k' || true
  die "the workflow failed on the cluster (snakemake output above)"
fi
say "cluster run done in $((SECONDS - t0)) s"
scontrol show job --details --oneliner > "$T/jobs.txt"   # finished jobs stay MinJobAge seconds

say "local run of the same grid (timeout ${LOCAL_RUN_TIMEOUT}s)"
t0=$SECONDS
if ! CUDA_VISIBLE_DEVICES= timeout -k 30 "$LOCAL_RUN_TIMEOUT" "$PY" -m snakemake --snakefile "$REPO/Snakefile" \
    --directory "$LOCAL_WD" "${GRID[@]}" --cores 2 >"$T/log/snakemake-local.log" 2>&1; then
  tail -n 60 "$T/log/snakemake-local.log"
  die "the local run failed (snakemake output above)"
fi
say "local run done in $((SECONDS - t0)) s"

# --- 5. checks ------------------------------------------------------------------------------------------
"$PY" "$REPO/tests/slurm/check_slurm_run.py" --cluster "$SLURM_WD" --local "$LOCAL_WD" --jobs "$T/jobs.txt" \
  --ctld-log "$T/log/slurmctld.log" --snakemake-log "$T/log/snakemake-cluster.log" \
  || die "checks failed"
say "PASS"
