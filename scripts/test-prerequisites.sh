#!/usr/bin/env bash
# Installs and starts what the test suite needs on a Debian or Ubuntu machine with Rust, then
# the suite runs with `cargo nextest run --workspace`. Run it as root (or with sudo); it is
# safe to run again. It changes the local PostgreSQL to trust connections from 127.0.0.1,
# which the tests use: run it on a development machine, not on a server that holds data.
#
# What it sets up:
# - Redis (`redis-server`, also started by tests of their own on free ports) on 127.0.0.1:6379
# - PostgreSQL on 127.0.0.1:5432, trust auth, database `test` (tests also start servers of
#   their own with the package's initdb and pg_ctl)
# - iproute2 (`ip netns`, for the partition test) and `promtool` (the metrics check)
# - Chromium (the web dashboard's test loads the page headless)
# - cargo-nextest
#
# Two tests need root and skip themselves otherwise: the network partition (namespaces) and
# the full disk (a small tmpfs).
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    echo "run as root (sudo $0)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q redis-server postgresql iproute2 prometheus python3 chromium

# Redis on 127.0.0.1:6379, keeping nothing on disk.
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no
fi

# PostgreSQL on 127.0.0.1:5432 with trust auth from 127.0.0.1 and a `test` database.
version="$(ls /etc/postgresql | sort -V | tail -n1)"
hba="/etc/postgresql/$version/main/pg_hba.conf"
if ! grep -Eq '^host[[:space:]]+all[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' "$hba"; then
    # First match wins in pg_hba.conf: the trust line goes first.
    sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
    restart=1
fi
if ! pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
elif [ "${restart:-0}" = 1 ]; then
    pg_ctlcluster --skip-systemctl-redirect "$version" main reload
fi
for _ in $(seq 1 30); do
    pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1 && break
    sleep 1
done
if ! psql -h 127.0.0.1 -U postgres -lqt | cut -d'|' -f1 | grep -qw test; then
    psql -h 127.0.0.1 -U postgres -c 'CREATE DATABASE test'
fi

if ! command -v cargo-nextest >/dev/null; then
    cargo install --locked cargo-nextest
fi
echo "ready: cargo nextest run --workspace"
