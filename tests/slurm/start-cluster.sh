#!/usr/bin/env bash
# Start a private, single-node, real Slurm cluster (munged + slurmctld + slurmd)
# whose every file lives under DIR.
#
#   tests/slurm/start-cluster.sh DIR
#   . DIR/env.sh            # export SLURM_CONF=DIR/slurm.conf
#   sbatch --wrap 'hostname'
#   tests/slurm/stop-cluster.sh DIR
#
# Must run as root (slurmd has to be able to start jobs; SlurmUser=root).
# Optional environment:
#   SLURM_TEST_CTLD_PORT / SLURM_TEST_SLURMD_PORT  fixed ports (default: random free ones)
#   SLURM_TEST_GPUS=N          number of fake GPUs declared as GRES (default 2, 0 = none)
#                              (gres.conf File=DIR/dev/nvidiaN dummy char devices; jobs
#                              get CUDA_VISIBLE_DEVICES / SLURM_JOB_GPUS)
#   SLURM_TEST_MIN_JOB_AGE     seconds finished jobs stay visible in scontrol/squeue (300)
#   SLURM_TEST_PROCTRACK       proctrack plugin (default proctrack/pgid; proctrack/linuxproc
#                              also works without cgroups but leaks orphans, see README)
#   SLURM_TEST_TIMEOUT         seconds to wait for the node to become idle (60)
#   SLURM_TEST_NODES=N         N compute nodes n1..nN (default 1, the host itself): each
#                              slurmd in a network namespace of its own with its own
#                              address (10.77.X.1N), joined by a bridge whose address
#                              (10.77.X.1, written to DIR/ctld-addr) is slurmctld's and the
#                              one jobs reach this machine at. Needs `ip` (iproute2).
#   SLURM_TEST_SLURMD_TIMEOUT  SlurmdTimeout in seconds (default 300)
#   SLURM_TEST_CPUS / SLURM_TEST_MEM_MB  declare the node with this many CPUs / MB instead of
#                              what `slurmd -C` sees (SlurmdParameters=config_overrides), so
#                              that more jobs run at once than the machine has cores
# The last line on stdout is the client environment:  export SLURM_CONF=DIR/slurm.conf
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "start-cluster.sh: must run as root" >&2
    exit 2
fi
for b in munged slurmctld slurmd sinfo scontrol; do
    command -v "$b" >/dev/null 2>&1 || { echo "start-cluster.sh: $b not found; run tests/slurm/install.sh" >&2; exit 2; }
done

mkdir -p "$1"
DIR="$(cd "$1" && pwd -P)"
if [ -e "$DIR/slurm.conf" ]; then
    echo "start-cluster.sh: $DIR already holds a cluster; use a fresh DIR (or stop-cluster.sh + rm -rf)" >&2
    exit 2
fi

TIMEOUT="${SLURM_TEST_TIMEOUT:-60}"
MIN_JOB_AGE="${SLURM_TEST_MIN_JOB_AGE:-300}"
NGPU="${SLURM_TEST_GPUS:-2}"
PROCTRACK="${SLURM_TEST_PROCTRACK:-proctrack/pgid}"
NODES="${SLURM_TEST_NODES:-1}"
SLURMD_TIMEOUT="${SLURM_TEST_SLURMD_TIMEOUT:-300}"

# munged insists that its directories are not group/world writable.
chmod 0755 "$DIR"
mkdir -p "$DIR/munge" "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run" "$DIR/dev"
# munge dir 0755 so that non-root clients could reach the socket (the key is 0400).
chmod 0755 "$DIR/munge"
chmod 0700 "$DIR/state" "$DIR/spool"

dump_logs() {
    for f in "$DIR"/log/munged.log "$DIR"/log/slurmctld.log "$DIR"/log/slurmd*.log; do
        [ -f "$f" ] || continue
        echo "==== tail $f" >&2
        tail -n 40 "$f" >&2
    done
}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fail() {
    echo "start-cluster.sh: $*" >&2
    dump_logs
    # do not leave half a cluster running
    "$HERE/stop-cluster.sh" "$DIR" >/dev/null 2>&1 || true
    exit 1
}

# ---------------------------------------------------------------- ports
port_in_use() {
    ss -Hltn "sport = :$1" 2>/dev/null | grep -q . && return 0
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    return 1
}
pick_port() {
    local p i
    for i in $(seq 1 200); do
        # 20000-32499: below the usual ephemeral range (32768-60999), so an
        # outgoing connection cannot grab the port between pick and bind
        p=$(( 20000 + (RANDOM * 32768 + RANDOM) % 12500 ))
        # avoid the neighbour too (slurmctld may use port+1.. with ranges)
        if ! port_in_use "$p" && ! port_in_use "$((p + 1))"; then
            echo "$p"
            return 0
        fi
    done
    return 1
}
CTLD_PORT="${SLURM_TEST_CTLD_PORT:-$(pick_port)}"
SLURMD_PORT="${SLURM_TEST_SLURMD_PORT:-$(pick_port)}"
while [ "$SLURMD_PORT" = "$CTLD_PORT" ]; do SLURMD_PORT="$(pick_port)"; done

# ---------------------------------------------------------------- munge
MUNGE_SOCKET="$DIR/munge/munge.socket"
if command -v mungekey >/dev/null 2>&1; then
    mungekey --create --keyfile="$DIR/munge/munge.key" >/dev/null
else
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
fi
chmod 0400 "$DIR/munge/munge.key"

# munged forks into the background itself and writes its pid file.
munged \
    --socket="$MUNGE_SOCKET" \
    --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/run/munged.pid" \
    --log-file="$DIR/log/munged.log" \
    --seed-file="$DIR/munge/munged.seed" \
    --force \
    >"$DIR/log/munged.out" 2>&1 || { cat "$DIR/log/munged.out" >&2; fail "munged failed to start"; }

for _ in $(seq 1 50); do
    [ -S "$MUNGE_SOCKET" ] && break
    sleep 0.1
done
[ -S "$MUNGE_SOCKET" ] || fail "munge socket $MUNGE_SOCKET did not appear"
if command -v munge >/dev/null 2>&1; then
    munge --socket="$MUNGE_SOCKET" -n | unmunge --socket="$MUNGE_SOCKET" >/dev/null \
        || fail "munge self-test failed"
fi

# ---------------------------------------------------------------- slurm.conf
HOST="$(hostname -s)"
# slurmd -C prints the hardware as slurmd sees it, e.g.
# NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105
HW="$(slurmd -C | head -n 1)"
hw() { echo "$HW" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
CPUS="$(hw CPUs)"
SOCKETS="$(hw SocketsPerBoard)"
CORES="$(hw CoresPerSocket)"
THREADS="$(hw ThreadsPerCore)"
REALMEM="$(hw RealMemory)"
[ -n "$CPUS" ] && [ -n "$REALMEM" ] || fail "could not parse 'slurmd -C': $HW"
# Default memory per CPU so that jobs without --mem do not grab the whole node
# (with CR_Core_Memory a job without --mem/DefMemPerCPU gets all of RealMemory).
DEFMEM=$(( REALMEM / CPUS ))
[ "$DEFMEM" -gt 1024 ] && DEFMEM=1024

NODE_HW="CPUs=$CPUS Boards=1 SocketsPerBoard=$SOCKETS CoresPerSocket=$CORES ThreadsPerCore=$THREADS RealMemory=$REALMEM"
OVERRIDES=""
if [ -n "${SLURM_TEST_CPUS:-}" ] || [ -n "${SLURM_TEST_MEM_MB:-}" ]; then
    CPUS="${SLURM_TEST_CPUS:-$CPUS}"
    REALMEM="${SLURM_TEST_MEM_MB:-$REALMEM}"
    NODE_HW="CPUs=$CPUS RealMemory=$REALMEM"
    OVERRIDES="SlurmdParameters=config_overrides"
    DEFMEM=$(( REALMEM / CPUS ))
    [ "$DEFMEM" -gt 1024 ] && DEFMEM=1024
fi

# ---------------------------------------------------------------- nodes
CTLD_ADDR=127.0.0.1
NODE_NAMES="$HOST"
NODE_LINES="NodeName=$HOST NodeAddr=127.0.0.1"
SPOOL="$DIR/spool"
SLURMD_PID="$DIR/run/slurmd.pid"
SLURMD_LOG="$DIR/log/slurmd.log"
if [ "$NODES" -gt 1 ]; then
    command -v ip >/dev/null 2>&1 || fail "SLURM_TEST_NODES=$NODES needs ip (iproute2)"
    NET="10.77.$(( CTLD_PORT % 250 ))"
    BRIDGE="drb$CTLD_PORT"
    ip link add "$BRIDGE" type bridge || fail "cannot create bridge $BRIDGE"
    echo "$BRIDGE" >"$DIR/run/bridge"
    ip addr add "$NET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    CTLD_ADDR="$NET.1"
    NODE_NAMES="n[1-$NODES]"
    NODE_LINES="NodeName=n[1-$NODES] NodeAddr=$(seq -s, -f "$NET.1%g" 1 "$NODES")"
    for i in $(seq 1 "$NODES"); do
        ns="dr$CTLD_PORT-n$i"
        ip netns add "$ns" || fail "cannot create network namespace $ns"
        echo "$ns" >>"$DIR/run/netns"
        ip link add "drv$CTLD_PORT$i" type veth peer name "drp$CTLD_PORT$i"
        ip link set "drp$CTLD_PORT$i" netns "$ns"
        ip link set "drv$CTLD_PORT$i" master "$BRIDGE"
        ip link set "drv$CTLD_PORT$i" up
        ip netns exec "$ns" ip addr add "$NET.1$i/24" dev "drp$CTLD_PORT$i"
        ip netns exec "$ns" ip link set "drp$CTLD_PORT$i" up
        ip netns exec "$ns" ip link set lo up
        mkdir -p "$DIR/spool/n$i"
    done
    SPOOL="$DIR/spool/%n"
    SLURMD_PID="$DIR/run/slurmd-%n.pid"
    SLURMD_LOG="$DIR/log/slurmd-%n.log"
    # Each node is this machine's hardware as slurmd sees it.
    OVERRIDES="SlurmdParameters=config_overrides"
fi
echo "$CTLD_ADDR" >"$DIR/ctld-addr"

NODE_GRES=""
GRES_TYPES=""
if [ "$NGPU" -gt 0 ]; then
    GRES_TYPES="GresTypes=gpu"
    NODE_GRES="Gres=gpu:$NGPU"
    {
        echo "AutoDetect=off"
        # Slurm 22.05 drops GPUs without File= ("Removing file-less GPU ... from
        # final GRES list") and the node then goes INVAL with "gres/gpu count
        # reported lower than configured (0 < 2)", so Count=N alone does not work.
        # Dummy device files instead: slurmd insists on a character or block
        # device ("... is not a valid character or block device, fix your
        # gres.conf") and derives the CUDA_VISIBLE_DEVICES index from the
        # trailing number. Nothing ever opens them. Prefer real char nodes
        # (major 195 = nvidia; works as root, also in containers); fall back to
        # symlinks to /dev/null if mknod is not permitted.
        for i in $(seq 0 $((NGPU - 1))); do
            mknod "$DIR/dev/nvidia$i" c 195 "$i" 2>/dev/null \
                || ln -sf /dev/null "$DIR/dev/nvidia$i"
            echo "NodeName=$NODE_NAMES Name=gpu File=$DIR/dev/nvidia$i"
        done
    } >"$DIR/gres.conf"
fi

cat >"$DIR/slurm.conf" <<CONF
# generated by tests/slurm/start-cluster.sh
ClusterName=test$(echo "$CTLD_PORT")
SlurmctldHost=$HOST($CTLD_ADDR)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
MpiDefault=none
ProctrackType=$PROCTRACK
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# finished jobs (with state and exit code) are appended here; there is no sacct
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
SchedulerType=sched/backfill
# batch_sched_delay: the default 3 makes consecutive submissions wait ~3 s for
# the scheduler; 0 gives ~1 s submit-to-start.
SchedulerParameters=batch_sched_delay=0
# A job whose dependency can never be satisfied (afterok on a FAILED job) is
# CANCELLED (Reason=DependencyNeverSatisfied) instead of staying PENDING
# forever. (Since 20.02 this lives in DependencyParameters; in
# SchedulerParameters it is silently ignored.)
DependencyParameters=kill_invalid_depend
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEFMEM
ReturnToService=2
MinJobAge=$MIN_JOB_AGE
KillWait=5
InactiveLimit=0
SlurmdTimeout=$SLURMD_TIMEOUT
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$SLURMD_LOG
SlurmctldDebug=info
SlurmdDebug=info
$GRES_TYPES
$OVERRIDES
# Jobs over a partition's limits are accepted and wait (Reason=PartitionTimeLimit) rather
# than refused at submission, as on many sites.
EnforcePartLimits=NO
$NODE_LINES $NODE_HW $NODE_GRES Features=testfeat State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
# A partition with a 1-minute limit: a job asking for more never starts there.
PartitionName=tiny Nodes=ALL MaxTime=1 State=UP
CONF

export SLURM_CONF="$DIR/slurm.conf"
cat >"$DIR/env.sh" <<ENV
export SLURM_CONF=$DIR/slurm.conf
ENV

# ---------------------------------------------------------------- daemons
# Both daemonize themselves and write the pid files named in slurm.conf.
# -i: ignore any state (there is none in a fresh DIR anyway).
slurmctld -f "$DIR/slurm.conf" -i >"$DIR/log/slurmctld.out" 2>&1 \
    || { cat "$DIR/log/slurmctld.out" >&2; fail "slurmctld failed to start"; }
if [ "$NODES" -gt 1 ]; then
    for i in $(seq 1 "$NODES"); do
        # nsenter, not `ip netns exec`: that remounts /sys, where slurmd wants its cgroups
        nsenter --net="/run/netns/dr$CTLD_PORT-n$i" slurmd -f "$DIR/slurm.conf" -N "n$i" \
            >"$DIR/log/slurmd-n$i.out" 2>&1 \
            || { cat "$DIR/log/slurmd-n$i.out" >&2; fail "slurmd n$i failed to start"; }
    done
    DAEMONS="slurmctld munged $(seq -s ' ' -f 'slurmd-n%g' 1 "$NODES")"
else
    slurmd -f "$DIR/slurm.conf" -N "$HOST" >"$DIR/log/slurmd.out" 2>&1 \
        || { cat "$DIR/log/slurmd.out" >&2; fail "slurmd failed to start"; }
    DAEMONS="slurmctld slurmd munged"
fi

state=""
deadline=$(( $(date +%s) + TIMEOUT ))
while [ "$(date +%s)" -lt "$deadline" ]; do
    # every node idle
    state="$(sinfo -h -N -o '%T' 2>/dev/null | sort -u | tr '\n' ' ' | sed 's/ $//' || true)"
    [ "$state" = idle ] && [ "$(sinfo -h -N -o '%N' 2>/dev/null | sort -u | wc -l)" -eq "$NODES" ] && break
    for d in $DAEMONS; do
        pid="$(cat "$DIR/run/$d.pid" 2>/dev/null || true)"
        if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
            # pid files are written right after daemonizing; allow a moment
            sleep 1
            pid="$(cat "$DIR/run/$d.pid" 2>/dev/null || true)"
            if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
                fail "$d is not running (port clash? see its log below)"
            fi
        fi
    done
    sleep 0.5
done
if [ "$state" != "idle" ]; then
    scontrol show node >&2 2>/dev/null || true
    fail "node(s) $NODE_NAMES did not become idle within ${TIMEOUT}s (last state: '${state}')"
fi

# slurmctld's scheduler makes its first pass ~3 s after start-up (logging
# "SchedulerParameters=..." then); a job submitted before waits for it. Wait
# for it (best effort) so that the first job starts as fast as later ones.
for _ in $(seq 1 100); do
    grep -q 'SchedulerParameters=' "$DIR/log/slurmctld.log" 2>/dev/null && break
    sleep 0.1
done

echo "slurm cluster up in $DIR (slurmctld :$CTLD_PORT, slurmd :$SLURMD_PORT, node $HOST, ${CPUS} CPUs, ${REALMEM} MB, gpus=$NGPU)" >&2
echo "export SLURM_CONF=$DIR/slurm.conf"
