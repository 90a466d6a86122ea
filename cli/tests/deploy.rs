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
            "audit_keep_days",
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
            "release_deadline_ms",
            "audit_address",
            "audit_server_name",
            "audit_checkpoint_key",
            "audit_keep_days",
            "log_format",
            "consent.admins_file",
            "consent.threshold",
            "tls.cert",
            "tls.key",
            "tls.ca",
            "notify.mailbox.dir",
            "notify.webhook.url",
            "notify.webhook.secret_file",
            "notify.webhook.send_pins",
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

mod common;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The workspace members, as the root Cargo.toml lists them.
fn workspace_members() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("Cargo.toml")).expect("Cargo.toml");
    let manifest: toml::Value = toml::from_str(&text).expect("Cargo.toml is TOML");
    let members: Vec<String> = manifest["workspace"]["members"]
        .as_array()
        .expect("workspace.members")
        .iter()
        .map(|m| {
            m.as_str()
                .expect("member path")
                .trim_end_matches('/')
                .to_owned()
        })
        .collect();
    assert!(!members.is_empty());
    members
}

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn instructions(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(trimmed);
            out.push(std::mem::take(&mut current));
        }
    }
    out
}

/// The build stage's `COPY` instructions before its first `cargo fetch`, as
/// (sources, destination), and whether such a fetch exists at all.
fn copies_before_fetch(dockerfile: &str) -> (Vec<(Vec<String>, String)>, bool) {
    let mut copies = Vec::new();
    for ins in instructions(dockerfile) {
        let words: Vec<&str> = ins.split_whitespace().collect();
        match words.first().map(|w| w.to_ascii_uppercase()).as_deref() {
            Some("FROM") if !copies.is_empty() => break,
            Some("RUN") if ins.contains("cargo fetch") => return (copies, true),
            Some("COPY") | Some("ADD") => {
                let args: Vec<String> = words[1..]
                    .iter()
                    .filter(|w| !w.starts_with("--"))
                    .map(|w| (*w).to_owned())
                    .collect();
                assert!(
                    words[1..].iter().all(|w| !w.starts_with("--from")),
                    "a COPY --from before cargo fetch: {ins}"
                );
                let (dest, sources) = args.split_last().expect("COPY SRC DEST");
                copies.push((sources.to_vec(), dest.clone()));
            }
            _ => {}
        }
    }
    (copies, false)
}

/// Patterns of deploy/Dockerfile.dockerignore: `**/*.ext` (any file with
/// that suffix) or a path that is left out with everything under it.
fn ignored(patterns: &[String], rel: &str) -> bool {
    patterns.iter().any(|p| match p.strip_prefix("**/*") {
        Some(suffix) => rel.ends_with(suffix),
        None => rel == p || rel.starts_with(&format!("{p}/")),
    })
}

fn dockerignore() -> Vec<String> {
    read("Dockerfile.dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_matches('/').to_owned())
        .collect()
}

/// Copies `rel` (a file or a directory, relative to the repository) from the
/// build context to `dest` as Docker's COPY does: a directory's contents go
/// into `dest`, ignored paths stay out.
fn copy_from_context(patterns: &[String], rel: &str, dest: &std::path::Path) {
    let src = if rel == "." { repo() } else { repo().join(rel) };
    if src.is_dir() {
        for entry in std::fs::read_dir(&src).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            let child = if rel == "." {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            if ignored(patterns, &child) {
                continue;
            }
            copy_from_context(patterns, &child, &dest.join(&name));
        }
    } else if src.is_file() {
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&src, dest).unwrap();
    } else {
        panic!("deploy/Dockerfile copies {rel}, which is not in the repository");
    }
}

#[test]
fn dockerfile_copies_every_workspace_member_before_cargo_fetch() {
    let dockerfile = read("Dockerfile");
    let (copies, fetch) = copies_before_fetch(&dockerfile);
    assert!(fetch, "deploy/Dockerfile has no RUN cargo fetch");
    // What the build stage holds when `cargo fetch` runs (WORKDIR /src).
    let sources: Vec<String> = copies
        .iter()
        .flat_map(|(s, _)| s.iter().map(|s| s.trim_end_matches('/').to_owned()))
        .collect();
    let patterns = dockerignore();
    for member in workspace_members() {
        let manifest = format!("{member}/Cargo.toml");
        let copied = sources
            .iter()
            .any(|s| s == "." || *s == member || *s == manifest);
        assert!(
            copied,
            "deploy/Dockerfile runs cargo fetch before copying {manifest} (workspace member \
             {member}); copy the whole workspace (COPY . .) or every member first"
        );
        assert!(
            !ignored(&patterns, &manifest) && !ignored(&patterns, &member),
            "deploy/Dockerfile.dockerignore leaves out {member}"
        );
    }
    for big in ["target", ".git"] {
        assert!(
            ignored(&patterns, big),
            "deploy/Dockerfile.dockerignore must leave {big}/ out of the build context"
        );
    }

    // Then the same as the image build does, here: those files alone, and
    // cargo fetch --locked on them (proto/build.rs, the .proto files and
    // every member's targets are what cargo needs besides the manifests).
    let tmp = tempfile::tempdir().unwrap();
    let workdir = tmp.path().join("src");
    std::fs::create_dir_all(&workdir).unwrap();
    for (sources, dest) in &copies {
        for source in sources {
            let into_dir = dest.ends_with('/') || dest == "." || sources.len() > 1;
            let target = match (source.as_str(), into_dir) {
                (".", _) => workdir.join(dest),
                (s, true) if repo().join(s).is_file() => workdir
                    .join(dest)
                    .join(std::path::Path::new(s).file_name().unwrap()),
                (_, _) => workdir.join(dest),
            };
            copy_from_context(&patterns, source.trim_end_matches('/'), &target);
        }
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = std::process::Command::new(cargo)
        .args(["fetch", "--locked"])
        .current_dir(&workdir)
        .env("CARGO_TARGET_DIR", tmp.path().join("target"))
        .output()
        .expect("run cargo fetch");
    assert!(
        output.status.success(),
        "cargo fetch --locked on what deploy/Dockerfile copies before its fetch fails:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `major.minor` of a Rust version string ("1.88", "1.88.0").
fn minor(v: &str) -> (u32, u32) {
    let mut parts = v
        .split('.')
        .map(|p| p.parse::<u32>().expect("version number"));
    (parts.next().unwrap(), parts.next().unwrap_or(0))
}

#[test]
fn dockerfile_rust_image_is_new_enough_for_every_dependency() {
    let dockerfile = read("Dockerfile");
    let image = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("FROM rust:"))
        .expect("FROM rust:VERSION");
    let image = minor(image.split(['-', ' ']).next().unwrap());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(repo())
        .output()
        .expect("run cargo metadata");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    for package in metadata["packages"].as_array().unwrap() {
        if let Some(needs) = package["rust_version"].as_str() {
            assert!(
                minor(needs) <= image,
                "{} {} needs Rust {needs}; deploy/Dockerfile builds with rust:{}.{}",
                package["name"],
                package["version"],
                image.0,
                image.1
            );
        }
    }
}

/// A container engine that answers, if any.
fn container_engine() -> Option<&'static str> {
    ["docker", "podman"].into_iter().find(|engine| {
        std::process::Command::new(engine)
            .arg("info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// The image build itself: a release build of the workspace, minutes long, so
/// it runs where an engine answers and CI (or TWOKEY_DOCKER_BUILD=1) asks.
#[test]
fn dockerfile_builds_where_an_engine_exists() {
    let Some(engine) = container_engine() else {
        eprintln!(
            "skipped: no container engine answers (docker info, podman info); \
             dockerfile_copies_every_workspace_member_before_cargo_fetch checks the build context"
        );
        return;
    };
    if std::env::var_os("CI").is_none() && std::env::var_os("TWOKEY_DOCKER_BUILD").is_none() {
        eprintln!(
            "skipped: {engine} answers; set TWOKEY_DOCKER_BUILD=1 (or CI) to build the image"
        );
        return;
    }
    let status = std::process::Command::new(engine)
        .args(["build", "-f", "deploy/Dockerfile", "-t", "twokey:test", "."])
        .env("DOCKER_BUILDKIT", "1")
        .current_dir(repo())
        .status()
        .expect("run the container build");
    assert!(
        status.success(),
        "{engine} build -f deploy/Dockerfile failed"
    );
}

/// The port of the broker's `http_listen` in deploy/broker.toml.
fn broker_http_port() -> u16 {
    let config: toml::Value = toml::from_str(&read("broker.toml")).unwrap();
    let listen = config["http_listen"].as_str().expect("http_listen");
    listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("http_listen port")
}

/// The YAML document of `kind` named `name` in a `---`-separated file.
fn yaml_doc(file: &str, kind: &str, name: &str) -> String {
    read(file)
        .split("\n---")
        .find(|d| d.contains(&format!("kind: {kind}\n")) && d.contains(&format!("name: {name}\n")))
        .unwrap_or_else(|| panic!("deploy/{file}: no {kind} {name}"))
        .to_owned()
}

#[test]
fn the_broker_http_port_is_published_everywhere_the_grpc_port_is() {
    let port = broker_http_port();
    let compose = read("compose.yaml");
    assert!(
        compose.contains(&format!("\"127.0.0.1:{port}:{port}\"")),
        "compose.yaml does not publish the broker's HTTP port {port} on 127.0.0.1"
    );
    assert!(
        compose.contains(&format!("TWOKEY_HTTP_LISTEN: 0.0.0.0:{port}")),
        "compose.yaml's setup must bind the HTTP listener inside the container"
    );
    let deployment = yaml_doc("k8s/broker.yaml", "Deployment", "twokey-broker");
    assert!(
        deployment.contains(&format!("{{ name: http, containerPort: {port} }}")),
        "{deployment}"
    );
    let service = yaml_doc("k8s/broker.yaml", "Service", "broker");
    assert!(
        service.contains(&format!("{{ name: http, port: {port}, targetPort: http }}")),
        "{service}"
    );
    let policy = yaml_doc(
        "k8s/networkpolicy.yaml",
        "NetworkPolicy",
        "broker-from-clients",
    );
    assert!(
        policy.contains(&format!("{{ protocol: TCP, port: {port} }}")),
        "{policy}"
    );
    let expose = read("Dockerfile");
    let expose = expose
        .lines()
        .find(|l| l.starts_with("EXPOSE "))
        .expect("EXPOSE");
    assert!(expose.split_whitespace().any(|p| p == port.to_string()));
}

#[test]
fn broker_egress_to_private_webhook_targets_is_a_documented_opt_in() {
    let egress = yaml_doc("k8s/networkpolicy.yaml", "NetworkPolicy", "broker-egress");
    assert!(
        egress.contains("except: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16]")
            && egress.contains("webhook-egress.yaml"),
        "broker-egress must except private ranges and point at webhook-egress.yaml: {egress}"
    );
    let extra = yaml_doc(
        "k8s/webhook-egress.yaml",
        "NetworkPolicy",
        "broker-egress-private-webhooks",
    );
    for line in [
        "matchLabels: { app.kubernetes.io/name: twokey-broker }",
        "policyTypes: [Egress]",
        "- ipBlock:",
        "cidr: ",
        "REPLACE",
    ] {
        assert!(extra.contains(line), "webhook-egress.yaml lacks {line}");
    }
    assert!(
        !extra.contains("ingress"),
        "webhook-egress.yaml must only widen egress"
    );
    let kustomization = read("k8s/kustomization.yaml");
    assert!(
        kustomization
            .lines()
            .any(|l| l.trim() == "# - webhook-egress.yaml"),
        "kustomization.yaml names webhook-egress.yaml as an opt-in"
    );
    assert!(read("README.md").contains("webhook-egress.yaml"));
}

/// Runs deploy/bootstrap.sh into a fresh directory with `env`; the broker
/// config it wrote and what it printed.
fn bootstrap(env: &[(&str, &str)]) -> (toml::Value, String) {
    let bins = common::service_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("etc");
    let mut command = std::process::Command::new("bash");
    command
        .arg(deploy("bootstrap.sh"))
        .arg(&out)
        .env("TWOKEY_BIN", &bins)
        .env("TWOKEY_CONFIG_ROOT", &out)
        .env("TWOKEY_DATA_ROOT", tmp.path());
    for (k, v) in env {
        command.env(k, v);
    }
    let output = command.output().expect("run bootstrap.sh");
    assert!(
        output.status.success(),
        "bootstrap.sh failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(out.join("broker/broker.toml")).unwrap();
    (
        toml::from_str(&text).expect("broker.toml is TOML"),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[test]
fn bootstrap_binds_http_to_loopback_and_names_the_production_notifiers() {
    // Default: HTTP/JSON on loopback only, PINs to the development mailbox,
    // and the output says what to use in production.
    let (config, said) = bootstrap(&[("TWOKEY_HOSTS", "services")]);
    assert_eq!(config["http_listen"].as_str(), Some("127.0.0.1:7404"));
    let notify = config["notify"].as_table().unwrap();
    assert_eq!(notify.keys().collect::<Vec<_>>(), ["mailbox"]);
    assert!(
        said.contains("for development only")
            && said.contains("TWOKEY_NOTIFY=slack or TWOKEY_NOTIFY=webhook"),
        "{said}"
    );

    // Production: Slack and a webhook that carries PINs, no mailbox; the
    // HTTP listener on the network only when asked.
    let (config, said) = bootstrap(&[
        ("TWOKEY_NOTIFY", "slack,webhook"),
        (
            "TWOKEY_WEBHOOK_URL",
            "https://tickets.internal/hooks/twokey",
        ),
        ("TWOKEY_HTTP_LISTEN", "0.0.0.0:7404"),
    ]);
    assert_eq!(config["http_listen"].as_str(), Some("0.0.0.0:7404"));
    let notify = config["notify"].as_table().unwrap();
    assert!(notify.get("mailbox").is_none(), "{notify:?}");
    assert_eq!(
        notify["webhook"]["url"].as_str(),
        Some("https://tickets.internal/hooks/twokey")
    );
    assert_eq!(notify["webhook"]["send_pins"].as_bool(), Some(true));
    assert!(notify["slack"]["token_file"].as_str().is_some());
    assert!(!said.contains("for development only"), "{said}");
    assert!(said.contains("slack.token") && said.contains("webhook.secret"));

    let (config, _) = bootstrap(&[("TWOKEY_HTTP_LISTEN", "off")]);
    assert!(config.get("http_listen").is_none());
}
