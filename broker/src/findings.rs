//! Alerts from reconciliation (issue 20, docs/RECONCILE.md): the broker pulls
//! audit's `reconcile.unexplained`, `reconcile.unprotected` and
//! `reconcile.out_of_band` findings and queues a notification to each admin
//! of the finding's account through the durable notification queue (Slack
//! direct message, webhook, mailbox).
//!
//! One cursor per action (the leaf index after the last finding taken), kept
//! in the broker's sled in the same transaction as the queued messages and
//! synced before the next poll: a finding is queued once, even across a
//! crash. Audit lets the broker read these actions and nothing else. The
//! gRPC client is behind [`FindingSource`] (implemented in the wiring).

use std::{sync::Arc, time::Duration};

use futures::future::BoxFuture;
use sled::Transactional;
use twokey_runtime::{SpiffeId, durable::DurableDb, time::Clock};

use crate::{
    error::BrokerError,
    notify::{FINDING_PREFIX, Message, NotifyQueue, Recipient},
    policy::Policy,
};

/// The finding kinds that alert the account's admins.
pub const ALERTS: [&str; 3] = [
    "reconcile.unexplained",
    "reconcile.unprotected",
    "reconcile.out_of_band",
];

/// Findings read per poll and action, at most.
pub const PAGE: u32 = 100;

/// One finding as audit's log holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FindingEntry {
    /// Its leaf index.
    pub index: u64,
    /// `reconcile.<kind>`.
    pub action: String,
    /// The twokey account.
    pub account_id: String,
    /// The event's attributes (`aws_account_id`, `event_time`, ...).
    pub attributes: std::collections::BTreeMap<String, String>,
}

/// Where findings come from: audit's `Query`, one action from a leaf index.
pub trait FindingSource: Send + Sync + 'static {
    /// Up to `limit` entries of `action` at or after leaf index `from`, in
    /// log order. The error says why (audit down, permission denied).
    fn findings(
        &self,
        action: &'static str,
        from: u64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<FindingEntry>, String>>;
}

/// What one kind of finding means, for the message.
fn meaning(action: &str) -> &'static str {
    match action {
        "reconcile.unexplained" => {
            "a root sign-in with MFA that no code released by twokey explains: the code came from \
             somewhere else (a copied seed, a second MFA device)"
        }
        "reconcile.unprotected" => "a root sign-in without MFA",
        "reconcile.out_of_band" => "an MFA device change on the root user, not made through twokey",
        _ => "a reconciliation finding",
    }
}

/// The messages of one finding: one to each admin of its account.
pub fn messages(policy: &Policy, entry: &FindingEntry, now_ms: u64) -> Vec<Message> {
    let Some(account) = policy.account(&entry.account_id) else {
        tracing::warn!(
            account = %entry.account_id,
            index = entry.index,
            "finding for an account the broker's policy does not name: no admin to notify"
        );
        return Vec::new();
    };
    let attr = |k: &str| entry.attributes.get(k).map_or("?", String::as_str);
    let mut text = format!(
        "{} on {} (AWS account {}) at {}",
        entry.action,
        entry.account_id,
        attr("aws_account_id"),
        attr("event_time"),
    );
    if let Some(ip) = entry
        .attributes
        .get("source_ip")
        .filter(|ip| !ip.is_empty())
    {
        text.push_str(&format!(" from {ip}"));
    }
    if let Some(action) = entry.attributes.get("mfa_action") {
        text.push_str(&format!(" ({action})"));
    }
    text.push_str(&format!(
        ": {}. CloudTrail event {}, audit leaf {}. See docs/RECONCILE.md for what to do.",
        meaning(&entry.action),
        attr("cloudtrail_event_id"),
        entry.index
    ));
    account
        .admins
        .iter()
        .map(|admin| Message {
            id: format!("finding-{}-{}", entry.index, admin_key(admin)),
            kind: entry.action.clone(),
            request_id: String::new(),
            account_id: entry.account_id.clone(),
            to: Recipient::Person {
                name: policy
                    .name_of(admin)
                    .map_or_else(|| admin.name().to_owned(), ToOwned::to_owned),
                identity: admin.to_string(),
                slack: policy.slack_member(admin).map(ToOwned::to_owned),
            },
            text: text.clone(),
            pin: None,
            at_ms: now_ms,
        })
        .collect()
}

fn admin_key(id: &SpiffeId) -> String {
    id.as_str()
        .trim_start_matches("spiffe://")
        .replace('/', ".")
}

/// The poller.
pub struct FindingsPoller {
    source: Box<dyn FindingSource>,
    queue: Arc<NotifyQueue>,
    db: DurableDb,
    cursors: sled::Tree,
    policy: Box<dyn Fn() -> Arc<Policy> + Send + Sync>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for FindingsPoller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FindingsPoller").finish_non_exhaustive()
    }
}

impl FindingsPoller {
    /// A poller queuing to `queue`, its cursors in `db`, addressing the
    /// admins of the policy `policy` returns at each poll.
    pub fn new(
        source: Box<dyn FindingSource>,
        queue: Arc<NotifyQueue>,
        db: &DurableDb,
        policy: Box<dyn Fn() -> Arc<Policy> + Send + Sync>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, BrokerError> {
        Ok(Self {
            source,
            queue,
            db: db.clone(),
            cursors: db.tree("findings_cursor")?,
            policy,
            clock,
        })
    }

    /// The leaf index from which `action` is read next.
    pub fn cursor(&self, action: &str) -> Result<u64, BrokerError> {
        Ok(self
            .cursors
            .get(action)?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0))
    }

    /// One poll of every alerting action: the findings after each cursor
    /// queued and the cursor moved, in one transaction, then synced.
    /// Returns how many findings were taken.
    pub async fn poll(&self) -> Result<usize, String> {
        let mut taken = 0;
        for action in ALERTS {
            loop {
                let from = self.cursor(action).map_err(|e| e.to_string())?;
                let entries = self.source.findings(action, from, PAGE).await?;
                let Some(last) = entries.last().map(|e| e.index) else {
                    break;
                };
                let policy = (self.policy)();
                let now_ms = twokey_runtime::time::unix_seconds(self.clock.now()) * 1000;
                let messages: Vec<Message> = entries
                    .iter()
                    .filter(|e| e.action == action && e.action.starts_with(FINDING_PREFIX))
                    .flat_map(|e| messages(&policy, e, now_ms))
                    .collect();
                let next = (last + 1).to_be_bytes();
                (self.queue.tree(), &self.cursors)
                    .transaction(|(q, c)| {
                        self.queue.enqueue(q, &messages)?;
                        c.insert(action, &next)?;
                        Ok(())
                    })
                    .map_err(|e: sled::transaction::TransactionError<BrokerError>| {
                        format!("cannot queue findings: {e}")
                    })?;
                self.db.sync().await.map_err(|e| e.to_string())?;
                self.queue.wake();
                taken += entries.len();
                tracing::info!(
                    action,
                    findings = entries.len(),
                    "reconciliation findings queued to admins"
                );
                if entries.len() < PAGE as usize {
                    break;
                }
            }
        }
        Ok(taken)
    }

    /// Polls every `interval` until the task is dropped. A refusal (audit
    /// down, or the broker not in audit's `[reconcile] readers`) is logged
    /// and tried again.
    pub async fn run(self, interval: Duration) {
        let mut every = tokio::time::interval(interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_error = String::new();
        loop {
            every.tick().await;
            match self.poll().await {
                Ok(_) => last_error.clear(),
                Err(e) if e != last_error => {
                    tracing::warn!("cannot read reconciliation findings from audit: {e}");
                    last_error = e;
                }
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{path::Path, sync::Mutex};

    use twokey_runtime::{events::EventSigner, keys::SecretKey, outbox::Outbox, time::ManualClock};
    use zeroize::Zeroizing;

    use super::*;
    use crate::{
        notify::{Notifier, http::HttpClient, testserver::TestServer, webhook::Webhook},
        pin::PinKey,
    };

    /// Findings as audit would answer them; records the cursors asked for.
    #[derive(Default)]
    struct Fake {
        log: Vec<FindingEntry>,
        asked: Mutex<Vec<(&'static str, u64)>>,
        refuse: Option<String>,
    }

    impl FindingSource for Arc<Fake> {
        fn findings(
            &self,
            action: &'static str,
            from: u64,
            limit: u32,
        ) -> BoxFuture<'_, Result<Vec<FindingEntry>, String>> {
            self.asked.lock().unwrap().push((action, from));
            let answer = match &self.refuse {
                Some(e) => Err(e.clone()),
                None => Ok(self
                    .log
                    .iter()
                    .filter(|e| e.action == action && e.index >= from)
                    .take(limit as usize)
                    .cloned()
                    .collect()),
            };
            Box::pin(async move { answer })
        }
    }

    fn finding(index: u64, action: &str) -> FindingEntry {
        FindingEntry {
            index,
            action: action.into(),
            account_id: "aws-prod-root".into(),
            attributes: [
                ("aws_account_id", "123456789012"),
                ("event_time", "2026-12-03T10:00:00Z"),
                ("source_ip", "192.0.2.10"),
                ("cloudtrail_event_id", "ev-1"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        }
    }

    fn policy() -> Arc<Policy> {
        Arc::new(
            Policy::parse(
                include_str!("../../deploy/policy.example.toml"),
                Path::new("policy.example.toml"),
            )
            .unwrap(),
        )
    }

    struct Setup {
        _dir: tempfile::TempDir,
        db: DurableDb,
        queue: Arc<NotifyQueue>,
        server: TestServer,
    }

    async fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let db = DurableDb::open(dir.path()).unwrap();
        let clock = ManualClock::new(std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        let signer = EventSigner::new(
            SpiffeId::parse("spiffe://twokey.local/svc/broker").unwrap(),
            ed25519_dalek::SigningKey::from_bytes(&[5; 32]),
        );
        let outbox = Outbox::open(&db, signer, Arc::new(clock.clone())).unwrap();
        let server = TestServer::start(204, "").await;
        let hook = Webhook::new(
            format!("{}/hooks/twokey", server.url),
            Zeroizing::new(b"s3cret".to_vec()),
            false,
            HttpClient::new(None).unwrap(),
        );
        let queue = Arc::new(
            NotifyQueue::open(
                &db,
                outbox,
                vec![Arc::new(hook) as Arc<dyn Notifier>],
                &PinKey::new(SecretKey::from_bytes([3; 32])),
                Arc::new(clock),
            )
            .unwrap(),
        );
        Setup {
            _dir: dir,
            db,
            queue,
            server,
        }
    }

    fn poller(s: &Setup, fake: &Arc<Fake>) -> FindingsPoller {
        let p = policy();
        FindingsPoller::new(
            Box::new(fake.clone()),
            s.queue.clone(),
            &s.db,
            Box::new(move || p.clone()),
            Arc::new(ManualClock::new(std::time::UNIX_EPOCH)),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn an_alerting_finding_reaches_the_webhook_addressed_to_each_admin_once() {
        let s = setup().await;
        let fake = Arc::new(Fake {
            log: vec![
                finding(4, "reconcile.unexplained"),
                finding(9, "reconcile.out_of_band"),
            ],
            ..Fake::default()
        });
        let p = poller(&s, &fake);
        assert_eq!(p.poll().await.unwrap(), 2);
        assert_eq!(p.cursor("reconcile.unexplained").unwrap(), 5);
        assert_eq!(p.cursor("reconcile.out_of_band").unwrap(), 10);
        assert_eq!(p.cursor("reconcile.unprotected").unwrap(), 0);
        s.queue.run_due().await;
        let seen = s.server.requests();
        let admins = policy().account("aws-prod-root").unwrap().admins.clone();
        assert_eq!(seen.len(), 2 * admins.len());
        let bodies: Vec<serde_json::Value> = seen
            .iter()
            .map(|r| serde_json::from_slice(&r.body).unwrap())
            .collect();
        let first = &bodies[0];
        assert_eq!(first["kind"], "reconcile.unexplained");
        assert_eq!(first["account_id"], "aws-prod-root");
        assert_eq!(first["to"]["type"], "person");
        let text = first["text"].as_str().unwrap();
        assert!(
            text.contains("123456789012") && text.contains("192.0.2.10"),
            "{text}"
        );
        let to: std::collections::BTreeSet<String> = bodies
            .iter()
            .filter(|b| b["kind"] == "reconcile.unexplained")
            .map(|b| b["to"]["identity"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(to, admins.iter().map(|a| a.to_string()).collect());
        // Polled again (and after a restart): nothing queued twice.
        assert_eq!(p.poll().await.unwrap(), 0);
        drop(p);
        let p = poller(&s, &fake);
        assert_eq!(p.poll().await.unwrap(), 0);
        s.queue.run_due().await;
        assert_eq!(s.server.requests().len(), 2 * admins.len());
        assert!(
            fake.asked
                .lock()
                .unwrap()
                .contains(&("reconcile.unexplained", 5))
        );
    }

    #[tokio::test]
    async fn a_refusal_from_audit_moves_no_cursor() {
        let s = setup().await;
        let fake = Arc::new(Fake {
            log: vec![finding(4, "reconcile.unexplained")],
            refuse: Some("PermissionDenied: not a reader".into()),
            ..Fake::default()
        });
        let p = poller(&s, &fake);
        let err = p.poll().await.unwrap_err();
        assert!(err.contains("PermissionDenied"), "{err}");
        assert_eq!(p.cursor("reconcile.unexplained").unwrap(), 0);
        assert_eq!(s.queue.depth(), 0);
    }

    #[test]
    fn a_finding_for_an_account_the_policy_does_not_name_notifies_nobody() {
        let mut f = finding(1, "reconcile.unprotected");
        f.account_id = "nope".into();
        assert!(messages(&policy(), &f, 0).is_empty());
    }
}
