#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager and kubectl from the newest
# Kubernetes source that Debian offers for this machine's release, and caches
# the binaries outside the clone, keyed by the source and Go versions:
#
#   ${OPS_PLATFORM_CACHE:-${XDG_CACHE_HOME:-~/.cache}/ops-platform}/kubernetes/<key>/bin
#
# The tests (tests/fixtures/kube_server.py) run these binaries against
# Debian's etcd. A second run finds the cache and returns at once; a fresh
# machine (as CI is) builds them, about 9 CPU-minutes. A failed build fails
# this script with the reason: the tests never fall back to the fake server.
#
# Why this release only: Debian's newer suites (trixie, sid) ship a
# kubernetes source repacked to kubectl alone ("+ds", no cmd/kube-apiserver,
# no vendor/) that needs a newer Go than the release has. The release's own
# source (bookworm: 1.20.5+really1.20.2) holds the whole tree with its
# vendored dependencies and builds with the release's golang-go.
#
# The one fix: vendored github.com/modern-go/reflect2 1.0.1 crashes under
# Go >= 1.18 (SIGSEGV in json-iterator when custom objects are created);
# Debian's golang-github-modern-go-reflect2-dev (1.0.2) replaces it.
#
# apt is asked with a source list of its own (deb-src for this release, in
# the cache), so the system's apt configuration is untouched. Build tools
# missing from the machine (golang-go, dpkg-dev, rsync, the reflect2
# package) are installed from the system's own apt sources.
#
# Prints the bin directory on stdout, nothing else.
set -euo pipefail

cache_root=${OPS_PLATFORM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ops-platform}/kubernetes
binaries=(kube-apiserver kube-controller-manager kubectl)
mkdir -p "$cache_root"
exec 9>"$cache_root/.lock"
flock 9  # two `make test` at once build once

log() { echo "install-kube-apiserver: $*" >&2; }
fail() { log "FAILED: $*"; exit 1; }

# --- the newest source this release offers (own apt lists, refreshed daily)
. /etc/os-release
codename=${VERSION_CODENAME:?/etc/os-release has no VERSION_CODENAME}
apt_dir=$cache_root/apt
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
cat >"$apt_dir/sources.list" <<EOF
deb-src [signed-by=$keyring] http://deb.debian.org/debian $codename main
deb-src [signed-by=$keyring] http://deb.debian.org/debian $codename-updates main
deb-src [signed-by=$keyring] http://deb.debian.org/debian-security $codename-security main
EOF
apt_options=(
  -o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
  -o APT::Sandbox::User=root
)
stamp=$apt_dir/updated
if [[ ! -e $stamp ]] || [[ -n $(find "$stamp" -mmin +1440) ]]; then
  if apt-get "${apt_options[@]}" -qq update >&2; then
    touch "$stamp"
  elif [[ ! -e $stamp ]]; then
    fail "could not read Debian's source index (apt-get update with $apt_dir/sources.list)"
  else
    log "could not refresh Debian's source index; using the one from $(date -r "$stamp")"
  fi
fi
version=$(apt-cache "${apt_options[@]}" showsrc kubernetes 2>/dev/null \
  | sed -n 's/^Version: //p' | sort -V | tail -1)
[[ -n $version ]] || fail "Debian $codename offers no kubernetes source package"

# --- build tools (only what is missing)
need=()
command -v go >/dev/null 2>&1 || need+=(golang-go)
command -v dpkg-source >/dev/null 2>&1 || need+=(dpkg-dev)
command -v rsync >/dev/null 2>&1 || need+=(rsync)
reflect2=/usr/share/gocode/src/github.com/modern-go/reflect2
[[ -d $reflect2 ]] || need+=(golang-github-modern-go-reflect2-dev)
if ((${#need[@]})); then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo=sudo
  log "installing build tools: ${need[*]}"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >&2 \
    || fail "could not install ${need[*]}"
fi
go_version=$(go env GOVERSION)
reflect2_version=$(dpkg-query -W -f '${Version}' golang-github-modern-go-reflect2-dev 2>/dev/null || echo unknown)

key="${version}_${go_version}_reflect2-${reflect2_version}"
out=$cache_root/$key
if [[ -x $out/bin/kube-apiserver && -x $out/bin/kube-controller-manager && -x $out/bin/kubectl ]]; then
  echo "$out/bin"
  exit 0
fi

# --- fetch, patch, build
log "building Kubernetes $version with $go_version (about 9 CPU-minutes; cached in $out)"
work=$cache_root/build
rm -rf "$work"
mkdir -p "$work"
started=$(date +%s)
(cd "$work" && apt-get "${apt_options[@]}" -qq source --download-only "kubernetes=$version" >&2) \
  || fail "could not download the kubernetes $version source"
dpkg-source -x "$work"/kubernetes_*.dsc "$work/src" >/dev/null \
  || fail "could not unpack the kubernetes $version source"
src=$work/src
[[ -d $src/cmd/kube-apiserver && -d $src/vendor ]] \
  || fail "kubernetes $version from Debian has no cmd/kube-apiserver or vendor/ (a kubectl-only repack?)"
rm -rf "$src/vendor/github.com/modern-go/reflect2"
cp -r "$reflect2" "$src/vendor/github.com/modern-go/reflect2"
upstream=${version##*really}   # 1.20.5+really1.20.2-1.1+deb12u1 -> 1.20.2-1.1+deb12u1
upstream=${upstream%%-*}       # -> 1.20.2
upstream=${upstream%%+*}
(
  cd "$src"
  export GOPATH=$work/gopath GOCACHE=$work/gocache GOPROXY=off GOFLAGS=-mod=vendor CGO_ENABLED=0
  export KUBE_GIT_VERSION=v$upstream KUBE_GIT_TREE_STATE=clean
  make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kubectl" >"$work/build.log" 2>&1
) || { tail -30 "$work/build.log" >&2; fail "the build of Kubernetes $version failed (log: $work/build.log)"; }

mkdir -p "$out.tmp/bin"
for binary in "${binaries[@]}"; do
  cp "$src/_output/bin/$binary" "$out.tmp/bin/$binary" || fail "the build made no $binary"
done
"$out.tmp/bin/kube-apiserver" --version >&2 || fail "the built kube-apiserver does not run"
rm -rf "$out"
mv "$out.tmp" "$out"
ln -sfn "$key" "$cache_root/current"
rm -rf "$work"
log "built in $(( $(date +%s) - started )) s"
echo "$out/bin"
