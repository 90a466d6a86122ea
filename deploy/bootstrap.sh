#!/usr/bin/env bash
# Makes everything the three services need, in the layout the example configs,
# the systemd units, compose.yaml and the Kubernetes manifests expect:
#
#   OUT/pki/      development CA (ca.key: keep it offline), user certificates,
#                 each user's OpenSSH signing key NAME.ssh (hand it to them;
#                 people who have their own key put its .pub there instead),
#                 twokey.toml (one CLI profile per user)
#   OUT/vault/    vault.toml  ca.crt vault.crt vault.key master.key event.key
#                 admins.allowed_signers (the pinned admins: the root of trust)
#   OUT/broker/   broker.toml ca.crt broker.crt broker.key grant.key event.key
#                 pin.key policy.toml admins.allowed_signers
#   OUT/audit/    audit.toml  ca.crt audit.crt audit.key checkpoint.key
#                 verifier.key (for `twokey audit verify --checkpoint-key`)
#
# Usage: deploy/bootstrap.sh OUT [NAME:ROLE ...]
#   default users (those policy.example.toml names, and an auditor):
#   alice:requester bob:approver dave:approver olivia:operator adam:admin
#   anna:admin carol:auditor bpm:intake
#
# Environment:
#   TWOKEY_TRUST_DOMAIN  trust domain (default twokey.local)
#   TWOKEY_CONFIG_ROOT   where OUT will be mounted, as written into the configs
#                        (default /etc/twokey; set it to OUT to run in place)
#   TWOKEY_DATA_ROOT     parent of the data directories (default /var/lib)
#   TWOKEY_HOSTS         "services" (vault, broker, audit: compose and k8s,
#                        default) or "local" (127.0.0.1: one host)
#   TWOKEY_POLICY        policy file to install (default: policy.example.toml
#                        beside this script)
#   TWOKEY_BIN           directory of the twokey binaries (default: from PATH)
#   TWOKEY_HTTP_LISTEN   the broker's HTTP/JSON listener (http_listen):
#                        default 127.0.0.1:7404, loopback only; 0.0.0.0:7404
#                        to serve BPMs on the network (compose and k8s set
#                        it: their port mapping and NetworkPolicy are the
#                        fence); "off" for gRPC only
#   TWOKEY_NOTIFY        how PINs reach requesters, comma-separated:
#                        "mailbox" (default) is a DEVELOPMENT notifier: it
#                        writes PINs to files on the broker host. In
#                        production use "slack" (DMs; put the bot token in
#                        OUT/broker/slack.token, mode 0600) or "webhook"
#                        (PINs to your own https endpoint, send_pins = true;
#                        set TWOKEY_WEBHOOK_URL and put the HMAC secret in
#                        OUT/broker/webhook.secret, mode 0600)
#   TWOKEY_WEBHOOK_URL   the webhook's https:// url (with TWOKEY_NOTIFY=webhook)
#
# Keys are written 0600 and never overwritten: OUT must be new or empty.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: bootstrap.sh OUT [NAME:ROLE ...]}"
shift
users=("$@")
if [ ${#users[@]} -eq 0 ]; then
  users=(alice:requester bob:approver dave:approver olivia:operator adam:admin anna:admin carol:auditor bpm:intake)
fi
td="${TWOKEY_TRUST_DOMAIN:-twokey.local}"
root="${TWOKEY_CONFIG_ROOT:-/etc/twokey}"
data="${TWOKEY_DATA_ROOT:-/var/lib}"
hosts="${TWOKEY_HOSTS:-services}"
policy="${TWOKEY_POLICY:-$here/policy.example.toml}"
http_listen="${TWOKEY_HTTP_LISTEN:-127.0.0.1:7404}"
notify="${TWOKEY_NOTIFY:-mailbox}"
webhook_url="${TWOKEY_WEBHOOK_URL:-}"
for n in ${notify//,/ }; do
  case "$n" in
    mailbox|slack) ;;
    webhook) [ -n "$webhook_url" ] || { echo "bootstrap: TWOKEY_NOTIFY=webhook needs TWOKEY_WEBHOOK_URL (https://...)" >&2; exit 1; } ;;
    *) echo "bootstrap: TWOKEY_NOTIFY: unknown notifier $n (mailbox, slack or webhook)" >&2; exit 1 ;;
  esac
done
bin() { if [ -n "${TWOKEY_BIN:-}" ]; then echo "$TWOKEY_BIN/$1"; else command -v "$1"; fi; }
for b in twokey twokey-vault twokey-broker twokey-audit; do
  [ -x "$(bin "$b" || true)" ] || { echo "bootstrap: $b not found; build it (cargo build --release) or set TWOKEY_BIN" >&2; exit 1; }
done
if [ -e "$out" ] && [ -n "$(ls -A "$out")" ]; then
  echo "bootstrap: $out is not empty; give a new directory" >&2
  exit 1
fi
umask 077
mkdir -p "$out"

pki_args=()
auditors=()
admins=()
for u in "${users[@]}"; do
  pki_args+=(--user "$u")
  [ "${u#*:}" = auditor ] && auditors+=("\"spiffe://$td/user/${u%%:*}\"")
  [ "${u#*:}" = admin ] && admins+=("${u%%:*}")
done
# CLI profiles point at the published ports on this host.
broker_url=127.0.0.1:7400
audit_url=127.0.0.1:7403
"$(bin twokey)" pki init --dir "$out/pki" --trust-domain "$td" "${pki_args[@]}" \
  --broker "$broker_url" --audit "$audit_url" >/dev/null

for svc in vault broker audit; do
  mkdir -p "$out/$svc"
  install -m 0644 "$out/pki/ca.crt" "$out/$svc/ca.crt"
  install -m 0644 "$out/pki/$svc.crt" "$out/$svc/$svc.crt"
  install -m 0600 "$out/pki/$svc.key" "$out/$svc/$svc.key"
  rm -f "$out/pki/$svc.key"
done

"$(bin twokey-vault)" init-key --out "$out/vault/master.key" >/dev/null
vault_event="$("$(bin twokey-vault)" init-event-key --out "$out/vault/event.key" | tail -n 1)"
broker_keys="$("$(bin twokey-broker)" init-keys --dir "$out/broker" 2>/dev/null)"
grant_pub="$(printf '%s\n' "$broker_keys" | sed -n 's/^grant_public_key = "\(.*\)"$/\1/p')"
broker_event="$(printf '%s\n' "$broker_keys" | sed -n 's/^event_public_key = "\(.*\)"$/\1/p')"
verifier="$("$(bin twokey-audit)" init-key --out "$out/audit/checkpoint.key" --origin "$td/audit" \
  | sed -n 's/^verifier key: //p')"
printf '%s\n' "$verifier" > "$out/audit/verifier.key"
chmod 0644 "$out/audit/verifier.key"
for v in vault_event grant_pub broker_event verifier; do
  [ -n "${!v}" ] || { echo "bootstrap: could not read $v from the key tools' output" >&2; exit 1; }
done

auditor_list="$(IFS=,; echo "${auditors[*]:-}")"
render() { # render SRC DEST
  local s=(
    -e "s|REPLACE_WITH_BROKER_GRANT_PUBLIC_KEY|$grant_pub|"
    -e "s|REPLACE_WITH_BROKER_EVENT_PUBLIC_KEY|$broker_event|"
    -e "s|REPLACE_WITH_VAULT_EVENT_PUBLIC_KEY|$vault_event|"
    -e "s|REPLACE_WITH_AUDIT_VERIFIER_KEY|$verifier|"
    -e "s|spiffe://twokey.local/|spiffe://$td/|g"
    -e "s|^trust_domain = .*|trust_domain = \"$td\"|"
    -e "s|^origin = .*|origin = \"$td/audit\"|"
    -e "s|^auditors = .*|auditors = [$auditor_list]|"
    -e "s|^threshold = 2$|threshold = $threshold|"
    -e "s|/etc/twokey/|$root/|g"
    -e "s|/var/lib/twokey-|$data/twokey-|g"
  )
  if [ "$hosts" = local ]; then
    s+=(-e "s|https://vault:|https://127.0.0.1:|" -e "s|https://audit:|https://127.0.0.1:|"
        -e "s|^listen = \"0.0.0.0:|listen = \"127.0.0.1:|")
  fi
  sed "${s[@]}" "$1" > "$2"
  chmod 0644 "$2"
}
# The pinned admins: every admin's OpenSSH public key, their SPIFFE ID as
# principal. M = 2 with two admins or more (1 with one: a single admin can
# then change the policy alone; add a second admin before production).
threshold=2
[ ${#admins[@]} -lt 2 ] && threshold=${#admins[@]}
[ ${#admins[@]} -ge 1 ] || { echo "bootstrap: give at least one NAME:admin" >&2; exit 1; }
for a in "${admins[@]}"; do
  pub="$out/pki/$a.ssh.pub"
  [ -f "$pub" ] || { echo "bootstrap: no OpenSSH key $pub for admin $a" >&2; exit 1; }
  printf 'spiffe://%s/user/%s %s\n' "$td" "$a" "$(cut -d' ' -f1,2 "$pub")"
done > "$out/vault/admins.allowed_signers"
chmod 0644 "$out/vault/admins.allowed_signers"
install -m 0644 "$out/vault/admins.allowed_signers" "$out/broker/admins.allowed_signers"
render "$here/vault.toml" "$out/vault/vault.toml"
render "$here/audit.toml" "$out/audit/audit.toml"
# The example broker config enables every notifier; keep those TWOKEY_NOTIFY
# names (with the comments above each kept section), set the HTTP listener.
awk -v keep=",$notify," '
  /^\[notify\.[a-z]+\]/ { n = substr($0, 9, length($0) - 9); skip = index(keep, "," n ",") == 0 }
  /^\[/ && !/^\[notify\./ { skip = 0 }
  /^#/ || /^$/ { buf = buf $0 "\n"; next }
  { if (!skip) printf "%s%s\n", buf, $0; buf = "" }
  END { printf "%s", buf }
' "$here/broker.toml" > "$out/broker/broker.in"
case "$http_listen" in
  off|"") sed -i '/^http_listen = /d' "$out/broker/broker.in" ;;
  *) sed -i "s|^http_listen = .*|http_listen = \"$http_listen\"|" "$out/broker/broker.in" ;;
esac
if [ -n "$webhook_url" ]; then
  sed -i -e "s|^url = \"https://tickets.example.org/hooks/twokey\"|url = \"$webhook_url\"|" \
    -e 's|^send_pins = false|send_pins = true|' "$out/broker/broker.in"
fi
render "$out/broker/broker.in" "$out/broker/broker.toml"
rm -f "$out/broker/broker.in"
if [ -f "$policy" ]; then
  sed "s|spiffe://twokey.local/|spiffe://$td/|g" "$policy" > "$out/broker/policy.toml"
  chmod 0644 "$out/broker/policy.toml"
else
  echo "bootstrap: no policy at $policy; write $out/broker/policy.toml before starting the broker" >&2
fi

cat <<EOF
wrote certificates, keys and configs in $out (trust domain $td)
  start:   twokey-audit serve --config $root/audit/audit.toml
           twokey-vault serve --config $root/vault/vault.toml
           twokey-broker serve --config $root/broker/broker.toml
  CLI:     TWOKEY_CONFIG=$out/pki/twokey.toml twokey --profile NAME whoami
  policy:  the admins write the signed policy (people, keys, roles) and apply it:
           twokey policy propose FILE; twokey policy sign VERSION (M admins); twokey policy apply VERSION
  verify:  twokey audit verify --sources $out/audit/audit.toml --checkpoint-key "\$(cat $out/audit/verifier.key)"
keep $out/pki/ca.key offline; each service needs only its own directory
EOF
case ",$notify," in
  *,mailbox,*) cat <<EOF
PINs: the mailbox notifier writes them to files in the broker's data directory
  (mailbox/NAME.jsonl) on the broker host: for development only. In production
  run bootstrap with TWOKEY_NOTIFY=slack or TWOKEY_NOTIFY=webhook.
EOF
esac
case ",$notify," in
  *,slack,*) echo "Slack: put the bot token in $out/broker/slack.token (mode 0600) before starting the broker" ;;
esac
case ",$notify," in
  *,webhook,*) echo "webhook: put the HMAC secret in $out/broker/webhook.secret (mode 0600) before starting the broker" ;;
esac
case "$http_listen" in
  off|"") echo "HTTP/JSON: off (gRPC only)" ;;
  *) echo "HTTP/JSON: the broker serves it on $http_listen" ;;
esac
