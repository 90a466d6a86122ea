#!/usr/bin/env bash
# Loads what deploy/bootstrap.sh wrote (or your own certificates and keys in
# the same layout) into the twokey namespace: a ConfigMap with each service's
# config and a Secret with its certificate and keys.
#
#   TWOKEY_HOSTS=services deploy/bootstrap.sh ./twokey-etc
#   deploy/k8s/create-secrets.sh ./twokey-etc
#   kubectl apply -k deploy/k8s
set -euo pipefail
src="${1:?usage: create-secrets.sh DIR (as written by deploy/bootstrap.sh)}"
ns="${TWOKEY_NAMESPACE:-twokey}"
kubectl get namespace "$ns" >/dev/null 2>&1 || kubectl create namespace "$ns"
apply() { kubectl -n "$ns" create "$@" --dry-run=client -o yaml | kubectl apply -f -; }

apply configmap twokey-vault-config --from-file="$src/vault/vault.toml" \
  --from-file="$src/vault/admins.allowed_signers"
apply secret generic twokey-vault \
  --from-file="$src/vault/ca.crt" --from-file="$src/vault/vault.crt" \
  --from-file="$src/vault/vault.key" --from-file="$src/vault/master.key" \
  --from-file="$src/vault/event.key"

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
  "${broker_extra[@]}"

apply configmap twokey-audit-config --from-file="$src/audit/audit.toml"
apply secret generic twokey-audit \
  --from-file="$src/audit/ca.crt" --from-file="$src/audit/audit.crt" \
  --from-file="$src/audit/audit.key" --from-file="$src/audit/checkpoint.key"
echo "secrets and configs loaded into namespace $ns; now: kubectl apply -k deploy/k8s"
