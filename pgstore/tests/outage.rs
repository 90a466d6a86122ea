//! PostgreSQL stops and starts while the outbox is shipped: a write in
//! between fails as unavailable, shipping pauses with a log line saying
//! PostgreSQL is unavailable, and resumes when it is back, with each event
//! in the log once. Its own test binary, so that it alone sets the log
//! subscriber and reads every line.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{Audit, PATIENCE, pg, replica, signer};
use twokey_pgstore::outbox::spawn_leased;
use twokey_runtime::{events::EventDraft, time::SystemClock};

/// Log lines written while a test runs.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

// The only test of this binary: the log subscriber is the process's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shipping_pauses_while_postgres_is_down_and_resumes_with_nothing_lost() {
    let lines = Lines::default();
    let writer = lines.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish(),
    )
    .unwrap();
    let db = pg().await;
    let audit = Audit::start().await;
    let mut r = replica(&db.settings).await;
    let lease = spawn_leased(
        db.settings.clone(),
        signer(),
        Arc::new(SystemClock),
        audit.ship(),
    );
    for i in 0..5 {
        r.push(&format!("before.{i}")).await;
    }
    audit.expect_exactly(5).await;
    lease.wait_shipping(true).await;

    db.pg.stop().unwrap();
    // A write while the database is down fails as unavailable.
    let err = r
        .outbox
        .emit(EventDraft::new("spiffe://twokey.test/user/alice", "x"))
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    lease.wait_shipping(false).await;
    let start = Instant::now();
    while !lines
        .text()
        .contains("audit shipping paused: PostgreSQL is unavailable")
    {
        assert!(
            start.elapsed() < PATIENCE,
            "no pause line:\n{}",
            lines.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let restarted = Instant::now();
    db.pg.start_server().unwrap();
    lease.wait_shipping(true).await;
    eprintln!(
        "PostgreSQL back: shipping again {:?} after pg_ctl start",
        restarted.elapsed()
    );
    let mut r = replica(&db.settings).await;
    for i in 0..5 {
        r.push(&format!("after.{i}")).await;
    }
    audit.expect_exactly(10).await;
    assert!(
        lines
            .text()
            .contains("this replica holds the shipping lease"),
        "{}",
        lines.text()
    );
    lease.stop().await;
    audit.stop().await;
}
