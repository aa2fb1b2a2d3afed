#!/usr/bin/env bash
# Stop the Slurm that tests/slurm/setup.sh started: cancel its jobs, then stop each daemon by the PID it
# recorded (never by name), and remove the config files, so later `snakemake` calls do not wait for a
# controller that slurm.conf names but that is gone.
STATE_DIR=${GQA_PRUNE_SLURM_STATE:-/tmp/gqa-prune-slurm}
if [ -s "$STATE_DIR/slurmctld.pid" ]; then scancel --user="$(id -un)" > /dev/null 2>&1 || true; fi
for daemon in slurmd slurmctld munged; do
  file="$STATE_DIR/$daemon.pid"
  [ -s "$file" ] || continue
  pid=$(cat "$file")
  if kill -0 "$pid" 2> /dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2> /dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2> /dev/null && kill -KILL "$pid"
    echo "[slurm teardown] stopped $daemon (pid $pid)"
  fi
  rm -f "$file"
done
rm -f /etc/slurm/slurm.conf /etc/slurm/gres.conf
