//! People's own OpenSSH keys and the admin-signed consent policy of a dev or
//! test system: generate an `ssh-ed25519` key per person, write it as
//! `ssh-keygen` would (`NAME.ssh`, mode 0600, and `NAME.ssh.pub`), render
//! the policy document for a set of people and accounts, sign it as an admin,
//! and write the pinned admin set (`allowed_signers`) the vault and broker
//! configs name as their root of trust.

use std::{
    fs::{self, OpenOptions},
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use twokey_consent::{
    policy_namespace,
    ssh_key::{Algorithm, LineEnding, PrivateKey, PublicKey},
    sshsig,
};

/// One person of the policy: a name, their SPIFFE IDs and their key.
#[derive(Debug, Clone)]
pub struct Person {
    /// The name in the policy (`alice`).
    pub name: String,
    /// Their SPIFFE IDs.
    pub ids: Vec<String>,
    /// Their key pair.
    pub key: PrivateKey,
}

impl Person {
    /// A person with a fresh `ssh-ed25519` key.
    pub fn generate(name: &str, ids: Vec<String>) -> Self {
        Self {
            name: name.to_owned(),
            ids,
            key: generate_key(),
        }
    }

    /// The public key.
    pub fn public(&self) -> &PublicKey {
        self.key.public_key()
    }

    /// The first SPIFFE ID.
    pub fn id(&self) -> &str {
        &self.ids[0]
    }
}

/// A fresh `ssh-ed25519` key pair.
pub fn generate_key() -> PrivateKey {
    PrivateKey::random(&mut rand::rngs::OsRng, Algorithm::Ed25519).expect("ed25519 keys generate")
}

/// Writes `key` as `DIR/NAME.ssh` (OpenSSH private key format, mode 0600,
/// unencrypted) and `DIR/NAME.ssh.pub`; returns the private key's path.
pub fn write_key(dir: &Path, name: &str, key: &PrivateKey) -> std::io::Result<PathBuf> {
    let path = dir.join(format!("{name}.ssh"));
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let _ = fs::remove_file(&path);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    fs::write(
        dir.join(format!("{name}.ssh.pub")),
        format!("{public} {name}\n"),
    )?;
    Ok(path)
}

/// Who does what on one account, by person name.
#[derive(Debug, Clone)]
pub struct AccountRoles {
    /// The account id.
    pub account: String,
    /// May ask for codes.
    pub requesters: Vec<String>,
    /// May approve.
    pub approvers: Vec<String>,
    /// May verify PINs and release.
    pub operators: Vec<String>,
    /// May file on a requester's behalf.
    pub intake: Vec<String>,
    /// Distinct approvals needed.
    pub approvals_required: u32,
    /// Codes one request may release.
    pub codes_per_request: u32,
    /// At most this many codes for the account per hour (the vault's rate).
    pub releases_per_hour: u32,
}

impl AccountRoles {
    /// One requester, approver and operator each; one approval, one code,
    /// 4 codes an hour.
    pub fn new(account: &str, requester: &str, approver: &str, operator: &str) -> Self {
        Self {
            account: account.to_owned(),
            requesters: vec![requester.to_owned()],
            approvers: vec![approver.to_owned()],
            operators: vec![operator.to_owned()],
            intake: Vec::new(),
            approvals_required: 1,
            codes_per_request: 1,
            releases_per_hour: 4,
        }
    }
}

/// The whole policy document.
#[derive(Debug, Clone)]
pub struct PolicySpec {
    /// The version number.
    pub version: u64,
    /// The trust domain.
    pub trust_domain: String,
    /// Everyone, by name.
    pub people: Vec<(String, Vec<String>, PublicKey)>,
    /// The admins, by name.
    pub admins: Vec<String>,
    /// M: distinct admins needed for the next version and admin actions.
    pub threshold: u32,
    /// The accounts.
    pub accounts: Vec<AccountRoles>,
}

fn list(names: &[String]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

impl PolicySpec {
    /// Policy `version` in `trust_domain` naming `people`, with adam and
    /// anna (who must be among them) its admins, both needed (M = 2), and
    /// `accounts`.
    pub fn adam_and_anna(
        version: u64,
        trust_domain: &str,
        people: &[&Person],
        accounts: Vec<AccountRoles>,
    ) -> Self {
        Self {
            version,
            trust_domain: trust_domain.into(),
            people: people
                .iter()
                .map(|p| (p.name.clone(), p.ids.clone(), p.public().clone()))
                .collect(),
            admins: vec!["adam".into(), "anna".into()],
            threshold: 2,
            accounts,
        }
    }

    /// The TOML document, as admins sign it.
    pub fn to_toml(&self) -> String {
        let mut s = format!(
            "version = {}\ntrust_domain = {:?}\n\n[admins]\npeople = {}\nthreshold = {}\n",
            self.version,
            self.trust_domain,
            list(&self.admins),
            self.threshold
        );
        for (name, ids, key) in &self.people {
            s.push_str(&format!(
                "\n[people.{name}]\nids = {}\nkeys = [{:?}]\n",
                list(ids),
                key.to_openssh().expect("public keys encode")
            ));
        }
        for a in &self.accounts {
            s.push_str(&format!(
                "\n[accounts.{}]\nrequesters = {}\napprovers = {}\noperators = {}\nintake = {}\n\
                 approvals_required = {}\ncodes_per_request = {}\n\
                 release_rate = {{ max = {}, per = \"1h\" }}\n",
                a.account,
                list(&a.requesters),
                list(&a.approvers),
                list(&a.operators),
                list(&a.intake),
                a.approvals_required,
                a.codes_per_request,
                a.releases_per_hour,
            ));
        }
        s
    }
}

/// An admin's detached signature over a policy document, armored as
/// `ssh-keygen -Y sign -n twokey-policy@<trust domain>` writes it.
pub fn sign_policy(key: &PrivateKey, trust_domain: &str, document: &str) -> Vec<u8> {
    sshsig::sign(key, &policy_namespace(trust_domain), document.as_bytes())
        .expect("ed25519 keys sign")
}

/// The pinned admin set as an `allowed_signers` file: one line per admin,
/// their SPIFFE IDs as principals.
pub fn admins_allowed_signers(admins: &[&Person]) -> String {
    admins
        .iter()
        .map(|p| {
            format!(
                "{} {}\n",
                p.ids.join(","),
                p.public().to_openssh().expect("public keys encode")
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use twokey_consent::{TrustRoot, verify_policy_update};

    #[test]
    fn a_rendered_policy_signed_by_the_pinned_admins_verifies() {
        let td = "example.org";
        let p = |n: &str| Person::generate(n, vec![format!("spiffe://{td}/user/{n}")]);
        let (alice, bob, olivia, adam, anna) =
            (p("alice"), p("bob"), p("olivia"), p("adam"), p("anna"));
        let all = [&alice, &bob, &olivia, &adam, &anna];
        let spec = PolicySpec::adam_and_anna(
            1,
            td,
            &all,
            vec![AccountRoles::new("aws-root", "alice", "bob", "olivia")],
        );
        let doc = spec.to_toml();
        let root = TrustRoot::from_allowed_signers(td, &admins_allowed_signers(&[&adam, &anna]), 2)
            .unwrap();
        let one = [sign_policy(&adam.key, td, &doc)];
        assert!(verify_policy_update(None, &root, doc.as_bytes(), &one).is_err());
        let two = [
            sign_policy(&adam.key, td, &doc),
            sign_policy(&anna.key, td, &doc),
        ];
        let v = verify_policy_update(None, &root, doc.as_bytes(), &two).unwrap();
        assert_eq!(v.version(), 1);
        assert_eq!(
            v.role_holders("aws-root", twokey_consent::Role::Approver),
            ["bob"]
        );

        let dir = tempfile::tempdir().unwrap();
        let path = write_key(dir.path(), "alice", &alice.key).unwrap();
        let back = PrivateKey::read_openssh_file(&path).unwrap();
        assert_eq!(back.public_key(), alice.public());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
