#!/usr/bin/env bash
# Smoke test of the CPU image with podman: build docker/Dockerfile, serve the default model from
# /opt/ml/model, /ping, one generation, one streamed generation, SIGTERM -> exit 0 within 30 s.
#
#   docker/smoke-test.sh            # from anywhere; run by `make test` (tests/test_docker_smoke.py)
#
# Exit codes: 0 passed, 1 failed, 77 podman cannot run here (the reason is printed; the pytest
# wrapper turns it into a skip).
#
# Without a container registry, the Dockerfile's base image (debian:bookworm-slim) is replaced by a
# local stand-in made once with debootstrap from the host's Debian mirror and kept in podman's
# storage (`podman rmi debian:bookworm-slim` rebuilds it). Torch comes from a local CPU wheel
# copied into docker/.wheels (WHEELS_DIR), the rest from PyPI.
#
# Environment: LMC_SMOKE_IMAGE (default lmc:smoke), LMC_SMOKE_PORT (default: a free port),
# LMC_SMOKE_MODEL_DIR (default: the converted default model), LMC_WHEELS (default /opt/wheels),
# PYTHON (default .venv/bin/python), DEBIAN_MIRROR (default: from the host's apt sources).
set -euo pipefail

SKIP=77
T0=$(date +%s)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
IMAGE=${LMC_SMOKE_IMAGE:-lmc:smoke}
NAME=lmc-smoke-$$
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3

log() { echo "[smoke $(($(date +%s) - T0))s] $*" >&2; }
fail() { log "FAIL: $*"; exit 1; }
skip() { log "SKIP: $*"; exit "$SKIP"; }

WORK=$(mktemp -d /tmp/lmc-smoke.XXXXXX)
cleanup() {
    podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
trap 'log "FAIL: unexpected error at line $LINENO (exit $?)"' ERR

# --- can podman run here? -------------------------------------------------------------------
command -v podman >/dev/null || skip "podman is not installed (make docker-deps installs it)"
command -v runc >/dev/null || skip "runc is not installed (make docker-deps installs it)"
if [ -z "${CONTAINERS_CONF:-}" ]; then
    # runc (crun may be missing or unusable in a sandbox) and ulimits no higher than the host's.
    nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
    [ "$nofile" = unlimited ] || [ "$nofile" -gt 1024 ] && nofile=1024
    [ "$nproc" = unlimited ] || [ "$nproc" -gt 4096 ] && nproc=4096
    cat > "$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
EOF
    export CONTAINERS_CONF=$WORK/containers.conf
fi
if ! out=$(podman info 2>&1); then
    skip "podman cannot run here: $(echo "$out" | tail -n 3 | tr '\n' ' ')"
fi

# --- the base image (a local stand-in when none is there) -----------------------------------
BASE=$(sed -n 's/^ARG BASE_IMAGE=//p' docker/Dockerfile | head -n 1)
if podman image exists "$BASE"; then
    log "base image $BASE: present"
else
    command -v debootstrap >/dev/null || skip "no $BASE image and no debootstrap to make one"
    [ "$(id -u)" = 0 ] || skip "no $BASE image, and making one with debootstrap needs root"
    mirror=${DEBIAN_MIRROR:-$(grep -rhoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | head -n 1 | awk '{print $2}' || true)}
    mirror=${mirror:-http://deb.debian.org/debian}
    log "base image $BASE: making a stand-in with debootstrap from $mirror (about a minute)"
    rootfs=$WORK/rootfs
    debootstrap --variant=minbase --include=ca-certificates,python3,python3-venv,python3-pip \
        bookworm "$rootfs" "$mirror" > "$WORK/debootstrap.log" 2>&1 \
        || { tail -n 20 "$WORK/debootstrap.log" >&2; fail "debootstrap failed"; }
    log "debootstrap done"
    # TLS inside the build: the host's extra CAs (a proxy's, say) join Debian's bundle, and pip
    # (whose own bundle would not have them) is told to use that bundle; plus the host's index.
    if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates >/dev/null 2>&1 \
            || cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    fi
    {
        echo "[global]"
        echo "cert = /etc/ssl/certs/ca-certificates.crt"
        index=$(pip config get global.index-url 2>/dev/null || true)
        case "$index" in http://*|https://*) echo "index-url = $index" ;; esac
    } > "$rootfs/etc/pip.conf"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    case "$BASE" in */*) full=$BASE ;; *) full=docker.io/library/$BASE ;; esac
    tar -C "$rootfs" -c . | podman import --change 'LABEL lmc.stand-in=debootstrap' \
        --change 'CMD ["/bin/bash"]' - "$full" >/dev/null 2>"$WORK/import.log" \
        || { cat "$WORK/import.log" >&2; fail "podman import failed"; }
    rm -rf "$rootfs"
    log "base image $BASE: stand-in imported"
fi

if ! out=$(podman run --rm --network=host --pull=never "$BASE" true 2>&1); then
    skip "podman cannot run a container here: $(echo "$out" | tail -n 3 | tr '\n' ' ')"
fi

# --- torch: the local CPU wheel --------------------------------------------------------------
build_args=()
torch_pin=$(sed -n 's/^torch==//p' constraints.txt)
wheel=$(ls "${LMC_WHEELS:-/opt/wheels}"/torch-"$torch_pin"-cp311-*.whl 2>/dev/null | head -n 1 || true)
if [ -n "$wheel" ]; then
    mkdir -p docker/.wheels
    [ -e "docker/.wheels/$(basename "$wheel")" ] \
        || cp -l "$wheel" docker/.wheels/ 2>/dev/null || cp "$wheel" docker/.wheels/
    build_args+=(--build-arg WHEELS_DIR=docker/.wheels)
else
    log "no local torch-$torch_pin wheel: torch comes from the Dockerfile's TORCH_INDEX_URL"
fi

# --- build -----------------------------------------------------------------------------------
log "building $IMAGE"
old_id=$(podman image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
stamp() { while IFS= read -r l; do echo "[$(($(date +%s) - T0))s] $l"; done; }
podman build --pull=never --network=host "${build_args[@]}" -f docker/Dockerfile -t "$IMAGE" . \
    2>&1 | stamp > "$WORK/build.log" || { tail -n 40 "$WORK/build.log" >&2; fail "podman build failed"; }
log "built $IMAGE"
# The previous build, now untagged, would pile up run after run (its layers stay cached).
if [ -n "$old_id" ] && [ "$old_id" != "$(podman image inspect -f '{{.Id}}' "$IMAGE")" ]; then
    podman rmi "$old_id" >/dev/null 2>&1 || true
fi
[ -z "${LMC_SMOKE_VERBOSE:-}" ] || grep -E '\] (STEP|COMMIT)' "$WORK/build.log" >&2

# --- run -------------------------------------------------------------------------------------
MODEL=${LMC_SMOKE_MODEL_DIR:-$("$PYTHON" -m engines.default_model | tail -n 1)}
[ -f "$MODEL/config.json" ] || fail "no model at '$MODEL' (python -m engines.default_model)"
PORT=${LMC_SMOKE_PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
URL=http://127.0.0.1:$PORT
# Host network (bridge networking may be unavailable in a sandbox); the port comes from
# SAGEMAKER_BIND_TO_PORT, as on SageMaker. `serve` is the argument SageMaker passes.
podman run -d --name "$NAME" --network=host -e SAGEMAKER_BIND_TO_PORT="$PORT" \
    -v "$MODEL:/opt/ml/model:ro" "$IMAGE" serve > /dev/null
log "started $NAME on port $PORT, model $MODEL"

running() { [ "$(podman inspect -f '{{.State.Running}}' "$NAME" 2>/dev/null)" = true ]; }
container_fail() { podman logs "$NAME" 2>&1 | tail -n 40 >&2; fail "$*"; }

deadline=$(($(date +%s) + ${LMC_SMOKE_READY_TIMEOUT:-240}))
until [ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/ping")" = 200 ]; do
    running || container_fail "the container exited before /ping answered 200"
    [ "$(date +%s)" -lt "$deadline" ] || container_fail "/ping did not answer 200 in time"
    sleep 1
done
log "/ping 200"

code=$(curl -s -o "$WORK/gen.json" -w '%{http_code}' -X POST "$URL/invocations" \
    -H 'Content-Type: application/json' \
    -d '{"inputs": "The capital of France is", "parameters": {"max_new_tokens": 8}}')
[ "$code" = 200 ] || container_fail "POST /invocations: $code $(cat "$WORK/gen.json")"
"$PYTHON" -c 'import json, sys; d = json.load(open(sys.argv[1])); d = d[0] if isinstance(d, list) else d; assert isinstance(d["generated_text"], str), d' \
    "$WORK/gen.json" || container_fail "no generated_text in $(cat "$WORK/gen.json")"
log "generation 200: $(cat "$WORK/gen.json")"

code=$(curl -s -N -D "$WORK/stream.headers" -o "$WORK/stream.out" -w '%{http_code}' \
    -X POST "$URL/invocations" -H 'Content-Type: application/json' \
    -d '{"inputs": "The capital of France is", "parameters": {"max_new_tokens": 8}, "stream": true}')
if [ "$code" = 200 ]; then
    lines=$(grep -c . "$WORK/stream.out" || true)
    grep -qi '^transfer-encoding: *chunked' "$WORK/stream.headers" \
        || container_fail "streamed response is not chunked: $(cat "$WORK/stream.headers")"
    [ "$lines" -ge 2 ] || container_fail "streamed response has $lines line(s): $(cat "$WORK/stream.out")"
    "$PYTHON" -c 'import json, sys; [json.loads(l) for l in open(sys.argv[1]) if l.strip()]' \
        "$WORK/stream.out" || container_fail "streamed lines are not JSON: $(cat "$WORK/stream.out")"
    log "streaming 200, chunked, $lines jsonlines"
elif [ "$code" = 400 ] && grep -q 'not supported yet' "$WORK/stream.out"; then
    # Streaming in the default handler is on its way; until then it is refused with a 400.
    log "NOTE: streaming not implemented by the default handler yet: $(cat "$WORK/stream.out")"
else
    container_fail "streamed POST /invocations: $code $(cat "$WORK/stream.out")"
fi

# --- SIGTERM: drain, exit 0 within 30 s ----------------------------------------------------------
t=$(date +%s)
podman kill --signal TERM "$NAME" > /dev/null
rc=$(timeout 30 podman wait "$NAME" 2>/dev/null) || container_fail "still running 30 s after SIGTERM"
log "exit code $rc $(($(date +%s) - t)) s after SIGTERM"
[ "$rc" = 0 ] || container_fail "exit code $rc after SIGTERM (want 0)"

log "PASS ($(($(date +%s) - T0)) s)"
