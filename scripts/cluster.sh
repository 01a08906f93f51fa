#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for reglab's cluster tests and for trying hydra/launcher=slurm:
#
#   scripts/cluster.sh up       # install SLURM, munge, slurmdbd and MariaDB if missing; start the daemons
#   scripts/cluster.sh status   # which daemons run (exit 0 only when all do and the node answers)
#   scripts/cluster.sh down     # stop exactly the daemons `up` started (by PID) and remove the state
#
# Everything lives under $REGLAB_CLUSTER_DIR (default /tmp/reglab-cluster): configuration, MariaDB data, SLURM
# state, logs and the PID of every daemon started. /etc/slurm/slurm.conf and slurmdbd.conf become symlinks into
# it, so that sinfo, sbatch and submitit find the cluster without SLURM_CONF. No systemd: the daemons run in
# the foreground mode of each program, sent to the background. Both commands are idempotent: `up` on a running
# cluster and `down` on a stopped one only say so. Needs root (packages, users munge/mysql, /etc/slurm).
#
# Accounting (slurmdbd + MariaDB) is not optional: submitit polls job states with sacct, and without accounting a
# job that dies before writing its result leaves the sweep waiting forever.
set -euo pipefail

DIR=${REGLAB_CLUSTER_DIR:-/tmp/reglab-cluster}
HOST=$(hostname -s)
PACKAGES=(slurm-wlm munge slurmdbd mariadb-server)
DB_PASSWORD=reglab-local-only # MariaDB listens on its socket only (no network), so this never leaves the box

say() { echo "[cluster] $*"; }
die() {
    echo "cluster: error: $*" >&2
    exit 1
}

# ------------------------------------------------------------------------------------------------------------
# Processes: every daemon's PID is kept in $DIR/pids/<name>.pid; a PID counts only while it is still that program

pid_of() { # prints the PID of daemon $1 if it runs, else nothing
    local file="$DIR/pids/$1.pid" pid
    [[ -f $file ]] || return 0
    pid=$(<"$file")
    if [[ -d /proc/$pid ]] && [[ $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) == *"$2"* ]]; then
        echo "$pid"
    fi
    return 0
}

start() { # start NAME PROGRAM ARGS...: run in the background as root, remember the PID
    local name=$1
    shift
    "$@" >>"$DIR/log/$name.out" 2>&1 &
    echo $! >"$DIR/pids/$name.pid"
}

start_as() { # start_as USER NAME PROGRAM ARGS...: setpriv execs the program, so $! is the daemon itself
    local user=$1 name=$2
    shift 2
    setpriv --reuid="$user" --regid="$user" --init-groups "$@" >>"$DIR/log/$name.out" 2>&1 &
    echo $! >"$DIR/pids/$name.pid"
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2 waited=0
    shift 2
    until "$@" >/dev/null 2>&1; do
        sleep 0.2
        waited=$((waited + 1))
        ((waited < seconds * 5)) || die "$what did not come up within ${seconds}s (logs: $DIR/log)"
    done
}

stop() { # stop NAME PROGRAM: TERM, then KILL after 10 s; only the PID recorded for it, only if it is that program
    local name=$1 program=$2 pid waited=0
    pid=$(pid_of "$name" "$program")
    rm -f "$DIR/pids/$name.pid"
    [[ -n $pid ]] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    while [[ -d /proc/$pid ]] && ((waited < 50)); do
        sleep 0.2
        waited=$((waited + 1))
    done
    if [[ -d /proc/$pid ]]; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    say "stopped $name (pid $pid)"
}

# ------------------------------------------------------------------------------------------------------------
# Set-up

install_packages() {
    local missing=()
    for program in slurmctld slurmd slurmdbd munged mariadbd sinfo; do
        command -v "$program" >/dev/null || missing+=("$program")
    done
    ((${#missing[@]} == 0)) && return 0
    say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install SLURM, munge and MariaDB"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >"${TMPDIR:-/tmp}/reglab-cluster-apt.log"
}

refuse_foreign_cluster() {
    # a SLURM set-up that is not ours (a real site's configuration, or daemons started by someone else) is left alone
    for conf in slurm.conf slurmdbd.conf; do
        local target=/etc/slurm/$conf
        if [[ -e $target || -L $target ]] && [[ $(readlink -f "$target") != "$DIR/etc/$conf" ]]; then
            die "$target exists and is not this script's: refusing to replace a SLURM configuration"
        fi
    done
    for program in slurmctld slurmd slurmdbd; do
        if pgrep -x "$program" >/dev/null && [[ -z $(pid_of "$program" "$program") ]]; then
            die "a $program not started by this script runs already (pid $(pgrep -x "$program" | head -1))"
        fi
    done
}

write_slurm_conf() {
    local cpus memory
    cpus=$(nproc)
    memory=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10)) # MiB; 10% left to the system
    cat >"$DIR/etc/slurm.conf" <<EOF
# written by reglab's scripts/cluster.sh for a one-node test cluster on $HOST
ClusterName=reglab
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# how long a requeued job waits before it runs again (default 120 s)
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
# start jobs at once (sbatch to completion ~1 s instead of up to 3 s)
SchedulerParameters=batch_sched_delay=0,sched_interval=5
# seconds between the SIGTERM and the SIGKILL of a job that is cancelled or reaches its time limit
KillWait=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$HOST CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASSWORD
StorageLoc=slurm_acct_db
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
EOF
    chmod 600 "$DIR/etc/slurmdbd.conf" # slurmdbd refuses a password file others can read
    mkdir -p /etc/slurm
    ln -sfn "$DIR/etc/slurm.conf" /etc/slurm/slurm.conf
    ln -sfn "$DIR/etc/slurmdbd.conf" /etc/slurm/slurmdbd.conf
}

start_munge() {
    install -d -o munge -g munge -m 755 /run/munge
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        say "munged already answers: using it"
        return 0
    fi
    start_as munge munged munged -F
    wait_for 10 munged bash -c 'munge -n </dev/null | unmunge'
}

start_mariadb() {
    local data=$DIR/mysql socket=/run/mysqld/mysqld.sock
    install -d -o mysql -g mysql -m 755 /run/mysqld "$data"
    if [[ -S $socket ]] && mariadb --socket="$socket" -e 'select 1' >/dev/null 2>&1; then
        die "another MariaDB serves $socket: stop it first"
    fi
    mariadb-install-db --user=mysql --datadir="$data" --auth-root-authentication-method=socket \
        --skip-test-db >>"$DIR/log/mariadb.out" 2>&1
    start mariadbd mariadbd --no-defaults --user=mysql --datadir="$data" --socket="$socket" \
        --skip-networking --pid-file=/run/mysqld/mysqld.pid --log-error="$DIR/log/mariadb.log"
    wait_for 30 MariaDB mariadb --socket="$socket" -e 'select 1'
    mariadb --socket="$socket" -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASSWORD';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

start_slurm() {
    start slurmdbd slurmdbd -D
    wait_for 30 slurmdbd bash -c "exec 3<>/dev/tcp/localhost/6819"
    start slurmctld slurmctld -D -i
    start slurmd slurmd -D
    wait_for 30 "the node" bash -c "sinfo -h -N -o %t | grep -qx idle"
}

up() {
    [[ $(id -u) == 0 ]] || die "needs root (it installs packages and starts daemons): run it as root"
    if [[ -n $(pid_of slurmctld slurmctld) ]]; then
        say "already up ($DIR); scripts/cluster.sh down stops it"
        return 0
    fi
    install_packages
    refuse_foreign_cluster
    local started=$SECONDS
    down quiet # leftovers of a half-started cluster
    mkdir -p "$DIR"/{etc,state,spool,run,log,pids}
    write_slurm_conf
    start_munge
    start_mariadb
    start_slurm
    say "up in $((SECONDS - started)) s: $(sinfo -h -o '%P %D nodes %c CPUs %t') (SLURM $(sinfo -V | cut -d' ' -f2))"
}

down() {
    [[ -d $DIR ]] || {
        [[ ${1:-} == quiet ]] || say "not running (no $DIR)"
        return 0
    }
    [[ $(id -u) == 0 ]] || die "needs root (it stops root's daemons): run it as root"
    stop slurmd slurmd
    stop slurmctld slurmctld
    stop slurmdbd slurmdbd
    stop mariadbd mariadbd
    stop munged munged
    for conf in slurm.conf slurmdbd.conf; do
        if [[ $(readlink -f "/etc/slurm/$conf") == "$DIR/etc/$conf" ]]; then rm -f "/etc/slurm/$conf"; fi
    done
    rm -rf "$DIR"
    [[ ${1:-} == quiet ]] || say "down"
}

status() {
    local all=0
    for daemon in munged mariadbd slurmdbd slurmctld slurmd; do
        local pid
        pid=$(pid_of "$daemon" "$daemon")
        if [[ -n $pid ]]; then echo "$daemon: running (pid $pid)"; else echo "$daemon: not running"; all=1; fi
    done
    ((all == 0)) && sinfo -h -N -o '%N %t' 2>/dev/null | grep -q idle
}

case ${1:-} in
up) up ;;
down) down ;;
status) status ;;
*) die "usage: scripts/cluster.sh up|down|status" ;;
esac
