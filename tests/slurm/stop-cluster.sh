#!/usr/bin/env bash
# Stop the cluster started by `start-cluster.sh DIR`: the jobs still running in
# it, slurmd, slurmctld and munged (pids from DIR/run/*.pid).
# Idempotent: missing pid files / dead processes are fine. Does not delete DIR.
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
[ -d "$1" ] || exit 0
DIR="$(cd "$1" && pwd -P)"

comm_of() { cat "/proc/$1/comm" 2>/dev/null; }

# Only kill a pid if it is still the daemon we started (guards against reuse).
is_ours() {
    [ "$(comm_of "$1")" = "$2" ]
}

# stop NAME...: SIGTERM all of them at once, wait up to 10 s, then SIGKILL.
stop() {
    local name pidfile pid i pids=() names=()
    for name in "$@"; do
        # slurmd-<node>.pid: one slurmd per node of a multi-node cluster
        for pidfile in "$DIR/run/$name.pid" "$DIR/run/$name"-*.pid; do
            [ -f "$pidfile" ] || continue
            pid="$(tr -dc '0-9' <"$pidfile")"
            if [ -n "$pid" ] && is_ours "$pid" "$name"; then
                kill -TERM "$pid" 2>/dev/null || true
                pids+=("$pid")
                names+=("$name")
            fi
        done
    done
    for i in $(seq 1 100); do
        local alive=0 k
        for k in "${!pids[@]}"; do
            is_ours "${pids[$k]}" "${names[$k]}" && alive=1
        done
        [ "$alive" -eq 0 ] && break
        sleep 0.1
    done
    for k in "${!pids[@]}"; do
        if is_ours "${pids[$k]}" "${names[$k]}"; then
            kill -KILL "${pids[$k]}" 2>/dev/null || true
        fi
    done
    for name in "$@"; do rm -f "$DIR/run/$name.pid" "$DIR/run/$name"-*.pid; done
}

# Jobs: slurmstepd and the job processes survive a slurmd shutdown (by
# design), so kill them explicitly, after the daemons are gone (so that no new
# job can be launched meanwhile). A job's slurmstepd runs in its own session
# (slurmd setsid()s it) and the batch script plus its children inherit that
# session, so killing every process of those sessions takes the whole job.
# A slurmstepd belongs to this cluster if it was started with our SLURM_CONF or
# has a file open under DIR (its log); a batch script if its command line is
# DIR/spool/jobNNNNN/slurm_script.
kill_jobs() {
    local p pid c mine sid s sids="" mysid
    mysid="$(ps -o sid= -p $$ | tr -d ' ')"
    for p in /proc/[0-9]*; do
        pid="${p#/proc/}"
        c="$(comm_of "$pid")"
        mine=0
        case "$c" in
            slurmstepd)
                if tr '\0' '\n' 2>/dev/null <"$p/environ" | grep -qx "SLURM_CONF=$DIR/slurm.conf"; then
                    mine=1
                elif ls -l "$p/fd" 2>/dev/null | grep -q -- "-> $DIR/"; then
                    mine=1
                fi
                ;;
            *)
                if tr '\0' ' ' 2>/dev/null <"$p/cmdline" | grep -q -- "$DIR/spool/job[0-9]*/slurm_script"; then
                    mine=1
                fi
                ;;
        esac
        if [ "$mine" -eq 1 ]; then
            sid="$(ps -o sid= -p "$pid" 2>/dev/null | tr -d ' ')"
            # never session 0/1 or our caller's session
            if [ -n "$sid" ] && [ "$sid" -gt 1 ] && [ "$sid" != "$mysid" ]; then
                sids="$sids $sid"
            fi
        fi
    done
    [ -n "$sids" ] || return 1
    for s in $(echo "$sids" | tr ' ' '\n' | sort -u); do
        for pid in $(ps -eo pid=,sid= | awk -v s="$s" '$2 == s { print $1 }'); do
            kill -KILL "$pid" 2>/dev/null || true
        done
    done
    return 0
}

stop slurmctld slurmd
# repeat until a scan finds nothing (a step may have been forking)
for _ in 1 2 3 4 5; do
    kill_jobs || break
    sleep 0.2
done
# munge last: the daemons need it while shutting down
stop munged
# a multi-node cluster's network namespaces and bridge (their veth pairs go with them)
if [ -f "$DIR/run/netns" ]; then
    while read -r ns; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done <"$DIR/run/netns"
    rm -f "$DIR/run/netns"
fi
if [ -f "$DIR/run/bridge" ]; then
    ip link del "$(cat "$DIR/run/bridge")" 2>/dev/null || true
    rm -f "$DIR/run/bridge"
fi
exit 0
