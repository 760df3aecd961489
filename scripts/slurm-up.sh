#!/usr/bin/env bash
# Bring up a single-node Slurm cluster on this machine, from Debian's packages, for the
# integration tests (and for trying `tpm-faas deploy`): munge, slurmdbd on the local MariaDB
# (so accounts are enforced), slurmctld and slurmd, one node with this machine's CPUs.
#
#   sudo scripts/slurm-up.sh            # idempotent: does nothing if the cluster answers
#   scripts/slurm-up.sh --down          # stop the daemons
#
# Accounts it creates: `tpm-test` (the current user may charge it) — any other account is
# refused by sbatch. Configuration and state live in $SLURM_HOME (default /var/lib/tpm-slurm);
# the config is also installed as /etc/slurm/slurm.conf so the client commands find it.
set -euo pipefail

SLURM_HOME=${SLURM_HOME:-/var/lib/tpm-slurm}
CLUSTER=tpm
ACCOUNT=tpm-test
USER_NAME=$(id -un)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
DB=slurm_acct_tpm

say() { echo "slurm-up: $*" >&2; }

if [[ "${1:-}" == "--down" ]]; then
  pkill -x slurmd || true; pkill -x slurmctld || true; pkill -x slurmdbd || true
  say "stopped"; exit 0
fi

if [[ $(id -u) -ne 0 ]]; then say "run as root (it installs packages and starts daemons)"; exit 1; fi

if scontrol ping 2>/dev/null | grep -q UP && sinfo -h -o %T 2>/dev/null | grep -qE "idle|mix|alloc"; then
  say "cluster already up"; exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v munged >/dev/null; then
  say "installing slurmctld slurmd slurmdbd slurm-client munge"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    slurmctld slurmd slurmdbd slurm-client munge >/dev/null
fi

mkdir -p "$SLURM_HOME"/{state,spool,log,run} /etc/slurm /run/munge /var/log/munge /var/lib/munge /etc/munge
chmod 755 /run/munge

# -- munge ---------------------------------------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
  su -s /bin/sh munge -c "/usr/sbin/munged" 2>/dev/null || /usr/sbin/munged --force
fi

# -- the accounting database (MariaDB) -----------------------------------------------------
if ! mariadb -uroot -e "select 1" >/dev/null 2>&1; then
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
  for _ in $(seq 50); do mariadb -uroot -e "select 1" >/dev/null 2>&1 && break; sleep 0.2; done
fi
mariadb -uroot -e "CREATE DATABASE IF NOT EXISTS $DB;
  CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
  GRANT ALL ON $DB.* TO 'slurm'@'localhost';"

cat > /etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=$DB
LogFile=$SLURM_HOME/log/slurmdbd.log
PidFile=$SLURM_HOME/run/slurmdbd.pid
EOF
chmod 600 /etc/slurm/slurmdbd.conf

cat > /etc/slurm/slurm.conf <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$SLURM_HOME/state
SlurmdSpoolDir=$SLURM_HOME/spool
SlurmctldPidFile=$SLURM_HOME/run/slurmctld.pid
SlurmdPidFile=$SLURM_HOME/run/slurmd.pid
SlurmctldLogFile=$SLURM_HOME/log/slurmctld.log
SlurmdLogFile=$SLURM_HOME/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SchedulerType=sched/backfill
MpiDefault=none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStorageEnforce=associations,limits,qos
JobAcctGatherType=jobacct_gather/none
InactiveLimit=0
KillWait=5
MinJobAge=30
NodeName=$(hostname -s) NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

# -- the daemons ----------------------------------------------------------------------------
pgrep -x slurmdbd >/dev/null || /usr/sbin/slurmdbd
for _ in $(seq 50); do sacctmgr -n show cluster >/dev/null 2>&1 && break; sleep 0.2; done
sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null 2>&1 || true
pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
sacctmgr -i -Q add account "$ACCOUNT" Cluster="$CLUSTER" Description="tpm_faas tests" \
  Organization=tpm >/dev/null 2>&1 || true
sacctmgr -i -Q add user "$USER_NAME" Account="$ACCOUNT" Cluster="$CLUSTER" >/dev/null 2>&1 || true

for _ in $(seq 100); do
  if sinfo -h -o %T 2>/dev/null | grep -qE "idle|mix|alloc"; then
    say "cluster $CLUSTER up: node $(hostname -s), $CPUS CPUs, account $ACCOUNT for $USER_NAME"
    exit 0
  fi
  scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
  sleep 0.3
done
say "the node did not come up; see $SLURM_HOME/log"
tail -20 "$SLURM_HOME"/log/*.log >&2 || true
exit 1
