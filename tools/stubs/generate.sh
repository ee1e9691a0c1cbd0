#!/usr/bin/env bash
# Generates client code for other languages from protos/ into build/stubs/<language>.
#
#   typescript  messages (ts-proto) and @grpc/grpc-js clients for Node, plus google.rpc.Status,
#               ErrorInfo and BadRequest to decode error details; the tools are pinned in
#               tools/stubs/ts/package-lock.json and installed there with `npm ci` (again only when
#               the lock file or the Node version changes)
#   go          messages (protoc-gen-go) and gRPC clients (protoc-gen-go-grpc), from the Debian packages
#               protoc-gen-go and protoc-gen-go-grpc; build/stubs/go is the module named by go_package
#   java        message classes, protoc's built-in generator (no gRPC service stubs)
#   csharp      message classes, protoc's built-in generator (no gRPC service stubs)
#
# Usage: tools/stubs/generate.sh [language ...]    (no argument: every language)
#
# The plugins run under the virtualenv's protoc (grpcio-tools), which ships the google/protobuf/*.proto
# well-known types that the protos import. That protoc has only the Python generators built in, so Java
# and C# use the system protoc (Debian: protobuf-compiler) with the same include path.
# A missing tool is an error, never a silent skip.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
python="${PYTHON:-$root/.venv/bin/python}"
out="$root/build/stubs"
wkt="$("$python" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')"
mapfile -t protos < <(cd protos && find onprem -name '*.proto' | sort)
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

die() {
  echo "generate.sh: $*" >&2
  exit 1
}

protoc() {
  "$python" -m grpc_tools.protoc -Iprotos -I"$wkt" "$@"
}

system_protoc() {
  command -v protoc >/dev/null 2>&1 || die "protoc is not installed (Debian: apt-get install protobuf-compiler)"
  command protoc -Iprotos -I"$wkt" "$@"
}

# Generation goes to build/stubs/<language>.tmp, which replaces build/stubs/<language> once it succeeded.
fresh() {
  rm -rf "$out/$1.tmp" && mkdir -p "$out/$1.tmp" && echo "$out/$1.tmp"
}

# Unchanged output keeps its files (and times), so that builds on top of it stay up to date.
publish() {
  if [ -d "$out/$1" ] && diff -rq "$out/$1" "$out/$1.tmp" >/dev/null 2>&1; then
    rm -rf "${out:?}/$1.tmp"
  else
    rm -rf "${out:?}/$1" && mv "$out/$1.tmp" "$out/$1"
  fi
  echo "build/stubs/$1: $(find "$out/$1" -type f | wc -l) files"
}

npm_tools() {
  local dir="$root/tools/stubs/ts" stamp want
  command -v node >/dev/null 2>&1 || die "node is not installed (TypeScript stubs need Node 20 or newer)"
  command -v npm >/dev/null 2>&1 || die "npm is not installed"
  stamp="$dir/node_modules/.onprem-installed"
  want="$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1) node $(node --version)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
    echo "$want" >"$stamp"
  fi
}

typescript() {
  npm_tools
  local dir
  dir="$(fresh typescript)"
  # google/rpc/status.proto and error_details.proto, from googleapis-common-protos (a grpcio-status
  # dependency), so that a Node client can decode grpc-status-details-bin.
  mkdir -p "$scratch/rpc/google/rpc"
  "$python" -c 'import shutil, sys, pathlib, google.rpc.status_pb2 as s
for name in ("status.proto", "error_details.proto"):
    shutil.copy(pathlib.Path(s.__file__).with_name(name), sys.argv[1])' "$scratch/rpc/google/rpc"
  protoc -I"$scratch/rpc" \
    --plugin=protoc-gen-ts_proto="$root/tools/stubs/ts/node_modules/.bin/protoc-gen-ts_proto" \
    --ts_proto_out="$dir" \
    --ts_proto_opt=outputServices=grpc-js,env=node,esModuleInterop=true,forceLong=string,oneof=unions-value \
    "${protos[@]}" google/rpc/status.proto google/rpc/error_details.proto
  # The generated code imports @grpc/grpc-js and @bufbuild/protobuf: let tsc and node find them, for
  # every program under build/stubs, in the pinned install.
  ln -sfn ../../tools/stubs/ts/node_modules "$out/node_modules"
  publish typescript
}

go_stubs() {
  local gen_go gen_grpc dir module="github.com/onprem/onprem/gen/go"
  gen_go="$(command -v protoc-gen-go)" || die "protoc-gen-go is not installed (Debian: apt-get install protoc-gen-go)"
  gen_grpc="$(command -v protoc-gen-go-grpc)" ||
    die "protoc-gen-go-grpc is not installed (Debian: apt-get install protoc-gen-go-grpc)"
  dir="$(fresh go)"
  protoc --plugin=protoc-gen-go="$gen_go" --plugin=protoc-gen-go-grpc="$gen_grpc" \
    --go_out="$dir" --go_opt=module="$module" \
    --go-grpc_out="$dir" --go-grpc_opt=module="$module" \
    "${protos[@]}"
  # The versions the Debian plugins generate for (and that Debian packages as Go source).
  cat >"$dir/go.mod" <<EOF
module $module

go 1.19

require (
	google.golang.org/grpc v1.33.3
	google.golang.org/protobuf v1.28.1
)
EOF
  publish go
}

java() {
  local dir
  dir="$(fresh java)"
  system_protoc --java_out="$dir" "${protos[@]}"
  publish java
}

csharp() {
  local dir
  dir="$(fresh csharp)"
  system_protoc --csharp_out="$dir" --csharp_opt=file_extension=.g.cs "${protos[@]}"
  publish csharp
}

mkdir -p "$out"
# One generation at a time (tests and `make stubs` may run side by side).
exec 9>"$out/.lock"
flock 9
languages=("$@")
[ ${#languages[@]} -gt 0 ] || languages=(typescript go java csharp)
for language in "${languages[@]}"; do
  case "$language" in
    typescript) typescript ;;
    go) go_stubs ;;
    java) java ;;
    csharp) csharp ;;
    *) die "unknown language '$language' (typescript, go, java, csharp)" ;;
  esac
done
