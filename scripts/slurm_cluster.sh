#!/usr/bin/env bash
# A single-node SLURM cluster with accounting, on this machine, for the SLURM tests and for trying
# `fastabsld compare --launcher slurm` without a real cluster.
#
#   scripts/slurm_cluster.sh start    installs what is missing (Debian: slurm-wlm, slurmdbd, munge, mariadb-server;
#                                     as root), writes the configs into $FASTABSLD_SLURM_DIR, starts munged,
#                                     mariadbd, slurmdbd, slurmctld and slurmd, and waits until the node is idle
#   scripts/slurm_cluster.sh stop     stops exactly the daemons that `start` started (their pids are in
#                                     $FASTABSLD_SLURM_DIR/pids), nothing else
#   scripts/slurm_cluster.sh env      prints the line that points SLURM's commands at the cluster:
#                                     eval "$(scripts/slurm_cluster.sh env)"; sinfo
#   scripts/slurm_cluster.sh status   sinfo and squeue of the cluster
#
# Every daemon runs in the foreground of a process of its own whose pid is recorded; the node has the
# machine's CPUs and memory; processes are tracked with proctrack/linuxproc and tasks are not bound
# (task/none), so no cgroup setup is needed. Sacct reads job states from slurmdbd (mariadb behind it):
# without accounting, launchers such as submitit cannot tell a finished job from a running one.
set -euo pipefail

DIR=${FASTABSLD_SLURM_DIR:-/tmp/fastabsld-slurm}
CLUSTER=${FASTABSLD_SLURM_CLUSTER:-fastabsld}
CONF=$DIR/etc/slurm.conf
PIDS=$DIR/pids
START_TIMEOUT=${FASTABSLD_SLURM_START_TIMEOUT:-120}

log() { echo "slurm_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

install_missing() {
    local missing=()
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null || missing+=(slurm-wlm)
    command -v slurmdbd >/dev/null || missing+=(slurmdbd)
    command -v munged >/dev/null || missing+=(munge)
    command -v mariadbd >/dev/null || missing+=(mariadb-server)
    [ ${#missing[@]} -eq 0 ] && return
    [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}; install them (apt-get install ${missing[*]}) or run this as root"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]}"
    apt-get update -q >"$DIR/apt.log" 2>&1 || { tail -20 "$DIR/apt.log"; die "apt-get update failed"; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$DIR/apt.log" 2>&1 \
        || { tail -20 "$DIR/apt.log"; die "apt-get install ${missing[*]} failed"; }
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Starts "$@" in the background, detached from this shell's session, and records its pid under a name.
spawn() {
    local name=$1; shift
    setsid "$@" >"$DIR/log/$name.out" 2>&1 < /dev/null &
    echo "$name $!" >> "$PIDS"
}

wait_for() {  # wait_for DESCRIPTION SECONDS COMMAND...: polls COMMAND until it succeeds
    local what=$1 seconds=$2; shift 2
    local deadline=$((SECONDS + seconds)) last
    last=$(tail -n 1 "$PIDS" | cut -d' ' -f2)
    until "$@" >/dev/null 2>&1; do
        local failed=""
        kill -0 "$last" 2>/dev/null || failed="its daemon ($last) exited"
        [ $SECONDS -ge $deadline ] && failed="not within ${seconds} s"
        if [ -n "$failed" ]; then
            log "$what did not come up: $failed; the logs are in $DIR/log"
            tail -n 15 "$DIR"/log/* >&2 || true
            stop
            exit 1
        fi
        sleep 0.5
    done
}

running() {  # true when a recorded daemon of a previous start still runs
    [ -s "$PIDS" ] || return 1
    local name pid
    while read -r name pid; do kill -0 "$pid" 2>/dev/null && return 0; done < "$PIDS"
    return 1
}

write_configs() {
    local host cpus mem_mb munge_socket db_port dbd_port ctld_port slurmd_port password
    host=$(hostname -s)
    cpus=$(nproc)
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
    munge_socket=$DIR/munge/munge.socket
    db_port=$(free_port); dbd_port=$(free_port); ctld_port=$(free_port); slurmd_port=$(free_port)
    password=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
    echo "$password" > "$DIR/etc/db_password"
    echo "$db_port" > "$DIR/etc/db_port"
    cat > "$CONF" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$host
SlurmUser=root
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
AuthInfo=socket=$munge_socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
MinJobAge=300
# A cancelled job gets SIGTERM (which submitit lets pass, as it precedes a preemption signal), then SIGKILL
# after KillWait seconds: short here, so that a cancelled run stops at once.
KillWait=2
# A requeued job (preempted, or near its time limit) may start again after cred_expire (in AuthInfo): 10 s,
# not the default 120 s.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$dbd_port
AccountingStoragePass=$munge_socket
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    cat > "$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$munge_socket,cred_expire=10
DbdHost=localhost
DbdPort=$dbd_port
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=$password
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$DIR/etc/slurmdbd.conf"
}

start() {
    mkdir -p "$DIR"
    if running; then
        log "already running (pids in $PIDS); stop it first"
        return 0
    fi
    install_missing
    rm -rf "$DIR"/{etc,state,spool,run,log,munge,mysql} "$PIDS"
    mkdir -p "$DIR"/{etc,state,spool,run,log,munge,mysql}
    write_configs
    local began=$SECONDS

    # munge: a key and a socket of this cluster's own, the daemon as the munge user (it refuses root).
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
    chown -R munge:munge "$DIR/munge"
    chmod 755 "$DIR/munge"  # munged wants its socket folder searchable by all, the key readable by munge only
    spawn munged setpriv --reuid=munge --regid=munge --init-groups munged --foreground \
        --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/munge/munged.pid" --seed-file="$DIR/munge/munge.seed" --log-file="$DIR/munge/munged.log"
    wait_for munged 20 test -S "$DIR/munge/munge.socket"

    # mariadb: a data folder of its own on 127.0.0.1, a database and a user for slurmdbd.
    # Its temporary files go to a folder of its own: the caller's TMPDIR may be one the mysql user cannot write.
    mkdir -p "$DIR/mysql-tmp"
    chown mysql:mysql "$DIR/mysql" "$DIR/mysql-tmp"
    TMPDIR="$DIR/mysql-tmp" mariadb-install-db --user=mysql --datadir="$DIR/mysql" --auth-root-authentication-method=socket \
        --skip-test-db > "$DIR/log/mariadb-install.log" 2>&1 || { tail -20 "$DIR/log/mariadb-install.log"; die "mariadb-install-db failed"; }
    spawn mariadbd mariadbd --no-defaults --user=mysql --datadir="$DIR/mysql" --socket="$DIR/mysql/mysqld.sock" \
        --pid-file="$DIR/mysql/mysqld.pid" --bind-address=127.0.0.1 --port="$(cat "$DIR/etc/db_port")" \
        --innodb-buffer-pool-size=64M --skip-log-bin --tmpdir="$DIR/mysql-tmp"
    wait_for mariadbd 60 mariadb --no-defaults --socket="$DIR/mysql/mysqld.sock" -u root -e "SELECT 1"
    local password
    password=$(cat "$DIR/etc/db_password")
    mariadb --no-defaults --socket="$DIR/mysql/mysqld.sock" -u root <<EOF
CREATE DATABASE slurm_acct_db;
CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$password';
CREATE USER 'slurm'@'localhost' IDENTIFIED BY '$password';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF

    export SLURM_CONF=$CONF
    spawn slurmdbd slurmdbd -D -s  # reads slurmdbd.conf beside $SLURM_CONF
    wait_for slurmdbd 60 sacctmgr -n list cluster
    sacctmgr -i add cluster "$CLUSTER" > /dev/null
    spawn slurmctld slurmctld -D -i -f "$CONF"
    spawn slurmd slurmd -D -f "$CONF"
    wait_for "an idle node" 60 bash -c 'sinfo -h -o %t | grep -qx idle'
    log "started in $((SECONDS - began)) s: $(sinfo -h -o '%P %D node(s) %c CPUs %m MB %t')"
    log "point SLURM's commands at it with: export SLURM_CONF=$CONF"
}

stop() {
    [ -s "$PIDS" ] || { log "nothing to stop ($PIDS is empty)"; return 0; }
    local names=() pids=() name pid i
    while read -r name pid; do names+=("$name"); pids+=("$pid"); done < "$PIDS"
    # The reverse of the starting order: slurmd, slurmctld, slurmdbd, mariadbd, munged.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        pid=${pids[i]}
        kill -0 "$pid" 2>/dev/null || continue
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            log "${names[i]} ($pid) did not stop on SIGTERM within 10 s: killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -f "$PIDS"
    log "stopped ${names[*]}"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    status) export SLURM_CONF=$CONF; sinfo; squeue ;;
    *) echo "usage: $0 start|stop|env|status (state folder: $DIR, FASTABSLD_SLURM_DIR overrides it)" >&2; exit 2 ;;
esac
