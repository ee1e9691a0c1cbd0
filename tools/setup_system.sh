#!/usr/bin/env bash
# Installs the system packages the tests use (a real PostgreSQL server, unixODBC
# with the psqlODBC and SQLite ODBC drivers, iptables and tinyproxy for the network tests, Chromium for the
# console's, OpenSSH's server and client for the benchmark's ssh -R baseline, zsh and fish for the CLI's completion scripts), when they are missing. Needs root for
# apt; without root it only reports what is missing.
set -euo pipefail

need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
[ -e /usr/lib/x86_64-linux-gnu/libodbc.so.2 ] || [ -e /usr/lib/aarch64-linux-gnu/libodbc.so.2 ] || need+=(unixodbc)
dpkg -s odbc-postgresql >/dev/null 2>&1 || need+=(odbc-postgresql)
dpkg -s libsqliteodbc >/dev/null 2>&1 || need+=(libsqliteodbc)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
command -v tinyproxy >/dev/null 2>&1 || [ -x /usr/bin/tinyproxy ] || [ -x /usr/sbin/tinyproxy ] || need+=(tinyproxy)
# The database benchmark's ssh -R baseline (tools/ssh_tunnel.py starts its own sshd, by this absolute path).
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)

# Generated clients for other languages (make stubs) and their interop tests.
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
command -v go >/dev/null 2>&1 || need+=(golang-go)
command -v protoc-gen-go >/dev/null 2>&1 || need+=(protoc-gen-go)
command -v protoc-gen-go-grpc >/dev/null 2>&1 || need+=(protoc-gen-go-grpc)
dpkg -s golang-google-grpc-dev >/dev/null 2>&1 || need+=(golang-google-grpc-dev)
dpkg -s golang-google-genproto-dev >/dev/null 2>&1 || need+=(golang-google-genproto-dev)
dpkg -s golang-google-protobuf-dev >/dev/null 2>&1 || need+=(golang-google-protobuf-dev)
# In the same apt-get as grpc: alone, apt would satisfy grpc with the older 1-3 API.
dpkg -s golang-github-golang-protobuf-1-5-dev >/dev/null 2>&1 || need+=(golang-github-golang-protobuf-1-5-dev)

# The Debian packages (make dist, tests/packaging): dpkg-shlibdeps, strip, lintian, and what the packages'
# scripts and dependencies use when the test installs them (adduser, the venv module of Debian's Python).
command -v dpkg-shlibdeps >/dev/null 2>&1 || need+=(dpkg-dev)
command -v strip >/dev/null 2>&1 || need+=(binutils)
command -v lintian >/dev/null 2>&1 || need+=(lintian)
command -v adduser >/dev/null 2>&1 || [ -x /usr/sbin/adduser ] || need+=(adduser)
dpkg -s python3-venv >/dev/null 2>&1 || need+=(python3-venv)
dpkg -s init-system-helpers >/dev/null 2>&1 || need+=(init-system-helpers)

# The web console's browser tests (tests/e2e/test_console.py): Debian's headless Chromium driven through its
# chromedriver, and a font for its pages and screenshots.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)

# `onprem completion zsh|fish` is tested by loading its script in the real shells (tests/operator_cli/).
command -v zsh >/dev/null 2>&1 || need+=(zsh)
command -v fish >/dev/null 2>&1 || need+=(fish)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing system packages: ${need[*]} (run as root, or: sudo apt-get install ${need[*]})" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts services on install; the tests start their own.
if command -v systemctl >/dev/null 2>&1; then systemctl stop tinyproxy 2>/dev/null || true; fi
pkill -x tinyproxy 2>/dev/null || true
# The system sshd that Debian may start is left alone (stopping it could cut off the machine's own users);
# the benchmark never uses it.
if command -v pg_lsclusters >/dev/null 2>&1; then
  pg_lsclusters -h 2>/dev/null | while read -r ver name _; do pg_ctlcluster "$ver" "$name" stop 2>/dev/null || true; done
fi
