#!/usr/bin/env bash
# Readies what bootstrap.sh wrote (OUT/{pki,vault,broker,audit}) for the
# services on PostgreSQL (docs/HA.md). Used by compose.ha.yaml's setup
# (setup-ha.sh) and before deploy/k8s/create-secrets.sh for deploy/k8s/ha.
#
#   deploy/postgres/store-config.sh OUT [SERVICE ...]
#
# It writes:
#   OUT/db/secrets/twokey_{vault,broker,audit}.password  a random password
#                 per service role (0600): what deploy/postgres/init.sql reads
#   OUT/<service>/postgres.password   the same, the service's password_file
#   OUT/pki/postgres-ca.{key,crt}     a CA for the database (keep the key
#                                     offline, as pki/ca.key)
#   OUT/db/server.{crt,key}           the database's certificate for the DNS
#                                     name $TWOKEY_DB_HOST (default postgres)
#   OUT/<service>/postgres-ca.crt     that CA, the service's ca_file
#   OUT/db/superuser.password         the postgres superuser's (the image's
#                                     POSTGRES_PASSWORD_FILE)
#   OUT/db/pg_hba.conf                each role over TLS to its own database
# and appends [store] backend = "postgres" with its [store.postgres] to the
# config of each SERVICE named (default: vault broker audit; a service whose
# store is set by TWOKEY_<SERVICE>_STORE_* variables instead is left out).
#
# Environment: TWOKEY_DB_HOST (default postgres), TWOKEY_CONFIG_ROOT (where
# OUT is mounted, as written into the configs; default /etc/twokey). With
# your own database CA: put its certificate in OUT/pki/postgres-ca.crt first
# (and the server's in OUT/db/server.{crt,key}); nothing is then made.
set -euo pipefail
out="${1:?usage: store-config.sh OUT [SERVICE ...]}"
shift
services=("$@")
[ ${#services[@]} -gt 0 ] || services=(vault broker audit)
host="${TWOKEY_DB_HOST:-postgres}"
root="${TWOKEY_CONFIG_ROOT:-/etc/twokey}"
for svc in vault broker audit; do
  [ -f "$out/$svc/$svc.toml" ] || { echo "store-config: no $out/$svc/$svc.toml: run bootstrap.sh $out first" >&2; exit 1; }
done
command -v openssl >/dev/null || [ -f "$out/pki/postgres-ca.crt" ] || {
  echo "store-config: openssl is needed to make the database's certificate (apt-get install openssl), or put your own in $out/pki/postgres-ca.crt and $out/db/server.{crt,key}" >&2
  exit 1
}
if [ -e "$out/db/secrets" ]; then
  echo "store-config: $out/db/secrets exists: already done (passwords are never replaced)" >&2
  exit 1
fi
umask 077
mkdir -p "$out/db/secrets"
password() { head -c 32 /dev/urandom | base64 | tr -d '/+=\n'; }
password > "$out/db/superuser.password"
for svc in vault broker audit; do
  password > "$out/db/secrets/twokey_$svc.password"
  install -m 0600 "$out/db/secrets/twokey_$svc.password" "$out/$svc/postgres.password"
done

if [ ! -f "$out/pki/postgres-ca.crt" ]; then
  # The database's own CA and server certificate (P-256, 825 days).
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$out/pki/postgres-ca.key" -out "$out/pki/postgres-ca.crt" -days 825 \
    -subj "/CN=twokey PostgreSQL CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$out/db/server.key" -out "$out/db/server.csr" -subj "/CN=$host" 2>/dev/null
  printf '%s\n' "subjectAltName=DNS:$host" "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" > "$out/db/server.ext"
  openssl x509 -req -in "$out/db/server.csr" -CA "$out/pki/postgres-ca.crt" \
    -CAkey "$out/pki/postgres-ca.key" -CAcreateserial -days 825 \
    -extfile "$out/db/server.ext" -out "$out/db/server.crt" 2>/dev/null
  rm -f "$out/db/server.csr" "$out/db/server.ext" "$out/pki/postgres-ca.srl"
  chmod 0644 "$out/db/server.crt" "$out/pki/postgres-ca.crt"
fi
for svc in vault broker audit; do
  install -m 0644 "$out/pki/postgres-ca.crt" "$out/$svc/postgres-ca.crt"
done

cat > "$out/db/pg_hba.conf" <<'HBA'
# Local socket: the image's entrypoint and the healthcheck, inside the
# database container only.
local   all            all            trust
# Each service role: over TLS, to its own database, with its password.
hostssl twokey_vault   twokey_vault   all  scram-sha-256
hostssl twokey_broker  twokey_broker  all  scram-sha-256
hostssl twokey_audit   twokey_audit   all  scram-sha-256
HBA
chmod 0644 "$out/db/pg_hba.conf"

for svc in "${services[@]}"; do
  case "$svc" in vault|broker|audit) ;; *) echo "store-config: unknown service $svc" >&2; exit 1 ;; esac
  cat >> "$out/$svc/$svc.toml" <<TOML

# store-config.sh: kept in PostgreSQL, shared by every $svc replica (docs/HA.md).
[store]
backend = "postgres"

[store.postgres]
url = "postgresql://twokey_$svc@$host:5432/twokey_$svc?sslmode=verify-full"
password_file = "$root/$svc/postgres.password"
ca_file = "$root/$svc/postgres-ca.crt"
TOML
done
echo "database passwords, certificate (host $host) and pg_hba.conf in $out/db; [store] in: ${services[*]}"
