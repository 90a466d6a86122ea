//! Load: many requesters at once, each with their own approver and
//! operator (certificates from the system's development CA, named in the
//! policy), running whole flows against the real binaries over mTLS. Every
//! flow ends in a code or a clear status, nothing deadlocks (an overall
//! limit), every event the flows caused is in the log exactly once and the
//! log verifies, and no service's memory runs away.
//!
//! 200 concurrent flows (CI); `TWOKEY_SOAK=1` runs 5 waves of 200.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tonic::Code;
use twokey_e2e::{
    EVENTS_PER_ENROLLMENT, System, account_policy, account_section, accounts_table, check_request,
    check_single_use, current_step, rss_kib, soak_or, totp,
};
use twokey_testkit::consent::{generate_key, write_key};
use twokey_testkit::local::{ACCOUNT, TRUST_DOMAIN, USERS};
use twokey_testkit::pki::DevCa;

const CONCURRENT: usize = 200;
/// No flow, and no wave, may take longer: past it the system is deadlocked.
const WAVE_LIMIT: Duration = Duration::from_secs(120);
/// Resident memory each service must stay under, after the load. After one
/// wave the broker held 157 to 202 MiB over six runs (one over the former
/// 200 MiB), and 155 to 197 MiB over three runs of the code before signed
/// consent: the spread is about as wide as before, and 240 MiB is above it.
/// The soak's 5 waves end near 560 MiB, before signed consent as well (the
/// broker's data grows about 70 MB a wave): a known problem of the broker,
/// which one wave does not reach.
const RSS_LIMIT_KIB: u64 = 240 * 1024;

fn name(role: &str, i: usize) -> String {
    format!("{role}{i:03}")
}

/// Crew `i`'s own account: one account yields at most 3 codes per 30 s
/// (the vault never hands out a TOTP step twice), so each crew files for
/// its own.
fn account(i: usize) -> String {
    format!("acct-{}", name("r", i))
}

/// Issues a certificate and an OpenSSH signing key (`pki/NAME.ssh`) for
/// every requester `r…`, approver `a…` and operator `o…`, and writes the
/// broker's policy naming them beside the local users, with an account of
/// its own for each crew (and the local account).
fn add_people(sys: &System, n: usize) {
    let pki = sys.local.dir.join("pki");
    let read = |f: &str| std::fs::read_to_string(pki.join(f)).expect("dev CA file");
    let ca = DevCa::load(&read("ca.crt"), &read("ca.key")).expect("dev CA");
    let mut identities = String::from("[identities]\n");
    for (user, _) in USERS {
        identities.push_str(&format!(
            "{user} = \"spiffe://{TRUST_DOMAIN}/user/{user}\"\n"
        ));
    }
    let mut groups: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (role, group, first) in [
        ("r", "requesters", "alice"),
        ("a", "approvers", "bob"),
        ("o", "operators", "olivia"),
    ] {
        let members = groups.entry(group).or_default();
        members.push(format!("{first:?}"));
        for i in 0..n {
            let user = name(role, i);
            ca.issue_user(TRUST_DOMAIN, &user)
                .and_then(|c| c.write(&pki, &user))
                .expect("issue a user certificate");
            write_key(&pki, &user, &generate_key()).expect("write an ssh key");
            identities.push_str(&format!(
                "{user} = \"spiffe://{TRUST_DOMAIN}/user/{user}\"\n"
            ));
            members.push(format!("{user:?}"));
        }
    }
    let mut policy = identities;
    policy.push_str("\n[groups]\n");
    for (group, members) in &groups {
        policy.push_str(&format!("{group} = [{}]\n", members.join(", ")));
    }
    policy.push_str(&account_policy(ACCOUNT));
    for i in 0..n {
        policy.push_str(&account_policy(&account(i)));
    }
    std::fs::write(sys.local.dir.join("policy.toml"), policy).expect("write policy");
}

/// The next signed consent policy: every crew member a person with their
/// key, each crew's account with the local account's rules and the crew in
/// its roles; adam and anna sign and apply it through the broker. Returns
/// the accounts' release rate (codes per hour).
async fn sign_people(sys: &System, n: usize) -> i64 {
    let pki = sys.local.dir.join("pki");
    let mut rate = 0;
    sys.update_policy(|doc| {
        let local = account_section(doc, ACCOUNT);
        rate = local["release_rate"]["max"]
            .as_integer()
            .expect("the local account's release rate");
        let people = doc
            .get_mut("people")
            .and_then(toml::Value::as_table_mut)
            .expect("[people]");
        for role in ["r", "a", "o"] {
            for i in 0..n {
                let user = name(role, i);
                let key = std::fs::read_to_string(pki.join(format!("{user}.ssh.pub")))
                    .expect("public key");
                let key: String = key.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
                let mut person = toml::Table::new();
                person.insert(
                    "ids".into(),
                    vec![toml::Value::from(format!(
                        "spiffe://{TRUST_DOMAIN}/user/{user}"
                    ))]
                    .into(),
                );
                person.insert("keys".into(), vec![toml::Value::from(key)].into());
                people.insert(user, person.into());
            }
        }
        for i in 0..n {
            let mut section = local.clone();
            for (field, role) in [("requesters", "r"), ("approvers", "a"), ("operators", "o")] {
                section.insert(field.into(), vec![toml::Value::from(name(role, i))].into());
            }
            accounts_table(doc).insert(account(i), section.into());
        }
    })
    .await;
    rate
}

fn rss(sys: &System) -> BTreeMap<&'static str, u64> {
    ["audit", "vault", "broker"]
        .into_iter()
        .map(|svc| (svc, rss_kib(sys.pid(svc))))
        .collect()
}

/// The broker events the log must hold for a request: one per history
/// entry, in order (`pin.issued` and notification events come besides).
fn history_actions(r: &twokey_proto::broker::v1::Request) -> Vec<String> {
    r.history.iter().map(|h| h.action.clone()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_concurrent_flows_finish_lose_no_event_and_stay_bounded() {
    let waves = soak_or(1, 5);
    let mut sys = System::start();
    let t = Instant::now();
    add_people(&sys, CONCURRENT);
    // The broker reads its policy when it starts.
    sys.crash_and_restart("broker");
    let rate = sign_people(&sys, CONCURRENT).await;
    // Each crew's account releases one code per wave: within its rate.
    assert!(
        waves as i64 <= rate,
        "{waves} waves, but an account may release only {rate} codes an hour"
    );
    println!("{} identities issued in {:?}", 3 * CONCURRENT, t.elapsed());
    let t = Instant::now();
    let accounts: Vec<String> = (0..CONCURRENT).map(account).collect();
    sys.enroll_accounts(&accounts).await;
    println!("{CONCURRENT} accounts enrolled in {:?}", t.elapsed());
    let enrolled = EVENTS_PER_ENROLLMENT * CONCURRENT;
    let enrollments = |log: &[twokey_proto::audit::v1::LogEntry]| {
        log.iter()
            .filter_map(|e| e.event.as_ref())
            .filter(|e| e.action == "account.enrolled")
            .count()
    };
    // The log also holds the policy updates' events; once it is settled,
    // everything later is the flows'.
    let before = sys
        .settled_log(Duration::from_secs(30), |log| enrollments(log) >= enrolled)
        .await;
    assert_eq!(enrollments(&before), enrolled, "the enrollments' events");
    let logged_before = before.len();
    let rss_before = rss(&sys);

    let sys = Arc::new(sys);
    // The policy does not change during the waves: the crews sign under
    // the version the broker names now.
    let version = sys.policy_version().await;
    let crews: Vec<_> = (0..CONCURRENT)
        .map(|i| {
            let mut crew = sys.crew_for(&account(i), &name("r", i), &name("a", i), &name("o", i));
            crew.policy_version = Some(version);
            crew
        })
        .collect();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut codes = 0usize;
    // The highest step released so far (each account's is at most this).
    let mut highest_step = 0u64;
    for wave in 0..waves {
        // A wave releases one more code per account: the vault has one only
        // once the clock is at most 1 step behind the account's last.
        while current_step() + 1 < highest_step {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let t = Instant::now();
        let mut flows = tokio::task::JoinSet::new();
        for crew in &crews {
            let (sys, crew) = (sys.clone(), crew.clone());
            flows.spawn(async move { sys.flow(&crew, Duration::from_secs(60)).await });
        }
        let all = tokio::time::timeout(WAVE_LIMIT, flows.join_all())
            .await
            .unwrap_or_else(|_| panic!("wave {wave}: flows still running after {WAVE_LIMIT:?}"));
        let mut latencies = Vec::new();
        for outcome in all {
            match outcome {
                Ok(r) => {
                    assert_eq!(r.code.code, totp(r.code.step), "a wrong code");
                    highest_step = highest_step.max(r.code.step);
                    codes += 1;
                    latencies.push(());
                    *outcomes.entry("released".into()).or_default() += 1;
                }
                Err(e) => {
                    // A clear status: a code that says what happened, and a
                    // message.
                    assert!(
                        !matches!(e.status.code(), Code::Unknown | Code::Internal | Code::Ok)
                            && !e.status.message().is_empty(),
                        "wave {wave}: an unclear failure at {}: {:?}",
                        e.step,
                        e.status
                    );
                    *outcomes
                        .entry(format!("{} {:?}", e.step, e.status.code()))
                        .or_default() += 1;
                }
            }
        }
        println!(
            "wave {wave}: {CONCURRENT} concurrent flows in {:?}, outcomes so far {outcomes:?}",
            t.elapsed()
        );
    }
    // Under this load nothing is broken, so nearly every flow releases.
    assert!(
        codes * 100 >= waves * CONCURRENT * 95,
        "only {codes} of {} flows released: {outcomes:?}",
        waves * CONCURRENT
    );

    // Every request obeys the state machine, and each of its history steps
    // reached the log exactly once, in order — no event lost or doubled.
    let requests = sys.all_requests().await;
    assert_eq!(requests.len(), waves * CONCURRENT);
    let mut expected_broker = 0usize;
    for r in &requests {
        check_request(r).unwrap();
        expected_broker += r.history.len();
        if r.history.iter().any(|h| h.action == "request.approved") {
            expected_broker += 1; // pin.issued
        }
    }
    let expected = logged_before + expected_broker + codes;
    let log = sys
        .log_until(Duration::from_secs(60), |log| log.len() >= expected)
        .await;
    let log = if log.len() >= expected {
        sys.verified_log(&[]).await
    } else {
        log
    };
    let mut of_request: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut vault_codes = 0usize;
    for e in log.iter().filter_map(|e| e.event.as_ref()) {
        if e.source.ends_with("/svc/vault") && e.action == "code.released" {
            vault_codes += 1;
        } else if e.source.ends_with("/svc/broker")
            && !e.request_id.is_empty()
            && e.action != "pin.issued"
        {
            of_request
                .entry(e.request_id.as_str())
                .or_default()
                .push(e.action.clone());
        }
    }
    for r in &requests {
        assert_eq!(
            of_request.get(r.request_id.as_str()),
            Some(&history_actions(r)),
            "request {}: the log's events are not its history",
            r.request_id
        );
    }
    assert_eq!(vault_codes, codes, "the vault's code.released events");
    assert_eq!(
        log.len(),
        expected,
        "log entries: {logged_before} before the flows ({enrolled} of {CONCURRENT} enrollments), \
         {expected_broker} broker, {codes} vault"
    );
    check_single_use(&log).unwrap();

    let rss_after = rss(&sys);
    println!("VmRSS KiB before {rss_before:?}, after {rss_after:?}");
    for (svc, kib) in &rss_after {
        assert!(
            *kib < RSS_LIMIT_KIB,
            "{svc} holds {kib} KiB after the load (limit {RSS_LIMIT_KIB} KiB)"
        );
    }
}
