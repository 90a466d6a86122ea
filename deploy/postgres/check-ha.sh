#!/usr/bin/env bash
# Checks the HA deploy files offline, where no container engine or cluster
# runs (CI): deploy/compose.ha.yaml and deploy/k8s/ha/*.yaml parse as YAML;
# every TWOKEY_<SERVICE>_* variable they set is one that `twokey-<service>
# serve` takes (read from its --help); two replicas of each service, each
# with its own data volume; PostgreSQL only on internal networks, reaching
# nothing; a PodDisruptionBudget (minAvailable 1) and hostname anti-affinity
# per service; the database's NetworkPolicy admits only the three services on
# 5432; and setup-ha.sh, run outside the container, writes configs whose
# [store] parses and names each service's own role and database.
#
#   cargo build -p twokey-vault -p twokey-broker -p twokey-audit -p twokey
#   deploy/postgres/check-ha.sh            # TWOKEY_BIN=DIR: binaries (default target/debug)
#
# Needs python3 with PyYAML. What it cannot check: that Docker Compose and
# kustomize accept the files (`docker compose config`, `kubectl kustomize`)
# and that the containers start: run those where they exist.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
deploy="$(cd "$here/.." && pwd)"
bin="${TWOKEY_BIN:-$deploy/../target/debug}"
for b in twokey twokey-vault twokey-broker twokey-audit; do
  [ -x "$bin/$b" ] || { echo "check-ha: no $bin/$b: build it or set TWOKEY_BIN" >&2; exit 1; }
done
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for svc in vault broker audit; do
  "$bin/twokey-$svc" serve --help | grep -o 'env: TWOKEY_[A-Z_]*' | sed 's/^env: //' > "$work/$svc.env"
done
mkdir "$work/etc"
TWOKEY_ETC="$work/etc" TWOKEY_CONFIG_ROOT=/etc/twokey TWOKEY_BIN="$bin" \
  TWOKEY_BOOTSTRAP="$deploy/bootstrap.sh" TWOKEY_HOSTS=services \
  "$here/setup-ha.sh" > "$work/setup.log" 2>&1 \
  || { cat "$work/setup.log" >&2; echo "check-ha: setup-ha.sh failed" >&2; exit 1; }

python3 - "$deploy" "$work" <<'PY'
import glob, os, re, sys, tomllib
import yaml

deploy, work = sys.argv[1], sys.argv[2]
problems = []
def check(ok, what):
    if not ok:
        problems.append(what)

env_names = {s: set(open(f"{work}/{s}.env").read().split()) for s in ("vault", "broker", "audit")}
def check_env(name, where):
    m = re.match(r"TWOKEY_(VAULT|BROKER|AUDIT)_", name)
    if m:
        svc = m.group(1).lower()
        check(name in env_names[svc], f"{where}: {name} is not a variable of twokey-{svc} serve")

# --- compose.ha.yaml -------------------------------------------------------
compose = yaml.safe_load(open(f"{deploy}/compose.ha.yaml"))
services = compose["services"]
for name, s in services.items():
    for k in (s.get("environment") or {}):
        check_env(k, f"compose.ha.yaml {name}")
internal = {n for n, v in compose["networks"].items() if (v or {}).get("internal")}
for svc in ("vault", "broker", "audit"):
    reps = [n for n in services if re.fullmatch(f"{svc}-[0-9]+", n)]
    check(len(reps) >= 2, f"compose.ha.yaml: {len(reps)} {svc} replicas, want 2")
    data = set()
    for r in reps:
        s = services[r]
        check(s["command"][0] == f"twokey-{svc}", f"compose.ha.yaml {r}: runs {s['command'][0]}")
        vols = [v for v in s["volumes"] if isinstance(v, str) and v.endswith(f":/var/lib/twokey-{svc}")]
        check(len(vols) == 1, f"compose.ha.yaml {r}: no data volume of its own")
        data.update(v.split(":")[0] for v in vols)
        check(s["depends_on"]["postgres"]["condition"] == "service_healthy", f"{r}: not after postgres")
        db_nets = [n for n in s["networks"] if n.startswith("db-")]
        check(db_nets == [f"db-{svc}"], f"compose.ha.yaml {r}: database networks {db_nets}, want db-{svc}")
    check(len(data) == len(reps), f"compose.ha.yaml: {svc} replicas share a data volume")
pg = services["postgres"]
check(pg["image"].startswith("postgres:") and int(pg["image"].split(":")[1].split(".")[0]) >= 15, "postgres image < 15")
check(set(pg["networks"]) <= internal, f"compose.ha.yaml postgres on a network that is not internal: {pg['networks']}")
check("ports" not in pg, "compose.ha.yaml postgres publishes a port")
check(any(isinstance(v, str) and v.startswith("./postgres/init.sql:/docker-entrypoint-initdb.d/") for v in pg["volumes"]),
      "compose.ha.yaml postgres does not run deploy/postgres/init.sql")
check(os.path.exists(f"{deploy}/postgres/init.sql"), "deploy/postgres/init.sql is missing")
for addr_var, svc in (("TWOKEY_BROKER_VAULT_ADDRESS", "vault"), ("TWOKEY_BROKER_AUDIT_ADDRESS", "audit")):
    value = services["broker-1"]["environment"][addr_var]
    hosts = [a.split("//")[1].split(":")[0] for a in value.split(",")]
    check(sorted(hosts) == sorted(n for n in services if n.startswith(f"{svc}-")), f"{addr_var} lists {hosts}")

# --- the configs setup-ha.sh wrote -----------------------------------------
for svc in ("vault", "audit"):
    conf = tomllib.load(open(f"{work}/etc/{svc}/{svc}.toml", "rb"))
    st = conf.get("store", {})
    check(st.get("backend") == "postgres", f"{svc}.toml: store.backend {st.get('backend')}")
    url = st.get("postgres", {}).get("url", "")
    check(url == f"postgresql://twokey_{svc}@postgres:5432/twokey_{svc}?sslmode=verify-full", f"{svc}.toml url {url}")
    for f in ("password_file", "ca_file"):
        p = st.get("postgres", {}).get(f, "")
        check(p.startswith(f"/etc/twokey/{svc}/") and os.path.exists(f"{work}/etc/{svc}/" + os.path.basename(p)),
              f"{svc}.toml {f} {p} not written")
broker_env = services["broker-1"]["environment"]
check(broker_env["TWOKEY_BROKER_STORE_POSTGRES_URL"] ==
      "postgresql://twokey_broker@postgres:5432/twokey_broker?sslmode=verify-full", "broker url")
for k in ("TWOKEY_BROKER_STORE_POSTGRES_PASSWORD_FILE", "TWOKEY_BROKER_STORE_POSTGRES_CA_FILE"):
    check(os.path.exists(f"{work}/etc/broker/" + os.path.basename(broker_env[k])), f"{k}: file not written")
for svc in ("vault", "broker", "audit"):
    a = open(f"{work}/etc/db/secrets/twokey_{svc}.password").read()
    b = open(f"{work}/etc/{svc}/postgres.password").read()
    check(a == b and len(a.strip()) >= 32, f"{svc}: password files differ or are short")
hba = open(f"{work}/etc/db/pg_hba.conf").read()
for svc in ("vault", "broker", "audit"):
    check(f"hostssl twokey_{svc}   twokey_{svc}" in hba.replace("  twokey", "   twokey") or
          re.search(rf"^hostssl\s+twokey_{svc}\s+twokey_{svc}\s", hba, re.M), f"pg_hba.conf: no line for {svc}")
check(not re.search(r"^host\s", hba, re.M), "pg_hba.conf allows cleartext TCP")

# --- k8s/ha -----------------------------------------------------------------
docs = {}
for f in sorted(glob.glob(f"{deploy}/k8s/*.yaml") + glob.glob(f"{deploy}/k8s/ha/*.yaml")):
    for d in yaml.safe_load_all(open(f)):
        if d and "kind" in d and "metadata" in d:
            docs.setdefault(os.path.relpath(f, deploy), []).append(d)
kust = yaml.safe_load(open(f"{deploy}/k8s/ha/kustomization.yaml"))
for r in kust["resources"]:
    check(os.path.exists(f"{deploy}/k8s/ha/{r}"), f"kustomization: no {r}")
for p in kust["patches"]:
    check(os.path.exists(f"{deploy}/k8s/ha/{p['path']}"), f"kustomization: no {p['path']}")
base = {(d["kind"], d["metadata"]["name"]) for f, ds in docs.items() if "/ha/" not in f for d in ds}
ha = {f: ds for f, ds in docs.items() if "/ha/" in f}
patched = [d for p in kust["patches"] for d in ha[f"k8s/ha/{p['path']}"]]
for d in patched:
    check((d["kind"], d["metadata"]["name"]) in base, f"patch of {d['kind']} {d['metadata']['name']}: not in the base")
added = [d for r in kust["resources"] if r != "../" for d in ha[f"k8s/ha/{r}"]]
deleted = {(d["kind"], d["metadata"]["name"]) for d in patched if d.get("$patch") == "delete"}

def workload(svc):
    name = f"twokey-{svc}"
    for d in added:
        if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] == name:
            return d, d["spec"]
    for d in patched:
        if d["kind"] == "Deployment" and d["metadata"]["name"] == name and d.get("$patch") != "delete":
            return d, d["spec"]
    return None, None

for svc in ("vault", "broker", "audit"):
    d, spec = workload(svc)
    check(spec is not None, f"k8s/ha: no {svc} workload")
    if spec is None:
        continue
    check(spec.get("replicas") == 2, f"k8s/ha {svc}: replicas {spec.get('replicas')}")
    aff = spec["template"]["spec"].get("affinity", {}).get("podAntiAffinity", {})
    terms = aff.get("requiredDuringSchedulingIgnoredDuringExecution", [])
    check(any(t["topologyKey"] == "kubernetes.io/hostname" and
              t["labelSelector"]["matchLabels"]["app.kubernetes.io/name"] == f"twokey-{svc}" for t in terms),
          f"k8s/ha {svc}: no anti-affinity on hostname")
    for c in spec["template"]["spec"].get("containers", []):
        for e in c.get("env", []):
            check_env(e["name"], f"k8s/ha {svc}")
    pdbs = [x for x in added if x["kind"] == "PodDisruptionBudget"
            and x["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == f"twokey-{svc}"]
    check(len(pdbs) == 1 and pdbs[0]["spec"].get("minAvailable") == 1, f"k8s/ha {svc}: no PDB minAvailable 1")
    check(("PersistentVolumeClaim", f"twokey-{svc}-data") in deleted, f"k8s/ha {svc}: its base claim is kept")
check(("Deployment", "twokey-audit") in deleted, "k8s/ha: the base audit Deployment is kept beside the StatefulSet")
pols = {d["metadata"]["name"]: d for d in added if d["kind"] == "NetworkPolicy"}
db = pols.get("db-from-services-only")
check(db is not None, "k8s/ha: no NetworkPolicy for the database")
if db:
    check(db["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "twokey-postgres", "db policy selector")
    check(db["spec"].get("egress") == [] and "Egress" in db["spec"]["policyTypes"], "the database may reach something")
    froms = sorted(f["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for f in db["spec"]["ingress"][0]["from"])
    check(froms == ["twokey-audit", "twokey-broker", "twokey-vault"], f"the database is reached by {froms}")
    check([p["port"] for p in db["spec"]["ingress"][0]["ports"]] == [5432], "db port")
    check(len(db["spec"]["ingress"]) == 1, "more than one ingress rule to the database")
dns = [d for d in patched if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "dns"]
check(dns and dns[0]["spec"]["podSelector"]["matchExpressions"][0]["values"] == ["twokey-postgres"],
      "the base DNS policy still lets the database out")
kept = {d["metadata"]["name"] for ds in docs.values() for d in ds if d["kind"] == "NetworkPolicy"}
for name in ("default-deny", "vault-from-broker-only", "audit-from-sources-only", "broker-egress", "vault-egress"):
    check(name in kept and ("NetworkPolicy", name) not in deleted, f"base NetworkPolicy {name} not kept")
svc_names = {d["metadata"]["name"] for d in added if d["kind"] == "Service"}
check("postgres" in svc_names, "no Service named postgres (the host in the urls and the certificate)")

if problems:
    print("check-ha: " + "\n check-ha: ".join(problems), file=sys.stderr)
    sys.exit(1)
print("check-ha: compose.ha.yaml, k8s/ha and the setup's configs are consistent")
PY
