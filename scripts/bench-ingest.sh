#!/usr/bin/env bash
# Transaction ingest measured from outside, on the real release `crew serve` alone (issue 11,
# "Measured"): wrk sends `PUT /_matrix/app/v1/transactions/<unique id>` with 100 `m.room.message`
# events that mention nobody, one transaction at a time (as a homeserver does), for DURATION;
# crew's pump handles them beside ingest (the rooms have the Manager and two people in them, so
# every message is decided and its room's conversation log saved). Prints wrk's latency
# percentiles, the events/s, crew's resident size (VmRSS) every 10 s, its peak (VmHWM) at the
# end, how long the pump took to drain the inbox after the load stopped, and the database's size
# on disk per event ingested.
#
# Usage: scripts/bench-ingest.sh            (builds `crew` in release first)
#   CREW=path/to/crew   use this binary instead of building
#   DURATION=60         seconds of load
#   CONNECTIONS=1       wrk connections (1 = single stream)
#   ROOMS=10            rooms the messages go round
#   CACHE_MB=           `[database] cache_mb` for crew (default: crew's own default)
#   RATE=               events/s to aim at (wrk waits between transactions; default: as fast as
#                       crew answers). A rate the pump keeps up with is a steady state; faster, the
#                       inbox's backlog grows for as long as the load lasts
#   CPUS_WRK=0 CPUS_CREW=1   pin wrk and crew to these CPUs (taskset lists)
#
# Needs nginx (a stand-in homeserver answering crew's start-up checks, as in
# scripts/bench-gateway.sh) and wrk (Debian: `apt-get install -y nginx-light wrk`). Everything
# listens on 127.0.0.1 only, in a temporary directory removed at the end. wrk and crew share the
# machine's cores: on a shared machine read the latencies as pessimistic.
set -euo pipefail

DURATION=${DURATION:-60}
CONNECTIONS=${CONNECTIONS:-1}
ROOMS=${ROOMS:-10}
bench_name=bench-ingest
# shellcheck source=scripts/bench-common.sh
source "$(dirname "$0")/bench-common.sh"
homeserver_port=$(free_port)
appservice_port=$(free_port)
admin_port=$(free_port)

# nginx: a stand-in homeserver that answers crew's start-up checks (versions, whoami, display
# name, ping) and `{}` to anything else (the outbox's calls), so that `crew serve` runs without a
# Synapse.
nginx_conf "$work/nginx" <<EOF
  server {
    listen 127.0.0.1:$homeserver_port;
    default_type application/json;
    location = /_matrix/client/versions { return 200 '{"versions":["v1.11"]}'; }
    location = /_matrix/client/v3/account/whoami { return 200 '{"user_id":"@crew:bench.test"}'; }
    location ~ /displayname\$ { return 200 '{"displayname":"Crew Manager"}'; }
    location ~ /ping\$ { return 200 '{"duration_ms":1}'; }
    location / { return 200 '{}'; }
  }
EOF
"$NGINX" -c "$work/nginx/nginx.conf" -p "$work/nginx" &
nginx_pid=$!

"$CREW" init --homeserver "http://127.0.0.1:$homeserver_port" --server-name bench.test \
  --admin @admin:bench.test --data-dir "$work/data" \
  --bind "127.0.0.1:$appservice_port" --admin-bind "127.0.0.1:$admin_port" >/dev/null
# Encryption off: the stand-in homeserver cannot take the agents' device keys (crew answers 503
# until its devices are set up), and these messages are plaintext anyway.
printf '\n[encryption]\nenabled = false\n' >>"$work/data/config.toml"
# The gateway on a port of its own (its default, 9003, may be another run's).
printf '\n[gateway]\nbind = "127.0.0.1:0"\n' >>"$work/data/config.toml"
if [ -n "${CACHE_MB:-}" ]; then
  printf '\n[database]\ncache_mb = %s\n' "$CACHE_MB" >>"$work/data/config.toml"
fi
hs_token=$(sed -n 's/^hs_token: *//p' "$work/data/registration.yaml" | tr -d "\"'")
# crew's default logging (info, to stderr), as it runs in production.
"${pin_crew[@]}" "$CREW" --config "$work/data/config.toml" serve 2>"$work/crew.log" &
crew_pid=$!

base="http://127.0.0.1:$appservice_port"
for _ in $(seq 1 100); do
  if curl -s -o /dev/null -H "Authorization: Bearer $hs_token" "$base/_matrix/app/v1/users/@x:bench.test"; then
    break
  fi
  sleep 0.1
done
kill -0 "$crew_pid" 2>/dev/null || { echo "bench-ingest: crew exited; log:" >&2; cat "$work/crew.log" >&2; exit 1; }

# The Manager and two people join every room first (three members: not a direct chat, so a
# message that mentions nobody wakes nobody, but the pump still decides it and saves the room's
# conversation log).
members=""
for room in $(seq 0 $((ROOMS - 1))); do
  for user in crew human0 human1; do
    members+="${members:+,}{\"type\":\"m.room.member\",\"state_key\":\"@$user:bench.test\",\"sender\":\"@$user:bench.test\",\"room_id\":\"!room$room:bench.test\",\"event_id\":\"\$join-$room-$user\",\"origin_server_ts\":1700000000000,\"content\":{\"membership\":\"join\"}}"
  done
done
curl -sS --fail-with-body -o "$work/joins.out" -X PUT -H "Authorization: Bearer $hs_token" -H "Content-Type: application/json" \
  --data "{\"events\":[$members]}" "$base/_matrix/app/v1/transactions/joins" || { cat "$work/joins.out" "$work/crew.log" >&2; exit 1; }

pause_ms=${RATE:+$((100000 / RATE))}
pause_ms=${pause_ms:-nil}
cat >"$work/ingest.lua" <<EOF
-- One transaction of 100 messages per request, every id unique.
wrk.method = "PUT"
wrk.headers["Authorization"] = "Bearer $hs_token"
wrk.headers["Content-Type"] = "application/json"
local run = tostring(os.time()) .. "-" .. tostring(math.random(1000000))
local counter = 0
local rooms = $ROOMS
-- Event ids as Synapse makes them for current room versions: a hash, so spread over the key
-- space (not one ascending run), followed by a counter that keeps them unique.
local template = '{"type":"m.room.message","event_id":"\$%08x%08x-%s-%d-%d","room_id":"!room%d:bench.test","sender":"@human%d:bench.test","origin_server_ts":%d,"content":{"msgtype":"m.text","body":"a message of ordinary length in a busy room, nobody mentioned","m.mentions":{}}}'
-- RATE: the pause before each transaction, so that 100 events per pause make the rate (less
-- the answer's own time, which the rate therefore slightly undershoots).
local pause_ms = $pause_ms
if pause_ms then
  delay = function() return pause_ms end
end
request = function()
  counter = counter + 1
  local parts = {}
  for i = 1, 100 do
    parts[i] = string.format(template, math.random(0, 0x7fffffff), math.random(0, 0x7fffffff), run, counter, i, (counter * 100 + i) % rooms, i % 2, 1700000000000 + counter)
  end
  local body = '{"events":[' .. table.concat(parts, ",") .. ']}'
  return wrk.format(nil, "/_matrix/app/v1/transactions/" .. run .. "-" .. counter, nil, body)
end
EOF

rss() { awk -v key="$1:" '$1==key {printf "%.1f", $2/1024}' "/proc/$crew_pid/status"; }
# VmRSS and its parts: anonymous memory (heap, sled's cache) and mapped files (the binary).
sizes() { echo "VmRSS $(rss VmRSS) MiB (anon $(rss RssAnon), file $(rss RssFile)), peak VmHWM $(rss VmHWM) MiB"; }
cpu_ticks() { awk '{print $14+$15}' "/proc/$crew_pid/stat"; }

echo "crew $("$CREW" --version | awk '{print $2}'), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), wrk -t1 -c$CONNECTIONS -d${DURATION}s, $ROOMS rooms${RATE:+, aiming at $RATE events/s}${CACHE_MB:+, cache_mb $CACHE_MB}${CPUS_WRK:+, CPUs: wrk $CPUS_WRK crew ${CPUS_CREW:-any}}"
echo "resident at start: $(sizes)"
"${pin_wrk[@]}" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$work/ingest.lua" "$base" >"$work/wrk.out" &
wrk_pid=$!
elapsed=0
while kill -0 "$wrk_pid" 2>/dev/null; do
  sleep 1
  elapsed=$((elapsed + 1))
  if [ $((elapsed % 10)) -eq 0 ]; then
    echo "  after ${elapsed} s: $(sizes), load $(cut -d' ' -f1 /proc/loadavg)"
  fi
done
wait "$wrk_pid"
sed -n '/Latency Distribution/,/Requests\/sec/p' "$work/wrk.out"
if grep -q "Non-2xx" "$work/wrk.out"; then
  echo "bench-ingest: non-2xx answers:" >&2
  cat "$work/wrk.out" >&2
  exit 1
fi
awk '$1=="Requests/sec:" {printf "events/s: %.0f\n", $2 * 100}' "$work/wrk.out"
events_in=$(awk '$2=="requests" && $3=="in" {print $1 * 100}' "$work/wrk.out")
echo "events in: $events_in"
echo "when the load stopped: $(sizes)"
# The pump drains what is left: wait until crew's CPU time stops growing (deadline 120 s).
drained=""
before=$(cpu_ticks)
for second in $(seq 1 120); do
  sleep 1
  now=$(cpu_ticks)
  if [ $((now - before)) -le 2 ]; then
    drained=$second
    break
  fi
  before=$now
done
if [ -n "$drained" ]; then idle="after ~$drained s"; else idle="not within 120 s"; fi
database_kib=$(du -sk "$work/data" | cut -f1)
echo "pump idle $idle: $(sizes), database $((database_kib / 1024)) MiB on disk ($(awk -v kib="$database_kib" -v events="$events_in" 'BEGIN {printf "%.2f", kib / events}') KiB per event)"
# What crew warned about (a backlog over its limit that the pump did not take under in time, say).
warnings=$(grep -c "WARN" "$work/crew.log" || true)
echo "crew log: $warnings warnings"
grep "WARN" "$work/crew.log" | sed 's/\x1b\[[0-9;]*m//g; s/^[^ ]* *//' | cut -c1-160 | sort | uniq -c | sort -rn | head -5 || true
