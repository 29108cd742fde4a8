#!/usr/bin/env bash
# Installs what pykp needs on a fresh machine, then pykp itself (a real, non-editable install
# of this source tree) into a virtual environment, .venv/ beside this script's tree:
#   system commands (Debian/Ubuntu packages): nft, iptables, conntrack, ip, iperf3, curl
#   (and openssl with --test)
#   Python: a venv with pykp and its extras (default: bench; `--test`: test and bench)
# Run as root from anywhere: `bash scripts/install.sh [--test]`. Builds the Rust extension,
# so it needs cargo (rustc >= 1.87, e.g. from rustup). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=bench
case "${1:-}" in
    "") ;;
    --test) extras=test,bench ;;
    *) echo "usage: bash scripts/install.sh [--test]" >&2; exit 2 ;;
esac

fail() { echo "scripts/install.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "run it as root (sudo bash scripts/install.sh): it installs system packages, and pykp programs netfilter, which needs root"
command -v cargo >/dev/null || fail "needs a Rust toolchain (cargo, rustc >= 1.87; e.g. from rustup) to build pykp's extension"
command -v python3 >/dev/null || fail "needs python3 (>= 3.10)"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || fail "needs python3 >= 3.10 (this is $(python3 -V 2>&1))"

# command -> Debian package
declare -A package=(
    [nft]=nftables [iptables]=iptables [ip6tables]=iptables [conntrack]=conntrack
    [ip]=iproute2 [iperf3]=iperf3 [curl]=curl
)
# The tests make TLS certificates for the stand-in API server with it.
[ "$extras" = bench ] || package[openssl]=openssl
missing=()
for tool in "${!package[@]}"; do
    command -v "$tool" >/dev/null || missing+=("${package[$tool]}")
done
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    command -v apt-get >/dev/null || fail "install these packages with your package manager, then run this again: ${missing[*]}"
    echo "== system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

echo "== pykp into .venv (building the Rust extension: a minute or two)"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# A real install, not an editable one: what a user of the wheel gets.
.venv/bin/python -m pip install --quiet ".[$extras]"
echo "== installed: $(.venv/bin/pykp --version) in $(pwd)/.venv (run .venv/bin/pykp, or 'source .venv/bin/activate')"
