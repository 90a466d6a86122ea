#!/usr/bin/env bash
# Loads what deploy/bootstrap.sh wrote (or your own certificates and keys in
# the same layout) into the twokey namespace: a ConfigMap with each service's
# config and a Secret with its certificate and keys.
#
#   TWOKEY_HOSTS=services deploy/bootstrap.sh ./twokey-etc
#   deploy/k8s/create-secrets.sh ./twokey-etc
#   kubectl apply -k deploy/k8s
#
# For deploy/k8s/ha (services on PostgreSQL), run deploy/postgres/store-config.sh
# on DIR first: each service's postgres.password and postgres-ca.crt then go
# into its Secret, and DIR/db into the database's Secrets twokey-postgres and
# twokey-postgres-roles, with deploy/postgres/init.sql as the ConfigMap
# twokey-postgres-init.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
src="${1:?usage: create-secrets.sh DIR (as written by deploy/bootstrap.sh)}"
ns="${TWOKEY_NAMESPACE:-twokey}"
kubectl get namespace "$ns" >/dev/null 2>&1 || kubectl create namespace "$ns"
apply() { kubectl -n "$ns" create "$@" --dry-run=client -o yaml | kubectl apply -f -; }
# What store-config.sh adds to a service's directory, when it is there.
db_files() { for f in postgres.password postgres-ca.crt; do [ -f "$src/$1/$f" ] && echo "--from-file=$src/$1/$f"; done; return 0; }

apply configmap twokey-vault-config --from-file="$src/vault/vault.toml" \
  --from-file="$src/vault/admins.allowed_signers"
apply secret generic twokey-vault \
  --from-file="$src/vault/ca.crt" --from-file="$src/vault/vault.crt" \
  --from-file="$src/vault/vault.key" --from-file="$src/vault/master.key" \
  --from-file="$src/vault/event.key" $(db_files vault)

apply configmap twokey-broker-config \
  --from-file="$src/broker/broker.toml" --from-file="$src/broker/policy.toml" \
  --from-file="$src/broker/admins.allowed_signers"
broker_extra=()
for f in webhook.secret slack.token; do
  [ -f "$src/broker/$f" ] && broker_extra+=(--from-file="$src/broker/$f")
done
apply secret generic twokey-broker \
  --from-file="$src/broker/ca.crt" --from-file="$src/broker/broker.crt" \
  --from-file="$src/broker/broker.key" --from-file="$src/broker/grant.key" \
  --from-file="$src/broker/event.key" --from-file="$src/broker/pin.key" \
  "${broker_extra[@]}" $(db_files broker)

apply configmap twokey-audit-config --from-file="$src/audit/audit.toml"
apply secret generic twokey-audit \
  --from-file="$src/audit/ca.crt" --from-file="$src/audit/audit.crt" \
  --from-file="$src/audit/audit.key" --from-file="$src/audit/checkpoint.key" $(db_files audit)

if [ -d "$src/db" ]; then
  apply secret generic twokey-postgres \
    --from-file="$src/db/server.crt" --from-file="$src/db/server.key" \
    --from-file="$src/db/superuser.password" --from-file="$src/db/pg_hba.conf"
  apply secret generic twokey-postgres-roles \
    --from-file="$src/db/secrets/twokey_vault.password" \
    --from-file="$src/db/secrets/twokey_broker.password" \
    --from-file="$src/db/secrets/twokey_audit.password"
  apply configmap twokey-postgres-init --from-file=init.sql="$here/../postgres/init.sql"
  echo "database secrets and init.sql loaded; for two replicas each: kubectl apply -k deploy/k8s/ha"
fi
echo "secrets and configs loaded into namespace $ns; now: kubectl apply -k deploy/k8s"
