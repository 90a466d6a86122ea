//! The broker's metrics (see docs/OBSERVABILITY.md): requests by state,
//! approvals, PIN failures, locks and notifier failures. Counted from the
//! broker's own audit events once audit acknowledged them (so each state
//! change counts once), and the states read from the store at each export.

use std::sync::{Arc, OnceLock, Weak};

use opentelemetry::{KeyValue, metrics::Counter};
use twokey_proto::audit::v1::Event;
use twokey_runtime::metrics::{counter, meter};

use crate::{state::State, store::RequestStore};

struct Counters {
    approvals: Counter<u64>,
    pin_failures: Counter<u64>,
    locks: Counter<u64>,
    notifier_failures: Counter<u64>,
}

fn counters() -> &'static Counters {
    static COUNTERS: OnceLock<Counters> = OnceLock::new();
    COUNTERS.get_or_init(|| Counters {
        approvals: counter(
            "twokey.broker.approvals",
            "approvals given (each approver's approve)",
            "{approval}",
        ),
        pin_failures: counter(
            "twokey.broker.pin.failures",
            "wrong PINs submitted",
            "{attempt}",
        ),
        locks: counter(
            "twokey.broker.locks",
            "requests locked after too many wrong PINs",
            "{request}",
        ),
        notifier_failures: counter(
            "twokey.broker.notifier.failures",
            "notifications given up after their retries",
            "{notification}",
        ),
    })
}

/// Counts one acknowledged broker event (the outbox's ack observer).
pub fn observe_event(event: &Event) {
    let c = counters();
    let account = || [KeyValue::new("account", event.account_id.clone())];
    match event.action.as_str() {
        "request.approved" => c.approvals.add(1, &account()),
        "pin.failed" => c.pin_failures.add(1, &account()),
        "request.locked" => c.locks.add(1, &account()),
        "notification.failed" => c.notifier_failures.add(1, &[]),
        _ => {}
    }
}

const STATES: [State; 8] = [
    State::Pending,
    State::Approved,
    State::Verified,
    State::Released,
    State::Denied,
    State::Cancelled,
    State::Expired,
    State::Locked,
];

/// How often the request counts behind `twokey.broker.requests` are read
/// from the store (the gauge's callback cannot wait for a database).
pub const REQUEST_COUNT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(15);

/// Reports `twokey.broker.requests` (requests in the store, by state): a
/// task reads the store every [`REQUEST_COUNT_INTERVAL`] for as long as
/// `store` lives, and each export reports the last counts.
pub fn observe_requests<S: RequestStore + ?Sized>(store: &Arc<S>) {
    let store: Weak<S> = Arc::downgrade(store);
    let counts: Arc<std::sync::Mutex<Option<[u64; STATES.len()]>>> = Arc::default();
    let read = counts.clone();
    meter()
        .u64_observable_gauge("twokey.broker.requests")
        .with_description("requests the broker holds, by state")
        .with_unit("{request}")
        .with_callback(move |gauge| {
            let Some(counts) = *read.lock().unwrap_or_else(|e| e.into_inner()) else {
                return;
            };
            for (state, n) in STATES.iter().zip(counts) {
                gauge.observe(n, &[KeyValue::new("state", state.as_str())]);
            }
        })
        .build();
    tokio::spawn(async move {
        loop {
            let Some(store) = store.upgrade() else {
                return;
            };
            if let Ok(all) = store.all().await {
                let mut n = [0u64; STATES.len()];
                for r in &all {
                    if let Some(i) = STATES.iter().position(|s| *s == r.state) {
                        n[i] += 1;
                    }
                }
                *counts.lock().unwrap_or_else(|e| e.into_inner()) = Some(n);
            }
            drop(store);
            tokio::time::sleep(REQUEST_COUNT_INTERVAL).await;
        }
    });
}
