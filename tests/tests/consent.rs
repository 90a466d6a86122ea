//! The two-person rule against single compromises (issue 14), with the real
//! binaries over mTLS on loopback. Each row of the table is one thing an
//! attacker holds — the broker's grant key (and its certificate), that plus
//! one approver's key, one approver with two SPIFFE IDs and one key, one
//! admin, an older signed policy, a used operator statement, a key the
//! policy does not list — and each yields no code, the exact gRPC status and
//! a refusal event giving that very reason in the audit log (read by the
//! auditor carol); bad input (another namespace, a malformed or changed
//! signature, a stale, future or misbound statement) likewise. Each table
//! ends with the full chain releasing the right code, so what was refused
//! was refused for what was missing. The allowed path releases the right
//! code end to end, signed by OpenSSH's own `ssh-keygen -Y sign` (and the
//! statements checked with `ssh-keygen -Y verify`), through a real
//! `ssh-agent` by the `twokey` CLI, and with delivery to the requester; two
//! admins replace, remove and restore a seed; a policy version applied at
//! the vault reaches the broker with the first statement naming it.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, SystemTime},
};

use tonic::{Code, Status};
use twokey_consent::{
    AdminAction, Binding, Policy, SignedStatement, admin_binding, consent_namespace,
    encode_statement, new_id, new_statement, request_binding, ssh_key::PrivateKey,
};
use twokey_e2e::{
    SECRET, Signer, System, TD, account_policy, account_section, accounts_table, bin_dir, bounded,
    consent_of, grant_id_of, request_id_of, totp, totp_of, user_id,
};
use twokey_proto::{
    audit::v1::LogEntry,
    broker::v1::{
        ApproveRequestRequest, ApproveRequestResponse, CreateRequestRequest, CreateRequestResponse,
        EnrollAccountRequest, GetRequestRequest, ListAccountsRequest, RemoveAccountRequest,
        SignAdminActionRequest, VerifyPinRequest, enroll_account_request::Seed,
    },
    vault::v1::{
        AdminConsent, ApplyPolicyRequest, EnrollRequest, GenerateCodeRequest, GetPolicyRequest,
        GrantPurpose, ReleaseEvidence, RemoveAccountRequest as VaultRemoveRequest, SignedGrant,
        enroll_request,
    },
};
use twokey_testkit::{
    consent::{generate_key, sign_policy},
    local::ACCOUNT,
};

// ---------------------------------------------------------------------------
// Rows: the exact status, no code, a refusal in the log.
// ---------------------------------------------------------------------------

/// The vault's `code.released` events in `log`.
fn codes_released(log: &[LogEntry]) -> usize {
    log.iter()
        .filter_map(|e| e.event.as_ref())
        .filter(|e| e.action == "code.released" && e.source.ends_with("/svc/vault"))
        .count()
}

/// One row of the table: what the log held before the attempt.
struct Row<'a> {
    sys: &'a System,
    what: String,
    codes: usize,
    len: usize,
    action: &'static str,
}

impl<'a> Row<'a> {
    /// Before an attempt that must be refused and audited as `action`
    /// (`code.refused`, `policy.refused`, `admin_action.refused` by the
    /// vault; `consent.refused` by the broker).
    async fn new(sys: &'a System, what: &str, action: &'static str) -> Self {
        let log = sys.log().await;
        Self {
            sys,
            what: what.to_owned(),
            codes: codes_released(&log),
            len: log.len(),
            action,
        }
    }

    /// The attempt answered exactly `code` with a message saying `says`, an
    /// `action` event giving that very reason reached the log after the
    /// attempt began, and no code left the vault.
    async fn refused<T: std::fmt::Debug>(self, result: Result<T, Status>, code: Code, says: &str) {
        let what = &self.what;
        let status = match result {
            Ok(answer) => panic!("{what}: not refused: {answer:?}"),
            Err(status) => status,
        };
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(
            status.message().contains(says),
            "{what}: {status:?} should say {says:?}"
        );
        let audited = |log: &[LogEntry]| {
            log.iter()
                .skip(self.len)
                .filter_map(|e| e.event.as_ref())
                .find(|e| {
                    e.action == self.action
                        && e.attributes
                            .get("reason")
                            .is_some_and(|r| !r.is_empty() && status.message().contains(r.as_str()))
                })
                .cloned()
        };
        let log = self
            .sys
            .log_until(Duration::from_secs(10), |log| audited(log).is_some())
            .await;
        let event = audited(&log).unwrap_or_else(|| {
            panic!(
                "{what}: no {} event with the reason {:?} in the audit log",
                self.action,
                status.message()
            )
        });
        assert_eq!(
            codes_released(&log),
            self.codes,
            "{what}: a code left the vault"
        );
        println!(
            "{what}: {:?} {:?}, audited as {} by {}",
            status.code(),
            status.message(),
            event.action,
            event.source
        );
    }
}

/// `attempt`, begun once the log is read: a row refused as `what` with
/// exactly `code`, saying `says`, audited as `action` (see [`Row`]).
async fn refused<T: std::fmt::Debug>(
    sys: &System,
    what: &str,
    action: &'static str,
    attempt: impl Future<Output = Result<T, Status>>,
    code: Code,
    says: &str,
) {
    let row = Row::new(sys, what, action).await;
    row.refused(attempt.await, code, says).await;
}

/// A direct GenerateCode call as the broker (its certificate).
async fn generate(
    sys: &System,
    grant: SignedGrant,
    evidence: Option<ReleaseEvidence>,
) -> Result<twokey_proto::types::v1::Code, Status> {
    bounded(sys.vault_as_broker().generate_code(GenerateCodeRequest {
        grant: Some(grant),
        evidence,
    }))
    .await
    .map(|r| r.code.expect("a code"))
}

/// The full consent of alice, bob and olivia, sent straight to the vault
/// with the broker's grant: releases the right code (the control of each
/// table: what was refused was refused for what was missing).
async fn control_release(sys: &System) {
    let (grant, evidence) = sys.signed_release(sys.policy_version().await, ACCOUNT);
    let code = generate(sys, grant, Some(evidence))
        .await
        .expect("the full chain releases a code");
    assert_eq!(
        code.code,
        totp(code.step),
        "the vault's code is not the TOTP"
    );
}

/// `grant` with `evidence` straight to the vault: a row refused as `what`
/// with exactly `code`, saying `says`, audited as `code.refused`.
async fn vault_refuses(
    sys: &System,
    what: &str,
    grant: SignedGrant,
    evidence: Option<ReleaseEvidence>,
    code: Code,
    says: &str,
) {
    let attempt = generate(sys, grant, evidence);
    refused(sys, what, "code.refused", attempt, code, says).await;
}

/// `evidence` with the broker's grant for it, straight to the vault:
/// refused as [`vault_refuses`] says.
async fn refused_at_vault(
    sys: &System,
    what: &str,
    evidence: ReleaseEvidence,
    code: Code,
    says: &str,
) {
    let grant = sys.grant_for(&evidence);
    vault_refuses(sys, what, grant, Some(evidence), code, says).await;
}

/// `requester`'s request on the local account for `reason`, `approver`'s
/// approval of it and `operator`'s release of both, under policy `v`.
fn chain(
    v: u64,
    requester: &Signer,
    approver: &Signer,
    operator: &Signer,
    reason: &str,
) -> ReleaseEvidence {
    let request = requester.request(v, ACCOUNT, reason, "");
    let approval = approver.approve(v, &request);
    let release = operator.release(v, &request, std::slice::from_ref(&approval));
    evidence(request, vec![approval], release)
}

/// Evidence of `request`, `approvals` and `release`.
fn evidence(
    request: SignedStatement,
    approvals: Vec<SignedStatement>,
    release: SignedStatement,
) -> ReleaseEvidence {
    ReleaseEvidence {
        request: Some(request),
        approvals,
        release: Some(release),
    }
}

/// alice files a request for `account` with `reason` and `ticket`, and her
/// signed `statement` of them, through the broker.
async fn alice_files(
    sys: &System,
    account: &str,
    reason: &str,
    ticket: &str,
    statement: SignedStatement,
) -> Result<CreateRequestResponse, Status> {
    bounded(sys.broker("alice").create_request(CreateRequestRequest {
        account_id: account.into(),
        reason: reason.into(),
        ticket: ticket.into(),
        on_behalf_of: String::new(),
        statement: Some(statement),
    }))
    .await
}

/// bob approves request `id` with `statement`, through the broker.
async fn bob_approves(
    sys: &System,
    id: &str,
    statement: SignedStatement,
) -> Result<ApproveRequestResponse, Status> {
    bounded(sys.broker("bob").approve_request(ApproveRequestRequest {
        request_id: id.to_owned(),
        comment: "ok".into(),
        statement: Some(statement),
    }))
    .await
}

/// olivia verifies the PIN alice reads out for request `id` (signing no
/// release yet); the request's statements as the broker then holds them.
async fn olivia_verifies(sys: &System, id: &str) -> (SignedStatement, Vec<SignedStatement>) {
    let pin = sys
        .pin("alice", id, Duration::from_secs(10))
        .await
        .expect("a PIN");
    let verified = bounded(sys.broker("olivia").verify_pin(VerifyPinRequest {
        request_id: id.to_owned(),
        pin,
        releases: Vec::new(),
    }))
    .await
    .expect("olivia verifies")
    .request
    .expect("the request");
    consent_of(&verified).expect("its statements")
}

/// Request `id` as olivia sees it.
async fn request_of(sys: &System, id: &str) -> twokey_proto::broker::v1::Request {
    bounded(sys.broker("olivia").get_request(GetRequestRequest {
        request_id: id.to_owned(),
    }))
    .await
    .expect("the request")
    .request
    .expect("the request")
}

/// The one code released so far was request `id`'s, and the vault's
/// `code.released` names the verified operator olivia.
async fn released_by_olivia(sys: &System, id: &str) {
    let log = sys
        .log_until(Duration::from_secs(10), |log| codes_released(log) == 1)
        .await;
    let event = log
        .iter()
        .filter_map(|e| e.event.as_ref())
        .find(|e| e.action == "code.released" && e.source.ends_with("/svc/vault"))
        .expect("the vault's code.released");
    assert_eq!(event.actor, user_id("olivia"), "{event:?}");
    assert_eq!(event.request_id, id);
}

/// A system with the local account enrolled, and its policy version.
async fn enrolled() -> (System, u64) {
    let sys = System::start();
    sys.enroll().await;
    let version = sys.policy_version().await;
    assert_eq!(version, 1, "the local system starts under policy version 1");
    (sys, version)
}

/// A person that is in no policy: a fresh key.
fn stranger(name: &str, id: &str) -> Signer {
    Signer::new(name, id, generate_key())
}

// ---------------------------------------------------------------------------
// The broker's grant key (and certificate) alone.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn the_broker_grant_key_alone_yields_no_code() {
    let (sys, v) = enrolled().await;
    let now = SystemTime::now();

    // Grants of any content, validly signed with keys/grant.key, no evidence.
    let mut grants = vec![
        (
            "a release grant naming the local crew",
            sys.sign_grant("g-crew"),
        ),
        (
            "a grant naming nobody and no request",
            sys.sign_with_grant_key(&twokey_testkit::grants::grant(
                "g-empty",
                ACCOUNT,
                GrantPurpose::Release,
                now,
            )),
        ),
    ];
    let mut everyone = twokey_testkit::grants::release(TD, "g-all", "r-all", ACCOUNT, now);
    everyone.approvers = vec![user_id("bob"), user_id("adam"), user_id("anna")];
    grants.push((
        "a grant naming every approver",
        sys.sign_with_grant_key(&everyone),
    ));
    for (what, grant) in grants {
        vault_refuses(
            &sys,
            &format!("{what}, no evidence"),
            grant,
            None,
            Code::PermissionDenied,
            "missing",
        )
        .await;
    }

    // Evidence made of empty statements.
    let empty = evidence(
        SignedStatement::default(),
        vec![SignedStatement::default()],
        SignedStatement::default(),
    );
    vault_refuses(
        &sys,
        "empty statements",
        sys.sign_grant("g-blank"),
        Some(empty),
        Code::PermissionDenied,
        "missing",
    )
    .await;

    // Statements naming alice, bob and olivia, signed with keys the policy
    // does not list (what the broker's host could make up).
    let forged = |name: &str| stranger(name, &user_id(name));
    let made_up = chain(
        v,
        &forged("alice"),
        &forged("bob"),
        &forged("olivia"),
        "forged",
    );
    refused_at_vault(
        &sys,
        "statements by keys not in the policy",
        made_up,
        Code::PermissionDenied,
        "in no person's entry of the policy",
    )
    .await;

    // People the policy does not know at all.
    let ghost = |name: &str| stranger(name, &user_id(name));
    let strangers = chain(v, &ghost("mallory"), &ghost("mel"), &ghost("max"), "forged");
    refused_at_vault(
        &sys,
        "statements by people not in the policy",
        strangers,
        Code::PermissionDenied,
        "is not a person in policy version 1",
    )
    .await;

    control_release(&sys).await;
}

/// alice's request, bob's approval and olivia's release, as `tamper`
/// leaves them, sent straight to the vault with the broker's grant for them.
async fn tampered(
    sys: &System,
    v: u64,
    tamper: impl FnOnce(&mut SignedStatement, &mut Vec<SignedStatement>, &mut SignedStatement),
) -> Result<twokey_proto::types::v1::Code, Status> {
    let (_, mut e) = sys.signed_release(v, ACCOUNT);
    let (mut request, mut release) = (e.request.take().unwrap(), e.release.take().unwrap());
    let grant = sys.grant_for(&evidence(
        request.clone(),
        e.approvals.clone(),
        release.clone(),
    ));
    tamper(&mut request, &mut e.approvals, &mut release);
    generate(sys, grant, Some(evidence(request, e.approvals, release))).await
}

/// The statements [`tampered`] sends: a row refused as `what` with exactly
/// `code`, saying `says`, audited as `code.refused`.
async fn refused_tampered(
    sys: &System,
    v: u64,
    what: &str,
    code: Code,
    says: &str,
    tamper: impl FnOnce(&mut SignedStatement, &mut Vec<SignedStatement>, &mut SignedStatement),
) {
    let attempt = tampered(sys, v, tamper);
    refused(sys, what, "code.refused", attempt, code, says).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_signatures_and_stale_or_misbound_statements_release_nothing() {
    let (sys, v) = enrolled().await;
    let (alice, bob, olivia) = (sys.signer("alice"), sys.signer("bob"), sys.signer("olivia"));

    // alice's own key, under another namespace than twokey-consent@TD.
    refused_tampered(
        &sys,
        v,
        "a request signed under another namespace",
        Code::PermissionDenied,
        "is signed under namespace",
        |request, _, _| {
            request.signature = twokey_consent::sshsig::sign(
                alice.key(),
                &twokey_consent::policy_namespace(TD),
                &request.statement,
            )
            .expect("sign");
        },
    )
    .await;

    // A signature that is no sshsig at all.
    refused_tampered(
        &sys,
        v,
        "a malformed approval signature",
        Code::InvalidArgument,
        "approval statement #1 is malformed",
        |_, approvals, _| {
            approvals[0].signature = b"-----BEGIN SSH SIGNATURE-----\nnot one\n".to_vec();
        },
    )
    .await;

    // bob's signature over other bytes than the approval presented.
    refused_tampered(
        &sys,
        v,
        "an approval whose bytes were changed",
        Code::PermissionDenied,
        "the signature does not verify",
        |request, approvals, _| {
            let other = bob.approve(v, request);
            approvals[0].statement = other.statement;
        },
    )
    .await;

    // bob's approval of another request of alice's.
    refused_tampered(
        &sys,
        v,
        "an approval of another request",
        Code::FailedPrecondition,
        "is bound to another request",
        |_, approvals, _| {
            let other = alice.request(v, ACCOUNT, "another", "");
            approvals[0] = bob.approve(v, &other);
        },
    )
    .await;

    // olivia's release that does not say the PIN was verified.
    refused_tampered(
        &sys,
        v,
        "a release without the PIN verified",
        Code::FailedPrecondition,
        "does not say the PIN was verified",
        |request, approvals, release| {
            let grant_id = grant_id_of(release);
            let Ok(Binding::Release(mut binding)) =
                twokey_consent::release_binding(request, approvals, &grant_id, &new_id())
            else {
                panic!("a release binding")
            };
            binding.pin_verified = false;
            *release = olivia.sign(v, Binding::Release(binding));
        },
    )
    .await;

    // An expired chain: filed, approved and released ten minutes ago (a
    // release statement is good for 2 minutes).
    let ago = |s: u64| SystemTime::now() - Duration::from_secs(s);
    let request = alice.sign_at(
        v,
        ago(610),
        request_binding(&new_id(), ACCOUNT, &alice.id, "old", "", ago(610)),
    );
    let approval = bob.sign_at(
        v,
        ago(605),
        twokey_consent::approval_binding(&request).expect("approval"),
    );
    let release = olivia.sign_at(
        v,
        ago(600),
        twokey_consent::release_binding(
            &request,
            std::slice::from_ref(&approval),
            &new_id(),
            &new_id(),
        )
        .expect("release"),
    );
    let old = evidence(request, vec![approval], release);
    refused_at_vault(
        &sys,
        "a release statement signed 10 minutes ago",
        old,
        Code::FailedPrecondition,
        "a release statement is good for 120 s",
    )
    .await;

    // A release issued ten minutes from now.
    refused_tampered(
        &sys,
        v,
        "a release statement from the future",
        Code::FailedPrecondition,
        "is issued in the future",
        |request, approvals, release| {
            let grant_id = grant_id_of(release);
            *release = olivia.sign_at(
                v,
                SystemTime::now() + Duration::from_secs(600),
                twokey_consent::release_binding(request, approvals, &grant_id, &new_id())
                    .expect("release"),
            );
        },
    )
    .await;

    control_release(&sys).await;
}

// ---------------------------------------------------------------------------
// The broker's key plus one approver's key.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn the_broker_key_and_one_approvers_key_yield_no_code() {
    let (sys, v) = enrolled().await;
    let bob = sys.signer("bob");

    // bob's key signs the requester's and the operator's statements in
    // their names.
    let posing = chain(
        v,
        &bob.as_id(&user_id("alice")),
        &bob,
        &bob.as_id(&user_id("olivia")),
        "bob alone",
    );
    refused_at_vault(
        &sys,
        "bob's key signing as alice and olivia",
        posing,
        Code::PermissionDenied,
        "person bob's",
    )
    .await;

    // bob signs every statement as himself: filing for alice, approving,
    // releasing.
    let request = bob.sign(
        v,
        request_binding(
            &new_id(),
            ACCOUNT,
            &user_id("alice"),
            "bob alone",
            "",
            SystemTime::now(),
        ),
    );
    let approval = bob.approve(v, &request);
    let release = bob.release(v, &request, std::slice::from_ref(&approval));
    let himself = evidence(request, vec![approval], release);
    refused_at_vault(
        &sys,
        "bob signing every statement himself",
        himself,
        Code::PermissionDenied,
        "is not intake of account",
    )
    .await;

    // bob as requester of his own request, approving it, and alice's
    // honest release would still need another approver.
    let own = chain(v, &bob, &bob, &sys.signer("olivia"), "bob alone");
    refused_at_vault(
        &sys,
        "bob requesting and approving",
        own,
        Code::PermissionDenied,
        "is not requester of account",
    )
    .await;

    control_release(&sys).await;
}

// ---------------------------------------------------------------------------
// One approver, two SPIFFE IDs, one SSH key.
// ---------------------------------------------------------------------------

/// `[people.NAME]` with `ids` and the OpenSSH public key of `key`.
fn add_person(doc: &mut toml::Table, name: &str, ids: &[String], key: &PrivateKey) {
    let mut person = toml::Table::new();
    person.insert(
        "ids".into(),
        ids.iter()
            .map(|i| toml::Value::from(i.as_str()))
            .collect::<Vec<_>>()
            .into(),
    );
    person.insert(
        "keys".into(),
        vec![toml::Value::from(
            key.public_key().to_openssh().expect("public key"),
        )]
        .into(),
    );
    people(doc).insert(name.into(), person.into());
}

fn people(doc: &mut toml::Table) -> &mut toml::Table {
    doc.get_mut("people")
        .and_then(toml::Value::as_table_mut)
        .expect("[people]")
}

fn names(list: &[&str]) -> toml::Value {
    list.iter()
        .map(|n| toml::Value::from(*n))
        .collect::<Vec<_>>()
        .into()
}

/// The versions the vault has applied, newest first.
async fn vault_versions(sys: &System) -> Vec<u64> {
    bounded(sys.vault_as_broker().get_policy(GetPolicyRequest {}))
        .await
        .expect("the vault returns its policy")
        .versions
        .iter()
        .map(|v| v.version)
        .collect()
}

/// `document` signed by each of `signers`, applied straight to the vault
/// with the broker's certificate.
async fn apply_at_vault(
    sys: &System,
    document: &str,
    signers: &[&str],
) -> Result<twokey_proto::vault::v1::ApplyPolicyResponse, Status> {
    let signatures = signers
        .iter()
        .map(|n| sign_policy(sys.signer(n).key(), TD, document))
        .collect();
    apply_signed_at_vault(sys, document, signatures).await
}

/// `document` with `signatures`, applied straight to the vault with the
/// broker's certificate.
async fn apply_signed_at_vault(
    sys: &System,
    document: &str,
    signatures: Vec<Vec<u8>>,
) -> Result<twokey_proto::vault::v1::ApplyPolicyResponse, Status> {
    bounded(sys.vault_as_broker().apply_policy(ApplyPolicyRequest {
        document: document.to_owned(),
        signatures,
    }))
    .await
}

/// The active version is still `version`: at the vault and at the broker.
async fn still_in_force(sys: &System, version: u64, what: &str) {
    assert_eq!(
        vault_versions(sys).await.first(),
        Some(&version),
        "{what}: the vault's active version changed"
    );
    assert_eq!(
        sys.policy_version().await,
        version,
        "{what}: the broker names another version"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_approver_with_two_spiffe_ids_and_one_key_counts_once() {
    let (sys, v) = enrolled().await;
    let bob = sys.signer("bob");

    // A policy listing bob's key for a second person is refused, even
    // signed by both admins: a key belongs to one person.
    let twin = sys
        .next_policy(|doc| {
            add_person(doc, "bobby", &[user_id("bobby")], bob.key());
            let account = accounts_table(doc)
                .get_mut(ACCOUNT)
                .and_then(toml::Value::as_table_mut)
                .expect("the account");
            account.insert("approvers".into(), names(&["bob", "bobby"]));
            account.insert("approvals_required".into(), 2.into());
        })
        .await;
    refused(
        &sys,
        "bob's key for a second person, at the vault",
        "policy.refused",
        apply_at_vault(&sys, &twin, &["adam", "anna"]),
        Code::InvalidArgument,
        "is listed for both bob and bobby",
    )
    .await;
    still_in_force(&sys, v, "bob's key for a second person").await;
    let through_broker = sys.apply_policy(&twin, &["adam", "anna"]).await;
    let (step, status) = through_broker.expect_err("the broker applied bob's key for two people");
    assert_eq!(status.code(), Code::InvalidArgument, "{step}: {status:?}");
    assert!(
        status.message().contains("is listed for both"),
        "{step}: {status:?}"
    );
    still_in_force(&sys, v, "bob's key for a second person, through the broker").await;

    // bob with a second SPIFFE ID is one person: with two approvals
    // needed, his two approvals (one per ID) count once.
    let ben = Signer::new("ben", &user_id("ben"), generate_key());
    let bob_alt = user_id("bob-alt");
    let v2 = sys
        .update_policy(|doc| {
            people(doc)
                .get_mut("bob")
                .and_then(toml::Value::as_table_mut)
                .expect("bob")
                .insert("ids".into(), names(&[&user_id("bob"), &bob_alt]));
            add_person(doc, "ben", std::slice::from_ref(&ben.id), ben.key());
            let account = accounts_table(doc)
                .get_mut(ACCOUNT)
                .and_then(toml::Value::as_table_mut)
                .expect("the account");
            account.insert("approvers".into(), names(&["bob", "ben"]));
            account.insert("approvals_required".into(), 2.into());
        })
        .await;
    assert_eq!(v2, v + 1);
    let alice = sys.signer("alice");
    let olivia = sys.signer("olivia");
    let request = alice.request(v2, ACCOUNT, "two approvals", "");
    let approvals = vec![
        bob.approve(v2, &request),
        bob.as_id(&bob_alt).approve(v2, &request),
    ];
    let release = olivia.release(v2, &request, &approvals);
    let twice = evidence(request, approvals, release);
    refused_at_vault(
        &sys,
        "bob approving under two SPIFFE IDs",
        twice,
        Code::PermissionDenied,
        "approved twice",
    )
    .await;

    // The control: bob and ben release.
    let request = alice.request(v2, ACCOUNT, "two approvals", "");
    let approvals = vec![bob.approve(v2, &request), ben.approve(v2, &request)];
    let release = olivia.release(v2, &request, &approvals);
    let two = evidence(request, approvals, release);
    let code = generate(&sys, sys.grant_for(&two), Some(two))
        .await
        .expect("two distinct approvers release a code");
    assert_eq!(code.code, totp(code.step));
}

// ---------------------------------------------------------------------------
// One admin; an older policy.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_signed_by_one_admin_where_two_are_required_changes_nothing() {
    let (sys, v) = enrolled().await;
    // What one admin would like: mallory approving alone.
    let mallory = Signer::new("mallory", &user_id("mallory"), generate_key());
    let document = sys
        .next_policy(|doc| {
            add_person(
                doc,
                "mallory",
                std::slice::from_ref(&mallory.id),
                mallory.key(),
            );
            accounts_table(doc)
                .get_mut(ACCOUNT)
                .and_then(toml::Value::as_table_mut)
                .expect("the account")
                .insert("approvers".into(), names(&["mallory"]));
        })
        .await;

    // Through the broker: proposed and signed by adam alone, applied; the
    // vault's refusal passes through.
    let applied = async {
        let applied = sys.apply_policy(&document, &["adam"]).await;
        applied.map_err(|(step, status)| {
            assert_eq!(step, "apply", "refused at {step}: {status:?}");
            status
        })
    };
    refused(
        &sys,
        "adam alone, through the broker",
        "policy.refused",
        applied,
        Code::FailedPrecondition,
        "needs 2 distinct admin signatures",
    )
    .await;
    still_in_force(&sys, v, "adam alone").await;

    // Straight to the vault with the broker's certificate: adam once, adam
    // twice (one person counts once).
    for signers in [&["adam"][..], &["adam", "adam"][..]] {
        refused(
            &sys,
            &format!("{signers:?} at the vault"),
            "policy.refused",
            apply_at_vault(&sys, &document, signers),
            Code::FailedPrecondition,
            "needs 2 distinct admin signatures, it has 1 (adam)",
        )
        .await;
        still_in_force(&sys, v, "adam alone at the vault").await;
    }

    // mallory's approval is worth nothing: the policy in force is v1.
    let hers = chain(
        v,
        &sys.signer("alice"),
        &mallory,
        &sys.signer("olivia"),
        "mallory approves",
    );
    refused_at_vault(
        &sys,
        "mallory's approval",
        hers,
        Code::PermissionDenied,
        "is not a person in policy version 1",
    )
    .await;
    control_release(&sys).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_older_policy_is_refused_and_old_statements_release_nothing() {
    let (sys, v1) = enrolled().await;
    // Version 2, properly signed by adam and anna: the local account needs
    // nothing new, the version is what counts.
    let v2 = sys
        .update_policy(|doc| {
            accounts_table(doc)
                .get_mut(ACCOUNT)
                .and_then(toml::Value::as_table_mut)
                .expect("the account")
                .insert("codes_per_request".into(), 1.into());
        })
        .await;
    assert_eq!(v2, v1 + 1);
    assert_eq!(vault_versions(&sys).await, [v2, v1]);

    // Version 1 again, with its own signatures by both admins (as written
    // by the local system), straight to the vault.
    let dir = &sys.local.dir;
    let document = std::fs::read_to_string(dir.join("consent-policy.toml")).expect("v1");
    let signatures: Vec<Vec<u8>> = ["adam", "anna"]
        .iter()
        .map(|n| std::fs::read(dir.join(format!("consent-policy.toml.{n}.sig"))).expect("sig"))
        .collect();
    refused(
        &sys,
        "version 1 replayed at the vault",
        "policy.refused",
        apply_signed_at_vault(&sys, &document, signatures),
        Code::FailedPrecondition,
        "policy version 1 is not above the active version 2",
    )
    .await;
    still_in_force(&sys, v2, "version 1 replayed").await;

    // Version 2 replayed is no newer either.
    let active = sys.active_policy().await;
    refused(
        &sys,
        "version 2 replayed at the vault",
        "policy.refused",
        apply_signed_at_vault(&sys, &active.document, active.signatures.clone()),
        Code::FailedPrecondition,
        "policy version 2 is not above the active version 2",
    )
    .await;
    still_in_force(&sys, v2, "version 2 replayed").await;

    // Through the broker: version 1 proposed again is refused.
    let (step, status) = sys
        .apply_policy(&document, &["adam", "anna"])
        .await
        .expect_err("the broker applied version 1 again");
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "{step}: {status:?}"
    );
    still_in_force(&sys, v2, "version 1 through the broker").await;

    // Statements bound to version 1 release nothing under version 2.
    let (grant, old) = sys.signed_release(v1, ACCOUNT);
    vault_refuses(
        &sys,
        "statements under version 1",
        grant,
        Some(old),
        Code::FailedPrecondition,
        "was made under policy version 1, the active one is 2",
    )
    .await;
    control_release(&sys).await;
}

// ---------------------------------------------------------------------------
// A replayed operator statement; a key not in the policy.
// ---------------------------------------------------------------------------

/// Adds `account`, which allows `codes` codes per request, to the broker's
/// policy with the lines `extra` (restarting the broker) and to the next
/// signed policy, and enrolls it.
async fn add_account(sys: &mut System, account: &str, codes: u32, extra: &str) {
    let path = sys.local.dir.join("policy.toml");
    let mut policy = std::fs::read_to_string(&path).expect("policy");
    policy.push_str(&account_policy(account).replace(
        "codes_per_request = 1",
        &format!("codes_per_request = {codes}"),
    ));
    policy.push_str(extra);
    std::fs::write(&path, policy).expect("write policy");
    sys.crash_and_restart("broker");
    sys.update_policy(|doc| {
        let mut section = account_section(doc, ACCOUNT);
        section.insert("codes_per_request".into(), i64::from(codes).into());
        accounts_table(doc).insert(account.into(), section.into());
    })
    .await;
    sys.enroll_accounts(&[account.to_owned()]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_operator_statement_releases_nothing() {
    let mut sys = System::start();
    // Two codes per request: the replay is not stopped by the request
    // being used up, only by the statement being used.
    let account = "aws-two-codes";
    add_account(&mut sys, account, 2, "").await;
    let request = sys.verified_request_for(account, "replay").await;
    let id = &request.request_id;
    let statement = sys
        .release_statement("olivia", id)
        .await
        .expect("statement");
    let code = sys
        .release_with(id, statement.clone())
        .await
        .expect("the first release");
    assert_eq!(code.code, totp(code.step));

    // The same statement again, through the broker.
    refused(
        &sys,
        "the operator's statement again",
        "consent.refused",
        sys.release_with(id, statement.clone()),
        Code::PermissionDenied,
        "used",
    )
    .await;

    // The same evidence straight to the vault with the broker's key: with
    // a new grant of the grant id the statement binds, and with a grant of
    // another id.
    let r = request_of(&sys, id).await;
    let (req, approvals) = consent_of(&r).expect("its statements");
    let replayed = evidence(req, approvals, statement.clone());
    refused_at_vault(
        &sys,
        "the same statement, same grant id, at the vault",
        replayed.clone(),
        Code::PermissionDenied,
        "used",
    )
    .await;
    vault_refuses(
        &sys,
        "the same statement, another grant id, at the vault",
        sys.sign_release_grant(&new_id(), id, account),
        Some(replayed),
        Code::PermissionDenied,
        "the grant does not carry this consent",
    )
    .await;
    let after = request_of(&sys, id).await;
    assert_eq!(after.codes_released, 1, "{after:?}");
    // The one code was released under the grant id olivia chose.
    let released: Vec<_> = sys
        .log()
        .await
        .into_iter()
        .filter_map(|e| e.event)
        .filter(|e| e.action == "code.released" && e.source.ends_with("/svc/vault"))
        .collect();
    assert_eq!(released.len(), 1, "{released:?}");
    assert_eq!(
        released[0].attributes.get("grant_id"),
        Some(&grant_id_of(&statement)),
        "the broker's grant id is not the one the operator signed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_delivery_to_the_requester_the_operator_signs_at_verify_pin() {
    let mut sys = System::start();
    let account = "aws-self-serve";
    add_account(&mut sys, account, 1, "delivery = \"requester\"\n").await;
    let v = sys.policy_version().await;
    let (alice, bob, olivia) = (sys.signer("alice"), sys.signer("bob"), sys.signer("olivia"));

    let statement = alice.request(v, account, "self serve", "OPS-7");
    let id = request_id_of(&statement);
    alice_files(&sys, account, "self serve", "OPS-7", statement.clone())
        .await
        .expect("alice files");
    let approved = bob_approves(&sys, &id, bob.approve(v, &statement))
        .await
        .expect("bob approves")
        .request
        .expect("the request");
    let (req, approvals) = consent_of(&approved).expect("its statements");
    let pin = sys
        .pin("alice", &id, Duration::from_secs(10))
        .await
        .expect("a PIN");

    // olivia verifies the PIN alice read out and signs the release
    // statement alice's release will carry.
    bounded(sys.broker("olivia").verify_pin(VerifyPinRequest {
        request_id: id.clone(),
        pin: pin.clone(),
        releases: vec![olivia.release(v, &req, &approvals)],
    }))
    .await
    .expect("olivia verifies and signs the release");
    // alice cannot stand in for the operator with a statement of her own.
    refused(
        &sys,
        "alice signing her own release",
        "consent.refused",
        bounded(
            sys.broker("alice")
                .release_code(twokey_proto::broker::v1::ReleaseCodeRequest {
                    request_id: id.clone(),
                    statement: Some(alice.release(v, &req, &approvals)),
                }),
        ),
        Code::PermissionDenied,
        "is signed by spiffe://twokey.local/user/alice, not by spiffe://twokey.local/user/olivia",
    )
    .await;
    let released = bounded(sys.broker("alice").release_code(
        twokey_proto::broker::v1::ReleaseCodeRequest {
            request_id: id.clone(),
            statement: None,
        },
    ))
    .await
    .expect("alice releases with olivia's statement");
    let code = released.code.expect("a code");
    assert_eq!(code.code, totp(code.step));

    // The vault names the verified operator, not the caller.
    released_by_olivia(&sys, &id).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_statement_from_a_key_not_in_the_policy_is_refused() {
    let (sys, v) = enrolled().await;
    let impostor = |name: &str| stranger(name, &user_id(name));

    // alice's request signed with a key the policy does not list for her.
    let statement = impostor("alice").request(v, ACCOUNT, "unknown key", "OPS-7");
    refused(
        &sys,
        "a request statement by an unknown key",
        "consent.refused",
        alice_files(&sys, ACCOUNT, "unknown key", "OPS-7", statement),
        Code::PermissionDenied,
        "in no person's entry of the policy",
    )
    .await;

    // A real request; bob's approval by an unknown key.
    let alice = sys.signer("alice");
    let statement = alice.request(v, ACCOUNT, "unknown key", "OPS-7");
    let created = alice_files(&sys, ACCOUNT, "unknown key", "OPS-7", statement.clone())
        .await
        .expect("alice files")
        .request
        .expect("the request");
    let id = created.request_id.clone();
    assert_eq!(id, request_id_of(&statement));
    refused(
        &sys,
        "an approval by an unknown key",
        "consent.refused",
        bob_approves(&sys, &id, impostor("bob").approve(v, &statement)),
        Code::PermissionDenied,
        "in no person's entry of the policy",
    )
    .await;
    bob_approves(&sys, &id, sys.signer("bob").approve(v, &statement))
        .await
        .expect("bob approves");
    let (req, approvals) = olivia_verifies(&sys, &id).await;

    // olivia's release by an unknown key.
    let forged = impostor("olivia").release(v, &req, &approvals);
    refused(
        &sys,
        "a release by an unknown key",
        "consent.refused",
        sys.release_with(&id, forged),
        Code::PermissionDenied,
        "in no person's entry of the policy",
    )
    .await;

    // The request still releases with olivia's own statement.
    let code = sys
        .release_with(&id, sys.signer("olivia").release(v, &req, &approvals))
        .await
        .expect("olivia's own release");
    assert_eq!(code.code, totp(code.step));
}

// ---------------------------------------------------------------------------
// Enrol-replace and remove with one admin.
// ---------------------------------------------------------------------------

/// adam's statement for `action` on the local account, signed and handed
/// to the broker; returns the action id and the statement.
async fn adam_alone(sys: &System, v: u64, action: AdminAction) -> (String, SignedStatement) {
    let action_id = new_id();
    let statement = sys
        .signer("adam")
        .sign(v, admin_binding(ACCOUNT, action, &action_id));
    let proposal = bounded(
        sys.broker("adam")
            .sign_admin_action(SignAdminActionRequest {
                statement: Some(statement.clone()),
            }),
    )
    .await
    .expect("the broker takes adam's statement")
    .action
    .expect("the action");
    assert_eq!(proposal.action_id, action_id);
    assert_eq!(proposal.needed, 2, "{proposal:?}");
    assert_eq!(proposal.signed_by, [user_id("adam")], "{proposal:?}");
    (action_id, statement)
}

/// A grant of `purpose` for the local account naming adam, signed with the
/// broker's grant key.
fn admin_grant(sys: &System, purpose: GrantPurpose) -> SignedGrant {
    let mut grant = twokey_testkit::grants::grant(&new_id(), ACCOUNT, purpose, SystemTime::now());
    grant.operator = user_id("adam");
    sys.sign_with_grant_key(&grant)
}

/// The accounts the vault holds.
async fn vault_accounts(sys: &System) -> Vec<String> {
    bounded(
        sys.vault_as_broker()
            .list_accounts(twokey_proto::vault::v1::ListAccountsRequest {}),
    )
    .await
    .expect("the vault lists accounts")
    .accounts
    .into_iter()
    .map(|a| a.account_id)
    .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn enrol_replace_and_remove_with_one_admin_are_refused() {
    let (sys, v) = enrolled().await;
    const OTHER: &str = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP";

    // Through the broker: adam signs alone, then carries the action out.
    let (remove_id, remove) = adam_alone(&sys, v, AdminAction::Remove).await;
    refused(
        &sys,
        "remove with adam alone, through the broker",
        "consent.refused",
        bounded(sys.broker("adam").remove_account(RemoveAccountRequest {
            account_id: ACCOUNT.into(),
            reason: "one admin".into(),
            action_id: remove_id,
        })),
        Code::FailedPrecondition,
        "needs 2 distinct admins",
    )
    .await;
    let (replace_id, replace) = adam_alone(&sys, v, AdminAction::EnrollReplace).await;
    refused(
        &sys,
        "enrol-replace with adam alone, through the broker",
        "consent.refused",
        bounded(sys.broker("adam").enroll_account(EnrollAccountRequest {
            account_id: ACCOUNT.into(),
            seed: Some(Seed::Base32Secret(OTHER.into())),
            replace: true,
            action_id: replace_id,
            ..Default::default()
        })),
        Code::FailedPrecondition,
        "needs 2 distinct admins",
    )
    .await;

    // Straight to the vault with the broker's key: adam's statement once,
    // and twice (one person counts once).
    for statements in [vec![remove.clone()], vec![remove.clone(), remove.clone()]] {
        let n = statements.len();
        refused(
            &sys,
            &format!("remove with {n} adam statement(s) at the vault"),
            "admin_action.refused",
            bounded(sys.vault_as_broker().remove_account(VaultRemoveRequest {
                grant: Some(admin_grant(&sys, GrantPurpose::Remove)),
                consent: Some(AdminConsent { statements }),
            })),
            Code::FailedPrecondition,
            "needs 2 distinct admins",
        )
        .await;
    }
    refused(
        &sys,
        "enrol-replace with adam alone at the vault",
        "admin_action.refused",
        bounded(sys.vault_as_broker().enroll(EnrollRequest {
            account_id: ACCOUNT.into(),
            seed: Some(enroll_request::Seed::Base32Secret(OTHER.into())),
            replace: true,
            grant: Some(admin_grant(&sys, GrantPurpose::Enroll)),
            consent: Some(AdminConsent {
                statements: vec![replace],
            }),
            ..Default::default()
        })),
        Code::FailedPrecondition,
        "needs 2 distinct admins",
    )
    .await;

    // The account is still there, with its seed: a full chain releases
    // the TOTP of SECRET.
    assert!(vault_accounts(&sys).await.contains(&ACCOUNT.to_owned()));
    let listed = bounded(sys.broker("adam").list_accounts(ListAccountsRequest {}))
        .await
        .expect("adam lists accounts");
    assert!(
        listed
            .accounts
            .iter()
            .any(|a| a.account_id == ACCOUNT && !a.disabled)
    );
    let request = sys.verified_request("after one admin").await;
    let code = sys
        .release_as_operator(&request.request_id)
        .await
        .expect("a full chain releases");
    assert_eq!(code.code, totp(code.step), "the seed is still {SECRET:.4}…");
}

/// `admins` each sign `action` on the local account under one action id,
/// through the broker; returns the action id.
async fn admins_sign(sys: &System, v: u64, action: AdminAction, admins: &[&str]) -> String {
    let action_id = new_id();
    for (i, admin) in admins.iter().enumerate() {
        let statement = sys
            .signer(admin)
            .sign(v, admin_binding(ACCOUNT, action, &action_id));
        let proposal = bounded(sys.broker(admin).sign_admin_action(SignAdminActionRequest {
            statement: Some(statement),
        }))
        .await
        .unwrap_or_else(|e| panic!("{admin} signs {action:?}: {e:?}"))
        .action
        .expect("the action");
        assert_eq!(proposal.signed_by.len(), i + 1, "{proposal:?}");
    }
    action_id
}

/// adam and anna sign a restore of the local account and carry it out,
/// through the broker: `what` (its last kept seed) is back.
async fn two_admins_restore(sys: &System, v: u64, what: &str) {
    let action_id = admins_sign(sys, v, AdminAction::Restore, &["adam", "anna"]).await;
    bounded(
        sys.broker("adam")
            .restore_account(twokey_proto::broker::v1::RestoreAccountRequest {
                account_id: ACCOUNT.into(),
                action_id,
            }),
    )
    .await
    .unwrap_or_else(|e| panic!("two admins restore {what}: {e:?}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn two_admins_replace_remove_and_restore_a_seed() {
    let (sys, v) = enrolled().await;
    const OTHER: &str = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP";

    // adam and anna replace the seed: the registration codes are the new
    // seed's.
    let action_id = admins_sign(&sys, v, AdminAction::EnrollReplace, &["adam", "anna"]).await;
    let replaced = bounded(sys.broker("adam").enroll_account(EnrollAccountRequest {
        account_id: ACCOUNT.into(),
        seed: Some(Seed::Base32Secret(OTHER.into())),
        replace: true,
        action_id,
        ..Default::default()
    }))
    .await
    .expect("two admins replace the seed");
    for code in [replaced.current.as_ref(), replaced.next.as_ref()] {
        let code = code.expect("a registration code");
        assert_eq!(
            code.code,
            totp_of(OTHER, code.step),
            "not the new seed's code"
        );
    }

    // They restore the replaced seed: SECRET is back.
    two_admins_restore(&sys, v, "the replaced seed").await;

    // They remove the account: the vault holds it no more and releases
    // nothing for it.
    let action_id = admins_sign(&sys, v, AdminAction::Remove, &["adam", "anna"]).await;
    bounded(sys.broker("adam").remove_account(RemoveAccountRequest {
        account_id: ACCOUNT.into(),
        reason: "rotated".into(),
        action_id,
    }))
    .await
    .expect("two admins remove the account");
    assert!(!vault_accounts(&sys).await.contains(&ACCOUNT.to_owned()));
    let (grant, chain) = sys.signed_release(v, ACCOUNT);
    let gone = generate(&sys, grant, Some(chain)).await;
    assert_eq!(gone.unwrap_err().code(), Code::NotFound);

    // And restore it: a full chain releases SECRET's code again.
    two_admins_restore(&sys, v, "the removed account").await;
    let request = sys.verified_request("after the restore").await;
    let code = sys
        .release_as_operator(&request.request_id)
        .await
        .expect("the restored account releases");
    assert_eq!(code.code, totp(code.step), "not the original seed's code");

    // Each step is on record with the admins who signed it.
    let log = sys
        .log_until(Duration::from_secs(10), |log| codes_released(log) == 1)
        .await;
    let actions: Vec<&str> = log
        .iter()
        .filter_map(|e| e.event.as_ref())
        .filter(|e| e.source.ends_with("/svc/vault") && e.account_id == ACCOUNT)
        .map(|e| e.action.as_str())
        .collect();
    for action in ["account.restored", "account.removed", "code.released"] {
        assert!(
            actions.contains(&action),
            "{action} missing from {actions:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_version_applied_at_the_vault_reaches_the_broker_with_the_first_statement_naming_it() {
    let (sys, v1) = enrolled().await;
    // Version 2 applied to the vault directly (signed by adam and anna),
    // behind the broker's back.
    let document = sys.next_policy(|_| {}).await;
    let applied = apply_at_vault(&sys, &document, &["adam", "anna"])
        .await
        .expect("the vault applies version 2");
    let v2 = applied.policy.expect("the version").version;
    assert_eq!(v2, v1 + 1);

    // alice signs under version 2: the broker fetches it and files the
    // request; the chain releases under version 2.
    let alice = sys.signer("alice");
    let statement = alice.request(v2, ACCOUNT, "new version", "OPS-7");
    let created = alice_files(&sys, ACCOUNT, "new version", "OPS-7", statement)
        .await
        .expect("the broker takes a statement under the vault's new version")
        .request
        .expect("the request");
    assert_eq!(sys.policy_version().await, v2, "the broker names version 2");
    assert_eq!(created.consent.expect("consent").policy_version, v2);
}

// ---------------------------------------------------------------------------
// The allowed path: OpenSSH's ssh-keygen, and ssh-agent through the CLI.
// ---------------------------------------------------------------------------

/// Signs `binding` as `name` under policy `version` with `ssh-keygen -Y
/// sign -f pki/NAME.ssh -n twokey-consent@twokey.local` over the encoded
/// statement bytes (written to a file; the signature read back from
/// `FILE.sig`).
fn ssh_keygen_sign(
    sys: &System,
    dir: &Path,
    name: &str,
    version: u64,
    binding: Binding,
) -> SignedStatement {
    let statement = new_statement(version, &user_id(name), SystemTime::now(), binding);
    let bytes = encode_statement(&statement);
    let file = dir.join(format!("{name}-{}.statement", new_id()));
    std::fs::write(&file, &bytes).expect("write the statement");
    let out = Command::new("ssh-keygen")
        .args(["-Y", "sign", "-f"])
        .arg(sys.ssh_key_path(name))
        .args(["-n", &consent_namespace(TD)])
        .arg(&file)
        .output()
        .expect("run ssh-keygen");
    assert!(
        out.status.success(),
        "ssh-keygen -Y sign failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut sig = file.clone().into_os_string();
    sig.push(".sig");
    let signature = std::fs::read(PathBuf::from(sig)).expect("ssh-keygen wrote FILE.sig");
    assert!(signature.starts_with(b"-----BEGIN SSH SIGNATURE-----"));
    SignedStatement {
        statement: bytes,
        signature,
    }
}

/// Runs `command` with `input` on its stdin; its output (stdout and stderr
/// captured).
fn run_with_stdin(command: &mut Command, input: &[u8]) -> std::process::Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write stdin");
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wait for {command:?}: {e}"))
}

/// Checks a signed statement with `ssh-keygen -Y verify` against the
/// active policy's people as an `allowed_signers` file.
fn ssh_keygen_verify(dir: &Path, allowed_signers: &Path, signer: &str, signed: &SignedStatement) {
    let base = dir.join(format!("verify-{}", new_id()));
    let sig = base.with_extension("sig");
    std::fs::write(&sig, &signed.signature).expect("write the signature");
    let out = run_with_stdin(
        Command::new("ssh-keygen")
            .args(["-Y", "verify", "-f"])
            .arg(allowed_signers)
            .args(["-I", signer, "-n", &consent_namespace(TD), "-s"])
            .arg(&sig),
        &signed.statement,
    );
    assert!(
        out.status.success(),
        "ssh-keygen -Y verify refused {signer}'s statement: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn statements_signed_by_ssh_keygen_release_the_right_code() {
    let (sys, v) = enrolled().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (reason, ticket) = ("rotate the root access keys", "CHG-14");

    let request = ssh_keygen_sign(
        &sys,
        dir.path(),
        "alice",
        v,
        request_binding(
            &new_id(),
            ACCOUNT,
            &user_id("alice"),
            reason,
            ticket,
            SystemTime::now(),
        ),
    );
    let created = alice_files(&sys, ACCOUNT, reason, ticket, request.clone())
        .await
        .expect("alice files with ssh-keygen's signature")
        .request
        .expect("the request");
    let id = created.request_id.clone();
    assert_eq!(id, request_id_of(&request));
    let (shown, _) = consent_of(&created).expect("the request statement");
    assert_eq!(
        shown, request,
        "the broker shows alice's statement as signed"
    );

    let approval = ssh_keygen_sign(
        &sys,
        dir.path(),
        "bob",
        v,
        twokey_consent::approval_binding(&shown).expect("approval binding"),
    );
    bob_approves(&sys, &id, approval.clone())
        .await
        .expect("bob approves with ssh-keygen's signature");
    let (req, approvals) = olivia_verifies(&sys, &id).await;
    assert_eq!(approvals, std::slice::from_ref(&approval));
    let release = ssh_keygen_sign(
        &sys,
        dir.path(),
        "olivia",
        v,
        twokey_consent::release_binding(&req, &approvals, &new_id(), &new_id())
            .expect("release binding"),
    );
    let code = sys
        .release_with(&id, release.clone())
        .await
        .expect("olivia releases with ssh-keygen's signature");
    assert_eq!(
        code.code,
        totp(code.step),
        "the vault's code is not the TOTP"
    );

    // The other way round: ssh-keygen -Y verify accepts these statements,
    // and one signed here, against the policy as allowed_signers.
    let active = sys.active_policy().await;
    let policy = Policy::parse(&active.document).expect("the active policy parses");
    let allowed = dir.path().join("allowed_signers");
    std::fs::write(&allowed, policy.allowed_signers()).expect("write allowed_signers");
    for (who, signed) in [
        ("alice", &request),
        ("bob", &approval),
        ("olivia", &release),
    ] {
        ssh_keygen_verify(dir.path(), &allowed, &user_id(who), signed);
    }
    let ours = sys.signer("bob").approve(v, &request);
    ssh_keygen_verify(dir.path(), &allowed, &user_id("bob"), &ours);

    // The vault's code.released names the verified people.
    released_by_olivia(&sys, &id).await;
}

/// An `ssh-agent` in the foreground (`-D`) on a socket in a temporary
/// directory, killed (by its process id) when dropped.
struct Agent {
    child: Child,
    socket: PathBuf,
}

impl Agent {
    fn start(dir: &Path) -> Self {
        let socket = dir.join("agent.sock");
        let child = Command::new("ssh-agent")
            .args(["-D", "-a"])
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run ssh-agent");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "ssh-agent made no socket"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, socket }
    }

    fn add(&self, key: &Path) {
        let out = Command::new("ssh-add")
            .env("SSH_AUTH_SOCK", &self.socket)
            .arg(key)
            .output()
            .expect("run ssh-add");
        assert!(
            out.status.success(),
            "ssh-add {}: {}",
            key.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the `twokey` CLI as `profile` with the agent's socket; its stdout
/// (a JSON answer) on success.
async fn twokey(
    sys: &System,
    agent: &Path,
    profile: &str,
    args: &[&str],
    stdin: &str,
) -> serde_json::Value {
    let config = sys.local.config.clone();
    let agent = agent.to_owned();
    let profile = profile.to_owned();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let stdin = stdin.to_owned();
    tokio::task::spawn_blocking(move || {
        let out = run_with_stdin(
            Command::new(bin_dir().join("twokey"))
                .env("TWOKEY_CONFIG", &config)
                .env("SSH_AUTH_SOCK", &agent)
                .args(["--profile", &profile, "--json"])
                .args(&args),
            stdin.as_bytes(),
        );
        assert!(
            out.status.success(),
            "twokey --profile {profile} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "twokey {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    })
    .await
    .expect("the CLI's thread")
}

#[tokio::test(flavor = "multi_thread")]
async fn signatures_through_ssh_agent_by_the_cli_release_the_right_code() {
    let (sys, _) = enrolled().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(dir.path());
    // The private keys go into the agent and then out of reach of the CLI
    // (the public halves stay: they say which agent key is whose), so every
    // signature below is the agent's.
    let away = dir.path().join("away");
    std::fs::create_dir(&away).expect("a place for the keys");
    for name in ["alice", "bob", "olivia"] {
        let key = sys.ssh_key_path(name);
        agent.add(&key);
        std::fs::rename(&key, away.join(name)).expect("move the private key away");
    }

    let created = twokey(
        &sys,
        &agent.socket,
        "alice",
        &[
            "request",
            "create",
            "--account",
            ACCOUNT,
            "--reason",
            "rotate the root access keys",
            "--ticket",
            "CHG-14",
        ],
        "",
    )
    .await;
    let id = created["request"]["requestId"]
        .as_str()
        .unwrap_or_else(|| panic!("no request id in {created}"))
        .to_owned();
    twokey(&sys, &agent.socket, "bob", &["request", "approve", &id], "").await;
    let pin = sys
        .pin("alice", &id, Duration::from_secs(10))
        .await
        .expect("a PIN");
    twokey(
        &sys,
        &agent.socket,
        "olivia",
        &["pin", "verify", &id, "--pin-stdin"],
        &format!("{pin}\n"),
    )
    .await;
    let released = twokey(&sys, &agent.socket, "olivia", &["code", "release", &id], "").await;
    let code = released["code"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no code in {released}"));
    let step = released["code"]["step"]
        .as_str()
        .map(|s| s.parse::<u64>().expect("a step"))
        .or_else(|| released["code"]["step"].as_u64())
        .unwrap_or_else(|| panic!("no step in {released}"));
    assert_eq!(code, totp(step), "the CLI's code is not the TOTP");

    // The statements the broker holds are the agent's keys' signatures.
    let r = request_of(&sys, &id).await;
    let (req, approvals) = consent_of(&r).expect("its statements");
    for (name, signed) in [("alice", &req), ("bob", &approvals[0])] {
        let sig = twokey_consent::sshsig::parse_signature(&signed.signature).expect("sshsig");
        assert_eq!(
            sig.public_key(),
            sys.public_key(name).key_data(),
            "{name}'s statement is not signed with {name}'s key"
        );
    }
}
