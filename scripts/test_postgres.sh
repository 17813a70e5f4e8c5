#!/usr/bin/env bash
# Start Debian's PostgreSQL on 127.0.0.1 and create the tests' database; print its URL.
# Used by `./setup.sh --test` (as root). Safe to run again.
set -euo pipefail
user=fmnist; pass=fmnist; db=fmnist_test
ver=$(ls /usr/lib/postgresql | sort -n | tail -n 1)
if ! pg_lsclusters -h | awk '{print $2}' | grep -qx main; then
  pg_createcluster "$ver" main >/dev/null
fi
pg_ctlcluster "$ver" main start >/dev/null 2>&1 || true   # already running is fine
for _ in $(seq 1 30); do
  runuser -u postgres -- pg_isready -q -h 127.0.0.1 && break
  sleep 1
done
psql_() { runuser -u postgres -- psql -h 127.0.0.1 -qtA "$@" 2>/dev/null || runuser -u postgres -- psql -qtA "$@"; }
if [ "$(psql_ -c "SELECT 1 FROM pg_roles WHERE rolname='$user'")" != 1 ]; then
  psql_ -c "CREATE ROLE $user LOGIN PASSWORD '$pass' CREATEDB" >/dev/null
fi
if [ "$(psql_ -c "SELECT 1 FROM pg_database WHERE datname='$db'")" != 1 ]; then
  psql_ -c "CREATE DATABASE $db OWNER $user" >/dev/null
fi
echo "postgresql://$user:$pass@127.0.0.1:5432/$db"
