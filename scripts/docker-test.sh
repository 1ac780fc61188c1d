#!/usr/bin/env bash
# Builds the container image and runs docs/docker.md's three-node cluster with it, checking
# each step: admission and tokens made by the image's own CLI, writes through one container
# read through another (eventual and strong), a graceful `docker stop` (exit code 0), data
# kept across a restart, JSON log lines. Needs a running Docker daemon with BuildKit
# (`DOCKER_BUILDKIT=1`); builds with the host's network, as `cargo` fetches crates.
#
#   scripts/docker-test.sh                # build agentstore:test, then test it
#   IMAGE=agentstore:1 SKIP_BUILD=1 scripts/docker-test.sh
#   DOCKER=/usr/bin/docker scripts/docker-test.sh   # another docker client
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKER="${DOCKER:-docker}"
IMAGE="${IMAGE:-agentstore:test}"
export DOCKER_BUILDKIT=1

if [ -z "${SKIP_BUILD:-}" ]; then
    "$DOCKER" build --network host -t "$IMAGE" .
fi

name="agentstore-test-$$"
work="$(mktemp -d)"
# A /24 of the private range for this run's network; nodes at .11, .12, .13.
subnet="172.29.$((RANDOM % 200 + 20))"
cleanup() {
    for n in a b c; do "$DOCKER" rm -f "$name-node-$n" >/dev/null 2>&1 || true; done
    "$DOCKER" network rm "$name" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

fail() {
    echo "FAIL: $*" >&2
    for n in a b c; do
        echo "--- logs of node-$n" >&2
        "$DOCKER" logs --tail 20 "$name-node-$n" >&2 || true
    done
    exit 1
}

user="$(id -u):$(id -g)"
# The image's CLI, as this user, with the work directory at /work.
cli() { "$DOCKER" run --rm --user "$user" -v "$work:/work" "$IMAGE" "$@"; }
# The image's CLI on the cluster's network, presenting the token.
client() { "$DOCKER" run --rm --network "$name" -e AGENTSTORE_TOKEN="$token" "$IMAGE" "$@"; }
ip() { echo "$subnet.$((10 + $(printf '%d' "'$1") - 96))"; } # a -> .11, b -> .12, c -> .13

"$DOCKER" network create --subnet "$subnet.0/24" "$name" >/dev/null
cli authority new /work/authority.key >/dev/null
for n in a b c; do
    mkdir -m 0700 "$work/node-$n"
    cli admit --authority /work/authority.key --name "node-$n" \
        --data-dir "/work/node-$n" --host "$(ip $n)" >/dev/null
    peers=""
    for p in a b c; do
        [ "$p" = "$n" ] || peers="$peers      node-$p: $(ip $p):7101"$'\n'
    done
    cat > "$work/node-$n.yaml" <<EOF
storage:
  node_id: node-$n
  data_dir: /var/lib/agentstore
  replication: { strategy: quorum, replicas: 3, write_quorum: 2, read_quorum: 2 }
  collections:
    ledger: { consistency: strong }
  cluster:
    client_addr: $(ip $n):7001
    resp_addr: $(ip $n):7201
    peer_addr: $(ip $n):7101
    authority: /etc/agentstore/authority.key.pub
    peers:
$peers
EOF
done
token="$(cli token issue --authority /work/authority.key --read '' --write '' --admin)"

start() {
    "$DOCKER" run -d --name "$name-node-$1" --network "$name" --ip "$(ip "$1")" \
        --user "$user" \
        -v "$work/node-$1:/var/lib/agentstore" \
        -v "$work/node-$1.yaml:/etc/agentstore/node.yaml:ro" \
        -v "$work/authority.key.pub:/etc/agentstore/authority.key.pub:ro" \
        "$IMAGE" >/dev/null
}
for n in a b c; do start $n; done

# Retries `what` (a command or a function) for up to 60 s.
eventually() {
    local what="$1"
    shift
    for _ in $(seq 1 60); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    fail "$what"
}
three_alive() {
    [ "$(client --json --node "$(ip a):7001" status | grep -o '"alive"' | wc -l)" = 3 ]
}
reads() { [ "$(client --node "$(ip "$1"):7001" get "$2")" = "$3" ]; }

eventually "node-a sees three live members" three_alive
client --node "$(ip a):7001" put notes:docker '"hello"' >/dev/null || fail "put through node-a"
reads c notes:docker '"hello"' || fail "read through node-c"
eventually "a strong write (the Raft group elects a leader)" \
    client --node "$(ip b):7001" put ledger:total 100
reads c ledger:total 100 || fail "strong read through node-c"

# A graceful stop: SIGTERM, and the node exits 0 well within docker's grace period.
stop() {
    "$DOCKER" stop --time 30 "$name-node-$1" >/dev/null
    local code
    code="$("$DOCKER" inspect --format '{{.State.ExitCode}}' "$name-node-$1")"
    [ "$code" = 0 ] || fail "node-$1 exited $code on docker stop"
}
stop b
client --node "$(ip a):7001" put notes:while-b-was-down '"missed"' >/dev/null \
    || fail "a write with one node down"
# Every container stopped and started again: what was acknowledged is on the volumes.
stop a
stop c
for n in a b c; do "$DOCKER" start "$name-node-$n" >/dev/null; done
eventually "node-b reads the first write after the restart" reads b notes:docker '"hello"'
eventually "node-b reads the write made while it was down" \
    reads b notes:while-b-was-down '"missed"'
eventually "node-a reads the strong write after the restart" reads a ledger:total 100

# Logs are JSON lines (the image sets AGENTSTORE_LOG_FORMAT=json).
"$DOCKER" logs "$name-node-a" 2>&1 | head -n 5 | python3 -c '
import json, sys
lines = [l for l in sys.stdin if l.strip()]
assert lines, "no log lines"
for line in lines:
    json.loads(line)
' || fail "node-a's logs are not JSON lines"

echo "PASS: $IMAGE runs a three-node cluster (docs/docker.md)"
