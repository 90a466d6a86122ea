//! The full release flow through the broker: alice creates a request, bob
//! approves it, the PIN lands in alice's mailbox file, olivia verifies it and
//! releases the code — each person signing their statement with their own
//! OpenSSH key (the vault checks all three), every step an audit event, the
//! code only after the vault's event is durably acknowledged. Measured one flow at a time and
//! with many flows in flight. Every flow releases a code of an account of
//! its own (see [`crate::scenario::vault::CODES_PER_ACCOUNT`]).

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Seek, SeekFrom},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail, ensure};
use tokio::sync::watch;
use tonic::transport::Channel;
use twokey_consent::{
    Binding, SignedStatement, approval_binding, new_id, new_statement, release_binding,
    request_binding, sign_statement,
};
use twokey_proto::broker::v1::{
    ApproveRequestRequest, CreateRequestRequest, ReleaseCodeRequest, VerifyPinRequest,
    WhoAmIRequest, broker_service_client::BrokerServiceClient,
};
use twokey_testkit::consent::Person;

use crate::{
    setup::{BenchPeople, TD},
    stats::{Phase, Row, drive},
};

/// Watches a mailbox file on its own thread (polling every 100 µs, reading
/// only new bytes) and hands out PINs by request id.
#[derive(Debug)]
pub struct MailboxWatcher {
    pins: Arc<Mutex<HashMap<String, String>>>,
    changed: watch::Receiver<u64>,
    stop: Arc<AtomicBool>,
}

impl MailboxWatcher {
    /// Starts watching `file` (which may not exist yet).
    pub fn start(file: PathBuf) -> Self {
        let pins: Arc<Mutex<HashMap<String, String>>> = Arc::default();
        let (tx, changed) = watch::channel(0u64);
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (pins.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut offset = 0u64;
            let mut partial = String::new();
            while !s.load(Ordering::Relaxed) {
                if let Ok(mut f) = std::fs::File::open(&file)
                    && f.metadata().map(|m| m.len()).unwrap_or(0) > offset
                    && f.seek(SeekFrom::Start(offset)).is_ok()
                {
                    let mut reader = BufReader::new(f);
                    let mut found = false;
                    loop {
                        let mut line = String::new();
                        match reader.read_line(&mut line) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                offset += n as u64;
                                partial.push_str(&line);
                                if !partial.ends_with('\n') {
                                    continue;
                                }
                                let whole = std::mem::take(&mut partial);
                                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&whole)
                                    && let (Some(id), Some(pin)) =
                                        (v["request_id"].as_str(), v["pin"].as_str())
                                {
                                    p.lock()
                                        .expect("not poisoned")
                                        .insert(id.to_owned(), pin.to_owned());
                                    found = true;
                                }
                            }
                        }
                    }
                    if found {
                        tx.send_modify(|n| *n += 1);
                    }
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        });
        Self {
            pins,
            changed,
            stop,
        }
    }

    /// Waits (at most `limit`) for the PIN of `request_id`.
    pub async fn pin(&self, request_id: &str, limit: Duration) -> Result<String> {
        let mut rx = self.changed.clone();
        let wait = async {
            loop {
                rx.borrow_and_update();
                if let Some(pin) = self.pins.lock().expect("not poisoned").remove(request_id) {
                    return Ok(pin);
                }
                if rx.changed().await.is_err() {
                    bail!("mailbox watcher stopped");
                }
            }
        };
        tokio::time::timeout(limit, wait)
            .await
            .with_context(|| format!("no PIN for {request_id} within {limit:?}"))?
    }
}

impl Drop for MailboxWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The clients of the three people in a flow.
#[derive(Debug, Clone)]
pub struct People {
    /// Requester.
    pub alice: BrokerServiceClient<Channel>,
    /// Approver.
    pub bob: BrokerServiceClient<Channel>,
    /// Operator.
    pub olivia: BrokerServiceClient<Channel>,
    /// Their keys.
    pub keys: Arc<BenchPeople>,
}

/// `person`'s statement under policy version 1, signed now.
fn sign(person: &Person, binding: Binding) -> Result<SignedStatement> {
    let statement = new_statement(1, person.id(), SystemTime::now(), binding);
    sign_statement(&person.key, TD, &statement).map_err(anyhow::Error::msg)
}

/// One whole flow; fails unless a code comes back.
pub async fn one(p: &People, mailbox: &MailboxWatcher, account: &str) -> Result<()> {
    let (mut alice, mut bob, mut olivia) = (p.alice.clone(), p.bob.clone(), p.olivia.clone());
    let keys = &p.keys;
    // alice picks the request id and signs the request.
    let request = sign(
        &keys.alice,
        request_binding(
            &new_id(),
            account,
            keys.alice.id(),
            "benchmark",
            "",
            SystemTime::now(),
        ),
    )?;
    let id = alice
        .create_request(CreateRequestRequest {
            account_id: account.into(),
            reason: "benchmark".into(),
            statement: Some(request.clone()),
            ..Default::default()
        })
        .await?
        .into_inner()
        .request
        .context("no request")?
        .request_id;
    let approval = sign(
        &keys.bob,
        approval_binding(&request).map_err(anyhow::Error::msg)?,
    )?;
    bob.approve_request(ApproveRequestRequest {
        request_id: id.clone(),
        comment: "ok".into(),
        statement: Some(approval.clone()),
    })
    .await?;
    let pin = mailbox.pin(&id, Duration::from_secs(10)).await?;
    olivia
        .verify_pin(VerifyPinRequest {
            request_id: id.clone(),
            pin,
            releases: Vec::new(),
        })
        .await?;
    // olivia picks the grant id and the release id and signs the release.
    let release = sign(
        &keys.olivia,
        release_binding(&request, &[approval], &new_id(), &new_id()).map_err(anyhow::Error::msg)?,
    )?;
    let code = olivia
        .release_code(ReleaseCodeRequest {
            request_id: id,
            statement: Some(release),
        })
        .await?
        .into_inner()
        .code
        .context("no code")?;
    ensure!(code.code.len() == 6, "code is not 6 digits");
    Ok(())
}

/// Flows run before the measured ones, to warm up connections.
pub const WARM_UP: usize = 3;

/// How many flows (so released codes) [`run`] makes at most.
pub fn flows_for(sequential: usize, concurrent_count: usize) -> usize {
    WARM_UP + sequential + concurrent_count
}

/// `sequential` flows one at a time, then `concurrent_count` flows at
/// `concurrency`; each flow takes the next of `accounts` (enrolled, named by
/// the policy, at least `accounts_for(flows_for(…))` of them).
pub async fn run(
    people: People,
    mailbox: Arc<MailboxWatcher>,
    accounts: &[String],
    sequential: usize,
    concurrent_count: usize,
    concurrency: usize,
    limit: Duration,
) -> Result<Vec<Row>> {
    let needed = crate::scenario::vault::accounts_for(flows_for(sequential, concurrent_count));
    ensure!(
        accounts.len() >= needed,
        "{} flows need {needed} accounts, got {}",
        flows_for(sequential, concurrent_count),
        accounts.len()
    );
    let accounts: Arc<Vec<String>> = Arc::new(accounts.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let take = move || accounts[next.fetch_add(1, Ordering::Relaxed) % accounts.len()].clone();
    for _ in 0..WARM_UP {
        one(&people, &mailbox, &take()).await?;
    }
    let op = {
        let (people, mailbox) = (people.clone(), mailbox.clone());
        move |_| {
            let (people, mailbox, account) = (people.clone(), mailbox.clone(), take());
            async move { one(&people, &mailbox, &account).await }
        }
    };
    let who = people.alice.clone();
    let floor = drive(sequential, 1, limit, move |_| {
        let mut c = who.clone();
        async move {
            for _ in 0..5 {
                c.who_am_i(WhoAmIRequest {}).await?;
            }
            Ok(())
        }
    })
    .await
    .row(
        "flow",
        "5 × broker WhoAmI (the flow's 5 round trips)",
        true,
        1,
    );
    let phase = Phase::start("flow: sequential");
    let mut seq = drive(sequential, 1, limit, op.clone()).await.row(
        "flow",
        "create → approve → PIN → verify → release",
        false,
        1,
    );
    drop(phase);
    seq.target = "p50 ≤ 5 ms, p99 ≤ 20 ms".into();
    let phase = Phase::start("flow: concurrent");
    let mut conc = drive(concurrent_count, concurrency, limit, op).await.row(
        "flow",
        "create → approve → PIN → verify → release",
        false,
        concurrency,
    );
    drop(phase);
    conc.target = "≥ 400 flows/s".into();
    Ok(vec![floor, seq, conc])
}
