//! The bench's world in a temp dir: a development CA (`DevCa`), a certificate
//! per service, per user and per benchmark audit source, every key, the
//! people's OpenSSH keys (alice requests, bob approves, olivia operates, adam
//! and anna are the pinned admins, M = 2), the service configs (TOML, as an
//! operator would write them, `[consent]` pinning adam and anna), the
//! broker's role policy and the admin-signed consent policy the vault holds;
//! with `--store postgres` also the throwaway PostgreSQL server each service's
//! `[store]` section names.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::postgres::{BenchPostgres, Store, Stores};
use anyhow::{Context, Result, ensure};
use ed25519_dalek::SigningKey;
use tonic::transport::Channel;
use twokey_proto::vault::v1::{ApplyPolicyRequest, vault_service_client::VaultServiceClient};
use twokey_runtime::{
    SpiffeId,
    events::EventSigner,
    keys::{SecretKey, encode_public_key, generate_signing_key},
    tls::TlsFiles,
};
use twokey_testkit::{
    consent::{AccountRoles, Person, PolicySpec, admins_allowed_signers, sign_policy, write_key},
    pki::{DevCa, LeafSpec},
};

/// Trust domain of the bench's PKI.
pub const TD: &str = "twokey.bench";
/// Prefix of the accounts the `GenerateCode` scenario releases codes of.
pub const CODE_ACCOUNTS: &str = "bench-code";
/// Prefix of the accounts the flow scenario releases codes of (the policy
/// names them).
pub const FLOW_ACCOUNTS: &str = "bench-flow";
/// Audit sources beyond vault and broker that the Append scenarios use.
pub const SOURCES: usize = 8;
/// The source that fills logs for the scaling runs.
pub const FILL_SOURCE: &str = "fill";

/// Codes an account may release an hour under the bench's signed policy:
/// the policy's maximum, so that the rate never bounds a run (each code
/// has an account of its own anyway, see `scenario::vault`).
pub const RELEASES_PER_HOUR: u32 = 1000;

/// Largest signed policy the bench sends: its document and signatures go
/// to the vault in one gRPC message of at most 256 KiB.
pub const MAX_POLICY_DOCUMENT: usize = 240 * 1024;

/// The people of the signed policy, each with their own `ssh-ed25519` key.
#[derive(Debug, Clone)]
pub struct BenchPeople {
    /// Requester.
    pub alice: Person,
    /// Approver.
    pub bob: Person,
    /// Operator.
    pub olivia: Person,
    /// Admin.
    pub adam: Person,
    /// Admin.
    pub anna: Person,
}

impl BenchPeople {
    fn generate() -> Self {
        let p = |n: &str| Person::generate(n, vec![format!("spiffe://{TD}/user/{n}")]);
        Self {
            alice: p("alice"),
            bob: p("bob"),
            olivia: p("olivia"),
            adam: p("adam"),
            anna: p("anna"),
        }
    }

    fn all(&self) -> [&Person; 5] {
        [&self.alice, &self.bob, &self.olivia, &self.adam, &self.anna]
    }
}

/// Everything on disk, removed when dropped.
#[derive(Debug)]
pub struct World {
    /// The temp dir.
    pub tmp: tempfile::TempDir,
    /// Certificates and keys.
    pub pki: PathBuf,
    /// The broker's grant key (the bench signs grants with it too).
    pub grant_key: SigningKey,
    /// Signers of the benchmark sources `svc/src-0` … and `svc/fill`.
    pub sources: Vec<EventSigner>,
    /// The fill source.
    pub fill: Arc<EventSigner>,
    /// The people who sign statements and the policy.
    pub people: Arc<BenchPeople>,
    /// Where each service keeps its state.
    pub stores: Stores,
    /// The PostgreSQL server when a service runs on it.
    pub postgres: Option<BenchPostgres>,
}

fn source_name(i: usize) -> String {
    format!("src-{i}")
}

/// SPIFFE ID of a service or source name.
pub fn svc_id(name: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://{TD}/svc/{name}")).expect("valid SPIFFE ID")
}

impl World {
    /// Makes the PKI, keys and configs, with a policy naming
    /// `policy_accounts`, and starts PostgreSQL when `stores` names it.
    pub fn new(policy_accounts: &[String], stores: Stores) -> Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tmp = tempfile::Builder::new().prefix("twokey-bench-").tempdir()?;
        let pki = tmp.path().join("pki");
        std::fs::create_dir_all(&pki)?;
        let ca = DevCa::new(TD)?;
        ca.write(&pki)?;
        for svc in ["vault", "broker", "audit"] {
            ca.issue_service(TD, svc)?.write(&pki, svc)?;
        }
        for user in ["alice", "bob", "olivia", "adam", "carol"] {
            ca.issue_user(TD, user)?.write(&pki, user)?;
        }
        let mut sources = Vec::new();
        for i in 0..SOURCES {
            let name = source_name(i);
            ca.issue(&LeafSpec::new(svc_id(&name).as_str()))?
                .write(&pki, &name)?;
            let key = generate_signing_key(&pki.join(format!("{name}-event.key")))?;
            sources.push(EventSigner::new(svc_id(&name), key));
        }
        let fill_key = generate_signing_key(&pki.join("fill-event.key"))?;
        let fill = Arc::new(EventSigner::new(svc_id(FILL_SOURCE), fill_key));
        SecretKey::generate().write(&pki.join("master.key"))?;
        SecretKey::generate().write(&pki.join("pin.key"))?;
        generate_signing_key(&pki.join("checkpoint.key"))?;
        let grant_key = generate_signing_key(&pki.join("grant.key"))?;
        let people = BenchPeople::generate();
        for p in people.all() {
            write_key(&pki, &p.name, &p.key)?;
        }
        std::fs::write(
            pki.join("admins.allowed_signers"),
            admins_allowed_signers(&[&people.adam, &people.anna]),
        )?;
        let postgres = if stores.any_postgres() {
            Some(BenchPostgres::start(tmp.path())?)
        } else {
            None
        };
        let world = Self {
            tmp,
            pki,
            grant_key,
            sources,
            fill,
            people: Arc::new(people),
            stores,
            postgres,
        };
        world.write_configs(policy_accounts)?;
        Ok(world)
    }

    /// The temp dir.
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// Leaves the temp dir in place when the bench ends, and says where.
    pub fn keep(&mut self) {
        self.tmp.disable_cleanup(true);
        eprintln!("twokey-bench: keeping {}", self.tmp.path().display());
    }

    /// TLS files of `name` (service, user or source).
    pub fn tls(&self, name: &str) -> TlsFiles {
        TlsFiles::in_dir(&self.pki, name)
    }

    /// A lazily connecting mTLS channel to `address` as `name`.
    pub fn channel(&self, name: &str, address: &str, server: &str) -> Result<Channel> {
        self.tls(name)
            .channel(address, server)
            .with_context(|| format!("channel to {address} as {name}"))
    }

    fn tls_section(&self, name: &str) -> String {
        let t = self.tls(name);
        format!(
            "[tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n",
            t.cert.display().to_string(),
            t.key.display().to_string(),
            t.ca.display().to_string()
        )
    }

    fn key(&self, name: &str) -> String {
        self.pki.join(name).display().to_string()
    }

    /// The `[consent]` section of the vault's and the broker's config.
    fn consent_section(&self) -> String {
        format!(
            "[consent]\nadmins_file = {:?}\nthreshold = 2\n",
            self.key("admins.allowed_signers")
        )
    }

    /// Consent policy version 1 naming `accounts` (alice requests, bob
    /// approves, olivia operates; one approval, one code per request,
    /// [`RELEASES_PER_HOUR`]), signed by adam and anna.
    pub fn signed_policy(&self, accounts: &[String]) -> Result<ApplyPolicyRequest> {
        let p = &self.people;
        let roles = accounts
            .iter()
            .map(|a| AccountRoles {
                releases_per_hour: RELEASES_PER_HOUR,
                ..AccountRoles::new(a, "alice", "bob", "olivia")
            })
            .collect();
        let document = PolicySpec::adam_and_anna(1, TD, &p.all(), roles).to_toml();
        ensure!(
            document.len() <= MAX_POLICY_DOCUMENT,
            "a signed policy naming {} accounts is {} bytes, more than one gRPC message carries ({MAX_POLICY_DOCUMENT}); \
             every code needs an account of its own, so run with fewer --codes, --flows or --concurrent-flows",
            accounts.len(),
            document.len()
        );
        let signatures = [&p.adam, &p.anna]
            .iter()
            .map(|a| sign_policy(&a.key, TD, &document))
            .collect();
        Ok(ApplyPolicyRequest {
            document,
            signatures,
        })
    }

    /// Applies [`World::signed_policy`] for `accounts` to the vault (called
    /// as the broker, the vault's only client); the broker picks it up
    /// when the first statement names it.
    pub async fn apply_policy(
        &self,
        vault: &VaultServiceClient<Channel>,
        accounts: &[String],
    ) -> Result<()> {
        vault
            .clone()
            .apply_policy(self.signed_policy(accounts)?)
            .await
            .context("applying the signed policy")?;
        Ok(())
    }

    /// The `[store]` section of `service`'s config: empty on sled (the
    /// default), the service's own database on PostgreSQL.
    pub fn store_section(&self, service: &str) -> String {
        match (&self.postgres, self.stores.of(service)) {
            (Some(pg), Store::Postgres) => pg.store_section(service),
            _ => String::new(),
        }
    }

    /// Writes `audit.toml` for a log in `data_dir`, naming every source, on
    /// the tile store (the scaling run fills tiles directly).
    pub fn write_audit_config(&self, file: &Path, data_dir: &Path) -> Result<()> {
        self.write_audit_config_on(file, data_dir, "")
    }

    /// [`World::write_audit_config`] with `store` (a `[store]` section)
    /// after the rest.
    fn write_audit_config_on(&self, file: &Path, data_dir: &Path, store: &str) -> Result<()> {
        let public = |key: &str| -> Result<String> {
            let k = twokey_runtime::keys::load_signing_key(&self.pki.join(key))?;
            Ok(encode_public_key(&k.verifying_key()))
        };
        let mut text = format!(
            "listen = \"127.0.0.1:0\"\ntrust_domain = \"{TD}\"\ndata_dir = {:?}\n\
             checkpoint_key_file = {:?}\norigin = \"{TD}/audit\"\n\
             auditors = [\"spiffe://{TD}/user/carol\"]\nlog_format = \"human\"\n{}",
            data_dir.display().to_string(),
            self.key("checkpoint.key"),
            self.tls_section("audit"),
        );
        let mut sources = vec![
            ("vault".to_owned(), public("vault-event.key")?),
            ("broker".to_owned(), public("broker-event.key")?),
            (
                FILL_SOURCE.to_owned(),
                encode_public_key(&self.fill.verifying_key()),
            ),
        ];
        for (i, s) in self.sources.iter().enumerate() {
            sources.push((source_name(i), encode_public_key(&s.verifying_key())));
        }
        for (name, key) in sources {
            text.push_str(&format!(
                "[[sources]]\nid = \"{}\"\npublic_key = \"{key}\"\n",
                svc_id(&name)
            ));
        }
        text.push_str(store);
        std::fs::write(file, text)?;
        Ok(())
    }

    /// Path of a service's config file.
    pub fn config(&self, svc: &str) -> PathBuf {
        self.dir().join(format!("{svc}.toml"))
    }

    /// Data directory of a service.
    pub fn data(&self, svc: &str) -> PathBuf {
        self.dir().join("data").join(svc)
    }

    /// The broker's mailbox directory.
    pub fn mailbox(&self) -> PathBuf {
        self.dir().join("mailbox")
    }

    fn write_configs(&self, policy_accounts: &[String]) -> Result<()> {
        generate_signing_key(&self.pki.join("vault-event.key"))?;
        generate_signing_key(&self.pki.join("broker-event.key"))?;
        self.write_audit_config_on(
            &self.config("audit"),
            &self.data("audit"),
            &self.store_section("audit"),
        )?;
        let policy = self.dir().join("policy.toml");
        std::fs::write(&policy, policy_text(policy_accounts))?;
        Ok(())
    }

    /// Writes the vault config, pointing at the audit service at `audit`.
    pub fn write_vault_config(&self, audit: &str, listen: &str) -> Result<()> {
        let text = format!(
            "listen = \"{listen}\"\ntrust_domain = \"{TD}\"\ndata_dir = {:?}\n\
             master_key_file = {:?}\nevent_key_file = {:?}\n\
             broker_id = \"spiffe://{TD}/svc/broker\"\ngrant_public_key = \"{}\"\n\
             audit_address = \"{audit}\"\naudit_server_name = \"audit\"\n\
             audit_ack_timeout_ms = 5000\nlog_format = \"human\"\n{}{}{}",
            self.data("vault").display().to_string(),
            self.key("master.key"),
            self.key("vault-event.key"),
            encode_public_key(&self.grant_key.verifying_key()),
            self.tls_section("vault"),
            self.consent_section(),
            self.store_section("vault"),
        );
        std::fs::write(self.config("vault"), text)?;
        Ok(())
    }

    /// Writes the broker config, pointing at `vault` and `audit`.
    pub fn write_broker_config(&self, vault: &str, audit: &str) -> Result<()> {
        let text = format!(
            "listen = \"127.0.0.1:0\"\ntrust_domain = \"{TD}\"\ndata_dir = {:?}\n\
             policy_file = {:?}\ngrant_key_file = {:?}\nevent_key_file = {:?}\n\
             pin_key_file = {:?}\nvault_address = \"{vault}\"\nvault_server_name = \"vault\"\n\
             audit_address = \"{audit}\"\naudit_server_name = \"audit\"\nlog_format = \"human\"\n\
             {}[notify.mailbox]\ndir = {:?}\n{}{}",
            self.data("broker").display().to_string(),
            self.dir().join("policy.toml").display().to_string(),
            self.key("grant.key"),
            self.key("broker-event.key"),
            self.key("pin.key"),
            self.tls_section("broker"),
            self.mailbox().display().to_string(),
            self.consent_section(),
            self.store_section("broker"),
        );
        std::fs::write(self.config("broker"), text)?;
        Ok(())
    }
}

/// `accounts`, each with one person per role, one approval, one code per
/// request.
pub fn policy_text(accounts: &[String]) -> String {
    let mut s = String::from("[identities]\n");
    for name in ["alice", "bob", "olivia", "adam", "carol"] {
        s.push_str(&format!("{name} = \"spiffe://{TD}/user/{name}\"\n"));
    }
    s.push_str(
        "\n[groups]\nrequesters = [\"alice\"]\napprovers = [\"bob\"]\noperators = [\"olivia\"]\n",
    );
    for account in accounts {
        s.push_str(&format!(
            "\n[accounts.{account}]\nrequesters = [\"requesters\"]\napprovers = [\"approvers\"]\n\
             operators = [\"operators\"]\nadmins = [\"adam\"]\napprovals_required = 1\n\
             request_ttl = \"1h\"\nrelease_window = \"15m\"\ncodes_per_request = 1\n"
        ));
    }
    s
}
