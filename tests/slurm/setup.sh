#!/usr/bin/env bash
# Start a single-node Slurm for the test suite (Debian 12, as root): munge, slurmctld, slurmd; no systemd,
# no cgroups; one fake GPU GRES so that rules asking for `gpu: 1` are schedulable; memory limits enforced
# by polling (jobacct_gather/linux + OverMemoryKill), so a job that outgrows --mem is killed like on a
# real cluster. Every daemon's PID is recorded in $STATE_DIR; tests/slurm/teardown.sh stops exactly those.
#
#   tests/slurm/setup.sh            # install the packages (apt) and start
#   SKIP_APT=1 tests/slurm/setup.sh # packages already installed
set -euo pipefail
STATE_DIR=${GQA_PRUNE_SLURM_STATE:-/tmp/gqa-prune-slurm}
NODE=$(hostname -s)
START=$(date +%s)
say() { echo "[slurm setup +$(( $(date +%s) - START ))s] $*"; }

if [ "$(id -u)" != 0 ]; then echo "tests/slurm/setup.sh must run as root" >&2; exit 1; fi
for daemon in munged slurmctld slurmd; do
  if [ -s "$STATE_DIR/$daemon.pid" ] && kill -0 "$(cat "$STATE_DIR/$daemon.pid")" 2>/dev/null; then
    echo "$daemon is already running (pid $(cat "$STATE_DIR/$daemon.pid")); run tests/slurm/teardown.sh first" >&2
    exit 1
  fi
done

if [ "${SKIP_APT:-0}" != 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d on CI machines stops dpkg from starting the daemons; this script starts them itself
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
say "packages ready ($(dpkg-query -W -f '${Version}' slurmctld))"

mkdir -p "$STATE_DIR/dev" /etc/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm

# munge: the key Debian's postinst made, or a fresh one
if [ ! -s /etc/munge/munge.key ]; then
  install -d -o munge -g munge -m 0700 /etc/munge
  head -c 1024 /dev/urandom > /etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
runuser -u munge -- /usr/sbin/munged
for _ in $(seq 50); do [ -S /run/munge/munge.socket.2 ] && break; sleep 0.1; done
munge -n | unmunge > /dev/null
cp /run/munge/munged.pid "$STATE_DIR/munged.pid"
say "munged up"

# the node as slurmd sees it; schedule 85 % of RAM so slurmd never reports less than configured
HARDWARE=$(slurmd -C | head -1 | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
MEMORY_MB=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 85 / 100 ))
# a GPU GRES needs a device file (slurmd drops file-less GPUs): a character device like /dev/null
[ -e "$STATE_DIR/dev/fakegpu0" ] || mknod "$STATE_DIR/dev/fakegpu0" c 1 3
echo "NodeName=$NODE Name=gpu File=$STATE_DIR/dev/fakegpu0" > /etc/slurm/gres.conf

cat > /etc/slurm/slurm.conf <<EOF
ClusterName=gqa-prune-ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
JobCompType=jobcomp/none
MinJobAge=3600
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
Waittime=0
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 $HARDWARE RealMemory=$MEMORY_MB Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

/usr/sbin/slurmctld -c   # -c: no jobs or node state from an earlier run
/usr/sbin/slurmd
for _ in $(seq 120); do
  sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)$' && break
  sleep 0.5
done
if ! sinfo -h -o '%T' | grep -qE '^(idle|mixed|allocated)$'; then
  sinfo -N -l; tail -20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log
  exit 1
fi
srun --time 1 hostname > /dev/null
say "slurm up: node $NODE, $(sinfo -h -o '%c CPUs, %m MB, %G')"
