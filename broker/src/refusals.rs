//! Refusals of identities the policy does not name, counted instead of
//! written one by one: at most one `access.denied` event per identity per
//! [`WINDOW`], carrying how many calls it refused. A valid certificate for an
//! unknown user or service could otherwise make the broker write and fsync
//! one permanent event per call.
//!
//! The counts live in memory, bounded: at most [`MAX_TRACKED`] identities are
//! counted one by one; refusals of any further identity are counted together
//! in one "other identities" tally until windows are written and make room.
//! Every refusal is counted in exactly one tally, and a tally leaves only as
//! an event (or comes back through [`Refusals::restore`] if it could not be
//! written), so the counts in the events add up to the refusals made.
//!
//! People in the policy are not counted here: each of their refusals stays
//! one event, written before the answer.

use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use tokio::sync::Notify;
use twokey_proto::audit::v1::Outcome;
use twokey_runtime::{SpiffeId, events::EventDraft, time::rfc3339};

/// How long one identity's refusals are counted before they are written.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Most identities counted one by one.
pub const MAX_TRACKED: usize = 10_000;

/// How often due windows are looked for, besides a refusal finding its own
/// window due.
pub const TICK: Duration = Duration::from_secs(1);

/// The actor of the tally of identities beyond [`MAX_TRACKED`].
pub const OTHER_IDENTITIES: &str = "other identities";

/// Longest call name kept (the broker's own names are far shorter).
const MAX_CALL_NAME: usize = 64;

/// Refusals counted since the first one of a window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Calls refused.
    pub count: u64,
    /// When the first was refused.
    pub first_at: SystemTime,
    /// When the last was refused.
    pub last_at: SystemTime,
    /// The call first refused, e.g. `create_request`.
    pub first_attempted: String,
    /// The call last refused.
    pub last_attempted: String,
}

fn call_name(attempted: &str) -> String {
    attempted.chars().take(MAX_CALL_NAME).collect()
}

impl Window {
    fn new(attempted: &str, now: SystemTime) -> Self {
        Self {
            count: 1,
            first_at: now,
            last_at: now,
            first_attempted: call_name(attempted),
            last_attempted: call_name(attempted),
        }
    }

    fn add(&mut self, attempted: &str, now: SystemTime) {
        self.count += 1;
        self.last_at = now;
        if self.last_attempted != attempted {
            self.last_attempted = call_name(attempted);
        }
    }

    /// Counts `other`'s refusals in this window too.
    fn merge(&mut self, other: Window) {
        self.count += other.count;
        if other.first_at < self.first_at {
            self.first_at = other.first_at;
            self.first_attempted = other.first_attempted;
        }
        if other.last_at > self.last_at {
            self.last_at = other.last_at;
            self.last_attempted = other.last_attempted;
        }
    }

    /// Whether the window has lasted `window` (or the clock went back past
    /// its start: then it is written rather than held).
    fn due(&self, now: SystemTime, window: Duration) -> bool {
        now.duration_since(self.first_at)
            .map_or(true, |d| d >= window)
    }
}

/// The tally of every identity beyond the cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overflow {
    /// Their refusals.
    pub window: Window,
    /// The identity refused first.
    pub first_actor: String,
    /// The identity refused last.
    pub last_actor: String,
}

impl Overflow {
    fn new(actor: &str, window: Window) -> Self {
        Self {
            window,
            first_actor: actor.to_owned(),
            last_actor: actor.to_owned(),
        }
    }

    fn add(&mut self, actor: &str, attempted: &str, now: SystemTime) {
        self.window.add(attempted, now);
        if self.last_actor != actor {
            self.last_actor = actor.to_owned();
        }
    }

    fn merge(&mut self, other: Overflow) {
        if other.window.first_at < self.window.first_at {
            self.first_actor = other.first_actor;
        }
        if other.window.last_at > self.window.last_at {
            self.last_actor = other.last_actor;
        }
        self.window.merge(other.window);
    }
}

/// A window taken out to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tally {
    /// One identity's refusals.
    Identity {
        /// Its SPIFFE ID.
        actor: String,
        /// Its refusals.
        window: Window,
    },
    /// Refusals of identities beyond the cap.
    Others(Overflow),
}

impl Tally {
    /// Refusals counted.
    pub fn count(&self) -> u64 {
        match self {
            Tally::Identity { window, .. } => window.count,
            Tally::Others(o) => o.window.count,
        }
    }

    /// The `access.denied` event that records it.
    pub fn event(&self) -> EventDraft {
        let (actor, window, reason) = match self {
            Tally::Identity { actor, window } => (
                actor.as_str(),
                window,
                format!("{actor} is not named in the broker policy"),
            ),
            Tally::Others(o) => (
                OTHER_IDENTITIES,
                &o.window,
                format!(
                    "identities not named in the broker policy, beyond the {MAX_TRACKED} counted one by one"
                ),
            ),
        };
        let mut event = EventDraft::new(actor, "access.denied")
            .outcome(Outcome::Denied)
            .attr("count", window.count.to_string())
            .attr("first_attempted", &window.first_attempted)
            .attr("last_attempted", &window.last_attempted)
            .attr("first_at", rfc3339(window.first_at))
            .attr("last_at", rfc3339(window.last_at))
            .attr("reason", reason);
        if let Tally::Others(o) = self {
            event = event
                .attr("first_actor", &o.first_actor)
                .attr("last_actor", &o.last_actor);
        }
        event
    }
}

#[derive(Debug, Default)]
struct Tracker {
    identities: HashMap<String, Window>,
    others: Option<Overflow>,
}

/// The refusals of identities outside the policy not yet written.
#[derive(Debug)]
pub struct Refusals {
    tracker: Mutex<Tracker>,
    cap: usize,
    window: Duration,
    due: Notify,
}

impl Default for Refusals {
    fn default() -> Self {
        Self::new(MAX_TRACKED, WINDOW)
    }
}

impl Refusals {
    /// Counts at most `cap` identities one by one, each for `window`.
    pub fn new(cap: usize, window: Duration) -> Self {
        Self {
            tracker: Mutex::new(Tracker::default()),
            cap,
            window,
            due: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one refused call of `caller` at `now`. Returns whether the
    /// window it was counted in is due, and then wakes [`Self::wait_due`].
    pub fn record(&self, caller: &SpiffeId, attempted: &str, now: SystemTime) -> bool {
        let actor = caller.as_str();
        let (cap, length) = (self.cap, self.window);
        let mut tracker = self.lock();
        let due = if let Some(w) = tracker.identities.get_mut(actor) {
            w.add(attempted, now);
            w.due(now, length)
        } else if tracker.identities.len() < cap {
            tracker
                .identities
                .insert(actor.to_owned(), Window::new(attempted, now));
            false
        } else {
            match &mut tracker.others {
                Some(o) => {
                    o.add(actor, attempted, now);
                    o.window.due(now, length)
                }
                slot @ None => {
                    *slot = Some(Overflow::new(actor, Window::new(attempted, now)));
                    false
                }
            }
        };
        drop(tracker);
        if due {
            self.due.notify_one();
        }
        due
    }

    /// Waits until a refusal finds its window due.
    pub async fn wait_due(&self) {
        self.due.notified().await;
    }

    /// Takes out every window that has lasted the window length at `now`.
    pub fn take_due(&self, now: SystemTime) -> Vec<Tally> {
        let window = self.window;
        let mut tracker = self.lock();
        let due: Vec<String> = tracker
            .identities
            .iter()
            .filter(|(_, w)| w.due(now, window))
            .map(|(actor, _)| actor.clone())
            .collect();
        let mut out: Vec<Tally> = due
            .into_iter()
            .filter_map(|actor| {
                let window = tracker.identities.remove(&actor)?;
                Some(Tally::Identity { actor, window })
            })
            .collect();
        if tracker
            .others
            .as_ref()
            .is_some_and(|o| o.window.due(now, window))
            && let Some(o) = tracker.others.take()
        {
            out.push(Tally::Others(o));
        }
        out
    }

    /// Takes out every window, due or not (on shutdown).
    pub fn take_all(&self) -> Vec<Tally> {
        let mut tracker = self.lock();
        let mut out: Vec<Tally> = tracker
            .identities
            .drain()
            .map(|(actor, window)| Tally::Identity { actor, window })
            .collect();
        out.extend(tracker.others.take().map(Tally::Others));
        out
    }

    /// Puts back tallies that could not be written, merged with whatever
    /// was counted since (into the overflow tally if the cap is reached).
    pub fn restore(&self, tallies: Vec<Tally>) {
        let cap = self.cap;
        let mut tracker = self.lock();
        for tally in tallies {
            let overflow = match tally {
                Tally::Identity { actor, window } => {
                    if let Some(w) = tracker.identities.get_mut(&actor) {
                        w.merge(window);
                        continue;
                    }
                    if tracker.identities.len() < cap {
                        tracker.identities.insert(actor, window);
                        continue;
                    }
                    Overflow::new(&actor, window)
                }
                Tally::Others(o) => o,
            };
            match &mut tracker.others {
                Some(o) => o.merge(overflow),
                None => tracker.others = Some(overflow),
            }
        }
    }

    /// Identities counted one by one now.
    pub fn tracked(&self) -> usize {
        self.lock().identities.len()
    }

    /// Refusals counted and not yet taken out.
    pub fn pending(&self) -> u64 {
        let tracker = self.lock();
        tracker.identities.values().map(|w| w.count).sum::<u64>()
            + tracker.others.as_ref().map_or(0, |o| o.window.count)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::Arc,
        time::{Duration, UNIX_EPOCH},
    };

    use twokey_runtime::time::{Clock, ManualClock};

    use super::*;

    fn id(n: usize) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://twokey.local/user/stranger-{n}")).unwrap()
    }

    fn clock() -> ManualClock {
        ManualClock::new(UNIX_EPOCH + Duration::from_secs(1_900_000_000))
    }

    fn total(tallies: &[Tally]) -> u64 {
        tallies.iter().map(Tally::count).sum()
    }

    #[test]
    fn one_identity_is_one_window_a_minute_with_its_count() {
        let clock = clock();
        let r = Refusals::default();
        let mallory = id(0);
        let start = clock.now();
        for i in 0..2000 {
            let call = if i == 1999 { "release_code" } else { "approve" };
            assert!(!r.record(&mallory, call, clock.now()), "due too early");
            clock.advance(Duration::from_millis(10));
        }
        assert_eq!(r.tracked(), 1);
        assert!(r.take_due(clock.now()).is_empty(), "the minute is not over");
        clock.advance(WINDOW);
        let taken = r.take_due(clock.now());
        assert_eq!(
            taken,
            [Tally::Identity {
                actor: mallory.to_string(),
                window: Window {
                    count: 2000,
                    first_at: start,
                    last_at: start + Duration::from_millis(10 * 1999),
                    first_attempted: "approve".into(),
                    last_attempted: "release_code".into(),
                },
            }]
        );
        assert_eq!((r.tracked(), r.pending()), (0, 0));
        let event = taken[0].event();
        assert_eq!(
            (event.actor.as_str(), event.action.as_str()),
            (mallory.as_str(), "access.denied")
        );
        assert_eq!(event.outcome, Outcome::Denied);
        assert_eq!(event.attributes["count"], "2000");
        assert_eq!(event.attributes["first_attempted"], "approve");
        assert_eq!(event.attributes["last_attempted"], "release_code");
        assert_eq!(event.attributes["first_at"], rfc3339(start));
    }

    #[test]
    fn the_next_refusal_after_the_minute_says_its_window_is_due() {
        let clock = clock();
        let r = Refusals::default();
        assert!(!r.record(&id(1), "approve", clock.now()));
        clock.advance(WINDOW - Duration::from_millis(1));
        assert!(!r.record(&id(1), "approve", clock.now()));
        clock.advance(Duration::from_millis(1));
        assert!(r.record(&id(1), "deny", clock.now()), "a minute has passed");
        // Another identity's young window is not taken with it.
        assert!(!r.record(&id(2), "approve", clock.now()));
        let taken = r.take_due(clock.now());
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].count(), 3, "the late refusal closes the window");
        assert_eq!((r.tracked(), r.pending()), (1, 1));
    }

    #[tokio::test]
    async fn a_due_window_wakes_the_flusher() {
        let clock = clock();
        let r = Arc::new(Refusals::default());
        r.record(&id(1), "approve", clock.now());
        clock.advance(WINDOW);
        r.record(&id(1), "approve", clock.now());
        tokio::time::timeout(Duration::from_secs(5), r.wait_due())
            .await
            .expect("not woken");
    }

    #[test]
    fn a_clock_gone_back_writes_rather_than_holds() {
        let start = UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        let r = Refusals::default();
        r.record(&id(1), "approve", start);
        assert!(r.record(&id(1), "approve", start - Duration::from_secs(3600)));
        assert_eq!(total(&r.take_due(start - Duration::from_secs(3600))), 2);
    }

    #[test]
    fn twenty_thousand_strangers_stay_within_the_cap_and_add_up() {
        let clock = clock();
        let r = Refusals::default();
        for n in 0..20_000 {
            r.record(&id(n), "create_request", clock.now());
            assert!(r.tracked() <= MAX_TRACKED);
        }
        // Again, so each of the first 10,000 counts 2 and the rest overflow.
        for n in 0..20_000 {
            r.record(&id(n), "approve", clock.now());
        }
        assert_eq!(r.tracked(), MAX_TRACKED);
        assert_eq!(r.pending(), 40_000);
        clock.advance(WINDOW);
        let taken = r.take_due(clock.now());
        assert_eq!(taken.len(), MAX_TRACKED + 1);
        assert_eq!(total(&taken), 40_000, "nothing lost");
        let others: Vec<&Overflow> = taken
            .iter()
            .filter_map(|t| match t {
                Tally::Others(o) => Some(o),
                Tally::Identity { .. } => None,
            })
            .collect();
        assert_eq!(others.len(), 1);
        let o = others[0];
        assert_eq!(o.window.count, 20_000);
        assert_eq!(o.first_actor, id(MAX_TRACKED).as_str());
        assert_eq!(o.last_actor, id(19_999).as_str());
        assert!(
            taken
                .iter()
                .all(|t| matches!(t, Tally::Others(_)) || t.count() == 2)
        );
        let event = Tally::Others(o.clone()).event();
        assert_eq!(event.actor, OTHER_IDENTITIES);
        assert_eq!(event.attributes["count"], "20000");
        assert_eq!(event.attributes["first_actor"], id(MAX_TRACKED).as_str());
        // Written windows make room again.
        r.record(&id(30_000), "approve", clock.now());
        assert_eq!((r.tracked(), r.pending()), (1, 1));
    }

    #[test]
    fn tallies_that_could_not_be_written_come_back_merged() {
        let clock = clock();
        let r = Refusals::new(2, WINDOW);
        let start = clock.now();
        for n in 0..3 {
            r.record(&id(n), "approve", clock.now());
        }
        let taken = r.take_all();
        assert_eq!((taken.len(), total(&taken), r.pending()), (3, 3, 0));
        clock.advance(Duration::from_secs(1));
        // Meanwhile id 0 and id 3 take the two places and id 4 overflows.
        for n in [0, 3, 4] {
            r.record(&id(n), "deny", clock.now());
        }
        r.restore(taken);
        assert_eq!((r.tracked(), r.pending()), (2, 6), "nothing lost");
        let mut again = r.take_all();
        again.sort_by_key(|t| match t {
            Tally::Identity { actor, .. } => actor.clone(),
            Tally::Others(_) => String::new(),
        });
        let later = start + Duration::from_secs(1);
        let window = |count, first_at, first: &str| Window {
            count,
            first_at,
            last_at: later,
            first_attempted: first.into(),
            last_attempted: "deny".into(),
        };
        assert_eq!(
            again,
            [
                Tally::Others(Overflow {
                    // id 4's, then id 1's and id 2's put back.
                    window: window(3, start, "approve"),
                    first_actor: id(1).to_string(),
                    last_actor: id(4).to_string(),
                }),
                Tally::Identity {
                    actor: id(0).to_string(),
                    window: window(2, start, "approve"),
                },
                Tally::Identity {
                    actor: id(3).to_string(),
                    window: window(1, later, "deny"),
                },
            ]
        );
    }

    #[test]
    fn concurrent_refusals_and_flushes_lose_nothing() {
        let clock = clock();
        let r = Arc::new(Refusals::new(100, WINDOW));
        let written = std::thread::scope(|s| {
            for t in 0..4 {
                let r = r.clone();
                let clock = clock.clone();
                s.spawn(move || {
                    for i in 0..5_000 {
                        r.record(&id((t * 7 + i) % 300), "approve", clock.now());
                    }
                });
            }
            let flusher = s.spawn(|| {
                let mut written = 0;
                for round in 0..200 {
                    clock.advance(Duration::from_secs(1));
                    let mut taken = r.take_due(clock.now());
                    // Every tenth flush "fails" and puts its tallies back.
                    if round % 10 == 3 {
                        r.restore(std::mem::take(&mut taken));
                    }
                    written += total(&taken);
                    std::thread::yield_now();
                }
                written
            });
            flusher.join().unwrap()
        });
        assert_eq!(written + total(&r.take_all()), 20_000);
    }
}
