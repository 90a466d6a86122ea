//! Property tests: the parsers of hostile input (statements, signatures,
//! policy TOML, allowed_signers, durations) and the checks over them never
//! panic, and statements round-trip through their one encoding.

mod common;

use std::sync::OnceLock;

use common::*;
use proptest::prelude::*;
use twokey_consent::statement::{ApprovalBinding, ReleaseBinding, RequestBinding};
use twokey_consent::{
    Binding, MemoryHistory, Policy, SignedStatement, allowed_signers::parse_allowed_signers,
    decode_statement, encode_statement, sshsig::parse_signature, time::parse_duration,
    verify_policy_update,
};

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(World::new)
}

fn binding() -> impl Strategy<Value = Binding> {
    let s = || "[ -~]{0,40}";
    let digest = || proptest::collection::vec(any::<u8>(), 0..40);
    prop_oneof![
        (s(), s(), s(), digest(), any::<u32>()).prop_map(|(r, a, q, d, t)| {
            Binding::Request(RequestBinding {
                request_id: r,
                account_id: a,
                requester: q,
                reason_digest: d,
                created_at: Some(twokey_proto_ts(t)),
            })
        }),
        (digest(), s(), s()).prop_map(|(d, r, a)| Binding::Approval(ApprovalBinding {
            request_digest: d,
            request_id: r,
            account_id: a,
        })),
        (
            digest(),
            proptest::collection::vec(digest(), 0..4),
            any::<bool>(),
            s(),
            s()
        )
            .prop_map(|(d, ds, pin, g, r)| Binding::Release(ReleaseBinding {
                request_digest: d,
                approval_digests: ds,
                pin_verified: pin,
                grant_id: g,
                release_id: r,
                request_id: String::new(),
                account_id: String::new(),
            })),
    ]
}

fn twokey_proto_ts(secs: u32) -> twokey_consent::statement::Timestamp {
    twokey_consent::statement::Timestamp {
        seconds: i64::from(secs),
        nanos: 0,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = decode_statement(&bytes);
    }

    #[test]
    fn statements_round_trip(b in binding(), v in any::<u64>(), t in any::<u32>()) {
        let s = twokey_consent::new_statement(v, "spiffe://example.org/user/x", at(u64::from(t)), b);
        let bytes = encode_statement(&s);
        prop_assert_eq!(decode_statement(&bytes).unwrap(), s);
    }

    #[test]
    fn mutated_statements_never_panic(b in binding(), i in any::<usize>(), x in any::<u8>()) {
        let s = twokey_consent::new_statement(1, "spiffe://example.org/user/x", t0(), b);
        let mut bytes = encode_statement(&s);
        let n = bytes.len();
        bytes[i % n] ^= x;
        let _ = decode_statement(&bytes);
    }

    #[test]
    fn signature_parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..800), armored in any::<bool>()) {
        let input = if armored {
            let mut v = b"-----BEGIN SSH SIGNATURE-----\n".to_vec();
            v.extend(bytes);
            v
        } else {
            let mut v = b"SSHSIG".to_vec();
            v.extend(bytes);
            v
        };
        let _ = parse_signature(&input);
    }

    #[test]
    fn policy_parsing_never_panics(text in "\\PC{0,400}") {
        let _ = Policy::parse(&text);
    }

    #[test]
    fn mutated_policies_never_panic(start in any::<usize>(), len in 0usize..40, insert in "[ -~\n]{0,40}") {
        let doc = world().policy_toml(2, "");
        let mut chars: Vec<char> = doc.chars().collect();
        let s = start % chars.len();
        let e = (s + len).min(chars.len());
        chars.splice(s..e, insert.chars());
        let text: String = chars.into_iter().collect();
        let _ = Policy::parse(&text);
        let w = world();
        let sig = w.sign_policy("alice", &text);
        let _ = verify_policy_update(Some(&w.policy), &w.root, text.as_bytes(), &[sig.clone(), sig]);
    }

    #[test]
    fn allowed_signers_and_durations_never_panic(text in "\\PC{0,200}") {
        let _ = parse_allowed_signers(&text);
        let _ = parse_duration(&text);
    }

    #[test]
    fn checks_over_garbage_never_panic(
        req in proptest::collection::vec(any::<u8>(), 0..300),
        sig in proptest::collection::vec(any::<u8>(), 0..300),
        n in 0usize..3,
    ) {
        let w = world();
        let junk = SignedStatement { statement: req, signature: sig };
        let good = w.build(&w.plan());
        let approvals = vec![junk.clone(); n];
        let grant = twokey_consent::GrantFacts { grant_id: "g", account_id: ACCOUNT, request_id: "r" };
        let h = MemoryHistory::new();
        prop_assert!(twokey_consent::check_release(&w.policy, &junk, &approvals, &junk, &grant, at(200), &h).is_err());
        prop_assert!(twokey_consent::check_release(&w.policy, &good.request, &approvals, &junk, &grant, at(200), &h).is_err());
        let req = twokey_consent::AdminActionRequest { account_id: ACCOUNT.into(), action: twokey_consent::AdminAction::Remove };
        prop_assert!(twokey_consent::check_admin_action(&w.policy, &req, &[junk], at(200), &h).is_err());
    }
}
