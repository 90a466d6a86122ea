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
fn actor_name(actor: &str) -> Option<&str> {
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

/// Leaf indices from `tree` (the query indexes) along `walk`, from `start`
/// (inclusive; for a time walk, `start_time` is the event time of entry
/// `start`), oldest or newest first. `Walk::All` and `Walk::Source` are not
/// walked here.
pub fn walk<'a>(
    tree: &'a sled::Tree,
    walk: &Walk,
    start: Option<(u64, Option<(i64, i32)>)>,
    newest_first: bool,
) -> Box<dyn Iterator<Item = Result<u64, AuditError>> + Send + 'a> {
    let (low, high): (Vec<u8>, Vec<u8>) = match walk {
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
            let (low, high) = match start {
                Some((index, Some(t))) if newest_first => {
                    let mut at = time_key(t, index);
                    at.push(0);
                    (low, at.min(high))
                }
                Some((index, Some(t))) => (time_key(t, index).max(low), high),
                _ => (low, high),
            };
            (low, high)
        }
        other => {
            let (tag, value) = match other {
                Walk::Request(v) => (REQUEST, v),
                Walk::Account(v) => (ACCOUNT, v),
                Walk::Actor(v) => (ACTOR, v),
                Walk::ActorName(v) => (ACTOR_NAME, v),
                Walk::Action(v) => (ACTION, v),
                Walk::All | Walk::Source(_) | Walk::Time { .. } => {
                    return Box::new(std::iter::once(Err(AuditError::Store(
                        "this walk does not read a query index".into(),
                    ))));
                }
            };
            let prefix = value_prefix(tag, value);
            let mut low = prefix.clone();
            let mut high = prefix.clone();
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
    if low >= high {
        return Box::new(std::iter::empty());
    }
    let range = tree.range(low..high);
    let parse = |item: sled::Result<(sled::IVec, sled::IVec)>| -> Result<u64, AuditError> {
        let (key, _) = item?;
        index_of(&key)
    };
    if newest_first {
        Box::new(range.rev().map(parse))
    } else {
        Box::new(range.map(parse))
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
        walk(tree, w, start, rev).map(Result::unwrap).collect()
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
