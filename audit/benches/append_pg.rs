//! Append on PostgreSQL beside tiles, in one run: the release
//! `twokey-audit` binary on tiles (its journal) and on a throwaway
//! PostgreSQL (`fsync = on`, `synchronous_commit = on`), each over mTLS on
//! loopback; grouped (2 sources × 64 in flight, one transaction or one
//! journal record per group) and one event in flight (one commit or one
//! `fdatasync` per event). Every acknowledgement counted is STORED.
//!
//! `cargo bench -p twokey-audit --bench append_pg [-- EVENTS_PER_SOURCE]`

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use tokio::sync::Semaphore;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use twokey_proto::audit::v1::{AppendRequest, AppendStatus};
use twokey_runtime::events::EventSigner;
use twokey_testkit::postgres::TestPostgres;

/// Streams seqs `first..first + count` of `signer` as `name` with up to
/// `window` unacknowledged; returns each event's latency.
async fn stream(
    env: &Env,
    addr: SocketAddr,
    name: &str,
    signer: EventSigner,
    first: u64,
    count: u64,
    window: usize,
) -> Vec<Duration> {
    let (tx, rx) = tokio::sync::mpsc::channel::<AppendRequest>(window);
    let permits = Arc::new(Semaphore::new(window));
    let sent: Arc<Mutex<VecDeque<Instant>>> = Arc::default();
    let events: Vec<_> = (first..first + count)
        .map(|s| event(&signer, s, "code.released"))
        .collect();
    let sender = {
        let (permits, sent) = (permits.clone(), sent.clone());
        tokio::spawn(async move {
            for e in events {
                permits.acquire().await.expect("open").forget();
                sent.lock().unwrap().push_back(Instant::now());
                let request = AppendRequest {
                    event: Some(e),
                    ..Default::default()
                };
                if tx.send(request).await.is_err() {
                    return;
                }
            }
            let _ = permits.acquire_many(window as u32).await;
        })
    };
    let mut client = env.client(addr, name);
    let mut inbound = client
        .append(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("Append stream")
        .into_inner();
    let mut latencies = Vec::with_capacity(count as usize);
    while (latencies.len() as u64) < count {
        let ack = inbound.message().await.expect("answer").expect("open");
        if ack.seq == 0 {
            continue; // a receipt alone
        }
        assert_eq!(ack.status, AppendStatus::Stored as i32, "{ack:?}");
        latencies.push(sent.lock().unwrap().pop_front().unwrap().elapsed());
        permits.add_permits(1);
    }
    permits.close();
    sender.abort();
    latencies
}

struct Measured {
    per_second: f64,
    p50: Duration,
    p99: Duration,
}

fn measure(mut latencies: Vec<Duration>, took: Duration) -> Measured {
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Measured {
        per_second: latencies.len() as f64 / took.as_secs_f64(),
        p50: at(0.5),
        p99: at(0.99),
    }
}

/// Grouped, then one in flight, on the audit at `addr`; seqs from `next`.
async fn run(env: &Env, addr: SocketAddr, per_source: u64, single: u64) -> (Measured, Measured) {
    // Warm up both connections.
    stream(env, addr, "vault", env.vault(), 1, 4, 4).await;
    stream(env, addr, "broker", env.broker(), 1, 4, 4).await;
    let start = Instant::now();
    let (v, b) = tokio::join!(
        stream(env, addr, "vault", env.vault(), 5, per_source, 64),
        stream(env, addr, "broker", env.broker(), 5, per_source, 64),
    );
    let grouped = measure([v, b].concat(), start.elapsed());
    let start = Instant::now();
    let one = stream(env, addr, "vault", env.vault(), 5 + per_source, single, 1).await;
    (grouped, measure(one, start.elapsed()))
}

fn row(backend: &str, what: &str, m: &Measured) {
    println!(
        "| {backend} | {what} | {:.0} | {:.2} | {:.2} |",
        m.per_second,
        m.p50.as_secs_f64() * 1e3,
        m.p99.as_secs_f64() * 1e3
    );
}

#[tokio::main]
async fn main() {
    let per_source: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5000);
    let single = (per_source / 5).max(100);

    let env = Env::new();
    let (tiles, addr) = start(&serve_flags(&env)).await;
    let on_tiles = run(&env, addr, per_source, single).await;
    tiles.stop().await;

    let env = Env::new();
    let pg = TestPostgres::start().expect("PostgreSQL (scripts/test installs it)");
    let url = pg
        .create_database("audit", "audit_role", "audit-pw")
        .unwrap();
    std::fs::write(env.path().join("db.pw"), "audit-pw\n").unwrap();
    let file = env.path().join("pg.toml");
    std::fs::write(
        &file,
        format!(
            "[store]\nbackend = \"postgres\"\n[store.postgres]\nurl = \"{url}\"\n\
             password_file = \"db.pw\"\n"
        ),
    )
    .unwrap();
    let mut flags = serve_flags(&env);
    flags.extend(["--config".into(), file.display().to_string()]);
    let (on_pg_server, addr) = start(&flags).await;
    // Appends go once the replica holds the sequencer lease.
    let mut health = HealthClient::new(env.channel(addr, "carol"));
    let check = HealthCheckRequest {
        service: "twokey.audit.v1.AuditService".into(),
    };
    while health
        .check(check.clone())
        .await
        .unwrap()
        .into_inner()
        .status()
        != ServingStatus::Serving
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let on_pg = run(&env, addr, per_source, single).await;
    on_pg_server.stop().await;
    drop(pg);

    println!("| store | Append | events/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|");
    let grouped = "2 sources × 64 in flight";
    let one = "1 source × 1 in flight";
    row("tiles (journal)", grouped, &on_tiles.0);
    row("tiles (journal)", one, &on_tiles.1);
    row("PostgreSQL", grouped, &on_pg.0);
    row("PostgreSQL", one, &on_pg.1);
}
