#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests: a cluster of its own, run by a non-root user,
# listening on 127.0.0.1 on a free port, trust authentication and fsync off (local tests only:
# a killed client or server loses nothing with fsync off, only a crash of the machine would).
#
#   eval "$(.ci/postgres.sh start)"   # prints: export MOE_SAMPLER_TEST_DATABASE_URL=postgresql://...
#   .ci/postgres.sh url               # the URL of the running server
#   .ci/postgres.sh restart           # the same server stopped and started again
#   .ci/postgres.sh halt              # stops the server, keeping its files (a database that went away)
#   .ci/postgres.sh resume            # starts a halted server again: same port, same data
#   .ci/postgres.sh stop              # stops it and deletes its files
#
# The cluster lives in $MOE_SAMPLER_PG_DIR (default /tmp/moe_sampler_pg-<uid>). Run as root,
# the server runs as the user $MOE_SAMPLER_PG_USER (default: "postgres" when Debian's package
# created it, else "nobody"), since PostgreSQL refuses to run as root; the folder is then made
# theirs, so its parent folders must be searchable by them (as /tmp is). Needs Debian's
# `postgresql` package (initdb, pg_ctl; found on PATH or in /usr/lib/postgresql/*/bin).
# Everything but the export line goes to stderr.
set -euo pipefail

command=${1:-}
dir=${MOE_SAMPLER_PG_DIR:-/tmp/moe_sampler_pg-$(id -u)}
database=moe_sampler_test
superuser=moe

log() { echo "postgres.sh: $*" >&2; }

bindir() {
  if command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1; then
    dirname "$(readlink -f "$(command -v pg_ctl)")"
    return
  fi
  local found
  found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$found" ] || [ ! -x "$found/pg_ctl" ]; then
    log "initdb/pg_ctl not found: install Debian's postgresql package (apt-get install postgresql)"
    exit 1
  fi
  echo "$found"
}

# Run a PostgreSQL program as the cluster's owner (ourselves unless we are root).
as_owner() {
  if [ "$(id -u)" = 0 ]; then
    (cd / && runuser -u "$owner" -- "$@")  # from /: the caller's folder may be closed to them
  else
    "$@"
  fi
}

owner=$(id -un)
if [ "$(id -u)" = 0 ]; then
  owner=${MOE_SAMPLER_PG_USER:-}
  if [ -z "$owner" ]; then
    if id postgres >/dev/null 2>&1; then owner=postgres; else owner=nobody; fi
  fi
fi

url() { echo "postgresql://$superuser@127.0.0.1:$(cat "$dir/port")/$database"; }

# Start the cluster in $dir/data on port $2 with the programs of folder $1.
launch() {
  as_owner "$1/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $2 -k $dir -c fsync=off -c max_connections=200" start >&2 \
    || { tail -n 40 "$dir/server.log" >&2; log "the server did not start"; exit 1; }
}

running() {
  [ -f "$dir/port" ] && [ -d "$dir/data" ] && as_owner "$(bindir)/pg_ctl" -D "$dir/data" status >/dev/null 2>&1
}

case "$command" in
  start)
    if running; then
      log "already running in $dir"
      echo "export MOE_SAMPLER_TEST_DATABASE_URL=$(url)"
      exit 0
    fi
    bin=$(bindir)
    rm -rf "$dir/data"
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown "$owner" "$dir"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_owner "$bin/initdb" -D "$dir/data" -U "$superuser" --auth=trust --encoding=UTF8 --locale=C.UTF-8 \
      >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; log "initdb failed"; exit 1; }
    launch "$bin" "$port"
    as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U "$superuser" "$database" >&2 \
      || { as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >&2; log "createdb failed"; exit 1; }
    echo "$port" >"$dir/port"
    log "PostgreSQL $("$bin/pg_ctl" --version | awk '{print $3}') as $owner on 127.0.0.1:$port, files in $dir"
    echo "export MOE_SAMPLER_TEST_DATABASE_URL=$(url)"
    ;;
  restart)  # same port, same data (for tests of a database that goes away and comes back)
    running || { log "no server running in $dir"; exit 1; }
    as_owner "$(bindir)/pg_ctl" -D "$dir/data" -l "$dir/server.log" -m fast -w restart >&2
    ;;
  halt)  # stopped, its files kept: `resume` brings back the same server (tests of a database that goes away)
    running || { log "no server running in $dir"; exit 1; }
    as_owner "$(bindir)/pg_ctl" -D "$dir/data" -m fast -w stop >&2
    log "halted; its files are kept in $dir (resume starts it again)"
    ;;
  resume)  # a halted server started again: same port, same data
    if running; then
      log "already running in $dir"
      exit 0
    fi
    [ -f "$dir/port" ] && [ -d "$dir/data" ] || { log "no halted server in $dir"; exit 1; }
    launch "$(bindir)" "$(cat "$dir/port")"
    log "resumed on 127.0.0.1:$(cat "$dir/port")"
    ;;
  url)
    running || { log "no server running in $dir"; exit 1; }
    url
    ;;
  stop)
    if [ -d "$dir/data" ]; then
      as_owner "$(bindir)/pg_ctl" -D "$dir/data" -m fast -w stop >&2 || true
    fi
    rm -rf "$dir/data" "$dir/port" "$dir/initdb.log" "$dir/server.log"
    rmdir "$dir" 2>/dev/null || true
    log "stopped; its files in $dir removed"
    ;;
  *)
    echo "usage: $0 start|url|restart|halt|resume|stop   (cluster folder: \$MOE_SAMPLER_PG_DIR, default /tmp/moe_sampler_pg-<uid>)" >&2
    exit 2
    ;;
esac
