//! A whole twokey system on loopback — audit, vault and broker as separate
//! processes with a development PKI, fresh keys, configs and a policy — for
//! `twokey demo` and for tests that run the CLI against the real services.
//!
//! Its people sign with their own OpenSSH keys (`pki/NAME.ssh`, named in
//! each CLI profile as `ssh_key`): alice requests, bob approves, olivia
//! operates, adam and anna are the admins (M = 2), carol audits. The admins'
//! keys are pinned in `admins.allowed_signers` (the `[consent]` root of trust
//! of vault and broker); consent policy version 1 (`consent-policy.toml`,
//! signed by adam and anna: `consent-policy.toml.NAME.sig`) is applied to the
//! vault with the broker's certificate right after the vault starts and
//! before the broker starts, so the broker loads it at start.
//!
//! Services listen on `127.0.0.1:0`; their addresses come from the
//! `twokey-<service> listening on ADDR` line each prints once it serves, so
//! there are no fixed ports and no sleeps. Dropping [`LocalSystem`] stops the
//! processes it started.
//!
//! [`LocalSystem::start_reconciling`] also turns on audit's reconciler of
//! CloudTrail sign-ins (issue 20, docs/RECONCILE.md): a trail directory,
//! audit's HTTP listener for EventBridge posts (the vault's certificate
//! stands in for the relay that posts), the broker reading the findings
//! every second and, if given, a webhook the alerts go to.

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::Duration,
};

use twokey_consent::ssh_key::PrivateKey;
use twokey_proto::vault::v1::{ApplyPolicyRequest, vault_service_client::VaultServiceClient};
use twokey_runtime::keys::{SecretKey, encode_public_key, generate_signing_key};
use twokey_runtime::tls::TlsFiles;

use crate::{
    consent::{AccountRoles, Person, PolicySpec, admins_allowed_signers, sign_policy},
    ha::{READY_TIMEOUT, REPLICAS, Replicated, wait_serving_blocking},
    pki::{self, Addresses, UserRole, UserSpec},
    ready::spawn_service,
};

/// The trust domain of a local system.
pub const TRUST_DOMAIN: &str = "twokey.local";
/// The account a local system's policy names.
pub const ACCOUNT: &str = "aws-demo-root";
/// The users of a local system: (name, role).
pub const USERS: [(&str, UserRole); 6] = [
    ("alice", UserRole::Requester),
    ("bob", UserRole::Approver),
    ("olivia", UserRole::Operator),
    ("adam", UserRole::Admin),
    ("anna", UserRole::Admin),
    ("carol", UserRole::Auditor),
];
/// The admins of a local system, who sign its consent policy.
pub const ADMINS: [&str; 2] = ["adam", "anna"];
/// M: distinct admins a policy update or an admin action needs.
pub const ADMIN_THRESHOLD: u32 = 2;
/// Codes the local system's account may release per hour (the vault's rate).
pub const RELEASES_PER_HOUR: u32 = 60;
/// The AWS account id a reconciling local system maps [`ACCOUNT`] to.
pub const AWS_ACCOUNT_ID: &str = "123456789012";
/// The reconciler's source identity in a reconciling local system.
pub const RECONCILE_ID: &str = "spiffe://twokey.local/svc/reconcile";

/// What a reconciling local system adds (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct ReconcileOptions {
    /// A webhook URL (e.g. a test's server on 127.0.0.1) the broker sends
    /// notifications, reconciliation alerts included, to.
    pub webhook_url: Option<String>,
}

/// Consent policy version 1, in the system's directory; each admin's
/// signature beside it as `consent-policy.toml.NAME.sig`.
pub const CONSENT_POLICY_FILE: &str = "consent-policy.toml";
/// The pinned admin set (root of trust), in the system's directory.
pub const ADMINS_FILE: &str = "admins.allowed_signers";

/// How long a service may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running local system.
#[derive(Debug)]
pub struct LocalSystem {
    /// Where everything lives.
    pub dir: PathBuf,
    /// The CLI profile file `DIR/twokey.toml`: one profile per user in [`USERS`].
    pub config: PathBuf,
    /// `https://127.0.0.1:PORT` of the broker.
    pub broker: String,
    /// `https://127.0.0.1:PORT` of the vault.
    pub vault: String,
    /// `https://127.0.0.1:PORT` of the audit service.
    pub audit: String,
    /// The broker's mailbox directory (`<user>.jsonl` files).
    pub mailbox: PathBuf,
    /// The audit config, which `twokey audit verify --sources` reads.
    pub audit_config: PathBuf,
    /// The checkpoint verifier key for `twokey audit verify --checkpoint-key`.
    pub verifier_key: String,
    /// The pinned admins (`allowed_signers`) that vault and broker configs
    /// name in `[consent] admins_file`.
    pub admins_file: PathBuf,
    /// Consent policy version 1 as applied (signatures beside it as
    /// `consent-policy.toml.NAME.sig`).
    pub consent_policy: PathBuf,
    /// The directory audit's reconciler scans for CloudTrail log files
    /// (`AWSLogs/...` under it), when reconciling.
    pub cloudtrail_dir: PathBuf,
    /// `https://127.0.0.1:PORT` of audit's HTTP listener (EventBridge
    /// posts), when reconciling; empty otherwise.
    pub audit_http: String,
    /// The people, each with their SPIFFE ID and OpenSSH key pair (the
    /// private key is also at [`LocalSystem::ssh_key`]).
    people: Vec<Person>,
    children: Vec<(String, Child)>,
    /// Extra environment variables for every service (e.g. `OTEL_*`).
    env: Vec<(String, String)>,
    /// The databases and extra accounts of a replicated system
    /// ([`LocalSystem::start_replicated`]); `None` for one process each.
    replicated: Option<Replicated>,
    /// Each replica of a replicated system: its name (`vault-0`), kind
    /// (`vault`), config file and `https://ADDR`.
    replicas: Vec<ReplicaProcess>,
}

/// One replica's process of a replicated local system.
#[derive(Debug, Clone)]
struct ReplicaProcess {
    name: String,
    kind: String,
    config: PathBuf,
    address: String,
}

impl Drop for LocalSystem {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Why a local system could not be set up or started; the message names
/// the file or service and what to do.
#[derive(Debug)]
pub struct LocalError(String);

impl std::fmt::Display for LocalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LocalError {}

impl From<pki::PkiError> for LocalError {
    fn from(e: pki::PkiError) -> Self {
        Self(e.to_string())
    }
}

impl From<twokey_runtime::keys::KeyError> for LocalError {
    fn from(e: twokey_runtime::keys::KeyError) -> Self {
        Self(e.to_string())
    }
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LocalError {
    let path = path.display().to_string();
    move |e| LocalError(format!("cannot {action} {path}: {e}"))
}

fn write(path: &Path, text: &str) -> Result<(), LocalError> {
    std::fs::write(path, text).map_err(io("write", path))
}

/// Makes the checkpoint key with `twokey-audit init-key`, as an operator
/// would, and returns the verifier key it prints.
fn checkpoint_key(bin_dir: &Path, out: &Path, origin: &str) -> Result<String, LocalError> {
    let bin = bin_dir.join("twokey-audit");
    let output = Command::new(&bin)
        .args(["init-key", "--origin", origin, "--out"])
        .arg(out)
        .output()
        .map_err(|e| {
            LocalError(format!(
                "cannot run {}: {e} — build it first (cargo build -p twokey-audit)",
                bin.display()
            ))
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("verifier key: "))
        .map(|k| k.trim().to_owned())
        .ok_or_else(|| {
            LocalError(format!(
                "twokey-audit init-key printed no verifier key: {}",
                one_line(&String::from_utf8_lossy(&output.stderr))
            ))
        })
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl LocalSystem {
    /// Makes PKI, keys, configs and a policy in `dir` (which must be empty or
    /// missing) and starts audit, vault and broker from `bin_dir`.
    pub fn start(dir: &Path, bin_dir: &Path) -> Result<Self, LocalError> {
        Self::start_with_env(dir, bin_dir, Vec::new())
    }

    /// Like [`LocalSystem::start`], with extra environment variables for
    /// every service (e.g. `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub fn start_with_env(
        dir: &Path,
        bin_dir: &Path,
        env: Vec<(String, String)>,
    ) -> Result<Self, LocalError> {
        Self::start_with(dir, bin_dir, env, None, None)
    }

    /// Like [`LocalSystem::start`], with [`REPLICAS`] processes of each
    /// service on PostgreSQL (`replicated`'s databases, see
    /// [`crate::ha::databases`]): `audit-0`, `audit-1`, `vault-0`, … each
    /// with its own config file `DIR/NAME.toml` (its own data directory and
    /// the service's `[store]`), listen port and log `logs/NAME.log`, the
    /// same keys. [`LocalSystem::audit`], [`LocalSystem::vault`] and
    /// [`LocalSystem::broker`] are the comma lists of both replicas' addresses,
    /// which is what each service's peer address and the CLI profiles name;
    /// the broker replicas share one mailbox directory. Returns once both
    /// vault replicas, both broker replicas and one audit replica (the
    /// sequencer) report SERVING.
    pub fn start_replicated(
        dir: &Path,
        bin_dir: &Path,
        replicated: Replicated,
    ) -> Result<Self, LocalError> {
        Self::start_with(dir, bin_dir, Vec::new(), None, Some(replicated))
    }

    /// Like [`LocalSystem::start`], with audit's reconciler on: consent
    /// policy version 1 maps [`ACCOUNT`] to [`AWS_ACCOUNT_ID`], audit scans
    /// [`LocalSystem::cloudtrail_dir`] every second and takes EventBridge
    /// posts from the vault's identity on [`LocalSystem::audit_http`], and
    /// the broker reads the findings every second.
    pub fn start_reconciling(
        dir: &Path,
        bin_dir: &Path,
        options: ReconcileOptions,
    ) -> Result<Self, LocalError> {
        Self::start_with(dir, bin_dir, Vec::new(), Some(options), None)
    }

    fn start_with(
        dir: &Path,
        bin_dir: &Path,
        env: Vec<(String, String)>,
        reconcile: Option<ReconcileOptions>,
        replicated: Option<Replicated>,
    ) -> Result<Self, LocalError> {
        if reconcile.is_some() && replicated.is_some() {
            return Err(LocalError(
                "a replicated local system has no reconciler: start one or the other".into(),
            ));
        }
        let pki_dir = dir.join("pki");
        let users: Vec<UserSpec> = USERS
            .iter()
            .map(|(name, role)| UserSpec {
                name: (*name).to_owned(),
                role: *role,
            })
            .collect();
        pki::init(
            &pki_dir,
            TRUST_DOMAIN,
            &users,
            false,
            Addresses {
                broker: "https://127.0.0.1:0",
                audit: "https://127.0.0.1:0",
            },
        )?;
        let people = USERS
            .iter()
            .map(|(name, role)| {
                let path = pki_dir.join(format!("{name}.ssh"));
                let key = PrivateKey::read_openssh_file(&path)
                    .map_err(|e| LocalError(format!("cannot read {}: {e}", path.display())))?;
                let kind = if *role == UserRole::Intake {
                    "svc"
                } else {
                    "user"
                };
                Ok(Person {
                    name: (*name).to_owned(),
                    ids: vec![format!("spiffe://{TRUST_DOMAIN}/{kind}/{name}")],
                    key,
                })
            })
            .collect::<Result<Vec<_>, LocalError>>()?;
        for sub in ["keys", "data", "logs"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(io("create", &p))?;
        }
        let keys = dir.join("keys");
        SecretKey::generate().write(&keys.join("master.key"))?;
        SecretKey::generate().write(&keys.join("pin.key"))?;
        let vault_event = generate_signing_key(&keys.join("vault-event.key"))?;
        let broker_event = generate_signing_key(&keys.join("broker-event.key"))?;
        let grant = generate_signing_key(&keys.join("grant.key"))?;
        let reconcile_key = match &reconcile {
            Some(_) => Some(generate_signing_key(&keys.join("reconcile.key"))?),
            None => None,
        };
        let origin = format!("{TRUST_DOMAIN}/audit");
        let verifier_key = checkpoint_key(bin_dir, &keys.join("checkpoint.key"), &origin)?;

        let td = TRUST_DOMAIN;
        let p = |name: &str| pki_dir.join(name).display().to_string();
        let k = |name: &str| keys.join(name).display().to_string();
        let d = |name: &str| dir.join("data").join(name).display().to_string();
        let tls = |svc: &str| {
            format!(
                "[tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n",
                p(&format!("{svc}.crt")),
                p(&format!("{svc}.key")),
                p("ca.crt")
            )
        };

        let mut system = LocalSystem {
            dir: dir.to_owned(),
            config: dir.join(pki::PROFILE_FILE),
            broker: String::new(),
            vault: String::new(),
            audit: String::new(),
            mailbox: dir.join("data/broker/mailbox"),
            audit_config: dir.join("audit.toml"),
            verifier_key,
            admins_file: dir.join(ADMINS_FILE),
            consent_policy: dir.join(CONSENT_POLICY_FILE),
            cloudtrail_dir: dir.join("cloudtrail"),
            audit_http: String::new(),
            people,
            children: Vec::new(),
            env,
            replicated,
            replicas: Vec::new(),
        };

        // The root of trust and consent policy version 1, signed by the
        // admins; applied once the vault serves.
        let admins: Vec<&Person> = ADMINS.iter().map(|n| system.person(n)).collect();
        write(&system.admins_file, &admins_allowed_signers(&admins))?;
        let mut spec = system.policy_spec();
        for account in system.extra_accounts() {
            let mut roles = AccountRoles::new(&account, "alice", "bob", "olivia");
            roles.releases_per_hour = RELEASES_PER_HOUR;
            spec.accounts.push(roles);
        }
        let mut document = spec.to_toml();
        if reconcile.is_some() {
            let section = format!("[accounts.{ACCOUNT}]\n");
            document = document.replace(
                &section,
                &format!("{section}aws_account_id = \"{AWS_ACCOUNT_ID}\"\n"),
            );
        }
        write(&system.consent_policy, &document)?;
        let mut signatures = Vec::new();
        for admin in &admins {
            let sig = sign_policy(&admin.key, td, &document);
            let path = dir.join(format!("{CONSENT_POLICY_FILE}.{}.sig", admin.name));
            std::fs::write(&path, &sig).map_err(io("write", &path))?;
            signatures.push(sig);
        }
        let consent_section = format!(
            "[consent]\nadmins_file = {:?}\nthreshold = {ADMIN_THRESHOLD}\n",
            system.admins_file.display().to_string()
        );

        let mut audit_config = String::new();
        if reconcile.is_some() {
            audit_config.push_str("http_listen = \"127.0.0.1:0\"\n");
        }
        audit_config.push_str(&format!(
            "listen = \"127.0.0.1:0\"\ntrust_domain = \"{td}\"\ndata_dir = {:?}\n\
                 checkpoint_key_file = {:?}\norigin = \"{origin}\"\n\
                 auditors = [\"spiffe://{td}/user/carol\"]\nlog_format = \"human\"\n{}\
                 [[sources]]\nid = \"spiffe://{td}/svc/vault\"\npublic_key = \"{}\"\n\
                 [[sources]]\nid = \"spiffe://{td}/svc/broker\"\npublic_key = \"{}\"\n",
            d("audit"),
            k("checkpoint.key"),
            tls("audit"),
            encode_public_key(&vault_event.verifying_key()),
            encode_public_key(&broker_event.verifying_key()),
        ));
        if let Some(key) = &reconcile_key {
            let trail = system.cloudtrail_dir.join("AWSLogs");
            std::fs::create_dir_all(&trail).map_err(io("create", &trail))?;
            audit_config.push_str(&format!(
                "[[sources]]\nid = \"{RECONCILE_ID}\"\npublic_key = \"{}\"\n\
                 [reconcile]\nsource_id = \"{RECONCILE_ID}\"\nkey_file = {:?}\n\
                 cloudtrail_dir = {:?}\nscan_interval = \"1s\"\n\
                 posters = [\"spiffe://{td}/svc/vault\"]\n\
                 readers = [\"spiffe://{td}/svc/broker\"]\n",
                encode_public_key(&key.verifying_key()),
                k("reconcile.key"),
                system.cloudtrail_dir.display().to_string(),
            ));
        }
        write(&system.audit_config, &audit_config)?;
        if reconcile.is_some() {
            let (grpc, http) = system.spawn_audit_with_http(bin_dir)?;
            system.audit = grpc;
            system.audit_http = http;
        } else if system.replicated.is_some() {
            system.audit = system
                .spawn_replicas(bin_dir, "audit", &audit_config, &d("audit"), 0..REPLICAS)?
                .join(",");
            system.audit_config = dir.join("audit-0.toml");
        } else {
            system.audit = system.spawn(bin_dir, "audit", &system.audit_config.clone())?;
        }

        let vault_config = dir.join("vault.toml");
        let vault_text = format!(
            "listen = \"127.0.0.1:0\"\ntrust_domain = \"{td}\"\ndata_dir = {:?}\n\
                 master_key_file = {:?}\nevent_key_file = {:?}\n\
                 broker_id = \"spiffe://{td}/svc/broker\"\ngrant_public_key = \"{}\"\n\
                 audit_address = \"{}\"\naudit_server_name = \"audit\"\n\
                 audit_checkpoint_key = \"{}\"\n\
                 audit_ack_timeout_ms = 5000\nlog_format = \"human\"\n{}{}",
            d("vault"),
            k("master.key"),
            k("vault-event.key"),
            encode_public_key(&grant.verifying_key()),
            system.audit,
            system.verifier_key,
            tls("vault"),
            consent_section,
        );
        write(&vault_config, &vault_text)?;
        if system.replicated.is_some() {
            // Policy version 1 is applied through the first replica before
            // the others start and load it from the database: a vault
            // replica reads the policy chain when it starts.
            let first = system.spawn_replicas(bin_dir, "vault", &vault_text, &d("vault"), 0..1)?;
            system.vault = first.join(",");
            system.apply_to_vault(&document, &signatures)?;
            let rest =
                system.spawn_replicas(bin_dir, "vault", &vault_text, &d("vault"), 1..REPLICAS)?;
            system.vault = first.into_iter().chain(rest).collect::<Vec<_>>().join(",");
        } else {
            system.vault = system.spawn(bin_dir, "vault", &vault_config)?;
            system.apply_to_vault(&document, &signatures)?;
        }

        let policy = dir.join("policy.toml");
        let mut policy_file = policy_text();
        for account in system.extra_accounts() {
            policy_file.push_str(&account_policy(&account));
        }
        write(&policy, &policy_file)?;
        let broker_config = dir.join("broker.toml");
        let mut broker_extra = String::new();
        let mut broker_top = String::new();
        if let Some(options) = &reconcile {
            broker_top.push_str("findings_interval = \"1s\"\n");
            if let Some(url) = &options.webhook_url {
                let secret = keys.join("webhook.secret");
                SecretKey::generate().write(&secret)?;
                broker_extra.push_str(&format!(
                    "[notify.webhook]\nurl = {url:?}\nsecret_file = {:?}\nsend_pins = false\n",
                    secret.display().to_string()
                ));
            }
        }
        let broker_text = format!(
            "{broker_top}listen = \"127.0.0.1:0\"\ntrust_domain = \"{td}\"\ndata_dir = {:?}\n\
                 policy_file = {:?}\ngrant_key_file = {:?}\nevent_key_file = {:?}\n\
                 pin_key_file = {:?}\nvault_address = \"{}\"\nvault_server_name = \"vault\"\n\
                 audit_address = \"{}\"\naudit_server_name = \"audit\"\n\
                 audit_checkpoint_key = \"{}\"\nlog_format = \"human\"\n\
                 {}{}[notify.mailbox]\ndir = {:?}\n{broker_extra}",
            d("broker"),
            policy.display().to_string(),
            k("grant.key"),
            k("broker-event.key"),
            k("pin.key"),
            system.vault,
            system.audit,
            system.verifier_key,
            tls("broker"),
            consent_section,
            system.mailbox.display().to_string(),
        );
        write(&broker_config, &broker_text)?;
        system.broker = if system.replicated.is_some() {
            system
                .spawn_replicas(bin_dir, "broker", &broker_text, &d("broker"), 0..REPLICAS)?
                .join(",")
        } else {
            system.spawn(bin_dir, "broker", &broker_config)?
        };

        // Profiles with the real addresses; pki init's file, beside the
        // certificates, has none.
        let stale = pki_dir.join(pki::PROFILE_FILE);
        std::fs::remove_file(&stale).map_err(io("replace", &stale))?;
        pki::write_profiles(
            &system.config,
            "pki/",
            &users,
            Addresses {
                broker: &system.broker,
                audit: &system.audit,
            },
        )?;
        Ok(system)
    }

    /// Starts `twokey-<svc> serve --config CONFIG` and waits for its
    /// listening line; returns `https://ADDR`.
    fn spawn(&mut self, bin_dir: &Path, svc: &str, config: &Path) -> Result<String, LocalError> {
        self.spawn_on(bin_dir, svc, svc, config, None)
    }

    /// The accounts a replicated system has besides [`ACCOUNT`].
    fn extra_accounts(&self) -> Vec<String> {
        self.replicated
            .as_ref()
            .map(|r| r.accounts.clone())
            .unwrap_or_default()
    }

    /// Starts replicas `which` (of [`REPLICAS`]) of service `kind`, each
    /// with `text` as its config but its own data directory (`data/NAME` for
    /// the `data_dir` `data` in `text`) and the service's `[store]` section;
    /// waits until they report SERVING (one of the audit replicas: the
    /// sequencer) and returns their addresses.
    fn spawn_replicas(
        &mut self,
        bin_dir: &Path,
        kind: &str,
        text: &str,
        data: &str,
        which: std::ops::Range<usize>,
    ) -> Result<Vec<String>, LocalError> {
        let store = self
            .replicated
            .as_ref()
            .expect("a replicated system")
            .store(kind)
            .section();
        let data_line = format!("data_dir = {data:?}\n");
        if !text.contains(&data_line) {
            return Err(LocalError(format!(
                "the {kind} config names no data_dir {data:?}"
            )));
        }
        let mut addresses = Vec::new();
        for i in which.clone() {
            let name = format!("{kind}-{i}");
            let own = self.dir.join("data").join(&name).display().to_string();
            let config = self.dir.join(format!("{name}.toml"));
            let own_text = text.replace(&data_line, &format!("data_dir = {own:?}\n")) + &store;
            write(&config, &own_text)?;
            let address = self.spawn_on(bin_dir, &name, kind, &config, None)?;
            self.replicas.push(ReplicaProcess {
                name,
                kind: kind.to_owned(),
                config,
                address: address.clone(),
            });
            addresses.push(address);
        }
        let at_least = if kind == "audit" { 1 } else { which.len() };
        wait_serving_blocking(
            &self.dir.join("pki"),
            kind,
            &addresses,
            at_least,
            READY_TIMEOUT,
        )
        .map_err(|e| {
            let tails: Vec<String> = which
                .map(|i| {
                    let log = self.dir.join("logs").join(format!("{kind}-{i}.log"));
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    let last: Vec<&str> = text.lines().rev().take(5).collect();
                    format!("{kind}-{i}: {}", one_line(&last.join(" | ")))
                })
                .collect();
            LocalError(format!("{e}; the logs end: {}", tails.join("; ")))
        })?;
        Ok(addresses)
    }

    /// The names of service `kind`'s replicas (`vault-0`, `vault-1`) in a
    /// replicated system; `[kind]` otherwise.
    pub fn replica_names(&self, kind: &str) -> Vec<String> {
        if self.replicated.is_none() {
            return vec![kind.to_owned()];
        }
        self.replicas
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| r.name.clone())
            .collect()
    }

    /// `https://ADDR` of each of service `kind`'s replicas, in the order of
    /// [`LocalSystem::replica_names`].
    pub fn replica_addresses(&self, kind: &str) -> Vec<String> {
        if self.replicated.is_none() {
            return vec![match kind {
                "audit" => self.audit.clone(),
                "vault" => self.vault.clone(),
                _ => self.broker.clone(),
            }];
        }
        self.replicas
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| r.address.clone())
            .collect()
    }

    fn spawn_on(
        &mut self,
        bin_dir: &Path,
        svc: &str,
        kind: &str,
        config: &Path,
        listen: Option<&str>,
    ) -> Result<String, LocalError> {
        let bin = bin_dir.join(format!("twokey-{kind}"));
        let log = self.dir.join("logs").join(format!("{svc}.log"));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io("create", &log))?;
        let mut command = Command::new(&bin);
        command.args(["serve", "--config"]).arg(config);
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(addr) = listen {
            command.args(["--listen", addr]);
        }
        let (child, rx) =
            spawn_service(command, &format!("twokey-{kind}"), log_file).map_err(|e| {
                LocalError(format!(
                    "cannot start {}: {e} — build it first (cargo build -p twokey-{kind})",
                    bin.display()
                ))
            })?;
        self.children.push((svc.to_owned(), child));
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(Some((addr, _))) => Ok(format!("https://{addr}")),
            _ => {
                let mut text = String::new();
                let _ = std::fs::File::open(&log).and_then(|mut f| f.read_to_string(&mut text));
                // The last line that says something: skip backtrace notes.
                let last = text
                    .lines()
                    .rev()
                    .find(|l| {
                        !l.trim().is_empty()
                            && !l.starts_with(' ')
                            && !l.starts_with("note:")
                            && !l.starts_with("stack backtrace")
                            && !l.starts_with("thread '")
                    })
                    .unwrap_or("no output")
                    .to_owned();
                Err(LocalError(format!(
                    "twokey-{svc} did not start: {} (log {})",
                    one_line(&last),
                    log.display()
                )))
            }
        }
    }

    /// Starts audit with its HTTP listener and waits for both listening
    /// lines; returns `https://ADDR` of each (gRPC, HTTP).
    fn spawn_audit_with_http(&mut self, bin_dir: &Path) -> Result<(String, String), LocalError> {
        use std::io::BufRead;
        let bin = bin_dir.join("twokey-audit");
        let log = self.dir.join("logs").join("audit.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io("create", &log))?;
        let mut command = Command::new(&bin);
        command
            .args(["serve", "--config"])
            .arg(&self.audit_config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env_remove("RUST_LOG")
            .env_remove("TWOKEY_LOG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(log_file);
        let mut child = command.spawn().map_err(|e| {
            LocalError(format!(
                "cannot start {}: {e} — build it first (cargo build -p twokey-audit)",
                bin.display()
            ))
        })?;
        let stdout = child.stdout.take().expect("piped stdout");
        self.children.push(("audit".to_owned(), child));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = std::io::BufReader::new(stdout);
            let (mut grpc, mut http) = (None, None);
            let mut line = String::new();
            while grpc.is_none() || http.is_none() {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(None);
                        return;
                    }
                    Ok(_) => {
                        let text = line.clone();
                        if let Some(a) = crate::ready::announced_addr(&text, "twokey-audit") {
                            grpc = Some(a.to_owned());
                        }
                        if let Some(a) = crate::ready::announced_addr(&text, "twokey-audit-http") {
                            http = Some(a.to_owned());
                        }
                    }
                }
            }
            let _ = tx.send(grpc.zip(http));
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(Some((grpc, http))) => Ok((format!("https://{grpc}"), format!("https://{http}"))),
            _ => {
                let mut text = String::new();
                let _ = std::fs::File::open(&log).and_then(|mut f| f.read_to_string(&mut text));
                Err(LocalError(format!(
                    "twokey-audit did not start with its HTTP listener: {} (log {})",
                    one_line(text.lines().last().unwrap_or("no output")),
                    log.display()
                )))
            }
        }
    }

    /// The people: each one's name, SPIFFE ID and OpenSSH key pair, in the
    /// order of [`USERS`].
    pub fn people(&self) -> &[Person] {
        &self.people
    }

    /// One person of [`USERS`] by name.
    ///
    /// # Panics
    /// If `name` is not one of [`USERS`].
    pub fn person(&self, name: &str) -> &Person {
        self.people
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("{name} is not a person of the local system"))
    }

    /// `pki/NAME.ssh`: the person's OpenSSH private key (unencrypted, mode
    /// 0600; the public key beside it as `NAME.ssh.pub`), which their CLI
    /// profile names as `ssh_key`.
    pub fn ssh_key(&self, name: &str) -> PathBuf {
        self.dir.join("pki").join(format!("{name}.ssh"))
    }

    /// The spec of consent policy version 1: every person with their key,
    /// the admins [`ADMINS`] with threshold [`ADMIN_THRESHOLD`], and
    /// [`ACCOUNT`] with alice requesting, bob approving (one approval),
    /// olivia operating, one code per request, [`RELEASES_PER_HOUR`] an
    /// hour. Bump `version` and change it to make the next version.
    pub fn policy_spec(&self) -> PolicySpec {
        local_policy_spec(&self.people)
    }

    /// Signs `spec`'s document as each of `signers` (names of [`USERS`])
    /// and applies it to the vault directly, presenting the broker's
    /// certificate (as the broker's own ApplyPolicy does). The broker picks
    /// the new version up when a statement names it.
    pub fn apply_policy(&self, spec: &PolicySpec, signers: &[&str]) -> Result<(), LocalError> {
        let document = spec.to_toml();
        let signatures: Vec<Vec<u8>> = signers
            .iter()
            .map(|n| sign_policy(&self.person(n).key, TRUST_DOMAIN, &document))
            .collect();
        self.apply_to_vault(&document, &signatures)
    }

    /// Hands a policy document and its signatures to the vault's
    /// ApplyPolicy over mTLS with the broker's certificate (on a thread of
    /// its own, so that callers inside an async runtime may use it).
    pub fn apply_to_vault(&self, document: &str, signatures: &[Vec<u8>]) -> Result<(), LocalError> {
        let tls = TlsFiles::in_dir(&self.dir.join("pki"), "broker");
        let address = self.vault.clone();
        let request = ApplyPolicyRequest {
            document: document.to_owned(),
            signatures: signatures.to_vec(),
        };
        let apply = move || -> Result<(), LocalError> {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| LocalError(format!("cannot start a runtime: {e}")))?;
            runtime.block_on(async {
                let channel = tls
                    .channel(&address, "vault")
                    .map_err(|e| LocalError(format!("cannot dial the vault at {address}: {e}")))?;
                VaultServiceClient::new(channel)
                    .apply_policy(request)
                    .await
                    .map(|_| ())
                    .map_err(|s| {
                        LocalError(format!(
                            "the vault at {address} did not apply the consent policy: {:?}: {}",
                            s.code(),
                            s.message()
                        ))
                    })
            })
        };
        std::thread::scope(|scope| {
            scope
                .spawn(apply)
                .join()
                .unwrap_or_else(|_| Err(LocalError("applying the consent policy panicked".into())))
        })
    }

    /// Every PIN the broker's mailbox holds for `user` and `request_id`,
    /// oldest first.
    pub fn pins_for(&self, user: &str, request_id: &str) -> Vec<String> {
        let Ok(text) = std::fs::read_to_string(self.mailbox.join(format!("{user}.jsonl"))) else {
            return Vec::new();
        };
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["request_id"] == request_id)
            .filter_map(|v| v["pin"].as_str().map(str::to_owned))
            .collect()
    }

    /// The newest PIN the broker's mailbox holds for `user` and `request_id`.
    pub fn pin_for(&self, user: &str, request_id: &str) -> Option<String> {
        self.pins_for(user, request_id).pop()
    }

    /// Waits, at most 10 s, until the mailbox holds more than `seen` PINs
    /// for `user` and `request_id` (the broker's notifier delivers them
    /// asynchronously), and returns the newest. `seen` is 0 for the first PIN,
    /// 1 for the one after a resend.
    pub fn wait_for_pin(&self, user: &str, request_id: &str, seen: usize) -> Option<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut pins = self.pins_for(user, request_id);
            if pins.len() > seen {
                return pins.pop();
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id of a running service (`audit`, `vault` or `broker`)
    /// this system started, for tests that signal or measure it.
    pub fn pid(&self, svc: &str) -> Option<u32> {
        self.children
            .iter()
            .find(|(name, _)| name == svc)
            .map(|(_, child)| child.id())
    }

    /// How service `svc` ended, if it has exited by itself (it is then no
    /// longer counted as running).
    pub fn exited(&mut self, svc: &str) -> Option<std::process::ExitStatus> {
        let status = self
            .children
            .iter_mut()
            .filter(|(name, _)| name == svc)
            .find_map(|(_, child)| child.try_wait().ok().flatten())?;
        self.children.retain(|(name, _)| name != svc);
        Some(status)
    }

    /// Kills one service (`audit`, `vault` or `broker`) with SIGKILL, as a
    /// crash would.
    pub fn kill(&mut self, svc: &str) {
        for (_, child) in self.children.iter_mut().filter(|(name, _)| name == svc) {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.children.retain(|(name, _)| name != svc);
    }

    /// Starts a killed service (or replica, by its name: `vault-1`) again,
    /// with the same config and data, on the address it had, so the others
    /// reach it where they expect it.
    pub fn restart(&mut self, bin_dir: &Path, svc: &str) -> Result<(), LocalError> {
        if let Some(r) = self.replicas.iter().find(|r| r.name == svc).cloned() {
            let listen = r.address.trim_start_matches("https://").to_owned();
            self.spawn_on(bin_dir, &r.name, &r.kind, &r.config, Some(&listen))?;
            return Ok(());
        }
        let address = match svc {
            "audit" => self.audit.clone(),
            "vault" => self.vault.clone(),
            _ => self.broker.clone(),
        };
        let listen = address.trim_start_matches("https://").to_owned();
        let config = self.dir.join(format!("{svc}.toml"));
        self.spawn_on(bin_dir, svc, svc, &config, Some(&listen))?;
        Ok(())
    }

    /// Stops every service this system started (SIGKILL to each child).
    pub fn stop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.children.clear();
    }

    /// Leaves the services running after this value is dropped; returns
    /// their process ids (service name, pid).
    pub fn detach(mut self) -> Vec<(String, u32)> {
        self.children
            .drain(..)
            .map(|(name, child)| (name, child.id()))
            .collect()
    }
}

/// Consent policy version 1 of a local system for `people` (see
/// [`LocalSystem::policy_spec`]).
pub fn local_policy_spec(people: &[Person]) -> PolicySpec {
    let mut account = AccountRoles::new(ACCOUNT, "alice", "bob", "olivia");
    account.releases_per_hour = RELEASES_PER_HOUR;
    PolicySpec {
        version: 1,
        trust_domain: TRUST_DOMAIN.to_owned(),
        people: people
            .iter()
            .map(|p| (p.name.clone(), p.ids.clone(), p.public().clone()))
            .collect(),
        admins: ADMINS.iter().map(|a| (*a).to_owned()).collect(),
        threshold: ADMIN_THRESHOLD,
        accounts: vec![account],
    }
}

/// The broker's policy section of `account`, with the same groups and
/// rules as [`ACCOUNT`]'s in [`policy_text`].
pub fn account_policy(account: &str) -> String {
    format!(
        "\n[accounts.{account}]\nrequesters = [\"requesters\"]\napprovers = [\"approvers\"]\n\
         operators = [\"operators\"]\nadmins = [\"adam\", \"anna\"]\napprovals_required = 1\n\
         request_ttl = \"1h\"\nrelease_window = \"15m\"\ncodes_per_request = 1\n"
    )
}

/// The broker's own policy of a local system (roles, groups, routing): one
/// account, one person per role, adam and anna its admins.
pub fn policy_text() -> String {
    let td = TRUST_DOMAIN;
    let mut s = String::from("[identities]\n");
    for (name, _) in USERS {
        s.push_str(&format!("{name} = \"spiffe://{td}/user/{name}\"\n"));
    }
    s.push_str(&format!(
        "\n[groups]\nrequesters = [\"alice\"]\napprovers = [\"bob\"]\noperators = [\"olivia\"]\n\n\
         [accounts.{ACCOUNT}]\nrequesters = [\"requesters\"]\napprovers = [\"approvers\"]\n\
         operators = [\"operators\"]\nadmins = [\"adam\", \"anna\"]\napprovals_required = 1\n\
         request_ttl = \"1h\"\nrelease_window = \"15m\"\ncodes_per_request = 1\n"
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use twokey_consent::{Role, TrustRoot, verify_policy_update};

    #[test]
    fn the_local_policy_verifies_under_the_pinned_admins_with_both_signatures() {
        let people: Vec<Person> = USERS
            .iter()
            .map(|(n, _)| Person::generate(n, vec![format!("spiffe://{TRUST_DOMAIN}/user/{n}")]))
            .collect();
        let spec = local_policy_spec(&people);
        let doc = spec.to_toml();
        let admins: Vec<&Person> = people
            .iter()
            .filter(|p| ADMINS.contains(&p.name.as_str()))
            .collect();
        let root = TrustRoot::from_allowed_signers(
            TRUST_DOMAIN,
            &admins_allowed_signers(&admins),
            ADMIN_THRESHOLD,
        )
        .unwrap();
        let one = [sign_policy(&admins[0].key, TRUST_DOMAIN, &doc)];
        assert!(verify_policy_update(None, &root, doc.as_bytes(), &one).is_err());
        let both: Vec<Vec<u8>> = admins
            .iter()
            .map(|a| sign_policy(&a.key, TRUST_DOMAIN, &doc))
            .collect();
        let v = verify_policy_update(None, &root, doc.as_bytes(), &both).unwrap();
        assert_eq!(v.version(), 1);
        assert_eq!(v.role_holders(ACCOUNT, Role::Requester), ["alice"]);
        assert_eq!(v.role_holders(ACCOUNT, Role::Approver), ["bob"]);
        assert_eq!(v.role_holders(ACCOUNT, Role::Operator), ["olivia"]);
        assert_eq!(v.role_holders(ACCOUNT, Role::Admin), ["adam", "anna"]);
        let account = v.account(ACCOUNT).unwrap();
        assert_eq!(account.release_rate.max, RELEASES_PER_HOUR);
        // The broker's own policy names the same admins.
        assert!(policy_text().contains("admins = [\"adam\", \"anna\"]"));
    }
}
