#!/usr/bin/env bash
# A PostgreSQL-backed MLflow tracking server on this machine, bound to 127.0.0.1: the same kind of store a cluster
# uses, without Docker. For trying the server set-up, and for tests.
#
#   cluster/mlflow/start-local.sh [start] [STATE_DIR]    start PostgreSQL + mlflow server; prints the tracking URI
#   cluster/mlflow/start-local.sh stop [STATE_DIR]       stop both
#   cluster/mlflow/start-local.sh status [STATE_DIR]     say what runs
#
# STATE_DIR (or $STREAMSSL_MLFLOW_HOME; default ./streamssl-runs/mlflow-server from the repository root) holds
# pgdata/ (the database cluster), artifacts/ (default artifact store), logs, PID files and env.sh (the URIs).
# Environment:
#   STREAMSSL_PG_PORT                 PostgreSQL port on 127.0.0.1 (default 5432)
#   STREAMSSL_MLFLOW_PORT             mlflow server port on 127.0.0.1 (default 5000)
#   MLFLOW_ARTIFACTS_DESTINATION      artifact store (default STATE_DIR/artifacts; s3://... needs boto3 + AWS creds)
#   STREAMSSL_MLFLOW_WORKERS          mlflow server workers (default 1)
#   STREAMSSL_MLFLOW_START_TIMEOUT    seconds to wait for the server to answer /health (default 180)
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  MLflow's GenAI job runner (default here: false)
#   PG_BIN                            PostgreSQL binaries (default: newest /usr/lib/postgresql/*/bin, else PATH)
#   MLFLOW_BIN                        mlflow executable (default: the repository's .venv/bin/mlflow, else PATH)
# Needs psycopg2 next to mlflow (pip install psycopg2-binary). Run as root, PostgreSQL runs as the `postgres` user
# (initdb and postgres refuse root), so STATE_DIR must be reachable by that user (not under a 0700 directory).
set -euo pipefail

die() { echo "start-local.sh: $*" >&2; exit 1; }

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)

ACTION=start
case "${1:-}" in
  start|stop|status) ACTION=$1; shift ;;
  -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
esac
[ $# -le 1 ] || die "too many arguments (usage: start-local.sh [start|stop|status] [STATE_DIR])"

STATE_DIR=${1:-${STREAMSSL_MLFLOW_HOME:-$REPO_ROOT/streamssl-runs/mlflow-server}}
if [ "$ACTION" = start ]; then mkdir -p "$STATE_DIR"; fi
[ -d "$STATE_DIR" ] || { echo "no state at $STATE_DIR: nothing was started there"; exit 0; }
STATE_DIR=$(cd "$STATE_DIR" && pwd)
PGDATA="$STATE_DIR/pgdata"
PG_LOG="$STATE_DIR/postgres.log"
MLFLOW_LOG="$STATE_DIR/mlflow.log"
MLFLOW_PID_FILE="$STATE_DIR/mlflow.pid"
PGPASSFILE_PATH="$STATE_DIR/pgpass"
ENV_FILE="$STATE_DIR/env.sh"

# Ports and URIs of the last start are kept in env.sh, so stop/status find what start launched.
if [ -f "$ENV_FILE" ]; then
  # shellcheck disable=SC1090
  saved_pg_port=$(. "$ENV_FILE" && echo "${STREAMSSL_PG_PORT:-}")
  saved_mlflow_port=$(. "$ENV_FILE" && echo "${STREAMSSL_MLFLOW_PORT:-}")
fi
if [ "$ACTION" = start ]; then
  PG_PORT=${STREAMSSL_PG_PORT:-5432}
  MLFLOW_PORT=${STREAMSSL_MLFLOW_PORT:-5000}
else
  PG_PORT=${saved_pg_port:-${STREAMSSL_PG_PORT:-5432}}
  MLFLOW_PORT=${saved_mlflow_port:-${STREAMSSL_MLFLOW_PORT:-5000}}
fi
ARTIFACTS=${MLFLOW_ARTIFACTS_DESTINATION:-$STATE_DIR/artifacts}
WORKERS=${STREAMSSL_MLFLOW_WORKERS:-1}
START_TIMEOUT=${STREAMSSL_MLFLOW_START_TIMEOUT:-180}
DB_USER=mlflow
DB_NAME=mlflow

find_pg_bin() {
  if [ -n "${PG_BIN:-}" ]; then
    [ -x "$PG_BIN/pg_ctl" ] || die "PG_BIN=$PG_BIN has no pg_ctl"
    echo "$PG_BIN"; return
  fi
  local newest
  newest=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$newest" ] && [ -x "$newest/initdb" ]; then echo "$newest"; return; fi
  if command -v initdb >/dev/null 2>&1; then dirname "$(command -v initdb)"; return; fi
  die "PostgreSQL server binaries not found (Debian/Ubuntu: apt-get install postgresql; or set PG_BIN)"
}

find_mlflow() {
  if [ -n "${MLFLOW_BIN:-}" ]; then echo "$MLFLOW_BIN"; return; fi
  if [ -x "$REPO_ROOT/.venv/bin/mlflow" ]; then echo "$REPO_ROOT/.venv/bin/mlflow"; return; fi
  command -v mlflow 2>/dev/null || die "mlflow not found (install the project, or set MLFLOW_BIN)"
}

# PostgreSQL refuses to run as root: as root, run its server-side commands as the `postgres` user.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_running() {
  [ -f "$PGDATA/PG_VERSION" ] && as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1
}

mlflow_pid() {
  local pid
  [ -f "$MLFLOW_PID_FILE" ] || return 1
  pid=$(cat "$MLFLOW_PID_FILE")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

healthy() {
  if command -v curl >/dev/null 2>&1; then
    curl -fsS --max-time 2 "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null 2>&1
  else
    python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$MLFLOW_PORT/health', timeout=2)" >/dev/null 2>&1
  fi
}

port_busy() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

start_postgres() {
  if [ "$(id -u)" = 0 ]; then
    id -u postgres >/dev/null 2>&1 || die "running as root needs a 'postgres' user to run PostgreSQL"
    runuser -u postgres -- test -x "$STATE_DIR" \
      || die "user postgres cannot reach $STATE_DIR (a parent directory is private); choose a STATE_DIR it can traverse"
  fi
  if [ ! -f "$PGDATA/PG_VERSION" ]; then
    echo "initialising PostgreSQL in $PGDATA"
    mkdir -p "$PGDATA"
    chmod 700 "$PGDATA"
    # A random password for the `mlflow` role; clients read it from the pgpass file (mode 600), never from argv.
    local password
    password=$(od -An -N18 -tx1 /dev/urandom | tr -d ' \n')
    local pwfile="$STATE_DIR/.initdb-password"
    ( umask 077
      printf '127.0.0.1:*:*:%s:%s\n' "$DB_USER" "$password" > "$PGPASSFILE_PATH"
      printf '%s\n' "$password" > "$pwfile" )
    if [ "$(id -u)" = 0 ]; then chown postgres: "$PGDATA" "$pwfile"; fi
    if ! as_pg "$PG_BIN/initdb" -D "$PGDATA" -U "$DB_USER" --auth-local=scram-sha-256 --auth-host=scram-sha-256 \
        --encoding=UTF8 --no-instructions --pwfile="$pwfile" >"$STATE_DIR/initdb.log" 2>&1; then
      rm -f "$pwfile"
      cat "$STATE_DIR/initdb.log" >&2
      die "initdb failed"
    fi
    rm -f "$pwfile"
  fi
  if pg_running; then
    PG_PORT=${saved_pg_port:-$PG_PORT}   # the port it was started on
    echo "PostgreSQL already running on 127.0.0.1:$PG_PORT ($PGDATA)"
  else
    : > "$PG_LOG"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$PG_LOG"; fi
    port_busy "$PG_PORT" && die "port $PG_PORT on 127.0.0.1 is in use; set STREAMSSL_PG_PORT"
    # TCP on 127.0.0.1 only; no Unix socket (nothing to clash with a system PostgreSQL's /var/run/postgresql).
    as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$PG_LOG" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -c unix_socket_directories=''" start >/dev/null \
      || { tail -n 20 "$PG_LOG" >&2; die "PostgreSQL did not start (log: $PG_LOG)"; }
  fi
  export PGPASSFILE="$PGPASSFILE_PATH"
  local exists
  exists=$("$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$DB_USER" -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'") || die "cannot connect to PostgreSQL on 127.0.0.1:$PG_PORT"
  if [ "$exists" != 1 ]; then
    "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U "$DB_USER" -O "$DB_USER" "$DB_NAME"
    echo "created database $DB_NAME"
  fi
}

start_mlflow() {
  local mlflow pid waited=0
  mlflow=$(find_mlflow)
  if pid=$(mlflow_pid); then
    MLFLOW_PORT=${saved_mlflow_port:-$MLFLOW_PORT}
    echo "mlflow server already running (pid $pid, port $MLFLOW_PORT)"
    return
  fi
  "$(dirname "$mlflow")/python" -c "import psycopg2" 2>/dev/null || [ -n "${MLFLOW_BIN:-}" ] \
    || die "psycopg2 is missing next to $mlflow: $(dirname "$mlflow")/pip install psycopg2-binary"
  port_busy "$MLFLOW_PORT" && die "port $MLFLOW_PORT on 127.0.0.1 is in use; set STREAMSSL_MLFLOW_PORT"
  case "$ARTIFACTS" in *://*) ;; *) mkdir -p "$ARTIFACTS" ;; esac
  # Its own session (setsid): `stop` ends the server and its workers as one process group, and nothing else.
  # MLflow's job runner (GenAI scorer jobs; streamssl uses none) would add ~8 processes: off unless asked for.
  PGPASSFILE="$PGPASSFILE_PATH" \
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} \
    setsid "$mlflow" server \
    --backend-store-uri "postgresql+psycopg2://$DB_USER@127.0.0.1:$PG_PORT/$DB_NAME" \
    --artifacts-destination "$ARTIFACTS" --serve-artifacts \
    --host 127.0.0.1 --port "$MLFLOW_PORT" --workers "$WORKERS" \
    >"$MLFLOW_LOG" 2>&1 < /dev/null &
  pid=$!
  echo "$pid" > "$MLFLOW_PID_FILE"
  until healthy; do
    kill -0 "$pid" 2>/dev/null || { tail -n 30 "$MLFLOW_LOG" >&2; die "mlflow server exited (log: $MLFLOW_LOG)"; }
    [ "$waited" -lt "$START_TIMEOUT" ] || { tail -n 30 "$MLFLOW_LOG" >&2; die "mlflow server not healthy after ${START_TIMEOUT}s"; }
    sleep 1; waited=$((waited + 1))
  done
}

stop_all() {
  local pid
  if pid=$(mlflow_pid); then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -KILL -- "-$pid" 2>/dev/null || true
    echo "stopped mlflow server (pid $pid)"
  else
    echo "mlflow server not running"
  fi
  rm -f "$MLFLOW_PID_FILE"
  if pg_running; then
    as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
    echo "stopped PostgreSQL ($PGDATA)"
  else
    echo "PostgreSQL not running"
  fi
}

PG_BIN=$(find_pg_bin)

case "$ACTION" in
  start)
    start_postgres
    start_mlflow
    TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"
    cat > "$ENV_FILE" <<EOF
# written by cluster/mlflow/start-local.sh: source it to point streamssl / mlflow at this server
export STREAMSSL_PG_PORT=$PG_PORT
export STREAMSSL_MLFLOW_PORT=$MLFLOW_PORT
export MLFLOW_TRACKING_URI=$TRACKING_URI
EOF
    echo "MLflow tracking server: $TRACKING_URI  (pid $(cat "$MLFLOW_PID_FILE"))"
    echo "  backend store:  postgresql+psycopg2://$DB_USER@127.0.0.1:$PG_PORT/$DB_NAME  (password in $PGPASSFILE_PATH)"
    echo "  artifacts:      $ARTIFACTS"
    echo "  logs:           $MLFLOW_LOG, $PG_LOG"
    echo "  use it:         streamssl run SPEC --tracking-uri $TRACKING_URI"
    echo "  stop it:        $SCRIPT_DIR/start-local.sh stop $STATE_DIR"
    ;;
  stop)
    stop_all
    ;;
  status)
    TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"
    if pg_running; then echo "PostgreSQL: running on 127.0.0.1:$PG_PORT ($PGDATA)"; else echo "PostgreSQL: stopped"; fi
    if pid=$(mlflow_pid); then
      if healthy; then state=healthy; else state="not answering"; fi
      echo "mlflow server: running, pid $pid, $TRACKING_URI ($state)"
    else
      echo "mlflow server: stopped"
    fi
    ;;
esac
