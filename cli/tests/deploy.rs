//! The files in deploy/: example configs use exactly the services' key
//! names, systemd units carry the hardening lines, and the Kubernetes
//! NetworkPolicies admit only the broker to the vault.

use std::{collections::BTreeSet, path::PathBuf};

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(deploy(path)).unwrap_or_else(|e| panic!("deploy/{path}: {e}"))
}

/// Every key of a TOML document as a dotted path (array tables as `name[]`).
fn keys(value: &toml::Value, prefix: &str, out: &mut BTreeSet<String>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                if !matches!(v, toml::Value::Table(_))
                    && !matches!(v, toml::Value::Array(a) if a.iter().all(toml::Value::is_table) && !a.is_empty())
                {
                    out.insert(path.clone());
                }
                keys(v, &path, out);
            }
        }
        toml::Value::Array(items) if items.iter().all(toml::Value::is_table) => {
            for item in items {
                keys(item, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

fn config_keys(file: &str) -> BTreeSet<String> {
    let value: toml::Value = toml::from_str(&read(file)).expect("valid TOML");
    let mut out = BTreeSet::new();
    keys(&value, "", &mut out);
    out
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn vault_example_config_has_exactly_the_vault_keys() {
    assert_eq!(
        config_keys("vault.toml"),
        set(&[
            "listen",
            "trust_domain",
            "data_dir",
            "master_key_file",
            "event_key_file",
            "broker_id",
            "grant_public_key",
            "audit_address",
            "audit_server_name",
            "audit_checkpoint_key",
            "audit_ack_timeout_ms",
            "log_format",
            "consent.admins_file",
            "consent.threshold",
            "tls.cert",
            "tls.key",
            "tls.ca",
        ])
    );
}

#[test]
fn broker_example_config_has_exactly_the_broker_keys() {
    assert_eq!(
        config_keys("broker.toml"),
        set(&[
            "listen",
            "http_listen",
            "trust_domain",
            "data_dir",
            "policy_file",
            "grant_key_file",
            "event_key_file",
            "pin_key_file",
            "vault_address",
            "vault_server_name",
            "audit_address",
            "audit_server_name",
            "audit_checkpoint_key",
            "log_format",
            "consent.admins_file",
            "consent.threshold",
            "tls.cert",
            "tls.key",
            "tls.ca",
            "notify.mailbox.dir",
            "notify.webhook.url",
            "notify.webhook.secret_file",
            "notify.slack.api_base",
            "notify.slack.token_file",
            "notify.slack.channel",
        ])
    );
}

#[test]
fn audit_example_config_has_exactly_the_audit_keys() {
    assert_eq!(
        config_keys("audit.toml"),
        set(&[
            "listen",
            "trust_domain",
            "data_dir",
            "checkpoint_key_file",
            "origin",
            "auditors",
            "log_format",
            "tls.cert",
            "tls.key",
            "tls.ca",
            "sources[].id",
            "sources[].public_key",
        ])
    );
}

#[test]
fn every_data_dir_is_the_units_only_writable_path() {
    for svc in ["vault", "broker", "audit"] {
        let config: toml::Value = toml::from_str(&read(&format!("{svc}.toml"))).unwrap();
        let data_dir = config["data_dir"].as_str().unwrap();
        let unit = read(&format!("systemd/twokey-{svc}.service"));
        let rw: Vec<&str> = unit
            .lines()
            .filter_map(|l| l.strip_prefix("ReadWritePaths="))
            .collect();
        assert_eq!(rw, [data_dir], "twokey-{svc}.service");
        for line in [
            format!("User=twokey-{svc}"),
            "ProtectSystem=strict".into(),
            "NoNewPrivileges=yes".into(),
            "PrivateTmp=yes".into(),
            "ProtectHome=yes".into(),
            "CapabilityBoundingSet=".into(),
            format!(
                "ExecStart=/usr/local/bin/twokey-{svc} serve --config /etc/twokey/{svc}/{svc}.toml"
            ),
        ] {
            assert!(
                unit.lines().any(|l| l == line),
                "twokey-{svc}.service lacks {line}"
            );
        }
    }
}

#[test]
fn the_broker_mailbox_is_inside_its_data_dir() {
    let config: toml::Value = toml::from_str(&read("broker.toml")).unwrap();
    let data_dir = config["data_dir"].as_str().unwrap();
    let mailbox = config["notify"]["mailbox"]["dir"].as_str().unwrap();
    assert!(
        mailbox.starts_with(data_dir),
        "{mailbox} outside {data_dir}"
    );
}

#[test]
fn only_the_broker_may_reach_the_vault_and_only_sources_reach_audit() {
    let np = read("k8s/networkpolicy.yaml");
    let doc = |name: &str| -> String {
        np.split("\n---")
            .find(|d| d.contains(&format!("name: {name}\n")))
            .unwrap_or_else(|| panic!("no NetworkPolicy {name}"))
            .to_owned()
    };
    let vault = doc("vault-from-broker-only");
    let froms: Vec<&str> = vault
        .lines()
        .filter(|l| l.contains("matchLabels") && !l.contains("twokey-vault"))
        .collect();
    assert_eq!(froms.len(), 1, "{vault}");
    assert!(froms[0].contains("twokey-broker"));
    let audit = doc("audit-from-sources-only");
    let active: Vec<&str> = audit
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter(|l| l.contains("matchLabels") && !l.contains("twokey-audit"))
        .collect();
    assert_eq!(active.len(), 2, "{audit}");
    assert!(doc("default-deny").contains("policyTypes: [Ingress, Egress]"));
}
