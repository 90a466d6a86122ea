//! Matching root sign-ins and MFA device changes against releases: each
//! finding, the window's edges, one release per sign-in, unused and pending.

use std::time::Duration;

use time::OffsetDateTime;
use time::macros::datetime;
use twokey_reconcile::cloudtrail::{Event, MfaAction, ReadOptions, parse_eventbridge};
use twokey_reconcile::fixture::Record;
use twokey_reconcile::matching::{
    Accounts, DEFAULT_WINDOW, Finding, FindingKind, MappingError, Release, reconcile,
};

const AWS: &str = "111122223333";
const OTHER_AWS: &str = "444455556666";
const T0: OffsetDateTime = datetime!(2025-03-04 10:00:00 UTC);

fn accounts() -> Accounts {
    let mut a = Accounts::new();
    a.map(AWS, "prod-root", None).unwrap();
    a
}

/// A record read back through the parser, as the service would see it.
fn event(record: Record) -> Event {
    parse_eventbridge(
        &record.eventbridge(),
        &ReadOptions::at(T0 + Duration::from_secs(86_400)),
    )
    .unwrap()
    .expect("a kept record")
}

fn release(at: OffsetDateTime, id: &str) -> Release {
    Release {
        account: "prod-root".into(),
        at,
        id: id.into(),
    }
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Far enough on that every window is closed.
fn later() -> OffsetDateTime {
    T0 + secs(86_400)
}

fn kinds(findings: &[Finding]) -> Vec<FindingKind> {
    findings.iter().map(Finding::kind).collect()
}

#[test]
fn a_sign_in_with_mfa_after_a_release_is_matched() {
    let sign_in = event(Record::console_login(AWS, T0 + secs(120)));
    let r = reconcile(
        &accounts(),
        std::slice::from_ref(&sign_in),
        &[release(T0, "r1")],
        later(),
    );
    assert_eq!(kinds(&r.findings), [FindingKind::Matched]);
    match &r.findings[0] {
        Finding::Matched {
            account,
            sign_in: s,
            release,
        } => {
            assert_eq!(account, "prod-root");
            assert_eq!(Event::SignIn(s.clone()), sign_in);
            assert_eq!(release.id, "r1");
        }
        other => panic!("{other:?}"),
    }
    assert!(r.pending.is_empty());
}

#[test]
fn a_sign_in_with_mfa_and_no_release_is_unexplained_and_alerts() {
    let r = reconcile(
        &accounts(),
        &[event(Record::console_login(AWS, T0))],
        &[],
        later(),
    );
    assert_eq!(kinds(&r.findings), [FindingKind::Unexplained]);
    assert!(FindingKind::Unexplained.alerts());
    assert_eq!(r.findings[0].account(), "prod-root");
}

#[test]
fn a_sign_in_without_mfa_is_unprotected_and_takes_no_release() {
    let r = reconcile(
        &accounts(),
        &[event(
            Record::console_login(AWS, T0 + secs(60)).without_mfa(),
        )],
        &[release(T0, "r1")],
        later(),
    );
    assert_eq!(
        kinds(&r.findings),
        [FindingKind::Unused, FindingKind::Unprotected]
    );
    assert!(FindingKind::Unprotected.alerts());
}

#[test]
fn a_failed_sign_in_is_counted_and_leaves_the_release_for_the_next_attempt() {
    let events = [
        event(Record::console_login(AWS, T0 + secs(30)).failed()),
        event(Record::console_login(AWS, T0 + secs(90))),
    ];
    let r = reconcile(&accounts(), &events, &[release(T0, "r1")], later());
    assert_eq!(
        kinds(&r.findings),
        [FindingKind::Failed, FindingKind::Matched]
    );
    assert_eq!(r.count(FindingKind::Failed), 1);
    assert!(!FindingKind::Failed.alerts());
}

#[test]
fn each_mfa_device_change_on_a_mapped_account_is_out_of_band() {
    let events: Vec<Event> = MfaAction::ALL
        .into_iter()
        .enumerate()
        .map(|(i, a)| event(Record::mfa_device(a, AWS, T0 + secs(i as u64))))
        .collect();
    let r = reconcile(&accounts(), &events, &[], later());
    assert_eq!(kinds(&r.findings), [FindingKind::OutOfBand; 4]);
    let actions: Vec<MfaAction> = r
        .findings
        .iter()
        .map(|f| match f {
            Finding::OutOfBand { change, account } => {
                assert_eq!(account, "prod-root");
                assert_eq!(change.identity_type, "Root");
                change.action
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(actions, MfaAction::ALL);
    assert!(FindingKind::OutOfBand.alerts());
}

#[test]
fn a_release_no_sign_in_took_is_unused_once_its_window_closed() {
    let r = reconcile(&accounts(), &[], &[release(T0, "r1")], later());
    assert_eq!(kinds(&r.findings), [FindingKind::Unused]);
    assert!(!FindingKind::Unused.alerts());
}

#[test]
fn a_release_whose_window_is_open_is_pending_up_to_the_last_second() {
    // complete_until one second before the window closes: pending.
    let r = reconcile(
        &accounts(),
        &[],
        &[release(T0, "r1")],
        T0 + DEFAULT_WINDOW - secs(1),
    );
    assert!(r.findings.is_empty());
    assert_eq!(r.pending, [release(T0, "r1")]);
    // Exactly at R + w the records are complete for the whole window: unused.
    let r = reconcile(&accounts(), &[], &[release(T0, "r1")], T0 + DEFAULT_WINDOW);
    assert_eq!(kinds(&r.findings), [FindingKind::Unused]);
    assert!(r.pending.is_empty());
}

#[test]
fn a_release_exactly_the_window_before_the_sign_in_matches() {
    let events = [event(Record::console_login(AWS, T0 + DEFAULT_WINDOW))];
    let r = reconcile(&accounts(), &events, &[release(T0, "r1")], later());
    assert_eq!(kinds(&r.findings), [FindingKind::Matched]);
}

#[test]
fn a_release_one_second_more_than_the_window_before_does_not_match() {
    let events = [event(Record::console_login(
        AWS,
        T0 + DEFAULT_WINDOW + secs(1),
    ))];
    let r = reconcile(&accounts(), &events, &[release(T0, "r1")], later());
    assert_eq!(
        kinds(&r.findings),
        [FindingKind::Unused, FindingKind::Unexplained]
    );
}

#[test]
fn a_release_in_the_same_second_matches_even_when_later_within_it() {
    // CloudTrail writes whole seconds: a sign-in logged at 10:00:00 may
    // follow a release at 10:00:00.7.
    let events = [event(Record::console_login(AWS, T0))];
    let r = reconcile(
        &accounts(),
        &events,
        &[release(T0 + Duration::from_millis(700), "r1")],
        later(),
    );
    assert_eq!(kinds(&r.findings), [FindingKind::Matched]);
}

#[test]
fn a_release_one_second_after_the_sign_in_does_not_match() {
    let events = [event(Record::console_login(AWS, T0))];
    let r = reconcile(
        &accounts(),
        &events,
        &[release(T0 + secs(1), "r1")],
        later(),
    );
    assert_eq!(
        kinds(&r.findings),
        [FindingKind::Unexplained, FindingKind::Unused]
    );
}

#[test]
fn one_release_explains_one_sign_in_the_first_after_it() {
    let events = [
        event(Record::console_login(AWS, T0 + secs(200))),
        event(Record::console_login(AWS, T0 + secs(100))),
    ];
    let r = reconcile(&accounts(), &events, &[release(T0, "r1")], later());
    assert_eq!(
        kinds(&r.findings),
        [FindingKind::Matched, FindingKind::Unexplained]
    );
    assert_eq!(r.findings[0].time(), T0 + secs(100));
}

#[test]
fn two_releases_explain_two_sign_ins_earliest_release_first() {
    // r1 at 0, r2 at 9 min; sign-ins at 9.5 min and 12 min. Taking the
    // earliest release first explains both (r2 is still in the second's
    // window); taking the latest would leave r1 unused and 12 min unexplained.
    let events = [
        event(Record::console_login(AWS, T0 + secs(570))),
        event(Record::console_login(AWS, T0 + secs(720))),
    ];
    let releases = [release(T0 + secs(540), "r2"), release(T0, "r1")];
    let r = reconcile(&accounts(), &events, &releases, later());
    let taken: Vec<&str> = r
        .findings
        .iter()
        .map(|f| match f {
            Finding::Matched { release, .. } => release.id.as_str(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(taken, ["r1", "r2"]);
}

#[test]
fn the_window_is_per_account() {
    let mut accounts = Accounts::new();
    accounts
        .map(AWS, "prod-root", Some(Duration::from_secs(60)))
        .unwrap();
    let events = [event(Record::console_login(AWS, T0 + secs(61)))];
    let r = reconcile(&accounts, &events, &[release(T0, "r1")], later());
    assert_eq!(
        kinds(&r.findings),
        [FindingKind::Unused, FindingKind::Unexplained]
    );
}

#[test]
fn a_release_of_one_account_does_not_explain_another() {
    let mut accounts = accounts();
    accounts.map(OTHER_AWS, "staging-root", None).unwrap();
    let events = [event(Record::console_login(OTHER_AWS, T0 + secs(60)))];
    let r = reconcile(&accounts, &events, &[release(T0, "r1")], later());
    assert_eq!(
        kinds(&r.findings),
        [FindingKind::Unused, FindingKind::Unexplained]
    );
    assert_eq!(r.findings[1].account(), "staging-root");
}

#[test]
fn unmapped_accounts_non_root_sign_ins_and_duplicates_are_counted_not_found() {
    let root = Record::console_login(AWS, T0 + secs(60));
    let events = [
        event(root.clone()),
        event(root),
        event(Record::console_login(OTHER_AWS, T0)),
        event(Record::console_login(AWS, T0).identity_type("IAMUser")),
        event(Record::mfa_device(MfaAction::Enable, OTHER_AWS, T0)),
    ];
    let releases = [
        release(T0, "r1"),
        Release {
            account: "unmapped".into(),
            at: T0,
            id: "r2".into(),
        },
    ];
    let r = reconcile(&accounts(), &events, &releases, later());
    assert_eq!(kinds(&r.findings), [FindingKind::Matched]);
    assert_eq!(r.ignored.duplicate_events, 1);
    assert_eq!(r.ignored.unmapped_events, 2);
    assert_eq!(r.ignored.non_root_sign_ins, 1);
    assert_eq!(r.ignored.unmapped_releases, 1);
}

#[test]
fn mappings_that_cannot_be_are_refused() {
    let mut a = accounts();
    assert!(matches!(
        a.map("12345", "x", None),
        Err(MappingError::NotAnAccountId(_))
    ));
    assert!(matches!(
        a.map(AWS, "other", None),
        Err(MappingError::Duplicate { .. })
    ));
    assert!(matches!(
        a.map(OTHER_AWS, "prod-root", None),
        Err(MappingError::AccountTwice { .. })
    ));
    assert!(matches!(
        a.map(OTHER_AWS, "z", Some(Duration::ZERO)),
        Err(MappingError::ZeroWindow(_))
    ));
    let text = a.map("12345", "x", None).unwrap_err().to_string();
    assert!(text.contains("12 digits"), "{text}");
}

#[test]
fn the_mapping_is_read_from_the_policy_applied_attribute() {
    let a = Accounts::from_policy_attr("prod-root=111122223333/600,dev=444455556666/60").unwrap();
    assert_eq!(a.get(AWS).unwrap().account, "prod-root");
    assert_eq!(a.get(AWS).unwrap().window, DEFAULT_WINDOW);
    assert_eq!(a.get(OTHER_AWS).unwrap().window, secs(60));
    assert!(Accounts::from_policy_attr("").unwrap().is_empty());
    for bad in [
        "prod-root",
        "prod-root=111122223333",
        "=111122223333/60",
        "p=111122223333/x",
    ] {
        assert_eq!(
            Accounts::from_policy_attr(bad),
            Err(MappingError::BadEntry(bad.to_owned())),
            "{bad}"
        );
    }
    assert!(matches!(
        Accounts::from_policy_attr("a=111122223333/60,b=111122223333/60"),
        Err(MappingError::Duplicate { .. })
    ));
    assert_eq!(
        Accounts::from_policy_attr("a=1234/60"),
        Err(MappingError::NotAnAccountId("1234".into()))
    );
}

#[test]
fn a_sign_in_carries_its_source_address() {
    let Event::SignIn(s) = event(Record::console_login(AWS, T0)) else {
        panic!("a sign-in")
    };
    assert_eq!(s.source_ip.as_deref(), Some("192.0.2.10"));
    let Event::SignIn(s) = event(Record::console_login(AWS, T0).remove("/sourceIPAddress")) else {
        panic!("a sign-in")
    };
    assert_eq!(s.source_ip, None);
}
