#!/usr/bin/env bash
# The one-shot setup of compose.ha.yaml (two replicas of each service on one
# PostgreSQL), run in the twokey image as user 10001 with the `etc` volume at
# /etc/twokey and this directory at /usr/share/twokey/postgres. The first
# time, it runs bootstrap.sh (certificates, keys, configs) as compose.yaml
# does, then store-config.sh (role passwords, the database's CA and
# certificate, pg_hba.conf; [store] in vault.toml and audit.toml: the broker
# gets its store from TWOKEY_BROKER_STORE_* in compose.ha.yaml, while the
# vault and audit take it from the file only), and lists both broker and
# both audit replicas in the CLI profiles. A second run does nothing.
#
# TWOKEY_ETC and TWOKEY_BOOTSTRAP let it run outside the container
# (check-ha.sh does).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
etc="${TWOKEY_ETC:-/etc/twokey}"
if [ -f "$etc/vault/vault.toml" ]; then echo "already set up"; exit 0; fi
"${TWOKEY_BOOTSTRAP:-/usr/share/twokey/bootstrap.sh}" "$etc/new"
mv "$etc/new"/* "$etc/" && rmdir "$etc/new"
"$here/store-config.sh" "$etc" vault audit
sed -i -e 's|^broker = "https://127.0.0.1:7400"$|broker = "https://127.0.0.1:7400,https://127.0.0.1:7410"|' \
  -e 's|^audit = "https://127.0.0.1:7403"$|audit = "https://127.0.0.1:7403,https://127.0.0.1:7413"|' \
  "$etc/pki/twokey.toml"
echo "set up for two replicas of each service on PostgreSQL (host postgres, sslmode=verify-full)"
