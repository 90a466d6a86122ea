//! A small world for the table tests: people with generated ed25519 keys, a
//! pinned admin set, a policy signed by it, and a builder for release
//! evidence whose every part a test can bend.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use twokey_consent::ssh_key::{Algorithm, PrivateKey};
use twokey_consent::statement::{
    AdminActionBinding, ApprovalBinding, ReleaseBinding, RequestBinding,
};
use twokey_consent::{
    AdminAction, Binding, MemoryHistory, Person, SignedStatement, TrustRoot, VerifiedPolicy,
    consent_namespace, encode_statement, new_statement, policy_namespace, reason_digest, sshsig,
    statement_digest, verify_policy_update,
};

pub const TD: &str = "example.org";
pub const ACCOUNT: &str = "aws-prod-root";

/// Everyone in the world; "mallory" is in no policy.
pub const NAMES: &[&str] = &[
    "alice", "bob", "carol", "rita", "adam", "anna", "ivan", "otto", "bpm", "mallory",
];

pub fn id(name: &str) -> String {
    match name {
        "bpm" => format!("spiffe://{TD}/svc/bpm"),
        _ => format!("spiffe://{TD}/user/{name}"),
    }
}

/// A second SPIFFE ID of the same person (same key).
pub fn alt_id(name: &str) -> String {
    format!("spiffe://{TD}/user/{name}-alt")
}

/// The reference time of the tests.
pub fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

pub fn at(secs: u64) -> SystemTime {
    t0() + Duration::from_secs(secs)
}

pub struct World {
    pub keys: BTreeMap<&'static str, PrivateKey>,
    pub root: TrustRoot,
    pub policy: VerifiedPolicy,
}

pub fn public(key: &PrivateKey) -> String {
    key.public_key().to_openssh().unwrap()
}

impl World {
    pub fn new() -> Self {
        let keys: BTreeMap<&'static str, PrivateKey> = NAMES
            .iter()
            .map(|&n| {
                (
                    n,
                    PrivateKey::random(&mut rand::rngs::OsRng, Algorithm::Ed25519).unwrap(),
                )
            })
            .collect();
        Self::with_keys(keys)
    }

    pub fn with_keys(keys: BTreeMap<&'static str, PrivateKey>) -> Self {
        let root = TrustRoot::new(
            TD,
            ["alice", "bob"]
                .iter()
                .map(|&n| Person::new(n, vec![id(n)], vec![keys[n].public_key().clone()]))
                .collect(),
            2,
        )
        .unwrap();
        let doc = policy_toml(&keys, 1, "");
        let ns = policy_namespace(TD);
        let sigs = vec![
            sshsig::sign(&keys["alice"], &ns, doc.as_bytes()).unwrap(),
            sshsig::sign(&keys["bob"], &ns, doc.as_bytes()).unwrap(),
        ];
        let policy = verify_policy_update(None, &root, doc.as_bytes(), &sigs).unwrap();
        Self { keys, root, policy }
    }

    pub fn key(&self, name: &str) -> String {
        public(&self.keys[name])
    }

    /// The policy document at `version`, with `extra` TOML appended to the
    /// account table.
    pub fn policy_toml(&self, version: u64, account_extra: &str) -> String {
        policy_toml(&self.keys, version, account_extra)
    }

    pub fn sign_policy(&self, who: &str, doc: &str) -> Vec<u8> {
        sshsig::sign(&self.keys[who], &policy_namespace(TD), doc.as_bytes()).unwrap()
    }

    /// Signs a statement binding `binding` with `key`'s private key, naming
    /// `signer` as signer, under `namespace`.
    pub fn sign(
        &self,
        key: &str,
        signer: &str,
        version: u64,
        issued_at: SystemTime,
        binding: Binding,
        namespace: &str,
    ) -> SignedStatement {
        let s = new_statement(version, signer, issued_at, binding);
        let bytes = encode_statement(&s);
        SignedStatement {
            signature: sshsig::sign(&self.keys[key], namespace, &bytes).unwrap(),
            statement: bytes,
        }
    }

    pub fn plan(&self) -> Plan {
        Plan {
            request_key: "rita",
            request_signer: id("rita"),
            requester: id("rita"),
            request_id: "req-1".into(),
            account: ACCOUNT.into(),
            created: 0,
            approvers: vec![("adam", id("adam"), 60), ("anna", id("anna"), 120)],
            approval_request_digest: None,
            operator: ("otto", id("otto")),
            release_at: 180,
            release_id: "rel-1".into(),
            grant_id: "grant-1".into(),
            pin_verified: true,
            release_approvals: None,
            version: self.policy.version(),
            namespace: consent_namespace(TD),
            release_namespace: None,
            now: 200,
        }
    }

    pub fn build(&self, p: &Plan) -> Attempt {
        let ns = &p.namespace;
        let request = self.sign(
            p.request_key,
            &p.request_signer,
            p.version,
            at(p.created),
            Binding::Request(RequestBinding {
                request_id: p.request_id.clone(),
                account_id: p.account.clone(),
                requester: p.requester.clone(),
                reason_digest: reason_digest("rotate the root password", "CHG-42").to_vec(),
                created_at: Some(twokey_consent::time::to_timestamp(at(p.created))),
            }),
            ns,
        );
        let request_digest = statement_digest(&request.statement).to_vec();
        let approvals: Vec<SignedStatement> = p
            .approvers
            .iter()
            .map(|(key, signer, t)| {
                self.sign(
                    key,
                    signer,
                    p.version,
                    at(*t),
                    Binding::Approval(ApprovalBinding {
                        request_digest: p
                            .approval_request_digest
                            .clone()
                            .unwrap_or_else(|| request_digest.clone()),
                        request_id: p.request_id.clone(),
                        account_id: p.account.clone(),
                    }),
                    ns,
                )
            })
            .collect();
        let approval_digests = p.release_approvals.clone().unwrap_or_else(|| {
            approvals
                .iter()
                .map(|a| statement_digest(&a.statement).to_vec())
                .collect()
        });
        let release = self.sign(
            p.operator.0,
            &p.operator.1,
            p.version,
            at(p.release_at),
            Binding::Release(ReleaseBinding {
                request_digest,
                approval_digests,
                pin_verified: p.pin_verified,
                grant_id: p.grant_id.clone(),
                release_id: p.release_id.clone(),
                request_id: p.request_id.clone(),
                account_id: p.account.clone(),
            }),
            p.release_namespace.as_deref().unwrap_or(ns),
        );
        Attempt {
            request,
            approvals,
            release,
            grant_id: p.grant_id.clone(),
            account: p.account.clone(),
            request_id: p.request_id.clone(),
            now: at(p.now),
            history: MemoryHistory::new(),
        }
    }

    /// An admin's statement consenting to `action` on the account.
    pub fn admin(
        &self,
        key: &str,
        signer: &str,
        action: AdminAction,
        action_id: &str,
        t: u64,
    ) -> SignedStatement {
        self.admin_on(key, signer, ACCOUNT, action, action_id, t)
    }

    /// An admin's statement consenting to `action` on `account` (empty:
    /// the vault itself).
    pub fn admin_on(
        &self,
        key: &str,
        signer: &str,
        account: &str,
        action: AdminAction,
        action_id: &str,
        t: u64,
    ) -> SignedStatement {
        self.sign(
            key,
            signer,
            self.policy.version(),
            at(t),
            Binding::AdminAction(AdminActionBinding {
                account_id: account.into(),
                action: action as i32,
                action_id: action_id.into(),
            }),
            &consent_namespace(TD),
        )
    }
}

/// Every knob of one release attempt.
#[derive(Clone)]
pub struct Plan {
    pub request_key: &'static str,
    pub request_signer: String,
    pub requester: String,
    pub request_id: String,
    pub account: String,
    pub created: u64,
    /// (key, SPIFFE ID named as signer, seconds after t0)
    pub approvers: Vec<(&'static str, String, u64)>,
    pub approval_request_digest: Option<Vec<u8>>,
    pub operator: (&'static str, String),
    pub release_at: u64,
    pub release_id: String,
    pub grant_id: String,
    pub pin_verified: bool,
    pub release_approvals: Option<Vec<Vec<u8>>>,
    pub version: u64,
    pub namespace: String,
    pub release_namespace: Option<String>,
    pub now: u64,
}

/// The evidence and context of one release attempt.
pub struct Attempt {
    pub request: SignedStatement,
    pub approvals: Vec<SignedStatement>,
    pub release: SignedStatement,
    pub grant_id: String,
    pub account: String,
    pub request_id: String,
    pub now: SystemTime,
    pub history: MemoryHistory,
}

impl Attempt {
    pub fn check(
        &self,
        policy: &VerifiedPolicy,
    ) -> Result<twokey_consent::Verified, twokey_consent::ConsentError> {
        twokey_consent::check_release(
            policy,
            &self.request,
            &self.approvals,
            &self.release,
            &twokey_consent::GrantFacts {
                grant_id: &self.grant_id,
                account_id: &self.account,
                request_id: &self.request_id,
            },
            self.now,
            &self.history,
        )
    }
}

/// The policy document at `version`, with `account_extra` TOML appended to
/// the account table.
pub fn policy_toml(
    keys: &BTreeMap<&'static str, PrivateKey>,
    version: u64,
    account_extra: &str,
) -> String {
    let person = |n: &str, ids: &[String]| {
        format!(
            "[people.{n}]\nids = [{}]\nkeys = [\"{}\"]\n",
            ids.iter()
                .map(|i| format!("\"{i}\""))
                .collect::<Vec<_>>()
                .join(", "),
            public(&keys[n])
        )
    };
    let mut doc = format!(
        "version = {version}\ntrust_domain = \"{TD}\"\n\n[admins]\npeople = [\"alice\", \"bob\", \"carol\"]\nthreshold = 2\n\n"
    );
    for n in ["alice", "bob", "carol", "adam", "anna", "otto", "bpm"] {
        doc.push_str(&person(n, &[id(n)]));
    }
    // rita and ivan each have two SPIFFE IDs on one key.
    doc.push_str(&person("rita", &[id("rita"), alt_id("rita")]));
    doc.push_str(&person("ivan", &[id("ivan"), alt_id("ivan")]));
    doc.push_str(&format!(
        "\n[accounts.{ACCOUNT}]\nrequesters = [\"rita\"]\napprovers = [\"adam\", \"anna\", \"ivan\", \"rita\"]\noperators = [\"otto\"]\nintake = [\"bpm\"]\napprovals_required = 2\ncodes_per_request = 1\nrelease_rate = {{ max = 2, per = \"1h\" }}\n{account_extra}"
    ));
    doc
}
