#!/usr/bin/env bash
# The gateway's cost measured from outside, as issue #10 measured it: nginx on loopback answers a
# canned chat completion (the fixed upstream), the release `crew serve` runs its credential
# gateway in front of it, and wrk sends POST /chat/completions with an Authorization header,
# 1 and 10 connections, straight to nginx ("direct") and through the gateway, alternating.
#
# Usage: scripts/bench-gateway.sh            (builds `crew` in release first)
#   CREW=path/to/crew   use this binary instead of building
#   ROUNDS=3            direct/gateway pairs per concurrency (alternating)
#   DURATION=10s        each wrk run
#   CONNECTIONS="1 10"  concurrencies
#   CPUS_WRK=0 CPUS_NGINX=1 CPUS_CREW=1   pin each process to these CPUs (taskset lists), so
#                       that wrk, nginx and crew share the cores the same way in every run
#   GATEWAY_CONFIG="threads = 2"   extra lines for crew's [gateway] section (A/B of settings)
#   NGINX_PROXY=0       leave out the yardstick: by default each round also runs wrk through a
#                       second nginx (one worker, keep-alive upstream connections) proxying to
#                       the same upstream: the same two hops crew makes, by the most efficient
#                       proxy in common use. What it reaches is what two hops cost on these
#                       cores; the gap between it and crew is crew's own.
#
# Each row also gives the CPU time (user + system, from /proc and /usr/bin/time) that wrk,
# nginx's worker and crew spent per request in that run: on shared cores the requests/s move
# with the machine's load, the µs per request much less.
#
# Needs nginx and wrk (Debian: `apt-get install -y nginx-light wrk`). Everything listens on
# 127.0.0.1 only, in a temporary directory removed at the end. On a 2-core machine wrk, nginx and
# crew share the cores: read the figures as relative (gateway vs direct), not absolute.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-"1 10"}
bench_name=bench-gateway
# shellcheck source=scripts/bench-common.sh
source "$(dirname "$0")/bench-common.sh"
upstream_port=$(free_port)
proxy_port=$(free_port)
homeserver_port=$(free_port)
appservice_port=$(free_port)
admin_port=$(free_port)
gateway_port=$(free_port)

# The canned completion: the size of a short real answer, with usage figures to meter.
completion='{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21}}'

# nginx: the LLM upstream, and a stand-in homeserver that answers crew's start-up checks
# (versions, whoami, display name, ping) so that `crew serve` runs without a Synapse.
nginx_conf "$work/nginx" <<EOF
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$upstream_port;
    location = /v1/chat/completions {
      default_type application/json;
      return 200 '$completion';
    }
  }
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
"${pin_nginx[@]}" "$NGINX" -c "$work/nginx/nginx.conf" -p "$work/nginx" &
nginx_pid=$!

# The yardstick: nginx as the proxy, in a process of its own (as crew is), one worker, HTTP/1.1
# keep-alive connections to the upstream, the request path rewritten as crew's route does.
NGINX_PROXY=${NGINX_PROXY:-1}
proxy_pid=""
if [ "$NGINX_PROXY" = 1 ]; then
  nginx_conf "$work/proxy" <<EOF
  keepalive_requests 1000000;
  upstream llm { server 127.0.0.1:$upstream_port; keepalive 64; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$proxy_port;
    location /llm/ {
      proxy_pass http://llm/v1/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer sk-bench-upstream-key";
      proxy_buffering off;
    }
  }
EOF
  "${pin_crew[@]}" "$NGINX" -c "$work/proxy/nginx.conf" -p "$work/proxy" &
  proxy_pid=$!
fi

"$CREW" init --homeserver "http://127.0.0.1:$homeserver_port" --server-name bench.test \
  --admin @admin:bench.test --data-dir "$work/data" \
  --bind "127.0.0.1:$appservice_port" --admin-bind "127.0.0.1:$admin_port" >/dev/null
echo "sk-bench-upstream-key" >"$work/llm.key"
cat >>"$work/data/config.toml" <<EOF

[gateway]
bind = "127.0.0.1:$gateway_port"
${GATEWAY_CONFIG:-}

[[gateway.routes]]
name = "llm"
prefix = "/llm"
upstream = "http://127.0.0.1:$upstream_port/v1"
kind = "openai"
credentials = [{ file = "$work/llm.key" }]
EOF
# crew's default logging (info, to stderr), as it runs in production.
"${pin_crew[@]}" "$CREW" --config "$work/data/config.toml" serve 2>"$work/crew.log" &
crew_pid=$!
echo "bench-gateway: crew pid $crew_pid (for perf record -p)" >&2

wait_for() {
  local url=$1
  for _ in $(seq 1 100); do
    if curl -s -o /dev/null "$url"; then return 0; fi
    sleep 0.1
  done
  echo "bench-gateway: nothing answers at $url; crew log:" >&2
  cat "$work/crew.log" >&2
  exit 1
}
wait_for "http://127.0.0.1:$upstream_port/"
[ "$NGINX_PROXY" = 1 ] && wait_for "http://127.0.0.1:$proxy_port/"
wait_for "http://127.0.0.1:$gateway_port/"
token=""
for _ in $(seq 1 100); do
  if out=$("$CREW" --config "$work/data/config.toml" gateway consumers add bench \
      --rpm 0 --max-concurrent 0 --daily-tokens 0 2>/dev/null); then
    token=$(printf '%s\n' "$out" | sed -n 's/^token: //p')
    break
  fi
  sleep 0.1
done
[ -n "$token" ] || { echo "bench-gateway: cannot add a consumer; crew log:" >&2; cat "$work/crew.log" >&2; exit 1; }

body='{"model":"bench-model","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello."}],"max_tokens":64}'
lua() {
  cat <<EOF
wrk.method = "POST"
wrk.body = '$body'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $1"
EOF
}
lua sk-direct >"$work/direct.lua"
lua "$token" >"$work/gateway.lua"

# A first short run of each path: connections, caches and the CPU frequency settle.
wrk -t1 -c10 -d2s -s "$work/direct.lua" "http://127.0.0.1:$upstream_port/v1/chat/completions" >/dev/null
wrk -t1 -c10 -d2s -s "$work/gateway.lua" "http://127.0.0.1:$gateway_port/llm/chat/completions" >/dev/null
if [ "$NGINX_PROXY" = 1 ]; then
  wrk -t1 -c10 -d2s -s "$work/direct.lua" "http://127.0.0.1:$proxy_port/llm/chat/completions" >/dev/null
fi

# CPU time (user + system, in clock ticks) of a process and its threads, and of nginx's workers.
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
nginx_ticks() {
  local total=0 pid
  for pid in $(pgrep -P "$1"); do total=$((total + $(ticks "$pid"))); done
  echo "$total"
}
hz=$(getconf CLK_TCK)

# wrk's "50%" latency in ms, its requests/s, and the CPU each process spent per request (µs):
# wrk, nginx's worker, crew (all its threads). The gateway costs what crew spends; for the
# gateway to serve half the direct path's requests/s on the same cores, crew's µs per request
# must stay under what wrk and nginx together spend per request on the direct path.
run() {
  local script=$1 url=$2 connections=$3 proxy=${4:-crew} out
  local nginx_before crew_before
  proxy_ticks() { if [ "$proxy" = nginx ]; then nginx_ticks "$proxy_pid"; else ticks "$crew_pid"; fi; }
  nginx_before=$(nginx_ticks "$nginx_pid")
  crew_before=$(proxy_ticks)
  out=$(/usr/bin/time -f "wrk-cpu %U %S" "${pin_wrk[@]}" wrk -t1 -c"$connections" -d"$DURATION" --latency -s "$script" "$url" 2>&1)
  local nginx_spent=$(($(nginx_ticks "$nginx_pid") - nginx_before)) crew_spent=$(($(proxy_ticks) - crew_before))
  if printf '%s\n' "$out" | grep -q "Non-2xx"; then
    echo "bench-gateway: non-2xx answers:" >&2
    printf '%s\n' "$out" >&2
    exit 1
  fi
  local p50 rps requests wrk_secs
  p50=$(printf '%s\n' "$out" | awk '$1=="50%" {v=$2; if (v ~ /us$/) {sub(/us$/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v=v*1000}; printf "%.3f", v}')
  rps=$(printf '%s\n' "$out" | awk '$1=="Requests/sec:" {printf "%.0f", $2}')
  requests=$(printf '%s\n' "$out" | awk '$2=="requests" && $3=="in" {print $1}')
  wrk_secs=$(printf '%s\n' "$out" | awk '$1=="wrk-cpu" {print $2+$3}')
  awk -v p50="$p50" -v rps="$rps" -v n="$requests" -v w="$wrk_secs" -v g="$nginx_spent" -v c="$crew_spent" -v hz="$hz" \
    'BEGIN { printf "%s %s %.1f %.1f %.1f\n", p50, rps, 1e6*w/n, 1e6*g/hz/n, 1e6*c/hz/n }'
}

echo "crew $("$CREW" --version | awk '{print $2}'), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), wrk -t1 -d$DURATION${CPUS_WRK:+, CPUs: wrk $CPUS_WRK nginx ${CPUS_NGINX:-any} crew ${CPUS_CREW:-any}}${GATEWAY_CONFIG:+, gateway: $GATEWAY_CONFIG}"
echo
echo "| connections | round | direct p50 | gateway p50 | added p50 | direct req/s | gateway req/s | gateway / direct | CPU µs/request direct: wrk + nginx | gateway: wrk + nginx + crew | nginx proxy: added p50 | req/s | / direct | CPU µs/request: wrk + nginx + proxy |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for connections in $CONNECTIONS; do
  for round in $(seq 1 "$ROUNDS"); do
    read -r d50 drps dwrk dnginx _ < <(run "$work/direct.lua" "http://127.0.0.1:$upstream_port/v1/chat/completions" "$connections")
    read -r g50 grps gwrk gnginx gcrew < <(run "$work/gateway.lua" "http://127.0.0.1:$gateway_port/llm/chat/completions" "$connections")
    p50="" prps=0 pwrk=0 pnginx=0 pproxy=0
    if [ "$NGINX_PROXY" = 1 ]; then
      read -r p50 prps pwrk pnginx pproxy < <(run "$work/direct.lua" "http://127.0.0.1:$proxy_port/llm/chat/completions" "$connections" nginx)
    fi
    awk -v c="$connections" -v r="$round" -v d50="$d50" -v g50="$g50" -v drps="$drps" -v grps="$grps" \
      -v dwrk="$dwrk" -v dnginx="$dnginx" -v gwrk="$gwrk" -v gnginx="$gnginx" -v gcrew="$gcrew" \
      -v p50="$p50" -v prps="$prps" -v pwrk="$pwrk" -v pnginx="$pnginx" -v pproxy="$pproxy" \
      'BEGIN { printf "| %d | %d | %.3f ms | %.3f ms | **%.3f ms** | %d | %d | **%.0f %%** | %.1f + %.1f | %.1f + %.1f + **%.1f** |", c, r, d50, g50, g50-d50, drps, grps, 100*grps/drps, dwrk, dnginx, gwrk, gnginx, gcrew
               if (p50 == "") { print " – | – | – | – |" }
               else { printf " %.3f ms | %d | %.0f %% | %.1f + %.1f + %.1f |\n", p50-d50, prps, 100*prps/drps, pwrk, pnginx, pproxy } }'
  done
done

# The gateway metered what it served: its usage row counts the requests.
"$CREW" --config "$work/data/config.toml" gateway usage | sed -n '1,3p' | sed 's/^/    /' >&2
