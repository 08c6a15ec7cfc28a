# Shared set-up of the outside benchmarks (bench-gateway.sh, bench-ingest.sh), sourced by them:
# checks that nginx and wrk are installed, builds the release `crew` unless CREW names one, makes
# a temporary work directory removed (with the processes started in it) on exit, and gives
# `pin` (taskset prefixes from CPUS_*) and `free_port`. Expects `bench_name` to be set.

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

for tool in nginx wrk; do
  if ! command -v "$tool" >/dev/null && ! [ -x "/usr/sbin/$tool" ]; then
    echo "$bench_name: $tool is missing; install it with: apt-get install -y nginx-light wrk" >&2
    exit 1
  fi
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
# Command prefixes that pin a process to its CPUs (taskset execs it: `$!` stays its pid).
pin() { [ -n "$1" ] && printf '%s\n' taskset -c "$1"; true; }
mapfile -t pin_wrk < <(pin "${CPUS_WRK:-}")
mapfile -t pin_nginx < <(pin "${CPUS_NGINX:-}")
mapfile -t pin_crew < <(pin "${CPUS_CREW:-}")

if [ -z "${CREW:-}" ]; then
  (cd "$here" && cargo build --release --bin crew >&2)
  CREW="${CARGO_TARGET_DIR:-$here/target}/release/crew"
fi

work=$(mktemp -d)
nginx_pid=""
crew_pid=""
cleanup() {
  [ -n "$crew_pid" ] && kill "$crew_pid" 2>/dev/null && wait "$crew_pid" 2>/dev/null || true
  [ -n "$nginx_pid" ] && kill "$nginx_pid" 2>/dev/null || true
  [ -n "${proxy_pid:-}" ] && kill "$proxy_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Writes $1/nginx.conf for one nginx (one worker, no access log, every path inside $1); the
# `http` block's own lines come from standard input.
nginx_conf() {
  local dir=$1
  mkdir -p "$dir"
  {
    cat <<EOF
daemon off;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $dir/body;
  proxy_temp_path $dir/proxy;
  fastcgi_temp_path $dir/fastcgi;
  uwsgi_temp_path $dir/uwsgi;
  scgi_temp_path $dir/scgi;
EOF
    cat
    echo "}"
  } >"$dir/nginx.conf"
}
