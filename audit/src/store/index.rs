//! The query indexes of the tile store, in sled: one key per (field value,
//! leaf index) for request id, account, actor (and the actor's bare name,
//! the last segment of its SPIFFE ID), action and event time, written in
//! the same sled batch as the append they index. A query walks one of them
//! from its page token instead of scanning the log.
//!
//! Keys: a tag byte, the value's length (`u16`, big-endian) and bytes, then
//! the leaf index (`u64`, big-endian), so one value's keys sort by index.
//! Time keys: the tag, the event time (seconds with the sign bit flipped,
//! then nanoseconds, both big-endian) and the leaf index.

use twokey_proto::audit::v1::Event;

use crate::error::AuditError;

const REQUEST: u8 = b'R';
const ACCOUNT: u8 = b'A';
const ACTOR: u8 = b'P';
const ACTOR_NAME: u8 = b'N';
const ACTION: u8 = b'C';
const TIME: u8 = b'T';

/// How a query walks the log: the one index it reads, or every entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Walk {
    /// Every entry, by leaf index.
    All,
    /// One source's entries, by leaf index (its sequence numbers).
    Source(String),
    /// Entries of one request id.
    Request(String),
    /// Entries of one account.
    Account(String),
    /// Entries of one actor (a SPIFFE ID, matched whole).
    Actor(String),
    /// Entries whose actor is this bare name or a SPIFFE ID ending in it.
    ActorName(String),
    /// Entries of one action.
    Action(String),
    /// Entries with an event time in `[since, until)`, by time then index.
    Time {
        /// At or after.
        since: Option<(i64, i32)>,
        /// Before.
        until: Option<(i64, i32)>,
    },
}

/// The prefix of every key of `tag` and `value`.
fn value_prefix(tag: u8, value: &str) -> Vec<u8> {
    let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
    let mut k = Vec::with_capacity(3 + value.len() + 8);
    k.push(tag);
    k.extend_from_slice(&len.to_be_bytes());
    k.extend_from_slice(&value.as_bytes()[..usize::from(len)]);
    k
}

/// The time part of a time key.
fn time_bytes((seconds, nanos): (i64, i32)) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&((seconds as u64) ^ (1 << 63)).to_be_bytes());
    b[8..].copy_from_slice(&(nanos.max(0) as u32).to_be_bytes());
    b
}

fn time_key(time: (i64, i32), index: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(21);
    k.push(TIME);
    k.extend_from_slice(&time_bytes(time));
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// The bare name an actor is also found by: the last segment of a SPIFFE
/// ID, or the actor itself when it has no `/`.
pub(crate) fn actor_name(actor: &str) -> Option<&str> {
    if !actor.contains('/') {
        return Some(actor);
    }
    if actor.starts_with("spiffe://") {
        return actor.rsplit_once('/').map(|(_, name)| name);
    }
    None
}

/// The index keys of `event` stored at `index`.
pub fn keys(event: &Event, index: u64) -> Vec<Vec<u8>> {
    let mut keys = Vec::with_capacity(6);
    let mut put = |tag: u8, value: &str| {
        if !value.is_empty() && value.len() <= usize::from(u16::MAX) {
            let mut k = value_prefix(tag, value);
            k.extend_from_slice(&index.to_be_bytes());
            keys.push(k);
        }
    };
    put(REQUEST, &event.request_id);
    put(ACCOUNT, &event.account_id);
    put(ACTOR, &event.actor);
    if let Some(name) = actor_name(&event.actor) {
        put(ACTOR_NAME, name);
    }
    put(ACTION, &event.action);
    if let Some(t) = &event.time {
        keys.push(time_key((t.seconds, t.nanos), index));
    }
    keys
}

fn index_of(key: &[u8]) -> Result<u64, AuditError> {
    key.len()
        .checked_sub(8)
        .and_then(|at| key[at..].try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| AuditError::Store("a query index key is shorter than 8 bytes".into()))
}

/// The index of a key: its last 8 bytes.
pub fn index_of_key(key: &[u8]) -> Result<u64, AuditError> {
    index_of(key)
}

/// The key range `[low, high)` a walk reads, from `start` (inclusive; for a
/// time walk, `start_time` is the event time of entry `start`); `None` when
/// it is empty. `Walk::All` and `Walk::Source` read no query index.
pub fn range(
    walk: &Walk,
    start: Option<(u64, Option<(i64, i32)>)>,
    newest_first: bool,
) -> Option<(Vec<u8>, Vec<u8>)> {
    let (low, high) = match walk {
        Walk::Time { since, until } => {
            let low = match since {
                Some(t) => time_key(*t, 0),
                None => vec![TIME],
            };
            let high = match until {
                Some(t) => time_key(*t, 0),
                None => vec![TIME + 1],
            };
            // Resume at the entry of the page token.
            match start {
                Some((index, Some(t))) if newest_first => {
                    let mut at = time_key(t, index);
                    at.push(0);
                    (low, at.min(high))
                }
                Some((index, Some(t))) => (time_key(t, index).max(low), high),
                _ => (low, high),
            }
        }
        Walk::All | Walk::Source(_) => return None,
        Walk::Request(value)
        | Walk::Account(value)
        | Walk::Actor(value)
        | Walk::ActorName(value)
        | Walk::Action(value) => {
            let tag = match walk {
                Walk::Request(_) => REQUEST,
                Walk::Account(_) => ACCOUNT,
                Walk::Actor(_) => ACTOR,
                Walk::ActorName(_) => ACTOR_NAME,
                _ => ACTION,
            };
            let prefix = value_prefix(tag, value);
            let mut low = prefix.clone();
            let mut high = prefix;
            match start {
                Some((index, _)) if newest_first => {
                    high.extend_from_slice(&index.to_be_bytes());
                    high.push(0);
                    low.extend_from_slice(&[0; 8]);
                }
                Some((index, _)) => {
                    low.extend_from_slice(&index.to_be_bytes());
                    high.extend_from_slice(&[0xff; 9]);
                }
                None => {
                    low.extend_from_slice(&[0; 8]);
                    high.extend_from_slice(&[0xff; 9]);
                }
            }
            (low, high)
        }
    };
    (low < high).then_some((low, high))
}

/// Leaf indices along `walk` from the keys in `tree` and the keys in
/// `pending` (sorted; those not written to `tree` yet), merged in key
/// order, each once.
pub fn walk<'a>(
    tree: &'a sled::Tree,
    pending: &std::collections::BTreeSet<Vec<u8>>,
    walk: &Walk,
    start: Option<(u64, Option<(i64, i32)>)>,
    newest_first: bool,
) -> Box<dyn Iterator<Item = Result<u64, AuditError>> + Send + 'a> {
    let Some((low, high)) = range(walk, start, newest_first) else {
        return Box::new(std::iter::empty());
    };
    let mut mem: Vec<Vec<u8>> = pending.range(low.clone()..high.clone()).cloned().collect();
    let stored = tree.range(low..high);
    let stored: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + Send> =
        if newest_first {
            mem.reverse();
            Box::new(stored.rev())
        } else {
            Box::new(stored)
        };
    Box::new(Merge {
        stored: stored.peekable(),
        mem: mem.into_iter().peekable(),
        newest_first,
    })
}

/// Two key streams in the same order, merged, a key in both given once.
struct Merge<A: Iterator, B: Iterator> {
    stored: std::iter::Peekable<A>,
    mem: std::iter::Peekable<B>,
    newest_first: bool,
}

impl<A, B> Iterator for Merge<A, B>
where
    A: Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
    B: Iterator<Item = Vec<u8>>,
{
    type Item = Result<u64, AuditError>;

    fn next(&mut self) -> Option<Self::Item> {
        let take_mem = match (self.stored.peek(), self.mem.peek()) {
            (None, None) => return None,
            (Some(Err(_)), _) | (Some(_), None) => false,
            (None, Some(_)) => true,
            (Some(Ok((k, _))), Some(m)) => {
                if k.as_ref() == m.as_slice() {
                    self.mem.next();
                    false
                } else {
                    (m.as_slice() < k.as_ref()) != self.newest_first
                }
            }
        };
        if take_mem {
            return self.mem.next().map(|k| index_of(&k));
        }
        self.stored.next().map(|item| {
            let (k, _) = item?;
            index_of(&k)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twokey_proto::Timestamp;

    fn event(actor: &str, seconds: i64) -> Event {
        Event {
            actor: actor.into(),
            action: "code.released".into(),
            account_id: "aws-prod".into(),
            request_id: "r1".into(),
            time: Some(Timestamp { seconds, nanos: 0 }),
            ..Event::default()
        }
    }

    fn tree() -> (tempfile::TempDir, sled::Tree) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tree = db.open_tree("q").unwrap();
        (dir, tree)
    }

    fn all(
        tree: &sled::Tree,
        w: &Walk,
        start: Option<(u64, Option<(i64, i32)>)>,
        rev: bool,
    ) -> Vec<u64> {
        walk(tree, &Default::default(), w, start, rev)
            .map(Result::unwrap)
            .collect()
    }

    #[test]
    fn keys_not_yet_written_merge_with_the_stored_ones_each_once() {
        let (_d, t) = tree();
        let mut pending = std::collections::BTreeSet::new();
        for i in 0..10u64 {
            for k in keys(&event("bob", 100 + i as i64), i) {
                // Even indices stored, odd ones pending, and 4 in both.
                if i % 2 == 0 {
                    t.insert(&k, &[]).unwrap();
                }
                if i % 2 == 1 || i == 4 {
                    pending.insert(k);
                }
            }
        }
        let bob = Walk::ActorName("bob".into());
        let got = |start, rev| -> Vec<u64> {
            walk(&t, &pending, &bob, start, rev)
                .map(Result::unwrap)
                .collect()
        };
        assert_eq!(got(None, false), (0..10).collect::<Vec<_>>());
        assert_eq!(got(None, true), (0..10).rev().collect::<Vec<_>>());
        assert_eq!(got(Some((3, None)), false), (3..10).collect::<Vec<_>>());
        assert_eq!(got(Some((4, None)), true), [4, 3, 2, 1, 0]);
        let time = Walk::Time {
            since: Some((103, 0)),
            until: Some((106, 0)),
        };
        let got: Vec<u64> = walk(&t, &pending, &time, None, false)
            .map(Result::unwrap)
            .collect();
        assert_eq!(got, [3, 4, 5]);
    }

    #[test]
    fn a_value_walks_in_index_order_from_the_token_either_way() {
        let (_d, t) = tree();
        for (i, actor) in [
            "spiffe://t/user/bob",
            "spiffe://t/user/alice",
            "bob",
            "spiffe://t/user/bob",
            "urn:x/bob",
        ]
        .iter()
        .enumerate()
        {
            for k in keys(&event(actor, 100 - i as i64), i as u64 * 300) {
                t.insert(k, &[]).unwrap();
            }
        }
        let bob = Walk::ActorName("bob".into());
        assert_eq!(all(&t, &bob, None, false), [0, 600, 900]);
        assert_eq!(all(&t, &bob, None, true), [900, 600, 0]);
        assert_eq!(all(&t, &bob, Some((600, None)), false), [600, 900]);
        assert_eq!(all(&t, &bob, Some((600, None)), true), [600, 0]);
        assert_eq!(all(&t, &bob, Some((601, None)), true), [600, 0]);
        let exact = Walk::Actor("spiffe://t/user/bob".into());
        assert_eq!(all(&t, &exact, None, false), [0, 900]);
        // A value that is a prefix of another is not mixed with it.
        assert!(all(&t, &Walk::ActorName("bo".into()), None, false).is_empty());
        assert_eq!(all(&t, &Walk::Request("r1".into()), None, false).len(), 5);
        assert!(all(&t, &Walk::Request("r".into()), None, false).is_empty());
    }

    #[test]
    fn a_time_walk_is_in_time_order_inside_the_range_from_the_token() {
        let (_d, t) = tree();
        // Index 0 at time 100, 1 at 99, ... 4 at 96; and one before 1970.
        for i in 0..5u64 {
            for k in keys(&event("a", 100 - i as i64), i) {
                t.insert(k, &[]).unwrap();
            }
        }
        for k in keys(&event("a", -5), 5) {
            t.insert(k, &[]).unwrap();
        }
        let w = |since: Option<i64>, until: Option<i64>| Walk::Time {
            since: since.map(|s| (s, 0)),
            until: until.map(|s| (s, 0)),
        };
        assert_eq!(all(&t, &w(None, None), None, false), [5, 4, 3, 2, 1, 0]);
        assert_eq!(all(&t, &w(Some(97), Some(100)), None, false), [3, 2, 1]);
        assert_eq!(all(&t, &w(Some(97), Some(100)), None, true), [1, 2, 3]);
        assert_eq!(
            all(&t, &w(Some(97), None), Some((2, Some((98, 0)))), false),
            [2, 1, 0]
        );
        assert_eq!(
            all(&t, &w(Some(97), None), Some((2, Some((98, 0)))), true),
            [2, 3]
        );
        assert_eq!(all(&t, &w(None, Some(0)), None, false), [5]);
    }
}
