//! The table of single compromises and forgeries thrown at the pure checks:
//! each must be refused with exactly the error variant named, and the
//! allowed paths must pass.

mod common;

use common::*;
use prost::Message;
use twokey_consent::statement::{Statement, decode_statement};
use twokey_consent::{
    AdminAction, AdminActionRequest, ConsentError, ErrorKind, MemoryHistory, Person, PolicyError,
    Role, SignedStatement, StatementRef, TrustRoot, check_admin_action, consent_namespace,
    policy_namespace, verify_policy_update,
};

/// The expected refusal of a case, as a pattern on the error.
macro_rules! is {
    ($($pattern:tt)+) => {
        |e| matches!(e, $($pattern)+)
    };
}

#[test]
fn the_allowed_path_releases_and_names_the_people() {
    let w = World::new();
    let v = w
        .build(&w.plan())
        .check(&w.policy)
        .expect("a complete chain passes");
    assert_eq!(v.requester_person, "rita");
    assert_eq!(v.filed_by.person, "rita");
    assert_eq!(
        v.approvers
            .iter()
            .map(|a| a.person.as_str())
            .collect::<Vec<_>>(),
        ["adam", "anna"]
    );
    assert_eq!(v.operator.person, "otto");
    assert_eq!(v.release_id, "rel-1");
    assert_eq!(v.policy_version, 1);
    assert!(v.operator.key_fingerprint.starts_with("SHA256:"));
}

#[test]
fn intake_may_file_for_a_requester() {
    let w = World::new();
    let mut p = w.plan();
    p.request_key = "bpm";
    p.request_signer = id("bpm");
    let v = w.build(&p).check(&w.policy).expect("intake files for rita");
    assert_eq!(v.filed_by.person, "bpm");
    assert_eq!(v.requester_person, "rita");
}

/// Flips the release's grant id inside the signed bytes, keeping the
/// signature: tampered bytes.
fn tamper(s: &SignedStatement) -> SignedStatement {
    let mut st: Statement = decode_statement(&s.statement).unwrap();
    if let Some(twokey_consent::Binding::Release(r)) = &mut st.binding {
        r.grant_id = "grant-2".into();
    }
    SignedStatement {
        statement: st.encode_to_vec(),
        signature: s.signature.clone(),
    }
}

type Setup = Box<dyn Fn(&World) -> Attempt>;

fn case(
    name: &'static str,
    setup: impl Fn(&World) -> Attempt + 'static,
    expect: fn(&ConsentError) -> bool,
    kind: ErrorKind,
) -> (&'static str, Setup, fn(&ConsentError) -> bool, ErrorKind) {
    (name, Box::new(setup), expect, kind)
}

#[test]
fn every_single_compromise_and_forgery_is_refused() {
    use ConsentError as E;
    use ErrorKind::*;
    let w = World::new();
    let table = vec![
        case(
            "broker only: a grant with no statements",
            |w| {
                let mut a = w.build(&w.plan());
                a.request = SignedStatement::default();
                a.approvals.clear();
                a.release = SignedStatement::default();
                a
            },
            is!(E::Missing {
                statement: StatementRef::Request
            }),
            PermissionDenied,
        ),
        case(
            "broker plus one approver's key: a request forged with adam's key",
            |w| {
                let mut p = w.plan();
                p.request_key = "adam";
                w.build(&p)
            },
            |e| matches!(e, E::UnknownKey { statement: StatementRef::Request, owner: Some(o), .. } if o == "adam"),
            PermissionDenied,
        ),
        case(
            "one approver's key reused as a second approver",
            |w| {
                let mut p = w.plan();
                p.approvers[1] = ("adam", id("anna"), 120);
                w.build(&p)
            },
            |e| matches!(e, E::UnknownKey { statement: StatementRef::Approval(1), owner: Some(o), .. } if o == "adam"),
            PermissionDenied,
        ),
        case(
            "one approver approving twice",
            |w| {
                let mut p = w.plan();
                p.approvers[1] = ("adam", id("adam"), 120);
                w.build(&p)
            },
            |e| matches!(e, E::DuplicateApproval { person, .. } if person == "adam"),
            PermissionDenied,
        ),
        case(
            "one person approving under two SPIFFE IDs with one key",
            |w| {
                let mut p = w.plan();
                p.approvers = vec![("ivan", id("ivan"), 60), ("ivan", alt_id("ivan"), 120)];
                w.build(&p)
            },
            |e| matches!(e, E::DuplicateApproval { person, first: StatementRef::Approval(0), second: StatementRef::Approval(1) } if person == "ivan"),
            PermissionDenied,
        ),
        case(
            "the requester approving her own request under her second SPIFFE ID",
            |w| {
                let mut p = w.plan();
                p.approvers[1] = ("rita", alt_id("rita"), 120);
                w.build(&p)
            },
            |e| matches!(e, E::NotDistinct { person, first_role: Role::Requester, second_role: Role::Approver, .. } if person == "rita"),
            PermissionDenied,
        ),
        case(
            "an approver releasing (not an operator)",
            |w| {
                let mut p = w.plan();
                p.operator = ("ivan", id("ivan"));
                w.build(&p)
            },
            is!(E::MissingRole {
                statement: StatementRef::Release,
                role: Role::Operator,
                ..
            }),
            PermissionDenied,
        ),
        case(
            "intake filing for someone who is not a requester",
            |w| {
                let mut p = w.plan();
                p.request_key = "bpm";
                p.request_signer = id("bpm");
                p.requester = id("carol");
                w.build(&p)
            },
            is!(E::MissingRole {
                statement: StatementRef::Request,
                role: Role::Requester,
                ..
            }),
            PermissionDenied,
        ),
        case(
            "wrong namespace (another trust domain's)",
            |w| {
                let mut p = w.plan();
                p.release_namespace = Some(consent_namespace("other.org"));
                w.build(&p)
            },
            |e| matches!(e, E::WrongNamespace { statement: StatementRef::Release, found, .. } if found == "twokey-consent@other.org"),
            PermissionDenied,
        ),
        case(
            "wrong namespace (the policy namespace)",
            |w| {
                let mut p = w.plan();
                p.namespace = policy_namespace(TD);
                w.build(&p)
            },
            is!(E::WrongNamespace {
                statement: StatementRef::Request,
                ..
            }),
            PermissionDenied,
        ),
        case(
            "an approval bound to another request",
            |w| {
                let mut p = w.plan();
                p.approval_request_digest = Some(vec![7; 32]);
                w.build(&p)
            },
            is!(E::WrongBinding {
                statement: StatementRef::Approval(0),
                field: "request",
                ..
            }),
            FailedPrecondition,
        ),
        case(
            "a release binding other approvals than presented",
            |w| {
                let mut p = w.plan();
                p.release_approvals = Some(vec![vec![1; 32], vec![2; 32]]);
                w.build(&p)
            },
            is!(E::WrongBinding {
                statement: StatementRef::Release,
                field: "set of approvals",
                ..
            }),
            FailedPrecondition,
        ),
        case(
            "statements bound to another policy version",
            |w| {
                let mut p = w.plan();
                p.version = 2;
                w.build(&p)
            },
            is!(E::PolicyVersion {
                bound: 2,
                active: 1,
                ..
            }),
            FailedPrecondition,
        ),
        case(
            "a stale release",
            |w| {
                let mut p = w.plan();
                p.now = p.release_at + 600;
                w.build(&p)
            },
            is!(E::Stale {
                statement: StatementRef::Release,
                ..
            }),
            FailedPrecondition,
        ),
        case(
            "a release past the release window",
            |w| {
                let mut p = w.plan();
                p.release_at = 120 + 16 * 60;
                p.now = p.release_at + 10;
                w.build(&p)
            },
            is!(E::Stale {
                statement: StatementRef::Release,
                ..
            }),
            FailedPrecondition,
        ),
        case(
            "an approval after the request window",
            |w| {
                let mut p = w.plan();
                p.approvers[1].2 = 3_700;
                p.release_at = 3_750;
                p.now = 3_760;
                w.build(&p)
            },
            is!(E::Stale {
                statement: StatementRef::Approval(1),
                ..
            }),
            FailedPrecondition,
        ),
        case(
            "a release from the future",
            |w| {
                let mut p = w.plan();
                p.release_at = p.now + 300;
                w.build(&p)
            },
            is!(E::FromTheFuture {
                statement: StatementRef::Release,
                ..
            }),
            FailedPrecondition,
        ),
        case(
            "a replayed release id",
            |w| {
                let mut a = w.build(&w.plan());
                let v = a.check(&w.policy).unwrap();
                a.history.record_release(&v, a.now);
                a
            },
            |e| matches!(e, E::ReleaseReplayed { release_id, .. } if release_id == "rel-1"),
            PermissionDenied,
        ),
        case(
            "an unknown key signing as the operator",
            |w| {
                let mut p = w.plan();
                p.operator = ("mallory", id("otto"));
                w.build(&p)
            },
            is!(E::UnknownKey {
                statement: StatementRef::Release,
                owner: None,
                ..
            }),
            PermissionDenied,
        ),
        case(
            "an identity not in the policy",
            |w| {
                let mut p = w.plan();
                p.operator = ("mallory", id("mallory"));
                w.build(&p)
            },
            is!(E::UnknownIdentity {
                statement: StatementRef::Release,
                ..
            }),
            PermissionDenied,
        ),
        case(
            "too few approvals",
            |w| {
                let mut p = w.plan();
                p.approvers.truncate(1);
                w.build(&p)
            },
            is!(E::TooFewApprovals {
                have: 1,
                need: 2,
                ..
            }),
            FailedPrecondition,
        ),
        case(
            "too many codes for one request",
            |w| {
                let first = w.build(&w.plan());
                let v = first.check(&w.policy).unwrap();
                let mut p = w.plan();
                p.release_id = "rel-2".into();
                p.grant_id = "grant-2".into();
                // Same request statement, new release: rebuild reusing the
                // signed request and approvals.
                let mut second = w.build(&p);
                second.request = first.request.clone();
                second.approvals = first.approvals.clone();
                second.release = w.sign(
                    "otto",
                    &id("otto"),
                    1,
                    at(190),
                    twokey_consent::Binding::Release(twokey_consent::statement::ReleaseBinding {
                        request_digest: v.request_digest.to_vec(),
                        approval_digests: v.approval_digests.iter().map(|d| d.to_vec()).collect(),
                        pin_verified: true,
                        grant_id: "grant-2".into(),
                        release_id: "rel-2".into(),
                        request_id: "req-1".into(),
                        account_id: ACCOUNT.into(),
                    }),
                    &consent_namespace(TD),
                );
                second.history.record_release(&v, at(185));
                second
            },
            is!(E::CodesExhausted {
                released: 1,
                allowed: 1,
                ..
            }),
            FailedPrecondition,
        ),
        case(
            "the account's release rate exceeded",
            |w| {
                let mut a = w.build(&w.plan());
                let mut history = MemoryHistory::new();
                for (i, t) in [10, 100].into_iter().enumerate() {
                    let mut p = w.plan();
                    p.request_id = format!("other-{i}");
                    p.release_id = format!("other-rel-{i}");
                    p.grant_id = format!("other-grant-{i}");
                    let other = w.build(&p);
                    let v = other.check(&w.policy).unwrap();
                    history.record_release(&v, at(t));
                }
                a.history = history;
                a
            },
            is!(E::RateLimited {
                released: 2,
                max: 2,
                ..
            }),
            FailedPrecondition,
        ),
        case(
            "tampered statement bytes",
            |w| {
                let mut a = w.build(&w.plan());
                a.release = tamper(&a.release);
                a.grant_id = "grant-2".into();
                a
            },
            is!(E::BadSignature {
                statement: StatementRef::Release,
                ..
            }),
            PermissionDenied,
        ),
        case(
            "a signature over other bytes (the request's signature on the release)",
            |w| {
                let mut a = w.build(&w.plan());
                a.release.signature = a.request.signature.clone();
                a
            },
            // The request's signature is rita's key; the release names otto.
            |e| matches!(e, E::UnknownKey { statement: StatementRef::Release, owner: Some(o), .. } if o == "rita"),
            PermissionDenied,
        ),
        case(
            "the PIN not verified",
            |w| {
                let mut p = w.plan();
                p.pin_verified = false;
                w.build(&p)
            },
            |e| matches!(e, E::PinNotVerified { .. }),
            FailedPrecondition,
        ),
        case(
            "a grant for another release",
            |w| {
                let mut a = w.build(&w.plan());
                a.grant_id = "grant-other".into();
                a
            },
            is!(E::GrantMismatch {
                field: "grant_id",
                ..
            }),
            PermissionDenied,
        ),
        case(
            "a grant for another account",
            |w| {
                let mut a = w.build(&w.plan());
                a.account = "aws-dev-root".into();
                a
            },
            is!(E::GrantMismatch {
                field: "account_id",
                ..
            }),
            PermissionDenied,
        ),
        case(
            "an account the policy does not list",
            |w| {
                let mut p = w.plan();
                p.account = "aws-dev-root".into();
                w.build(&p)
            },
            |e| matches!(e, E::UnknownAccount { .. }),
            FailedPrecondition,
        ),
        case(
            "an approval where the release should be",
            |w| {
                let mut a = w.build(&w.plan());
                a.release = a.approvals[0].clone();
                a
            },
            is!(E::WrongKind {
                statement: StatementRef::Release,
                ..
            }),
            InvalidArgument,
        ),
        case(
            "garbage where the signature should be",
            |w| {
                let mut a = w.build(&w.plan());
                a.approvals[0].signature = b"not a signature".to_vec();
                a
            },
            is!(E::Malformed {
                statement: StatementRef::Approval(0),
                ..
            }),
            InvalidArgument,
        ),
    ];
    let mut failures = Vec::new();
    for (name, setup, expect, kind) in &table {
        let attempt = setup(&w);
        match attempt.check(&w.policy) {
            Ok(_) => failures.push(format!("{name}: ACCEPTED")),
            Err(e) if !expect(&e) => failures.push(format!("{name}: wrong error {e:?}")),
            Err(e) if e.kind() != *kind => {
                failures.push(format!("{name}: kind {:?}, expected {kind:?}", e.kind()))
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(!msg.is_empty(), "{name}: empty message");
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(table.len() >= 30, "the table shrank");
}

#[test]
fn errors_name_the_statement_the_person_and_what_to_do() {
    let w = World::new();
    let mut p = w.plan();
    p.approvers[1] = ("adam", id("anna"), 120);
    let e = w.build(&p).check(&w.policy).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("approval statement #2"), "{msg}");
    assert!(msg.contains(&id("anna")), "{msg}");
    assert!(msg.contains("person adam's"), "{msg}");
    assert!(msg.contains("sign with your own key"), "{msg}");
}

// ---- Admin actions ---------------------------------------------------------

fn remove() -> AdminActionRequest {
    AdminActionRequest {
        account_id: ACCOUNT.into(),
        action: AdminAction::Remove,
    }
}

#[test]
fn two_admins_may_remove() {
    let w = World::new();
    let s = vec![
        w.admin("alice", &id("alice"), AdminAction::Remove, "act-1", 0),
        w.admin("carol", &id("carol"), AdminAction::Remove, "act-1", 30),
    ];
    let v = check_admin_action(&w.policy, &remove(), &s, at(60), &MemoryHistory::new()).unwrap();
    assert_eq!(
        v.admins
            .iter()
            .map(|a| a.person.as_str())
            .collect::<Vec<_>>(),
        ["alice", "carol"]
    );
    assert_eq!(v.recovery_window.as_secs(), 7 * 86_400);
}

#[test]
fn admin_forgeries_are_refused() {
    use ConsentError as E;
    let w = World::new();
    let none = MemoryHistory::new();
    let one = |a: AdminAction, id_: &str| w.admin("alice", &id("alice"), a, id_, 0);
    let check = |s: &[SignedStatement], now: u64, h: &MemoryHistory| {
        check_admin_action(&w.policy, &remove(), s, at(now), h)
    };

    // One admin alone (enroll-replace and remove both need two).
    for action in [AdminAction::Remove, AdminAction::EnrollReplace] {
        let req = AdminActionRequest {
            account_id: ACCOUNT.into(),
            action,
        };
        let e =
            check_admin_action(&w.policy, &req, &[one(action, "a")], at(10), &none).unwrap_err();
        assert!(
            matches!(&e, E::TooFewAdmins { need: 2, have, .. } if have == &["alice"]),
            "{e:?}"
        );
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    }
    // The same admin twice counts once.
    let e = check(
        &[one(AdminAction::Remove, "a"), one(AdminAction::Remove, "a")],
        10,
        &none,
    )
    .unwrap_err();
    assert!(
        matches!(&e, E::TooFewAdmins { have, .. } if have.len() == 1),
        "{e:?}"
    );
    // A second statement that does not make the pair: consent to another
    // action, to another action id, or from a person who is not an admin.
    type Expected = fn(&E) -> bool;
    let cases: [(&str, AdminAction, &str, Expected); 3] = [
        ("bob", AdminAction::Disable, "a", |e| {
            matches!(
                e,
                E::WrongBinding {
                    statement: StatementRef::AdminAction(1),
                    field: "action",
                    ..
                }
            )
        }),
        ("bob", AdminAction::Remove, "b", |e| {
            matches!(
                e,
                E::WrongBinding {
                    field: "action id",
                    ..
                }
            )
        }),
        ("rita", AdminAction::Remove, "a", |e| {
            matches!(
                e,
                E::MissingRole {
                    role: Role::Admin,
                    ..
                }
            )
        }),
    ];
    for (who, action, action_id, expected) in cases {
        let s = vec![
            one(AdminAction::Remove, "a"),
            w.admin(who, &id(who), action, action_id, 0),
        ];
        let e = check(&s, 10, &none).unwrap_err();
        assert!(expected(&e), "{who} {action:?} {action_id}: {e:?}");
    }
    // Stale.
    let s = vec![
        one(AdminAction::Remove, "a"),
        w.admin("bob", &id("bob"), AdminAction::Remove, "a", 0),
    ];
    let e = check(&s, 25 * 3600, &none).unwrap_err();
    assert!(matches!(&e, E::Stale { .. }), "{e:?}");
    // Replayed.
    let v = check(&s, 10, &none).unwrap();
    let mut used = MemoryHistory::new();
    used.record_admin_action(&v);
    let e = check(&s, 20, &used).unwrap_err();
    assert!(matches!(&e, E::AdminActionReplayed { .. }), "{e:?}");
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    // None at all.
    let e = check(&[], 10, &none).unwrap_err();
    assert!(matches!(&e, E::Missing { .. }), "{e:?}");
}

#[test]
fn vault_wide_actions_bind_no_account_and_need_the_policys_admins() {
    use ConsentError as E;
    let w = World::new();
    let none = MemoryHistory::new();
    let rotate = AdminActionRequest {
        account_id: String::new(),
        action: AdminAction::RotateKey,
    };
    let on = |who: &str, account: &str, action: AdminAction| {
        w.admin_on(who, &id(who), account, action, "rot-1", 0)
    };
    let alice = on("alice", "", AdminAction::RotateKey);
    let carol = on("carol", "", AdminAction::RotateKey);
    let v = check_admin_action(&w.policy, &rotate, &[alice.clone(), carol], at(10), &none).unwrap();
    assert_eq!(v.account_id, "");
    assert_eq!(v.action, AdminAction::RotateKey);
    assert_eq!(v.action_id, "rot-1");

    // One admin: too few, and the message names the vault and the count.
    let e = check_admin_action(
        &w.policy,
        &rotate,
        std::slice::from_ref(&alice),
        at(10),
        &none,
    )
    .unwrap_err();
    assert!(
        matches!(&e, E::TooFewAdmins { need: 2, have, .. } if have == &["alice"]),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "rotate-key of the vault needs 2 distinct admins, 1 signed (alice); collect more admin signatures"
    );
    // A second statement for another action, or bound to an account, or
    // from someone who is no admin of the policy (an account approver).
    for (second, expected) in [
        (
            on("bob", "", AdminAction::SealVault),
            "it consents to seal of the vault, the vault is asked to rotate-key of the vault",
        ),
        (
            on("bob", ACCOUNT, AdminAction::RotateKey),
            "it consents to rotate-key of account aws-prod-root, the vault is asked to rotate-key of the vault",
        ),
    ] {
        let e = check_admin_action(&w.policy, &rotate, &[alice.clone(), second], at(10), &none)
            .unwrap_err();
        assert!(
            matches!(&e, E::WrongBinding { statement: StatementRef::AdminAction(1), field: "action", detail, .. } if detail.contains(expected)),
            "{e:?}"
        );
    }
    let e = check_admin_action(
        &w.policy,
        &rotate,
        &[alice.clone(), on("adam", "", AdminAction::RotateKey)],
        at(10),
        &none,
    )
    .unwrap_err();
    assert!(
        matches!(
            &e,
            E::MissingRole {
                role: Role::Admin,
                ..
            }
        ),
        "{e:?}"
    );
    // A vault-wide action asked of an account, or an account action of
    // the vault: refused before any statement is read.
    for (account, action) in [
        (ACCOUNT, AdminAction::RotateKey),
        (ACCOUNT, AdminAction::SealVault),
        ("", AdminAction::Remove),
    ] {
        let req = AdminActionRequest {
            account_id: account.into(),
            action,
        };
        let e = check_admin_action(&w.policy, &req, std::slice::from_ref(&alice), at(10), &none)
            .unwrap_err();
        assert!(matches!(&e, E::Malformed { .. }), "{e:?}");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    }
    // Replayed: the id is single use here too.
    let mut used = MemoryHistory::new();
    used.record_admin_action(&v);
    let e = check_admin_action(
        &w.policy,
        &rotate,
        &[alice, on("bob", "", AdminAction::RotateKey)],
        at(20),
        &used,
    )
    .unwrap_err();
    assert!(
        matches!(&e, E::AdminActionReplayed { action_id } if action_id == "rot-1"),
        "{e:?}"
    );
}

// ---- The policy ------------------------------------------------------------

#[test]
fn policy_updates_need_m_admins_of_the_previous_version_and_a_higher_version() {
    use PolicyError as P;
    let w = World::new();
    let v1 = &w.policy;
    let doc2 = w.policy_toml(2, "");
    let sig = |who: &str, doc: &str| w.sign_policy(who, doc);

    // Signed by 1 of 2.
    let e = verify_policy_update(Some(v1), &w.root, doc2.as_bytes(), &[sig("alice", &doc2)])
        .unwrap_err();
    assert!(
        matches!(&e, P::TooFewSignatures { need: 2, signed_by } if signed_by == &["alice"]),
        "{e:?}"
    );
    // The same admin's signature twice, and two signatures by one person.
    let s = sig("alice", &doc2);
    let e = verify_policy_update(Some(v1), &w.root, doc2.as_bytes(), &[s.clone(), s]).unwrap_err();
    assert!(
        matches!(&e, P::TooFewSignatures { signed_by, .. } if signed_by.len() == 1),
        "{e:?}"
    );
    let e = verify_policy_update(
        Some(v1),
        &w.root,
        doc2.as_bytes(),
        &[sig("alice", &doc2), sig("alice", &doc2)],
    )
    .unwrap_err();
    assert!(matches!(&e, P::TooFewSignatures { .. }), "{e:?}");
    // An unknown signer among valid ones.
    let e = verify_policy_update(
        Some(v1),
        &w.root,
        doc2.as_bytes(),
        &[
            sig("alice", &doc2),
            sig("bob", &doc2),
            sig("mallory", &doc2),
        ],
    )
    .unwrap_err();
    assert!(matches!(&e, P::UnknownSigner { index: 3, .. }), "{e:?}");
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    // A person who is not an admin.
    let e = verify_policy_update(
        Some(v1),
        &w.root,
        doc2.as_bytes(),
        &[sig("alice", &doc2), sig("rita", &doc2)],
    )
    .unwrap_err();
    assert!(matches!(&e, P::UnknownSigner { index: 2, .. }), "{e:?}");
    // Wrong namespace.
    let consent_sig =
        twokey_consent::sshsig::sign(&w.keys["bob"], &consent_namespace(TD), doc2.as_bytes())
            .unwrap();
    let e = verify_policy_update(
        Some(v1),
        &w.root,
        doc2.as_bytes(),
        &[sig("alice", &doc2), consent_sig],
    )
    .unwrap_err();
    assert!(matches!(&e, P::WrongNamespace { index: 2, .. }), "{e:?}");
    // Tampered document.
    let tampered = doc2.replace("approvals_required = 2", "approvals_required = 1");
    let e = verify_policy_update(
        Some(v1),
        &w.root,
        tampered.as_bytes(),
        &[sig("alice", &doc2), sig("bob", &doc2)],
    )
    .unwrap_err();
    assert!(matches!(&e, P::BadSignature { index: 1, .. }), "{e:?}");

    // Version 2 with two of v1's admins (carol is one of them in v1).
    let v2 = verify_policy_update(
        Some(v1),
        &w.root,
        doc2.as_bytes(),
        &[sig("carol", &doc2), sig("bob", &doc2)],
    )
    .expect("v2 by carol and bob");
    assert_eq!(v2.version(), 2);
    assert_eq!(v2.signed_by(), ["bob", "carol"]);

    // A replayed older policy, and the same version again.
    let doc1 = w.policy_toml(1, "");
    let e = verify_policy_update(
        Some(&v2),
        &w.root,
        doc1.as_bytes(),
        &[sig("alice", &doc1), sig("bob", &doc1)],
    )
    .unwrap_err();
    assert!(
        matches!(
            &e,
            P::NotNewer {
                proposed: 1,
                active: 2
            }
        ),
        "{e:?}"
    );
    let e = verify_policy_update(
        Some(&v2),
        &w.root,
        doc2.as_bytes(),
        &[sig("alice", &doc2), sig("bob", &doc2)],
    )
    .unwrap_err();
    assert!(
        matches!(
            &e,
            P::NotNewer {
                proposed: 2,
                active: 2
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
}

#[test]
fn the_next_version_is_signed_by_the_previous_versions_admins_not_the_pinned_ones() {
    use PolicyError as P;
    let w = World::new();
    // v2 makes carol and otto the only admins.
    let doc2 = w.policy_toml(2, "").replace(
        "people = [\"alice\", \"bob\", \"carol\"]",
        "people = [\"carol\", \"otto\"]",
    );
    let v2 = verify_policy_update(
        Some(&w.policy),
        &w.root,
        doc2.as_bytes(),
        &[w.sign_policy("alice", &doc2), w.sign_policy("bob", &doc2)],
    )
    .unwrap();
    // v3 signed by the pinned alice and bob: refused.
    let doc3 = w.policy_toml(3, "");
    let e = verify_policy_update(
        Some(&v2),
        &w.root,
        doc3.as_bytes(),
        &[w.sign_policy("alice", &doc3), w.sign_policy("bob", &doc3)],
    )
    .unwrap_err();
    assert!(matches!(&e, P::UnknownSigner { index: 1, .. }), "{e:?}");
    verify_policy_update(
        Some(&v2),
        &w.root,
        doc3.as_bytes(),
        &[w.sign_policy("carol", &doc3), w.sign_policy("otto", &doc3)],
    )
    .expect("v3 by v2's admins");
}

#[test]
fn a_key_or_an_identity_shared_by_two_people_is_refused() {
    use PolicyError as P;
    let w = World::new();
    // "ivan2" entry with ivan's key: two identities, one key, must be one person.
    let doc = w.policy_toml(2, "").replace(
        "\n[accounts.",
        &format!(
            "[people.ivan2]\nids = [\"spiffe://{TD}/user/ivan2\"]\nkeys = [\"{}\"]\n\n[accounts.",
            w.key("ivan")
        ),
    );
    let e = verify_policy_update(
        Some(&w.policy),
        &w.root,
        doc.as_bytes(),
        &[w.sign_policy("alice", &doc), w.sign_policy("bob", &doc)],
    )
    .unwrap_err();
    assert!(
        matches!(&e, P::SharedKey { first, second, .. } if first == "ivan" && second == "ivan2"),
        "{e:?}"
    );
    // One SPIFFE ID under two people.
    let doc = w.policy_toml(2, "").replace(
        "\n[accounts.",
        &format!(
            "[people.zed]\nids = [\"{}\"]\nkeys = [\"{}\"]\n\n[accounts.",
            id("adam"),
            w.key("mallory")
        ),
    );
    let e = twokey_consent::Policy::parse(&doc).unwrap_err();
    assert!(matches!(&e, P::SharedIdentity { .. }), "{e:?}");
    // And in the pinned set.
    let k = w.keys["alice"].public_key().clone();
    let e = TrustRoot::new(
        TD,
        vec![
            Person::new("alice", vec![id("alice")], vec![k.clone()]),
            Person::new("alice2", vec![id("alice2")], vec![k]),
        ],
        2,
    )
    .unwrap_err();
    assert!(matches!(&e, P::SharedKey { .. }), "{e:?}");
}

#[test]
fn the_first_policy_needs_the_pinned_admins() {
    use PolicyError as P;
    let w = World::new();
    let doc = w.policy_toml(1, "");
    let e = verify_policy_update(
        None,
        &w.root,
        doc.as_bytes(),
        &[w.sign_policy("alice", &doc)],
    )
    .unwrap_err();
    assert!(matches!(&e, P::TooFewSignatures { .. }), "{e:?}");
    // carol is an admin in the document but not pinned.
    let e = verify_policy_update(
        None,
        &w.root,
        doc.as_bytes(),
        &[w.sign_policy("alice", &doc), w.sign_policy("carol", &doc)],
    )
    .unwrap_err();
    assert!(matches!(&e, P::UnknownSigner { index: 2, .. }), "{e:?}");
    // A document for another trust domain.
    let other = doc.replace(
        &format!("trust_domain = \"{TD}\""),
        "trust_domain = \"other.org\"",
    );
    let other = other.replace(&format!("spiffe://{TD}/"), "spiffe://other.org/");
    let e = verify_policy_update(
        None,
        &w.root,
        other.as_bytes(),
        &[w.sign_policy("alice", &other), w.sign_policy("bob", &other)],
    )
    .unwrap_err();
    assert!(matches!(&e, P::TrustDomain { .. }), "{e:?}");
}

#[test]
fn pinned_admins_from_allowed_signers() {
    let w = World::new();
    let text = format!(
        "# pinned admins\n{} {}\n{},{} namespaces=\"twokey-policy@{TD}\" {}\n{} {}\n",
        id("alice"),
        w.key("alice"),
        id("bob"),
        alt_id("bob"),
        w.key("bob"),
        alt_id("bob"),
        w.key("carol"),
    );
    let root = TrustRoot::from_allowed_signers(TD, &text, 2).unwrap();
    // bob's two lines (shared principal) are one person with two keys.
    assert_eq!(root.admins().len(), 2);
    assert_eq!(root.admins()[1].keys().len(), 2);
    // bob signing with both of his keys is still one person.
    let doc = w.policy_toml(1, "");
    let e = verify_policy_update(
        None,
        &root,
        doc.as_bytes(),
        &[w.sign_policy("bob", &doc), w.sign_policy("carol", &doc)],
    )
    .unwrap_err();
    assert!(matches!(&e, PolicyError::TooFewSignatures { .. }), "{e:?}");
    verify_policy_update(
        None,
        &root,
        doc.as_bytes(),
        &[w.sign_policy("alice", &doc), w.sign_policy("carol", &doc)],
    )
    .unwrap();
    // Unsupported options are refused, not ignored.
    let e = TrustRoot::from_allowed_signers(
        TD,
        &format!("{} cert-authority {}\n", id("alice"), w.key("alice")),
        1,
    )
    .unwrap_err();
    assert!(e.to_string().contains("not supported"), "{e}");
}

#[test]
fn bad_policy_documents_are_refused_with_a_reason() {
    let w = World::new();
    let base = w.policy_toml(1, "");
    for (bad, needle) in [
        (
            base.replace("approvals_required = 2", "approvals_required = 9"),
            "approvals_required",
        ),
        (base.replace("threshold = 2", "threshold = 4"), "threshold"),
        (
            base.replace("codes_per_request = 1", "codes_per_request = 0"),
            "codes_per_request",
        ),
        (
            base.replace("intake = [\"bpm\"]", "intake = [\"adam\"]"),
            "intake",
        ),
        (
            base.replace("operators = [\"otto\"]", "operators = [\"nobody\"]"),
            "nobody",
        ),
        (base.replace("per = \"1h\"", "per = \"1y\""), "unknown unit"),
        (base.clone() + "surprise = 1\n", "surprise"),
        (base.replace("version = 1", "version = 0"), "version"),
    ] {
        let e = twokey_consent::Policy::parse(&bad).unwrap_err();
        assert!(e.to_string().contains(needle), "{needle}: {e}");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    }
    let p = twokey_consent::Policy::parse(&base).unwrap();
    let a = p.account(ACCOUNT).unwrap();
    assert_eq!(a.recovery_window.as_secs(), 7 * 86_400);
    assert_eq!(a.release_window.as_secs(), 15 * 60);
    assert_eq!(p.role_holders(ACCOUNT, Role::Operator), ["otto"]);
}

#[test]
fn the_example_policy_parses() {
    let text = include_str!("../policy.example.toml");
    let p = twokey_consent::Policy::parse(text).expect("policy.example.toml is valid");
    assert_eq!(p.admin_threshold(), 2);
    let a = p.account("aws-prod-root").unwrap();
    assert_eq!(a.approvals_required, 2);
    assert_eq!(p.role_holders("aws-prod-root", Role::Intake), ["bpm"]);
    // Its allowed_signers form has one line per key, SPIFFE IDs as principals.
    let allowed = p.allowed_signers();
    assert_eq!(allowed.lines().count(), 8);
    assert!(allowed.contains(
        "spiffe://twokey.local/user/alice namespaces=\"twokey-consent@twokey.local,twokey-policy@twokey.local\" ssh-ed25519 "
    ));
}
