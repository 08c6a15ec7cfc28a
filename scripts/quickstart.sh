#!/usr/bin/env bash
# Runs crew on this machine. With no homeserver configured it first starts a local Synapse for
# trying crew out (installed once from PyPI into ~/.cache/matrix-crew), creates an admin account,
# registers crew with it, and prints how to log in from any Matrix client.
#
#   scripts/quickstart.sh                 # local Synapse on 127.0.0.1:8008 + crew serve
#   CREW_HOMESERVER=http://hs:8008 CREW_SERVER_NAME=example.org CREW_ADMIN=@me:example.org \
#     scripts/quickstart.sh               # your own homeserver (register data/registration.yaml there)
#
# The agents' LLM, on first run: OPENAI_BASE_URL (any OpenAI-compatible /v1 URL), OPENAI_API_KEY
# and optionally OPENAI_MODEL. The key goes to crew's credential gateway only: the config names
# the variable, and crew reads it when it starts, so keep it set for later runs too.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${CREW_DATA_DIR:-data}
cache=${CREW_CACHE:-$HOME/.cache/matrix-crew}
mkdir -p "$data" "$cache"

# A debug build compiles in a few minutes; CREW_PROFILE=release for a long-running install.
profile=${CREW_PROFILE:-debug}
if [ "$profile" = release ]; then cargo build --release --bin crew; else cargo build --bin crew; fi
crew="${CARGO_TARGET_DIR:-target}/$profile/crew"

llm_args=()
if [ -n "${OPENAI_BASE_URL:-}" ]; then
  llm_args=(--llm-url "$OPENAI_BASE_URL" --llm-key-env OPENAI_API_KEY)
  if [ -n "${OPENAI_MODEL:-}" ]; then llm_args+=(--llm-model "$OPENAI_MODEL"); fi
  if [ -z "${OPENAI_API_KEY:-}" ]; then echo "OPENAI_BASE_URL is set but OPENAI_API_KEY is not: the agents will be refused by the provider" >&2; fi
  if [ -f "$data/config.toml" ] && ! grep -q '^name = "llm"' "$data/config.toml"; then
    echo "note: $data/config.toml exists without an LLM route; add one as README.md shows (or remove the file to start over)" >&2
  fi
fi

if [ -z "${CREW_HOMESERVER:-}" ]; then
  hs="$data/synapse"
  mkdir -p "$hs"
  if [ ! -x "$cache/synapse-venv/bin/python" ] || ! "$cache/synapse-venv/bin/python" -c 'import synapse' 2>/dev/null; then
    echo "installing Synapse into $cache/synapse-venv (once)…"
    python3 -m venv "$cache/synapse-venv"
    "$cache/synapse-venv/bin/pip" install --quiet matrix-synapse
  fi
  server_name=localhost
  admin="@admin:$server_name"
  if [ ! -f "$data/config.toml" ]; then
    "$crew" init --homeserver http://127.0.0.1:8008 --server-name "$server_name" --admin "$admin" --data-dir "$data" ${llm_args[@]+"${llm_args[@]}"}
  fi
  if [ ! -f "$hs/homeserver.yaml" ]; then
    cat > "$hs/homeserver.yaml" <<YAML
server_name: "$server_name"
public_baseurl: "http://127.0.0.1:8008/"
pid_file: "$(pwd)/$hs/homeserver.pid"
listeners:
  - {port: 8008, bind_addresses: ["127.0.0.1"], type: http, tls: false, resources: [{names: [client], compress: false}]}
database: {name: sqlite3, args: {database: "$(pwd)/$hs/homeserver.db"}}
media_store_path: "$(pwd)/$hs/media"
signing_key_path: "$(pwd)/$hs/signing.key"
report_stats: false
trusted_key_servers: []
suppress_key_server_warning: true
registration_shared_secret: "$(head -c 24 /dev/urandom | base64 | tr -d '/+=')"
enable_registration: false
presence: {enabled: false}
app_service_config_files: ["$(pwd)/$data/registration.yaml"]
YAML
  fi
  "$cache/synapse-venv/bin/python" -m synapse.app.homeserver -c "$hs/homeserver.yaml" > "$hs/synapse.log" 2>&1 &
  synapse_pid=$!
  trap 'kill $synapse_pid 2>/dev/null || true' EXIT
  for _ in $(seq 1 120); do
    curl -fsS http://127.0.0.1:8008/_matrix/client/versions >/dev/null 2>&1 && break
    sleep 0.5
  done
  if [ ! -f "$hs/admin.password" ]; then
    head -c 12 /dev/urandom | base64 | tr -d '/+=' > "$hs/admin.password"
    "$cache/synapse-venv/bin/register_new_matrix_user" -c "$hs/homeserver.yaml" -u admin \
      -p "$(cat "$hs/admin.password")" --admin http://127.0.0.1:8008 >/dev/null
  fi
  cat <<TXT

  A local homeserver is running. Log in from any Matrix client (Element, FluffyChat, …):
    homeserver: http://127.0.0.1:8008
    user:       admin
    password:   $(cat "$hs/admin.password")
  The Manager (@crew:$server_name) will open a DM with you and say hello.

TXT
else
  if [ ! -f "$data/config.toml" ]; then
    : "${CREW_SERVER_NAME:?set CREW_SERVER_NAME}" "${CREW_ADMIN:?set CREW_ADMIN}"
    "$crew" init --homeserver "$CREW_HOMESERVER" --server-name "$CREW_SERVER_NAME" --admin "$CREW_ADMIN" --data-dir "$data" ${llm_args[@]+"${llm_args[@]}"}
    echo "Register $data/registration.yaml with your homeserver (docs/homeservers.md), restart it, then run this again."
    exit 0
  fi
fi

# Not exec: the EXIT trap stops the local Synapse when crew stops.
"$crew" serve --config "$data/config.toml"
