#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the `slurm` tests (tests/test_slurm.py) and for trying
# `snakemake --profile profiles/slurm` without a cluster. Debian/Ubuntu, as root (the daemons run as root and
# apt installs them); no systemd needed.
#
#   .ci/slurm.sh up     install (first time), start munged, slurmctld and slurmd; wait until the node is idle
#   .ci/slurm.sh down   stop the daemons this script started (by their pid files); keep the scratch folder
#   .ci/slurm.sh env    print `export SLURM_CONF=...` (the client commands read the config from there)
#
# Idempotent: `up` on a running cluster and `down` on a stopped one do nothing. Everything lives in one scratch
# folder ($BNNPAN_SLURM_DIR, default /tmp/bnnpan-slurm): config, state, logs, pid files. Nothing in /etc/slurm is
# written: clients find the config through $SLURM_CONF or, configless, through slurmd's /run/slurm/conf (removed
# again by `down`).
# No accounting daemon (slurmdbd): `sacct` does not work here, which is why profiles/slurm polls with `squeue`,
# and why MinJobAge is long (finished jobs must stay visible to squeue between two status checks).
set -euo pipefail

DIR=${BNNPAN_SLURM_DIR:-/tmp/bnnpan-slurm}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop() {  # stop the daemon of pid file $1 and wait for it to exit (slurmd must let go of its port)
    local pidfile=$1 pid i
    alive "$pidfile" || { rm -f "$pidfile"; return 0; }
    pid=$(cat "$pidfile")
    kill "$pid"
    for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    rm -f "$pidfile"
}

install() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return 0
    [[ $(id -u) == 0 ]] || { echo "slurm.sh: SLURM is not installed and installing it needs root" >&2; exit 3; }
    command -v apt-get >/dev/null || { echo "slurm.sh: SLURM is not installed and there is no apt-get" >&2; exit 3; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends -qq \
        slurmctld slurmd slurm-client munge >/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends -qq \
                 slurmctld slurmd slurm-client munge >/dev/null; }
}

write_conf() {
    local host node
    host=$(hostname -s)
    # the node's real CPUs/sockets/memory, as slurmd sees them (a mismatch would drain the node)
    node=$(slurmd -C | head -n 1)
    mkdir -p "$DIR/state" "$DIR/spool"
    cat > "$CONF.new" <<CONF
# Written by .ci/slurm.sh: a one-node test cluster (no accounting, no cgroups).
ClusterName=bnnpan
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
# no cgroup v2 delegation without systemd: track processes by /proc, no task affinity plugin
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# finished jobs stay in squeue's view for 10 minutes (the executor's status checks come every few seconds)
MinJobAge=600
# configless: slurmd fetches this config from slurmctld and caches it under /run/slurm/conf, where client commands
# look when \$SLURM_CONF is unset. Jobs need that: the Snakemake SLURM plugin starts each rule with a nested srun
# from an environment stripped of SLURM_* variables (SLURM_CONF included).
SlurmctldParameters=enable_configless
ReturnToService=2
SlurmdTimeout=60
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    mv "$CONF.new" "$CONF"
}

up() {
    install
    write_conf
    # munge: the key the daemons and clients authenticate with, and its socket folder (/run is a tmpfs)
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    [[ -s /etc/munge/munge.key ]] || { mungekey --create; chown munge:munge /etc/munge/munge.key; }
    if ! alive /run/munge/munged.pid; then
        runuser -u munge -- munged
        touch "$DIR/munged.ours"  # `down` stops munged only when this script started it
    fi
    alive "$DIR/slurmctld.pid" || slurmctld -f "$CONF"
    alive "$DIR/slurmd.pid" || slurmd --conf-server 127.0.0.1
    local i state=""
    for i in $(seq 60); do
        state=$(sinfo -h -N -o %T 2>/dev/null | head -n 1 || true)
        [[ $state == idle* || $state == mixed* || $state == allocated* ]] && break
        sleep 0.5
    done
    if [[ $state != idle* && $state != mixed* && $state != allocated* ]]; then
        echo "slurm.sh: node not ready (state '${state}'); logs in $DIR" >&2
        tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
        exit 1
    fi
    echo "SLURM up: $(sinfo -h -o '%P %D %c %m %T') (SLURM_CONF=$CONF)"
}

down() {
    stop "$DIR/slurmd.pid"
    stop "$DIR/slurmctld.pid"
    # slurmd's configless cache link (clients read it when $SLURM_CONF is unset): gone with our cluster
    [[ $(readlink /run/slurm/conf 2>/dev/null) == "$DIR"/* ]] && rm -f /run/slurm/conf
    if [[ -e $DIR/munged.ours ]]; then
        stop /run/munge/munged.pid
        rm -f "$DIR/munged.ours"
    fi
    echo "SLURM down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
