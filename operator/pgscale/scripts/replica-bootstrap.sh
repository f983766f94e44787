#!/bin/sh
# pgscale read replica: clone the primary once (pg_basebackup through this pod's
# replication slot), then run as a hot standby streaming from it. Mounted from a
# ConfigMap into the replica pods; the tests run this same file outside a pod.
#
# Environment: PGDATA, PRIMARY_HOST, PRIMARY_PORT, REPLICATION_USER,
# REPLICATION_PASSWORD, POD_NAME (its ordinal picks the slot), SLOT_PREFIX,
# POSTGRES_ARGS (server options overriding the primary's copied postgresql.conf: listen
# addresses, port and socket directory; the pod spec sets them).
set -eu
: "${PGDATA:?}" "${PRIMARY_HOST:?}" "${REPLICATION_USER:?}" "${REPLICATION_PASSWORD:?}" "${POD_NAME:?}"
: "${PRIMARY_PORT:=5432}" "${SLOT_PREFIX:?}" "${POSTGRES_ARGS:=}"
ordinal="${POD_NAME##*-}"
slot="${SLOT_PREFIX}${ordinal}"
passfile="${PGDATA%/}.pgpass"

# The password lives in a passfile beside the data directory, not in postgresql.auto.conf.
umask 077
printf '%s:%s:*:%s:%s\n' "$PRIMARY_HOST" "$PRIMARY_PORT" "$REPLICATION_USER" \
  "$(printf '%s' "$REPLICATION_PASSWORD" | sed 's/[\\:]/\\&/g')" > "$passfile"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  # Nothing here, or a clone a killed attempt left half done: start over.
  mkdir -p "$PGDATA"
  find "$PGDATA" -mindepth 1 -delete
  echo "pgscale: cloning $PRIMARY_HOST:$PRIMARY_PORT through slot $slot" >&2
  pg_basebackup --pgdata="$PGDATA" --wal-method=stream --slot="$slot" --write-recovery-conf \
    --checkpoint=fast --no-password \
    --dbname="host=$PRIMARY_HOST port=$PRIMARY_PORT user=$REPLICATION_USER passfile=$passfile application_name=$POD_NAME"
fi
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/pg_hba.conf" ]; then
  # The primary keeps its pg_hba.conf elsewhere (Debian: /etc/postgresql): password logins only.
  printf '%s\n' 'local all all peer' 'host all all 0.0.0.0/0 scram-sha-256' 'host all all ::/0 scram-sha-256' \
    > "$PGDATA/pg_hba.conf"
fi
touch "$PGDATA/standby.signal"
# shellcheck disable=SC2086 # POSTGRES_ARGS is a list of options
exec postgres -D "$PGDATA" -c hot_standby=on $POSTGRES_ARGS
