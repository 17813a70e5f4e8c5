#!/usr/bin/env bash
# Set up a fresh machine for fmnist-search.
#   ./setup.sh          the package and Fashion-MNIST (Debian's dataset-fashion-mnist)
#   ./setup.sh --test   the same plus what the tests need (pytest, PostgreSQL server, ...)
set -euo pipefail
cd "$(dirname "$0")"

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

apt_pkgs=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || apt_pkgs+=(dataset-fashion-mnist)
if [ "$want_test" = 1 ]; then
  command -v pg_ctlcluster >/dev/null 2>&1 || apt_pkgs+=(postgresql)
fi
if [ "${#apt_pkgs[@]}" -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing ${apt_pkgs[*]} with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${apt_pkgs[@]}" >/dev/null
  else
    echo "setup: please install ${apt_pkgs[*]} (Debian/Ubuntu: sudo apt-get install ${apt_pkgs[*]})," >&2
    echo "       or pass --data-dir DIR with the four Fashion-MNIST IDX .gz files" >&2
  fi
fi

if [ "$want_test" = 1 ] && [ "$(id -u)" = 0 ] && command -v pg_ctlcluster >/dev/null 2>&1; then
  # The PostgreSQL tests use this server (URL also in $FMNIST_TEST_PG_URL under CI).
  echo "setup: PostgreSQL for the tests at $(scripts/test_postgres.sh)" >&2
fi

extra=""
[ "$want_test" = 1 ] && extra="[test]"
python -m pip install --quiet --disable-pip-version-check -e ".${extra}"
