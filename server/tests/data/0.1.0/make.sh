#!/usr/bin/env bash
# Makes the small Drover 0.1.0 database of this directory (see README.md): 6 agents, a
# second client with a site, three builds, tasks that succeeded and tasks that rolled
# back, a halted build, and audit rows. Needs curl, python3 and sha256sum.
set -euo pipefail
bin=${DROVER_0_1_0_BIN:?set DROVER_0_1_0_BIN to the target/debug directory of a 0.1.0 build}
work=$1; shift           # a new directory
mkdir -p "$work/downloads"
cd "$work"
export DROVER_ADMIN_TOKEN=upgrade-admin DROVER_ENROLL_TOKEN=upgrade-enroll
"$bin/drover-server" --listen 127.0.0.1:0 --data-dir data --downloads downloads --heartbeat-interval 1 "$@" > server.out 2> server.log &
server=$!
for _ in $(seq 50); do grep -q "start an agent" server.out 2>/dev/null && break; sleep 0.2; done
url=$(grep -o "http://127.0.0.1:[0-9]*" server.out | head -1)
api() { curl -sf -H "Authorization: Bearer upgrade-admin" -H "Content-Type: application/json" "$@"; }
publish() { # version channel
    f="drover-agent-linux-amd64-$1"
    head -c 4096 /dev/urandom > "downloads/$f"
    (cd downloads && sha256sum "$f" > "$f.sha256")
    echo "$2" > "downloads/$f.channel"
}
publish 1.0.0 stable
"$bin/drover-sim" --server "$url" --enroll-token upgrade-enroll --agents 6 --identities ids.json --fail-versions 1.2.0 > sim1.json 2> sim1.log &
sim=$!
sleep 3
first=$(api "$url/api/v1/agents" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
api -X PUT "$url/api/v1/agents/$first/channel" -d '{"channel":"beta"}' > /dev/null
client=$(api -X POST "$url/api/v1/clients" -d '{"name":"Second client"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
api -X POST "$url/api/v1/sites" -d "{\"client_id\":\"$client\",\"name\":\"Depot\"}" > /dev/null
publish 1.1.0 beta
api -X POST "$url/api/v1/releases/rescan" > /dev/null || true
sleep 4
api -X POST "$url/api/v1/rollouts/1.1.0/promote" -d '{"force":true}' > /dev/null
sleep 5
publish 1.2.0 stable
api -X POST "$url/api/v1/releases/rescan" > /dev/null || true
sleep 6
second=$(api "$url/api/v1/agents" | python3 -c 'import json,sys; print(json.load(sys.stdin)[1]["id"])')
api -X POST "$url/api/v1/agents/$second/pause" > /dev/null
sleep 1
kill -TERM $sim; wait $sim || true
kill -TERM $server; wait $server || true
