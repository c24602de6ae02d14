#!/usr/bin/env bash
# Entrypoint of isolate-local/postgres:15, compatible with the official
# postgres image's environment contract:
#
#   POSTGRES_PASSWORD        superuser password (required unless
#                            POSTGRES_HOST_AUTH_METHOD=trust)
#   POSTGRES_USER            superuser name (default: postgres)
#   POSTGRES_DB              database created at init (default: $POSTGRES_USER)
#   POSTGRES_INITDB_ARGS     extra initdb arguments (shell-quoted string)
#   POSTGRES_INITDB_WALDIR   optional separate WAL directory
#   POSTGRES_HOST_AUTH_METHOD  auth for TCP connections (default: the server's
#                            password_encryption, i.e. scram-sha-256)
#   PGDATA                   data directory (default /var/lib/postgresql/data)
#   *_FILE                   for PASSWORD/USER/DB/INITDB_ARGS: read from file
#
# `docker run IMG -p 5433 -c fsync=off` runs `postgres -p 5433 -c fsync=off`.
# On an empty PGDATA: initdb, pg_hba (local trust; TCP with password),
# create POSTGRES_DB, run /docker-entrypoint-initdb.d/*.{sh,sql,sql.gz}
# against a socket-only temporary server, then exec postgres as the
# "postgres" OS user (so it is PID 1 and gets `docker stop`'s SIGINT).
# listen_addresses defaults to 127.0.0.1 (set in postgresql.conf).
set -Eeo pipefail

err() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; }

# VAR [DEFAULT]: take VAR, else the content of the file named by VAR_FILE.
env_or_file() {
    local var="$1" file_var="${1}_FILE" val="${2:-}"
    if [ -n "${!var:-}" ] && [ -n "${!file_var:-}" ]; then
        err "both $var and $file_var are set; they are exclusive"
        exit 1
    fi
    if [ -n "${!var:-}" ]; then
        val="${!var}"
    elif [ -n "${!file_var:-}" ]; then
        val="$(<"${!file_var}")"
    fi
    export "$var=$val"
    unset "$file_var"
}

load_env() {
    : "${PGDATA:=/var/lib/postgresql/data}"
    export PGDATA
    env_or_file POSTGRES_PASSWORD
    env_or_file POSTGRES_USER postgres
    env_or_file POSTGRES_DB "$POSTGRES_USER"
    env_or_file POSTGRES_INITDB_ARGS
    : "${POSTGRES_HOST_AUTH_METHOD:=}"
    : "${POSTGRES_INITDB_WALDIR:=}"
}

# As root: create the directories and hand them to the postgres user.
prepare_dirs() {
    mkdir -p "$PGDATA"
    chmod 0700 "$PGDATA" 2>/dev/null || :
    mkdir -p /var/run/postgresql 2>/dev/null || :
    chmod 3777 /var/run/postgresql 2>/dev/null || :
    if [ -n "$POSTGRES_INITDB_WALDIR" ]; then
        mkdir -p "$POSTGRES_INITDB_WALDIR"
        [ "$(id -u)" = 0 ] && find "$POSTGRES_INITDB_WALDIR" \! -user postgres -exec chown postgres: '{}' +
        chmod 0700 "$POSTGRES_INITDB_WALDIR"
    fi
    if [ "$(id -u)" = 0 ]; then
        find "$PGDATA" \! -user postgres -exec chown postgres: '{}' +
        find /var/run/postgresql \! -user postgres -exec chown postgres: '{}' +
    fi
}

check_init_env() {
    if [ -z "$POSTGRES_PASSWORD" ] && [ "$POSTGRES_HOST_AUTH_METHOD" != trust ]; then
        cat >&2 <<'EOF'
Error: Database is uninitialized and superuser password is not specified.
       You must specify POSTGRES_PASSWORD to a non-empty value for the
       superuser. For example, "-e POSTGRES_PASSWORD=password" on "docker run".

       You may also use "POSTGRES_HOST_AUTH_METHOD=trust" to allow all
       connections without a password. This is *not* recommended.
EOF
        exit 1
    fi
    if [ "$POSTGRES_HOST_AUTH_METHOD" = trust ]; then
        err "WARNING: POSTGRES_HOST_AUTH_METHOD=trust: TCP connections need no password"
    fi
}

run_initdb() {
    local extra=()
    [ -n "$POSTGRES_INITDB_WALDIR" ] && extra+=(--waldir "$POSTGRES_INITDB_WALDIR")
    # (trailing newline: initdb rejects a completely empty password file)
    # POSTGRES_INITDB_ARGS is a shell-quoted string, hence eval (as upstream).
    eval 'initdb --username="$POSTGRES_USER" --pwfile=<(printf "%s\n" "$POSTGRES_PASSWORD") '"$POSTGRES_INITDB_ARGS"' "${extra[@]}"'
}

# Args: the postgres server args (without the leading "postgres").
write_hba() {
    local auth="$POSTGRES_HOST_AUTH_METHOD"
    if [ -z "$auth" ]; then
        # match how the password was stored (scram-sha-256 unless overridden)
        auth="$(postgres -C password_encryption "$@")"
    fi
    cat >"$PGDATA/pg_hba.conf" <<EOF
# Written by docker-entrypoint.sh (isolate-local/postgres:15).
# TYPE  DATABASE     USER  ADDRESS        METHOD
local   all          all                  trust
host    all          all   127.0.0.1/32   $auth
host    all          all   ::1/128        $auth
local   replication  all                  trust
host    replication  all   127.0.0.1/32   $auth
host    replication  all   ::1/128        $auth
# only reachable if listen_addresses is widened
host    all          all   all            $auth
EOF
}

psql_run() { # psql as the superuser on the temp server's socket
    PGHOST='' PGHOSTADDR='' psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" \
        --no-password --no-psqlrc "$@"
}

temp_server_start() { # server args
    # Socket only: no TCP port is taken while initialising.
    local opts
    opts="$(printf '%q ' "$@" -c "listen_addresses=" -p "${PGPORT:-5432}")"
    PGUSER="${PGUSER:-$POSTGRES_USER}" pg_ctl -D "$PGDATA" -o "$opts" -w start
}

temp_server_stop() {
    PGUSER="${PGUSER:-$POSTGRES_USER}" pg_ctl -D "$PGDATA" -m fast -w stop
}

create_db() {
    [ "$POSTGRES_DB" = postgres ] && return 0
    local exists
    exists="$(psql_run --dbname postgres --tuples-only --no-align --set db="$POSTGRES_DB" <<'EOSQL'
SELECT 1 FROM pg_database WHERE datname = :'db';
EOSQL
)"
    if [ -z "$exists" ]; then
        psql_run --dbname postgres --set db="$POSTGRES_DB" <<'EOSQL'
CREATE DATABASE :"db";
EOSQL
    fi
}

run_init_files() {
    local f
    for f in /docker-entrypoint-initdb.d/*; do
        [ -e "$f" ] || continue
        case "$f" in
            *.sh)
                if [ -x "$f" ]; then
                    echo "$0: running $f"; "$f"
                else
                    echo "$0: sourcing $f"
                    # shellcheck disable=SC1090
                    . "$f"
                fi ;;
            *.sql)    echo "$0: running $f"; psql_run --dbname "$POSTGRES_DB" -f "$f" ;;
            *.sql.gz) echo "$0: running $f"; gunzip -c "$f" | psql_run --dbname "$POSTGRES_DB" ;;
            *)        echo "$0: ignoring $f" ;;
        esac
    done
}

wants_help() {
    local a
    for a; do
        case "$a" in -'?'|--help|--describe-config|-V|--version) return 0 ;; esac
    done
    return 1
}

main() {
    # first arg looks like a flag: these are postgres server args
    if [ "${1:0:1}" = '-' ]; then
        set -- postgres "$@"
    fi

    if [ "$1" = postgres ] && ! wants_help "$@"; then
        load_env
        prepare_dirs
        if [ "$(id -u)" = 0 ]; then
            # re-run this script as the postgres OS user
            export HOME=/var/lib/postgresql USER=postgres LOGNAME=postgres
            exec setpriv --reuid=postgres --regid=postgres --init-groups "${BASH_SOURCE[0]}" "$@"
        fi

        if [ ! -s "$PGDATA/PG_VERSION" ]; then
            check_init_env
            run_initdb
            write_hba "${@:2}"
            export PGPASSWORD="${PGPASSWORD:-$POSTGRES_PASSWORD}"
            temp_server_start "${@:2}"
            create_db
            run_init_files
            temp_server_stop
            unset PGPASSWORD
            echo
            echo 'PostgreSQL init process complete; ready for start up.'
            echo
        else
            echo
            echo 'PostgreSQL Database directory appears to contain a database; Skipping initialization'
            echo
        fi
    fi

    exec "$@"
}

main "$@"
