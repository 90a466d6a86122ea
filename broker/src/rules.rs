//! The rules in force at the broker: the TOML policy alone, or once an
//! admin-signed policy is in force the rules made from it
//! ([`Policy::under_signed`]: roles and counts signed, names, routing and
//! PIN settings from the file). They follow the cached signed policy
//! without a restart: a new version swaps in a new [`Policy`], and calls in
//! flight keep the one they took.

use std::sync::{Arc, RwLock};

use crate::{consent::SignedPolicy, policy::Policy};

/// The broker's TOML policy and the signed policy cache, and the rules made
/// from them for the signed version last seen.
#[derive(Debug)]
pub struct Rules {
    file: Arc<Policy>,
    signed: Arc<SignedPolicy>,
    /// The signed version the rules were made for (0: none, the file's).
    current: RwLock<(u64, Arc<Policy>)>,
}

impl Rules {
    /// The rules of `file`, under `signed` once it holds a version.
    pub fn new(file: Arc<Policy>, signed: Arc<SignedPolicy>) -> Self {
        let current = RwLock::new((0, file.clone()));
        Self {
            file,
            signed,
            current,
        }
    }

    /// The broker's own policy file, as loaded.
    pub fn file(&self) -> &Policy {
        &self.file
    }

    /// The rules in force: made again (once) when the signed policy cache
    /// holds a newer version than they were made for; each time, one
    /// warning per account where the file's roles or counts differ from the
    /// signed policy's.
    pub fn current(&self) -> Arc<Policy> {
        let active = self.signed.active();
        let version = active.as_ref().map_or(0, |p| p.version());
        {
            let current = self.current.read().unwrap_or_else(|e| e.into_inner());
            if current.0 >= version {
                return current.1.clone();
            }
        }
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.0 >= version {
            return current.1.clone();
        }
        let Some(signed) = active else {
            return current.1.clone();
        };
        let (policy, differ) = self.file.under_signed(&signed);
        for d in &differ {
            tracing::warn!(
                account_id = %d.account,
                policy_version = version,
                "the broker's policy file disagrees with signed policy version {version} on account {}: {}; the signed policy wins",
                d.account,
                d.detail
            );
        }
        tracing::info!(
            policy_version = version,
            accounts = %policy.describe_accounts(),
            "roles and counts now come from signed policy version {version}"
        );
        let policy = Arc::new(policy);
        *current = (version, policy.clone());
        policy
    }
}

#[cfg(test)]
mod tests {
    use std::{
        path::Path,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use tracing_subscriber::{
        Layer,
        layer::{Context, SubscriberExt},
    };
    use twokey_consent::TrustRoot;
    use twokey_testkit::consent::{
        AccountRoles, Person, PolicySpec, admins_allowed_signers, sign_policy,
    };

    use super::*;
    use crate::vault::PolicyVersion;

    const TD: &str = "twokey.local";

    /// Counts WARN events.
    struct Warnings(Arc<AtomicUsize>);

    impl<S: tracing::Subscriber> Layer<S> for Warnings {
        fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
            if *event.metadata().level() == tracing::Level::WARN {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    const FILE: &str = r#"
[identities]
alice = "spiffe://twokey.local/user/alice"
bob = "spiffe://twokey.local/user/bob"
olivia = "spiffe://twokey.local/user/olivia"
adam = "spiffe://twokey.local/user/adam"
anna = "spiffe://twokey.local/user/anna"
[accounts.same]
requesters = ["alice"]
approvers = ["bob"]
operators = ["olivia"]
admins = ["adam", "anna"]
[accounts.differs]
requesters = ["alice"]
approvers = ["bob"]
operators = ["olivia"]
admins = ["adam", "anna"]
"#;

    #[test]
    fn rules_are_made_once_per_signed_version_with_one_warning_per_differing_account() {
        let people: Vec<Person> = ["alice", "bob", "olivia", "adam", "anna"]
            .iter()
            .map(|n| Person::generate(n, vec![format!("spiffe://{TD}/user/{n}")]))
            .collect();
        let admins = [&people[3], &people[4]];
        let root =
            TrustRoot::from_allowed_signers(TD, &admins_allowed_signers(&admins), 2).unwrap();
        let version = |v: u64| {
            let document = PolicySpec::adam_and_anna(
                v,
                TD,
                &people.iter().collect::<Vec<_>>(),
                vec![
                    AccountRoles::new("same", "alice", "bob", "olivia"),
                    AccountRoles::new("differs", "alice", "anna", "olivia"),
                ],
            )
            .to_toml();
            PolicyVersion {
                version: v,
                signatures: admins
                    .iter()
                    .map(|p| sign_policy(&p.key, TD, &document))
                    .collect(),
                document,
                ..Default::default()
            }
        };
        let file = Arc::new(Policy::parse(FILE, Path::new("policy.toml")).unwrap());
        let signed = Arc::new(SignedPolicy::new(Some(root)));
        let rules = Rules::new(file.clone(), signed.clone());
        let warnings = Arc::new(AtomicUsize::new(0));
        let subscriber = tracing_subscriber::registry().with(Warnings(warnings.clone()));
        tracing::subscriber::with_default(subscriber, || {
            // No signed version: the file's rules.
            assert!(Arc::ptr_eq(&rules.current(), &file));
            let v1 = version(1);
            signed.adopt(std::slice::from_ref(&v1)).unwrap();
            let first = rules.current();
            assert_eq!(first.signed_version(), Some(1));
            let differs = first.account("differs").unwrap();
            assert!(differs.approvers.iter().all(|id| id.name() == "anna"));
            assert_eq!(warnings.load(Ordering::SeqCst), 1);
            // Calls take the same rules and warn no more.
            for _ in 0..3 {
                assert!(Arc::ptr_eq(&rules.current(), &first));
            }
            assert_eq!(warnings.load(Ordering::SeqCst), 1);
            // A new version: new rules, its warnings once.
            signed.adopt(&[version(2), v1]).unwrap();
            let second = rules.current();
            assert_eq!(second.signed_version(), Some(2));
            assert!(Arc::ptr_eq(&rules.current(), &second));
            assert_eq!(warnings.load(Ordering::SeqCst), 2);
            // The file itself is unchanged.
            assert_eq!(rules.file(), &*file);
        });
    }
}
