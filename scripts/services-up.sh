#!/usr/bin/env bash
# Bring up the services the test suite uses, when this machine can: PostgreSQL (ledger tests),
# RabbitMQ (Globus Compute SDK tests) and a single-node Slurm cluster (scripts/slurm-up.sh).
#
#   scripts/services-up.sh      # run by `make test` first (and so by .ci/run)
#
# Idempotent and fast when everything is up (each check is one probe). It never fails: a
# service it cannot start is reported on stderr, and the tests that need it skip with a reason.
set -uo pipefail
cd "$(dirname "$0")/.."

say() { echo "services-up: $*" >&2; }
port_open() { (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {  # wait_port PORT SECONDS
  local i
  for ((i = 0; i < $2 * 5; i++)); do port_open "$1" && return 0; sleep 0.2; done
  return 1
}

# -- PostgreSQL on 127.0.0.1:5432 -----------------------------------------------------------
if ! port_open 5432; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [[ -d /etc/postgresql ]]; then
    for version in /etc/postgresql/*; do
      pg_ctlcluster --skip-systemctl-redirect "$(basename "$version")" main start >/dev/null 2>&1 || true
    done
    wait_port 5432 15 && say "started PostgreSQL" || say "PostgreSQL did not start; its tests will skip"
  else
    say "no PostgreSQL here; its tests will skip"
  fi
fi

# -- RabbitMQ on 127.0.0.1:5672 -------------------------------------------------------------
if ! port_open 5672; then
  if command -v rabbitmq-server >/dev/null 2>&1; then
    rabbitmq-server -detached >/dev/null 2>&1 || true
    wait_port 5672 30 && say "started RabbitMQ" || say "RabbitMQ did not start; its tests will skip"
  else
    say "no RabbitMQ here; its tests will skip"
  fi
fi

# -- Slurm (needs root: it installs packages and starts daemons) ----------------------------
if [[ $(id -u) -eq 0 ]]; then
  # slurm-up.sh is idempotent: one probe when the cluster already answers.
  scripts/slurm-up.sh || say "the Slurm cluster did not come up; its tests will say why"
else
  say "not root: no Slurm cluster; its tests will skip"
fi
exit 0
