#!/usr/bin/env bash
# Installs the Debian packages of the servers the sandbox and the tests run
# for real. Installs only what is missing; needs root (or sudo).
set -euo pipefail

declare -A binary_of=(
  [postgresql]=/usr/lib/postgresql
  [pgbackrest]=pgbackrest
  [redis-server]=redis-server
  [etcd-server]=etcd
  [etcd-client]=etcdctl
  [prometheus]=prometheus
  [prometheus-alertmanager]=prometheus-alertmanager
  [prometheus-pushgateway]=prometheus-pushgateway
  [stunnel4]=stunnel4
)

missing=()
for package in "${!binary_of[@]}"; do
  probe=${binary_of[$package]}
  if [[ $probe == /* ]]; then
    [[ -e $probe ]] || missing+=("$package")
  else
    command -v "$probe" >/dev/null 2>&1 || missing+=("$package")
  fi
done

if ((${#missing[@]} == 0)); then
  exit 0
fi

sudo=""
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo="sudo"
  else
    echo "missing Debian packages: ${missing[*]}; run this script as root to install them" >&2
    exit 1
  fi
fi

echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# policy-rc.d keeps the packages' own services from starting: the sandbox and
# the tests start every server themselves, on their own ports.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee $policy >/dev/null
  $sudo chmod +x $policy
  created_policy=1
fi
trap '[[ $created_policy == 1 ]] && $sudo rm -f $policy' EXIT
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
