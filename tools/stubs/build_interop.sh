#!/usr/bin/env bash
# Builds an interop program from the generated stubs (tests/e2e/test_interop_*.py) and prints the path of
# what to run; nothing is rebuilt when no input changed since the last build.
#
#   tools/stubs/build_interop.sh node   tools/stubs/ts/interop.ts, compiled with the pinned tsc together
#                                       with build/stubs/typescript into build/stubs/ts-interop;
#                                       prints the .js file to run with node
#   tools/stubs/build_interop.sh go     tools/stubs/go/interop, built offline against build/stubs/go and
#                                       the Go sources Debian packages (golang-google-grpc-dev, ...) in
#                                       /usr/share/gocode, in GOPATH mode: the Go module proxy is not
#                                       needed, nor reachable; prints the binary
#
# It generates the stubs of that language first (tools/stubs/generate.sh), which installs the npm tools
# once per lock file.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
out="$root/build/stubs"

# True when $1 is missing or older than any file under the other arguments.
stale() {
  local target="$1"
  shift
  [ ! -e "$target" ] || [ -n "$(find "$@" -type f -newer "$target" -print -quit)" ]
}

case "${1:-}" in
  node)
    tools/stubs/generate.sh typescript >&2
    program="$out/ts-interop/tools/stubs/ts/interop.js"
    if stale "$program" tools/stubs/ts/interop.ts tools/stubs/ts/tsconfig.json tools/stubs/ts/package-lock.json \
      "$out/typescript"; then
      tools/stubs/ts/node_modules/.bin/tsc -p tools/stubs/ts/tsconfig.json >&2
      touch "$program"
    fi
    echo "$program"
    ;;
  go)
    command -v go >/dev/null 2>&1 || { echo "build_interop.sh: go is not installed (Debian: golang-go)" >&2; exit 1; }
    gocode=/usr/share/gocode
    [ -d "$gocode/src/google.golang.org/grpc" ] || {
      echo "build_interop.sh: no gRPC Go sources in $gocode (Debian: golang-google-grpc-dev)" >&2
      exit 1
    }
    tools/stubs/generate.sh go >&2
    program="$out/go-interop/interop"
    if stale "$program" tools/stubs/go "$out/go"; then
      gopath="$out/go-interop/gopath"
      rm -rf "$gopath"
      mkdir -p "$gopath/src/github.com/onprem/onprem/gen" "$gopath/src/onprem-interop"
      cp -r "$out/go" "$gopath/src/github.com/onprem/onprem/gen/go"
      cp tools/stubs/go/interop/*.go "$gopath/src/onprem-interop/"
      GO111MODULE=off GOFLAGS= GOPROXY=off GOPATH="$gopath:$gocode" \
        GOCACHE="${GOCACHE:-$out/go-interop/cache}" \
        go build -o "$program" onprem-interop >&2
    fi
    echo "$program"
    ;;
  *)
    echo "usage: tools/stubs/build_interop.sh node|go" >&2
    exit 2
    ;;
esac
