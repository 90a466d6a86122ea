//! The notification queue in PostgreSQL (a throwaway server), in process:
//! two replicas' workers claim with `FOR UPDATE SKIP LOCKED` and deliver
//! every entry exactly once, a PIN first; a queued PIN is sealed in the
//! table; a failing webhook is retried with the backoff and, given up,
//! recorded once as `notification.failed` in the PostgreSQL outbox.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::future::BoxFuture;
use twokey_broker::{
    notify::{
        FIRST_BACKOFF, MAX_ATTEMPTS, MAX_BACKOFF, Message, Notifier, NotifyError, NotifyQueue,
        Recipient, http::HttpClient, pg::PgQueue, webhook::Webhook,
    },
    pin::{Pin, PinKey},
    store::postgres,
};
use twokey_pgstore::{PgSettings, outbox::PgOutbox};
use twokey_runtime::{
    SpiffeId,
    durable::DurableDb,
    events::EventSigner,
    keys::SecretKey,
    outbox::Outbox,
    time::{Clock, ManualClock},
};
use twokey_testkit::postgres::TestPostgres;

const PIN: &str = "4815162342";

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn signer() -> EventSigner {
    EventSigner::new(
        SpiffeId::parse("spiffe://t.local/svc/broker").unwrap(),
        ed25519_dalek::SigningKey::from_bytes(&[4; 32]),
    )
}

struct Pg {
    pg: TestPostgres,
    settings: PgSettings,
}

async fn pg() -> Pg {
    let pg = TestPostgres::start().expect("scripts/test installs PostgreSQL");
    let db = pg.database_for("broker", "broker_role").unwrap();
    let settings = PgSettings {
        url: db.url,
        password_file: Some(db.password_file),
        ca_file: None,
    };
    postgres::migrate(&settings).await.unwrap();
    Pg { pg, settings }
}

/// One replica's queue in PostgreSQL, delivering to `notifier`.
async fn replica(
    pg: &Pg,
    notifier: Arc<dyn Notifier>,
    clock: Arc<dyn Clock>,
) -> (PgQueue, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let db = DurableDb::open(dir.path()).unwrap();
    let outbox = Outbox::open(&db, signer(), clock.clone()).unwrap();
    let key = PinKey::new(SecretKey::from_bytes([3; 32]));
    let sled = NotifyQueue::open(&db, outbox, vec![notifier], &key, clock.clone()).unwrap();
    let queue = PgQueue::new(pg.settings.clone(), &sled);
    queue.ready(
        PgOutbox::connect(&pg.settings, Arc::new(signer()), clock)
            .await
            .unwrap(),
    );
    (queue, dir)
}

fn message(id: &str, pin: Option<&str>) -> Message {
    Message {
        id: id.into(),
        kind: if pin.is_some() {
            "pin"
        } else {
            "request.created"
        }
        .into(),
        request_id: "r1".into(),
        account_id: "acct".into(),
        to: Recipient::Channel,
        text: "a change".into(),
        pin: pin.map(Pin::from_text),
        at_ms: 0,
    }
}

/// Queues `messages` in a transaction of their own, as a change would.
async fn enqueue(pg: &Pg, queue: &PgQueue, messages: &[Message]) {
    let mut client = twokey_pgstore::connect(&pg.settings).await.unwrap();
    let tx = client.transaction().await.unwrap();
    queue.enqueue(&tx, messages).await.unwrap();
    tx.commit().await.unwrap();
}

/// Records what it was handed: (message id, PIN).
#[derive(Debug, Default)]
struct Recorder {
    seen: Mutex<Vec<(String, Option<String>)>>,
}

impl Notifier for Recorder {
    fn name(&self) -> &'static str {
        "recorder"
    }
    fn accepts(&self, _: &Message) -> bool {
        true
    }
    fn send<'a>(&'a self, m: &'a Message) -> BoxFuture<'a, Result<(), NotifyError>> {
        Box::pin(async move {
            // Slow enough that the two workers' passes overlap.
            tokio::time::sleep(Duration::from_millis(2)).await;
            self.seen
                .lock()
                .unwrap()
                .push((m.id.clone(), m.pin.as_ref().map(|p| p.expose().to_owned())));
            Ok(())
        })
    }
}

/// Passes until one finds nothing due.
async fn drain(queue: &PgQueue) -> usize {
    let mut total = 0;
    loop {
        match queue.run_due().await.unwrap() {
            0 => return total,
            n => total += n,
        }
    }
}

#[tokio::test]
async fn two_workers_deliver_every_entry_once_a_pin_first_and_the_table_holds_it_sealed() {
    let pg = pg().await;
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(now()));
    let (on_a, on_b) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
    let (a, _da) = replica(&pg, on_a.clone(), clock.clone()).await;
    let (b, _db) = replica(&pg, on_b.clone(), clock.clone()).await;
    let others: Vec<Message> = (0..150).map(|i| message(&format!("m{i}"), None)).collect();
    enqueue(&pg, &a, &others[..75]).await;
    enqueue(&pg, &b, &others[75..]).await;
    // Queued behind 150 others.
    enqueue(&pg, &a, &[message("the-pin", Some(PIN))]).await;

    // In the table: sealed, never in the clear.
    let table = pg
        .pg
        .psql("broker", "SELECT id, pin, entry FROM broker_notify_queue")
        .unwrap();
    assert!(table.contains("sealed_pin"), "{table}");
    assert!(!table.contains(PIN), "a PIN in the clear in PostgreSQL");

    let (tried_a, tried_b) = tokio::join!(drain(&a), drain(&b));
    assert_eq!(tried_a + tried_b, 151);
    assert!(
        tried_a > 0 && tried_b > 0,
        "both workers deliver: {tried_a} and {tried_b}"
    );
    let mut ids: Vec<String> = [&on_a, &on_b]
        .iter()
        .flat_map(|r| r.seen.lock().unwrap().clone())
        .map(|(id, _)| id)
        .collect();
    ids.sort();
    let all = ids.len();
    ids.dedup();
    assert_eq!(all, ids.len(), "a message delivered twice");
    assert_eq!(all, 151);
    // The worker that claimed the PIN sent it first, opened.
    let with_pin = [&on_a, &on_b]
        .into_iter()
        .find(|r| r.seen.lock().unwrap().iter().any(|(id, _)| id == "the-pin"))
        .unwrap();
    assert_eq!(
        with_pin.seen.lock().unwrap()[0],
        ("the-pin".to_owned(), Some(PIN.to_owned()))
    );
    assert_eq!(a.depth().await.unwrap(), 0);
}

#[tokio::test]
async fn a_failing_webhook_is_retried_with_backoff_then_recorded_once_as_failed() {
    let pg = pg().await;
    let manual = ManualClock::new(now());
    let clock: Arc<dyn Clock> = Arc::new(manual.clone());
    // A port nobody listens on: every post is refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let webhook = Webhook::new(
        format!("https://127.0.0.1:{port}/hook"),
        zeroize::Zeroizing::new(b"secret".to_vec()),
        false,
        HttpClient::new(None).unwrap(),
    );
    let (a, _da) = replica(&pg, Arc::new(webhook), clock.clone()).await;
    let (b, _db) = replica(&pg, Arc::new(Recorder::default()), clock).await;
    enqueue(&pg, &a, &[message("m1", None)]).await;
    let failed = "SELECT count(*) FROM twokey_outbox_pending
                  WHERE position('notification.failed'::bytea in event) > 0";

    assert_eq!(a.run_due().await.unwrap(), 1);
    // Not due again, on either replica, until the backoff has passed.
    assert_eq!(a.run_due().await.unwrap(), 0);
    assert_eq!(b.run_due().await.unwrap(), 0);
    for attempt in 1..MAX_ATTEMPTS {
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << (attempt - 1))
            .min(MAX_BACKOFF);
        manual.advance(backoff - Duration::from_millis(1));
        assert_eq!(a.run_due().await.unwrap(), 0, "early retry {attempt}");
        manual.advance(Duration::from_millis(1));
        assert_eq!(a.run_due().await.unwrap(), 1, "attempt {}", attempt + 1);
        let expected = if attempt + 1 < MAX_ATTEMPTS { "0" } else { "1" };
        assert_eq!(pg.pg.psql("broker", failed).unwrap().trim(), expected);
    }
    // Given up: gone from the queue, one event in the outbox.
    assert_eq!(a.depth().await.unwrap(), 0);
    assert_eq!(pg.pg.psql("broker", failed).unwrap().trim(), "1");
    manual.advance(MAX_BACKOFF);
    assert_eq!(a.run_due().await.unwrap(), 0);
    assert_eq!(pg.pg.psql("broker", failed).unwrap().trim(), "1");
    let attempts = pg
        .pg
        .psql(
            "broker",
            &format!(
                "SELECT position('{MAX_ATTEMPTS}'::bytea in event) > 0 FROM twokey_outbox_pending"
            ),
        )
        .unwrap();
    assert!(attempts.contains('t'), "{attempts}");
}

#[tokio::test]
async fn entries_that_do_not_decode_are_kept_out_of_the_due_set_and_never_starve_the_others() {
    let pg = pg().await;
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(now()));
    let seen = Arc::new(Recorder::default());
    let (a, _da) = replica(&pg, seen.clone(), clock).await;
    // More unreadable rows than one pass takes, queued before the good
    // ones (as a bug or a hand edit of the table would leave them).
    pg.pg
        .psql(
            "broker",
            "INSERT INTO broker_notify_queue (id, pin, next_ms, entry)
             SELECT 'bad-' || g, false, 0, '{not an entry' FROM generate_series(1, 70) g",
        )
        .unwrap();
    enqueue(&pg, &a, &[message("good-1", None), message("good-2", None)]).await;
    // The first pass parks 64 of them, the next the other 6 and sends both.
    assert_eq!(a.run_due().await.unwrap(), 64);
    assert_eq!(a.run_due().await.unwrap(), 8);
    assert_eq!(a.run_due().await.unwrap(), 0);
    let mut ids: Vec<String> = seen
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|(id, _)| id.clone())
        .collect();
    ids.sort();
    assert_eq!(ids, ["good-1", "good-2"]);
    // Kept, never due again, not deleted.
    let parked = pg
        .pg
        .psql(
            "broker",
            "SELECT count(*) FROM broker_notify_queue WHERE id LIKE 'bad-%' AND next_ms = 9223372036854775807",
        )
        .unwrap();
    assert_eq!(parked.trim(), "70");
    assert_eq!(a.depth().await.unwrap(), 70);
}
