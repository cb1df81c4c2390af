#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the SLURM tests (tests/test_slurm.py) and
# for trying `hydra/launcher=slurm` without a cluster. No systemd, no cgroups: it runs in a
# container as well. With accounting (slurmdbd on a private MariaDB), because submitit learns that
# a job failed or was cancelled from `sacct`; without it a cancelled job hangs the sweep.
#
#   scripts/slurm_cluster.sh up      install slurm-wlm, slurmdbd, munge and mariadb-server if
#                                    missing (root + apt), write the configs, start munged,
#                                    mariadbd, slurmdbd, slurmctld and slurmd, wait for the node
#   scripts/slurm_cluster.sh env     print `export SLURM_CONF=...` (eval it to use sbatch, sinfo)
#   scripts/slurm_cluster.sh status  sinfo, or exit 1 when the cluster is not up
#   scripts/slurm_cluster.sh down    stop the daemons it started and remove its state directory
#
# Everything it writes lives under $SUITE_SLURM_STATE (default /tmp/suite-slurm), apart from what
# apt installs: the configs are $SUITE_SLURM_STATE/slurm.conf and slurmdbd.conf, and every SLURM
# command must see them, hence `eval "$(scripts/slurm_cluster.sh env)"` (the tests set SLURM_CONF
# themselves). One node (this host, its real CPUs and memory from `slurmd -C`), one partition:
# `debug`. Ports 6817-6820 on 127.0.0.1 (SUITE_SLURM_*_PORT). `up` and `down` are idempotent.
# The node must be idle within SUITE_SLURM_TIMEOUT seconds (default 60).
set -euo pipefail

STATE=${SUITE_SLURM_STATE:-/tmp/suite-slurm}
PARTITION=debug
TIMEOUT=${SUITE_SLURM_TIMEOUT:-60}
CONF=$STATE/slurm.conf
MUNGE_SOCKET=$STATE/munge/munge.socket
CTLD_PORT=${SUITE_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${SUITE_SLURM_SLURMD_PORT:-6818}
DBD_PORT=${SUITE_SLURM_DBD_PORT:-6819}
DB_PORT=${SUITE_SLURM_DB_PORT:-6820} # MariaDB, on 127.0.0.1 only
DB_PASS=suite                        # the private database's only user; nothing else is in it
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd) # in start order
export SLURM_CONF=$CONF # slurmdbd finds slurmdbd.conf beside it

die() {
    echo "slurm_cluster: $*" >&2
    exit 1
}

running() { # running PID: the process exists and is not a zombie (a container's init may
    # reap exited daemons only after a second or two)
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

alive() { # alive NAME: the daemon $STATE/NAME.pid names is running
    [[ -s $STATE/$1.pid ]] && running "$(cat "$STATE/$1.pid")"
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v slurmdbd >/dev/null || missing+=(slurmdbd)
    command -v munged >/dev/null || missing+=(munge)
    command -v mariadbd >/dev/null || missing+=(mariadb-server)
    [[ ${#missing[@]} -eq 0 ]] && return
    [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]}; install ${PACKAGES[*]} (needs root)"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    echo "slurm_cluster: installing ${PACKAGES[*]} with apt" >&2
    # A container has no init system: the packages' own service start is refused, which is fine.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${PACKAGES[@]}" >"$STATE/apt.log" 2>&1 || {
        apt-get update -qq >>"$STATE/apt.log" 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${PACKAGES[@]}" >>"$STATE/apt.log" 2>&1
    } || die "apt-get install ${PACKAGES[*]} failed; see $STATE/apt.log"
}

write_config() {
    local host node
    host=$(hostname -s)
    # slurmd -C prints this machine's "NodeName=... CPUs=... RealMemory=..." line.
    node=$(slurmd -C 2>/dev/null | grep '^NodeName=') || die "slurmd -C printed no node line"
    mkdir -p "$STATE"/{ctld,slurmd,munge,log}
    cat >"$CONF.tmp" <<EOF
# Written by scripts/slurm_cluster.sh: one node, this host; no systemd, no cgroups.
ClusterName=suite
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# For slurmdbd connections SLURM takes the munge socket from here, not from AuthInfo.
AccountingStoragePass=$MUNGE_SOCKET
MailProg=/bin/true
# scancel: SIGTERM, then SIGKILL after KillWait seconds (the default 30 s; shorter for the tests).
KillWait=5
ReturnToService=2
SchedulerType=sched/backfill
MinJobAge=300
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
    (
        umask 077 # slurmdbd refuses a slurmdbd.conf others can read
        cat >"$STATE/slurmdbd.conf" <<EOF
# Written by scripts/slurm_cluster.sh: accounting for the one-node cluster (sacct).
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    )
}

start_munge() {
    alive munged && return
    if [[ ! -s $STATE/munge.key ]]; then
        (umask 077 && head -c 1024 /dev/urandom >"$STATE/munge.key")
    fi
    chmod 700 "$STATE/munge"
    # --force: munged refuses some ownerships (root, /tmp) it considers unsafe; this key and
    # socket are private to this test cluster.
    munged --force --key-file="$STATE/munge.key" --socket="$MUNGE_SOCKET" \
        --pid-file="$STATE/munged.pid" --log-file="$STATE/log/munged.log" \
        --seed-file="$STATE/munge/munged.seed" ||
        die "munged did not start; see $STATE/log/munged.log"
    for _ in $(seq 50); do
        [[ -S $MUNGE_SOCKET ]] && return
        sleep 0.1
    done
    die "munged did not open $MUNGE_SOCKET; see $STATE/log/munged.log"
}

sql() { mariadb --no-defaults --socket="$STATE/db.sock" -u root -e "$1"; }

start_database() {
    if ! alive mariadbd; then
        if [[ ! -d $STATE/db ]]; then
            mariadb-install-db --no-defaults --datadir="$STATE/db" --user=root \
                --auth-root-authentication-method=socket --skip-test-db \
                >"$STATE/log/mariadb-install.log" 2>&1 ||
                die "mariadb-install-db failed; see $STATE/log/mariadb-install.log"
        fi
        # --no-defaults: nothing from /etc/mysql applies; TCP on 127.0.0.1 only, for slurmdbd.
        mariadbd --no-defaults --datadir="$STATE/db" --user=root --socket="$STATE/db.sock" \
            --bind-address=127.0.0.1 --port="$DB_PORT" --pid-file="$STATE/mariadbd.pid" \
            --log-error="$STATE/log/mariadbd.log" --innodb-buffer-pool-size=32M \
            --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
        disown
        local ok=""
        for _ in $(seq 300); do
            sql "SELECT 1" >/dev/null 2>&1 && ok=1 && break
            sleep 0.1
        done
        [[ -n $ok ]] || die "mariadbd did not start; see $STATE/log/mariadbd.log"
    fi
    sql "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
         GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" ||
        die "could not create the database user"
    if ! alive slurmdbd; then
        slurmdbd || die "slurmdbd did not start; see $STATE/log/slurmdbd.log"
    fi
    local deadline=$((SECONDS + TIMEOUT))
    until sacctmgr -n list cluster >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "slurmdbd does not answer; see $STATE/log/slurmdbd.log"
        sleep 0.5
    done
    if [[ -z $(sacctmgr -n list cluster suite format=cluster 2>/dev/null) ]]; then
        sacctmgr -i add cluster suite >/dev/null || die "sacctmgr add cluster suite failed"
    fi
}

start_slurm() {
    if ! alive slurmctld; then
        # Recovers the saved state, if any (job ids continue, matching the accounting database).
        slurmctld -f "$CONF" || die "slurmctld did not start; see $STATE/log/slurmctld.log"
    fi
    if ! alive slurmd; then
        slurmd -f "$CONF" || die "slurmd did not start; see $STATE/log/slurmd.log"
    fi
}

wait_idle() {
    local deadline=$((SECONDS + TIMEOUT)) state=""
    while ((SECONDS < deadline)); do
        state=$(sinfo -h -p "$PARTITION" -o '%t' 2>/dev/null | head -1) || true
        case $state in
        idle | mix | alloc) return ;;
        drain* | down* | fail*)
            # ReturnToService=2 brings a node back when it registers; a state left from an
            # earlier cluster in this directory is cleared by hand.
            scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
            ;;
        esac
        sleep 0.5
    done
    local log
    for log in slurmctld slurmd slurmdbd; do
        echo "--- $STATE/log/$log.log" >&2
        tail -n 15 "$STATE/log/$log.log" >&2 2>/dev/null || true
    done
    die "the node is not idle after ${TIMEOUT}s (last state: '${state:-none}')"
}

up() {
    mkdir -p "$STATE"
    install_packages
    local daemon all_up=1
    for daemon in "${DAEMONS[@]}"; do
        alive "$daemon" || all_up=""
    done
    if [[ -n $all_up ]]; then
        wait_idle
        echo "slurm_cluster: already up (SLURM_CONF=$CONF)" >&2
        return
    fi
    alive slurmctld || write_config
    start_munge
    start_database
    start_slurm
    wait_idle
    echo "slurm_cluster: up; partition $PARTITION on $(hostname -s) (SLURM_CONF=$CONF)" >&2
}

stop() { # stop NAME: TERM the daemon its pid file names, KILL it after 20 s
    local pid
    alive "$1" || return 0
    pid=$(cat "$STATE/$1.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 200); do
        running "$pid" || return 0
        sleep 0.1
    done
    echo "slurm_cluster: $1 (pid $pid) ignored SIGTERM; killing it" >&2
    kill -9 "$pid" 2>/dev/null || true
}

down() {
    [[ -d $STATE ]] || return 0
    if alive slurmctld; then
        scancel --quiet --partition="$PARTITION" 2>/dev/null || true
    fi
    local i
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        stop "${DAEMONS[i]}"
    done
    rm -rf "$STATE"
    echo "slurm_cluster: down" >&2
}

case ${1:-} in
up) up ;;
down) down ;;
env) echo "export SLURM_CONF=$CONF" ;;
status)
    [[ -f $CONF ]] && alive slurmctld || die "not up"
    sinfo
    ;;
*)
    echo "usage: $0 up|down|env|status" >&2
    exit 2
    ;;
esac
