//! The same release on two vault replicas at once: the loser's check may
//! read the vault's history while the winner commits. Whichever read the
//! winner's commit lands before, the check answers the replay
//! (`ReleaseReplayed`, PERMISSION_DENIED) or passes (and the vault's own
//! transaction then refuses the used grant) — never "this request's codes
//! are used up" or "the rate is exceeded", which would name the wrong
//! reason for the same attempt.

mod common;

use std::{cell::Cell, time::SystemTime};

use common::*;
use twokey_consent::{ConsentError, MemoryHistory, ReleaseHistory};

/// A history that is `before` for the first `reads` reads and `after`
/// (the winner's release committed) from then on.
struct Racing {
    before: MemoryHistory,
    after: MemoryHistory,
    reads: Cell<usize>,
    commit_after: usize,
}

impl Racing {
    fn now(&self) -> &MemoryHistory {
        let n = self.reads.get();
        self.reads.set(n + 1);
        if n < self.commit_after {
            &self.before
        } else {
            &self.after
        }
    }
}

impl ReleaseHistory for Racing {
    fn release_id_used(&self, release_id: &str) -> bool {
        self.now().release_id_used(release_id)
    }
    fn codes_released(&self, request_digest: &[u8; 32]) -> u32 {
        self.now().codes_released(request_digest)
    }
    fn releases_since(&self, account_id: &str, since: SystemTime) -> u32 {
        self.now().releases_since(account_id, since)
    }
}

#[test]
fn a_release_committed_between_the_reads_is_seen_as_the_replay_it_is() {
    let w = World::new();
    let a = w.build(&w.plan());
    let v = a.check(&w.policy).expect("the attempt passes alone");
    let mut after = MemoryHistory::new();
    after.record_release(&v, a.now);
    // The account allows one code per request and few per hour: the
    // winner's release alone would exhaust the request.
    for commit_after in 0..=3 {
        let racing = Racing {
            before: MemoryHistory::new(),
            after: after.clone(),
            reads: Cell::new(0),
            commit_after,
        };
        let result = twokey_consent::check_release(
            &w.policy,
            &a.request,
            &a.approvals,
            &a.release,
            &twokey_consent::GrantFacts {
                grant_id: &a.grant_id,
                account_id: &a.account,
                request_id: &a.request_id,
            },
            a.now,
            &racing,
        );
        match result {
            Ok(_) => assert_eq!(commit_after, 3, "passed with the commit before a read"),
            Err(ConsentError::ReleaseReplayed { .. }) => {}
            Err(e) => panic!("commit after {commit_after} reads: {e:?}"),
        }
    }
}
