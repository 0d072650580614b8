#!/usr/bin/env bash
# Dev/CI PostgreSQL for the adapter store tests (Debian, run as root). Idempotent:
# installs Debian's `postgresql` if missing, starts the cluster of the installed
# major version, waits for 127.0.0.1:5432, and creates role `aligner` (password
# `aligner`, CREATEDB) owning database `aligner_test`. The last line printed is the URL.
set -euo pipefail

ROLE=aligner
PASSWORD=aligner
DB=aligner_test
HOST=127.0.0.1
PORT=5432

log() { echo "postgres.sh: $*" >&2; }
cd /  # the postgres user may not be able to read the caller's directory

if [[ $(id -u) -ne 0 ]]; then
    log "must run as root"; exit 1
fi

if ! dpkg-query -W -f='${Status}' postgresql 2>/dev/null | grep -q "install ok installed"; then
    log "installing the postgresql package"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >&2
    apt-get install -y --no-install-recommends postgresql >&2
fi

# The newest installed server major version (15 on Debian 12, 17 on Debian 13, ...).
VER=$(ls -1 /usr/lib/postgresql | grep -E '^[0-9]+$' | sort -n | tail -n 1 || true)
if [[ -z "$VER" || ! -x "/usr/lib/postgresql/$VER/bin/postgres" ]]; then
    log "no PostgreSQL server binaries found under /usr/lib/postgresql"; exit 1
fi

# Some images install the package without creating a cluster.
if ! pg_lsclusters -h | awk -v v="$VER" '$1 == v && $2 == "main" {found=1} END {exit !found}'; then
    log "creating cluster $VER/main"
    pg_createcluster "$VER" main --port "$PORT" >&2
fi

status=$(pg_lsclusters -h | awk -v v="$VER" '$1 == v && $2 == "main" {print $4}')
if [[ "$status" != online* ]]; then
    log "starting cluster $VER/main"
    pg_ctlcluster "$VER" main start >&2
fi

port=$(pg_lsclusters -h | awk -v v="$VER" '$1 == v && $2 == "main" {print $3}')
if [[ "$port" != "$PORT" ]]; then
    log "cluster $VER/main listens on port $port, expected $PORT"; exit 1
fi

for _ in $(seq 1 60); do
    if pg_isready -q -h "$HOST" -p "$PORT"; then break; fi
    sleep 0.5
done
if ! pg_isready -q -h "$HOST" -p "$PORT"; then
    log "server did not accept connections on $HOST:$PORT within 30s"; exit 1
fi

psql_admin() { su postgres -s /bin/sh -c "psql -X -q -v ON_ERROR_STOP=1 -p $PORT $*"; }

psql_admin "-d postgres" >&2 <<SQL
DO \$\$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$ROLE') THEN
        CREATE ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD';
    ELSE
        ALTER ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD';
    END IF;
END
\$\$;
SQL

if [[ -z $(psql_admin "-d postgres -tA -c \"SELECT 1 FROM pg_database WHERE datname = '$DB'\"") ]]; then
    psql_admin "-d postgres -c \"CREATE DATABASE $DB OWNER $ROLE\"" >&2
fi

URL="postgresql://$ROLE:$PASSWORD@$HOST:$PORT/$DB"
# Prove the URL works over TCP with the password before printing it.
if ! PGPASSWORD=$PASSWORD psql -X -q -h "$HOST" -p "$PORT" -U "$ROLE" -d "$DB" -tA -c "SELECT 1" >/dev/null; then
    log "cannot log in as $ROLE over TCP"; exit 1
fi
echo "$URL"
