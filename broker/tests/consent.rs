//! The people's signed consent at the broker, with `[consent]` configured
//! and a fake vault serving a policy signed by the pinned admins: each rule
//! refused with its exact gRPC status (and, for refusals, nothing released
//! and a `consent.refused` or `access.denied` event written), the evidence
//! and grant the vault receives, the policy round trip and admin actions.

mod common;

use std::collections::BTreeMap;

use common::*;
use tonic::Code;
use twokey_consent::{
    AdminAction, SignedStatement, TrustRoot, approval_binding, new_id, new_statement,
    release_binding, request_binding, sign_statement, statement::Binding, verify_policy_update,
};
use twokey_proto::{
    broker::v1::{self as pb},
    vault::v1::{self as vpb, GrantPurpose},
};
use twokey_testkit::consent::{
    AccountRoles, Person, PolicySpec, admins_allowed_signers, sign_policy,
};

const SELF: &str = "aws-self-root";
const REASON: &str = "rotate the root password";
const TICKET: &str = "OPS-7";

/// The broker's own policy for these tests: two admins (M = 2), an
/// operator who neither requests nor approves, and an account whose
/// requester releases the codes.
const CONSENT_POLICY: &str = r#"
[identities]
alice = "spiffe://twokey.local/user/alice"
rita = "spiffe://twokey.local/user/rita"
bob = "spiffe://twokey.local/user/bob"
dave = "spiffe://twokey.local/user/dave"
olivia = "spiffe://twokey.local/user/olivia"
carol = "spiffe://twokey.local/user/carol"
adam = "spiffe://twokey.local/user/adam"
anna = "spiffe://twokey.local/user/anna"
bpm = "spiffe://twokey.local/svc/bpm"

[groups]
requesters = ["alice", "rita"]
approvers = ["bob", "dave"]
operators = ["olivia"]
admins = ["adam", "anna"]

[accounts.aws-prod-root]
requesters = ["requesters"]
approvers = ["approvers"]
operators = ["operators"]
admins = ["admins"]
intake = ["bpm"]
approvals_required = 1
codes_per_request = 1

[accounts.aws-audit-root]
requesters = ["requesters"]
approvers = ["approvers"]
operators = ["operators"]
admins = ["admins"]
approvals_required = 2
codes_per_request = 2
pin_length = 10

[accounts.aws-self-root]
requesters = ["requesters"]
approvers = ["approvers"]
operators = ["operators"]
admins = ["admins"]
approvals_required = 1
codes_per_request = 2
delivery = "requester"
"#;

/// The people of the signed policy: those of the broker's file, and
/// mallory, whom the file does not name.
const NAMES: [&str; 10] = [
    "alice", "rita", "bob", "dave", "olivia", "carol", "adam", "anna", "bpm", "mallory",
];

/// Asserts `result` was refused with exactly `code` and a message naming
/// `part`.
#[track_caller]
fn assert_refused<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    part: &str,
) {
    let (got, message) = code_of(result);
    assert_eq!(got, code, "{message}");
    assert!(message.contains(part), "{message}");
}

fn spiffe(name: &str) -> String {
    let kind = if name == "bpm" { "svc" } else { "user" };
    format!("spiffe://{TD}/{kind}/{name}")
}

fn roles(account: &str, approvals: u32, codes: u32) -> AccountRoles {
    let mut a = AccountRoles::new(account, "alice", "bob", "olivia");
    a.requesters.push("rita".into());
    a.approvers.push("dave".into());
    a.approvals_required = approvals;
    a.codes_per_request = codes;
    a.releases_per_hour = 60;
    a
}

/// The signed policy document of `version` for these people: the roles
/// the broker's file gives.
fn document(people: &BTreeMap<&'static str, Person>, version: u64) -> String {
    let mut prod = roles(PROD, 1, 1);
    prod.intake.push("bpm".into());
    document_with(
        people,
        version,
        vec![prod, roles(AUDIT, 2, 2), roles(SELF, 1, 2)],
    )
}

/// A signed policy document of `version` for these people with `accounts`.
fn document_with(
    people: &BTreeMap<&'static str, Person>,
    version: u64,
    accounts: Vec<AccountRoles>,
) -> String {
    PolicySpec::adam_and_anna(version, TD, &people.values().collect::<Vec<_>>(), accounts).to_toml()
}

/// A test system under a signed policy.
struct Signed {
    h: Harness,
    people: BTreeMap<&'static str, Person>,
    root: TrustRoot,
    version: u64,
}

impl Signed {
    /// The broker with `[consent]`; the vault holds version 1, signed by
    /// adam and anna, unless `applied` is false.
    async fn start(applied: bool) -> Self {
        Self::start_with(applied.then_some(|p: &BTreeMap<&'static str, Person>| document(p, 1)))
            .await
    }

    /// The broker with `[consent]`; the vault holds version 1 as `v1`
    /// writes it for the people, signed by adam and anna (none: no version).
    async fn start_with(
        v1: Option<impl FnOnce(&BTreeMap<&'static str, Person>) -> String>,
    ) -> Self {
        let applied = v1.is_some();
        let people: BTreeMap<&'static str, Person> = NAMES
            .iter()
            .map(|n| (*n, Person::generate(n, vec![spiffe(n)])))
            .collect();
        let pinned = admins_allowed_signers(&[&people["adam"], &people["anna"]]);
        let root = TrustRoot::from_allowed_signers(TD, &pinned, 2).unwrap();
        let mut versions = Vec::new();
        if let Some(v1) = v1 {
            versions.push(version_of(
                &root,
                None,
                &v1(&people),
                &[&people["adam"], &people["anna"]],
            ));
        }
        let h = Harness::start_with(
            CONSENT_POLICY,
            Some(ConsentSetup {
                admins_allowed_signers: pinned,
                threshold: 2,
                versions,
            }),
        )
        .await;
        Self {
            h,
            people,
            root,
            version: u64::from(applied),
        }
    }

    fn key(&self, who: &str) -> &Person {
        &self.people[who]
    }

    /// `who`'s statement binding `binding`, under the test's version.
    fn sign(&self, who: &str, binding: Binding) -> SignedStatement {
        self.sign_as(who, who, binding)
    }

    /// A statement naming `signer` as its signer, signed with `key`'s key.
    fn sign_as(&self, signer: &str, key: &str, binding: Binding) -> SignedStatement {
        let statement = new_statement(self.version, &spiffe(signer), self.h.now(), binding);
        sign_statement(&self.key(key).key, TD, &statement).unwrap()
    }

    fn request_statement(&self, who: &str, account: &str, requester: &str) -> SignedStatement {
        self.sign(
            who,
            request_binding(
                &new_id(),
                account,
                &spiffe(requester),
                REASON,
                TICKET,
                self.h.now(),
            ),
        )
    }

    async fn create(
        &self,
        who: &str,
        account: &str,
        statement: Option<SignedStatement>,
    ) -> Result<tonic::Response<pb::CreateRequestResponse>, tonic::Status> {
        self.h
            .client(who)
            .create_request(pb::CreateRequestRequest {
                account_id: account.into(),
                reason: REASON.into(),
                ticket: TICKET.into(),
                on_behalf_of: String::new(),
                statement,
            })
            .await
    }

    /// alice files on `account` with her signed statement.
    async fn file(&self, account: &str) -> pb::Request {
        let statement = self.request_statement("alice", account, "alice");
        request_of(self.create("alice", account, Some(statement)).await)
    }

    fn approval(&self, who: &str, request: &pb::Request) -> SignedStatement {
        let stmt = request_statement(request);
        self.sign(who, approval_binding(&stmt).unwrap())
    }

    /// `who` approves `request` with a statement of their own bound to it.
    async fn approve(
        &self,
        who: &str,
        request: &pb::Request,
    ) -> Result<tonic::Response<pb::ApproveRequestResponse>, tonic::Status> {
        let statement = self.approval(who, request);
        self.approve_with(who, &request.request_id, Some(statement))
            .await
    }

    async fn approve_with(
        &self,
        who: &str,
        id: &str,
        statement: Option<SignedStatement>,
    ) -> Result<tonic::Response<pb::ApproveRequestResponse>, tonic::Status> {
        self.h
            .client(who)
            .approve_request(pb::ApproveRequestRequest {
                request_id: id.into(),
                comment: "ok".into(),
                statement,
            })
            .await
    }

    /// A release statement by `who` binding `approvals` of `request`.
    fn release(
        &self,
        who: &str,
        request: &pb::Request,
        approvals: &[SignedStatement],
        grant_id: &str,
        release_id: &str,
    ) -> SignedStatement {
        let stmt = request_statement(request);
        self.sign(
            who,
            release_binding(&stmt, approvals, grant_id, release_id).unwrap(),
        )
    }

    async fn release_with(
        &self,
        who: &str,
        id: &str,
        statement: Option<SignedStatement>,
    ) -> Result<tonic::Response<pb::ReleaseCodeResponse>, tonic::Status> {
        self.h
            .client(who)
            .release_code(pb::ReleaseCodeRequest {
                request_id: id.into(),
                statement,
            })
            .await
    }

    async fn verify_with(
        &self,
        id: &str,
        releases: Vec<SignedStatement>,
    ) -> Result<tonic::Response<pb::VerifyPinResponse>, tonic::Status> {
        let pin = self.h.wait_for_pin("alice", id, 1).await;
        self.h
            .client("olivia")
            .verify_pin(pb::VerifyPinRequest {
                request_id: id.into(),
                pin,
                releases,
            })
            .await
    }

    /// alice files on `account`, bob (and dave, where two are needed)
    /// approve with their statements: APPROVED.
    async fn approved(&self, account: &str) -> pb::Request {
        let r = self.file(account).await;
        let mut r = request_of(
            self.approve_with("bob", &r.request_id, Some(self.approval("bob", &r)))
                .await,
        );
        if r.approvals_required == 2 {
            r = request_of(
                self.approve_with("dave", &r.request_id, Some(self.approval("dave", &r)))
                    .await,
            );
        }
        assert_eq!(state_of(&r), pb::RequestState::Approved);
        r
    }

    /// ... and olivia verifies the PIN: VERIFIED.
    async fn verified(&self, account: &str) -> pb::Request {
        let r = self.approved(account).await;
        let r = request_of(self.verify_with(&r.request_id, vec![]).await);
        assert_eq!(state_of(&r), pb::RequestState::Verified);
        r
    }

    async fn policy_version(&self, who: &str) -> u64 {
        self.h
            .client(who)
            .who_am_i(pb::WhoAmIRequest {})
            .await
            .unwrap()
            .into_inner()
            .policy_version
    }

    /// The roles WhoAmI gives `who`, per account.
    async fn roles_of(&self, who: &str) -> Vec<(String, Vec<pb::Role>)> {
        self.h
            .client(who)
            .who_am_i(pb::WhoAmIRequest {})
            .await
            .unwrap()
            .into_inner()
            .accounts
            .into_iter()
            .map(|a| (a.account_id.clone(), a.roles().collect()))
            .collect()
    }

    /// adam proposes `document`, adam and anna sign it and anna applies it,
    /// all through the broker; statements are made under its version from
    /// then on.
    async fn apply(&mut self, document: String) {
        let version = self.version + 1;
        self.h
            .client("adam")
            .propose_policy(pb::ProposePolicyRequest {
                document: document.clone(),
            })
            .await
            .unwrap();
        for who in ["adam", "anna"] {
            self.h
                .client(who)
                .sign_policy(pb::SignPolicyRequest {
                    version,
                    signature: sign_policy(&self.key(who).key, TD, &document),
                })
                .await
                .unwrap();
        }
        let applied = self
            .h
            .client("anna")
            .apply_policy(pb::ApplyPolicyRequest { version })
            .await
            .unwrap()
            .into_inner()
            .policy
            .unwrap();
        assert_eq!(applied.version, version);
        self.version = version;
    }

    fn released(&self) -> usize {
        self.h.vault.evidence.lock().unwrap().len()
    }

    /// Stops the broker and answers the reasons of its `consent.refused`
    /// (and `access.denied`) events.
    async fn refusals(&mut self) -> Vec<(String, String)> {
        self.h.stop_broker().await;
        self.h
            .stored_events()
            .into_iter()
            .filter(|e| e.action == "consent.refused" || e.action == "access.denied")
            .map(|e| (e.action.clone(), e.attributes["reason"].clone()))
            .collect()
    }
}

/// The request statement a request shows.
fn request_statement(request: &pb::Request) -> SignedStatement {
    request
        .consent
        .as_ref()
        .and_then(|c| c.request.clone())
        .expect("the request carries its request statement")
}

fn approvals_of(request: &pb::Request) -> Vec<SignedStatement> {
    request
        .consent
        .as_ref()
        .map(|c| c.approvals.clone())
        .unwrap_or_default()
}

/// A vault `PolicyVersion` of `document` signed by `signers`, verified over
/// `current` from `root`.
fn version_of(
    root: &TrustRoot,
    current: Option<&twokey_consent::VerifiedPolicy>,
    document: &str,
    signers: &[&Person],
) -> vpb::PolicyVersion {
    let signatures: Vec<Vec<u8>> = signers
        .iter()
        .map(|p| sign_policy(&p.key, TD, document))
        .collect();
    let v = verify_policy_update(current, root, document.as_bytes(), &signatures).unwrap();
    vpb::PolicyVersion {
        version: v.version(),
        document: document.into(),
        signatures,
        signed_by: v.signed_by().to_vec(),
        digest: v.digest().to_vec(),
        applied_at: None,
    }
}

#[tokio::test]
async fn without_a_request_statement_nothing_is_filed_and_whoami_names_the_version() {
    let mut s = Signed::start(true).await;
    assert_eq!(s.policy_version("alice").await, 1);
    let (code, message) = code_of(s.create("alice", PROD, None).await);
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert!(
        message.contains("signed policy version 1 is in force")
            && message.contains("twokey request create"),
        "{message}"
    );
    let listed =
        s.h.client("alice")
            .list_requests(pb::ListRequestsRequest::default())
            .await
            .unwrap()
            .into_inner();
    assert!(listed.requests.is_empty());
    let refusals = s.refusals().await;
    assert!(
        refusals
            .iter()
            .any(|(a, r)| a == "consent.refused" && r.contains("twokey request create")),
        "{refusals:?}"
    );
    s.h.shutdown().await;
}

#[tokio::test]
async fn a_filed_request_takes_its_id_and_time_from_the_statement_and_shows_it() {
    let s = Signed::start(true).await;
    s.h.advance(std::time::Duration::from_secs(1));
    let statement = s.request_statement("alice", PROD, "alice");
    let Some(Binding::Request(rb)) = twokey_consent::decode_statement(&statement.statement)
        .unwrap()
        .binding
    else {
        panic!("a request binding")
    };
    let r = request_of(s.create("alice", PROD, Some(statement.clone())).await);
    assert_eq!(r.request_id, rb.request_id);
    assert_eq!(r.created_at, rb.created_at);
    let consent = r.consent.clone().unwrap();
    assert_eq!(consent.request.as_ref(), Some(&statement));
    assert_eq!(consent.policy_version, 1);
    // As GetRequest, ListRequests (for an approver) show it.
    let got = get(&s.h, "bob", &r.request_id).await;
    assert_eq!(request_statement(&got), statement);
    let listed =
        s.h.client("bob")
            .list_requests(pb::ListRequestsRequest::default())
            .await
            .unwrap()
            .into_inner();
    assert_eq!(request_statement(&listed.requests[0]), statement);
    // An intake service signs for the requester it names.
    let for_rita = s.sign(
        "bpm",
        request_binding(&new_id(), PROD, &spiffe("rita"), REASON, TICKET, s.h.now()),
    );
    let r = request_of(
        s.h.client("bpm")
            .create_request(pb::CreateRequestRequest {
                account_id: PROD.into(),
                reason: REASON.into(),
                ticket: TICKET.into(),
                on_behalf_of: "rita".into(),
                statement: Some(for_rita),
            })
            .await,
    );
    assert_eq!(r.requester, spiffe("rita"));
    s.h.shutdown().await;
}

#[tokio::test]
async fn a_request_statement_not_the_callers_own_is_permission_denied() {
    let mut s = Signed::start(true).await;
    // rita's statement, sent by alice.
    let ritas = s.request_statement("rita", PROD, "alice");
    assert_refused(
        s.create("alice", PROD, Some(ritas)).await,
        Code::PermissionDenied,
        "not by spiffe://twokey.local/user/alice",
    );
    // Naming alice as signer, signed with rita's key.
    let forged = s.sign_as(
        "alice",
        "rita",
        request_binding(&new_id(), PROD, &spiffe("alice"), REASON, TICKET, s.h.now()),
    );
    assert_refused(
        s.create("alice", PROD, Some(forged)).await,
        Code::PermissionDenied,
        "person rita's",
    );
    // A key the policy does not list at all.
    let stranger = Person::generate("alice", vec![spiffe("alice")]);
    let statement = new_statement(
        1,
        &spiffe("alice"),
        s.h.now(),
        request_binding(&new_id(), PROD, &spiffe("alice"), REASON, TICKET, s.h.now()),
    );
    let unknown = sign_statement(&stranger.key, TD, &statement).unwrap();
    assert_refused(
        s.create("alice", PROD, Some(unknown)).await,
        Code::PermissionDenied,
        "in no person's entry",
    );
    let refusals = s.refusals().await;
    assert_eq!(
        refusals
            .iter()
            .filter(|(a, _)| a == "consent.refused")
            .count(),
        3,
        "{refusals:?}"
    );
    s.h.shutdown().await;
}

#[tokio::test]
async fn a_request_statement_bound_to_something_else_is_refused() {
    let s = Signed::start(true).await;
    let now = s.h.now();
    let with = |account: &str, requester: &str, reason: &str, ticket: &str| {
        s.sign(
            "alice",
            request_binding(&new_id(), account, &spiffe(requester), reason, ticket, now),
        )
    };
    for (statement, field) in [
        (
            with(PROD, "alice", "another reason", TICKET),
            "reason and ticket",
        ),
        (with(PROD, "alice", REASON, "OPS-8"), "reason and ticket"),
        (with(AUDIT, "alice", REASON, TICKET), "account"),
        (with(PROD, "rita", REASON, TICKET), "requester"),
    ] {
        assert_refused(
            s.create("alice", PROD, Some(statement)).await,
            Code::FailedPrecondition,
            &format!("bound to another {field}"),
        );
    }
    // Created ten minutes from the broker's time.
    let old = s.sign(
        "alice",
        request_binding(
            &new_id(),
            PROD,
            &spiffe("alice"),
            REASON,
            TICKET,
            now - std::time::Duration::from_secs(600),
        ),
    );
    assert_refused(
        s.create("alice", PROD, Some(old)).await,
        Code::FailedPrecondition,
        "out of its time window",
    );
    // An id that is not a UUID.
    let odd = s.sign(
        "alice",
        request_binding("r1", PROD, &spiffe("alice"), REASON, TICKET, now),
    );
    let (code, message) = code_of(s.create("alice", PROD, Some(odd)).await);
    assert_eq!(code, Code::InvalidArgument, "{message}");
    // One statement files one request.
    let once = with(PROD, "alice", REASON, TICKET);
    request_of(s.create("alice", PROD, Some(once.clone())).await);
    assert_refused(
        s.create("alice", PROD, Some(once)).await,
        Code::PermissionDenied,
        "is taken",
    );
    // Under another policy version.
    let mut s2 = s;
    s2.version = 7;
    let stale = s2.request_statement("alice", PROD, "alice");
    assert_refused(
        s2.create("alice", PROD, Some(stale)).await,
        Code::FailedPrecondition,
        "policy version 7, the active one is 1",
    );
    // Only the one good statement filed a request; every refusal is audited.
    let listed =
        s2.h.client("alice")
            .list_requests(pb::ListRequestsRequest::default())
            .await
            .unwrap()
            .into_inner();
    assert_eq!(listed.requests.len(), 1);
    let refusals = s2.refusals().await;
    assert_eq!(refusals.len(), 8, "{refusals:?}");
    assert!(refusals.iter().all(|(a, _)| a == "consent.refused"));
    s2.h.shutdown().await;
}

#[tokio::test]
async fn approvals_are_the_approvers_own_bound_to_this_request_and_kept_in_order() {
    let mut s = Signed::start(true).await;
    let a = s.file(AUDIT).await;
    let b = s.file(AUDIT).await;
    // No statement.
    assert_refused(
        s.approve_with("bob", &a.request_id, None).await,
        Code::FailedPrecondition,
        &format!("twokey request approve {}", a.request_id),
    );
    // Bound to the other request.
    assert_refused(
        s.approve_with("bob", &a.request_id, Some(s.approval("bob", &b)))
            .await,
        Code::FailedPrecondition,
        "bound to another request",
    );
    // dave's statement, sent by bob.
    let (code, message) = code_of(
        s.approve_with("bob", &a.request_id, Some(s.approval("dave", &a)))
            .await,
    );
    assert_eq!(code, Code::PermissionDenied, "{message}");
    let r = get(&s.h, "bob", &a.request_id).await;
    assert!(r.approvals.is_empty() && approvals_of(&r).is_empty());
    // dave first, then bob: stored in that order.
    let dave = s.approval("dave", &a);
    let bob = s.approval("bob", &a);
    request_of(
        s.approve_with("dave", &a.request_id, Some(dave.clone()))
            .await,
    );
    let r = request_of(
        s.approve_with("bob", &a.request_id, Some(bob.clone()))
            .await,
    );
    assert_eq!(state_of(&r), pb::RequestState::Approved);
    assert_eq!(approvals_of(&r), vec![dave, bob]);
    let refusals = s.refusals().await;
    assert_eq!(refusals.len(), 3, "{refusals:?}");
    s.h.shutdown().await;
}

#[tokio::test]
async fn a_release_carries_exactly_the_stored_evidence_and_the_operators_grant_id() {
    let s = Signed::start(true).await;
    let r = s.verified(AUDIT).await;
    let approvals = approvals_of(&r);
    assert_eq!(approvals.len(), 2);
    let (grant_id, release_id) = (new_id(), new_id());
    let release = s.release("olivia", &r, &approvals, &grant_id, &release_id);
    let answer = s
        .release_with("olivia", &r.request_id, Some(release.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.code.unwrap().code, FAKE_CODE);
    let evidence = s.h.vault.evidence.lock().unwrap()[0].clone().unwrap();
    assert_eq!(evidence.request, Some(request_statement(&r)));
    assert_eq!(evidence.approvals, approvals);
    assert_eq!(evidence.release, Some(release));
    let grant = s.h.vault.grants.lock().unwrap()[0].clone();
    assert_eq!(grant.grant_id, grant_id);
    assert_eq!(grant.request_id, r.request_id);
    // The second code: the same grant id again is refused, as is the same
    // release id; new ids release it.
    let again = s.release("olivia", &r, &approvals, &grant_id, &new_id());
    assert_refused(
        s.release_with("olivia", &r.request_id, Some(again)).await,
        Code::PermissionDenied,
        &format!("grant id {grant_id} was used"),
    );
    let replay = s.release("olivia", &r, &approvals, &new_id(), &release_id);
    assert_refused(
        s.release_with("olivia", &r.request_id, Some(replay)).await,
        Code::PermissionDenied,
        "was used already",
    );
    assert_eq!(s.released(), 1);
    let fresh = s.release("olivia", &r, &approvals, &new_id(), &new_id());
    s.release_with("olivia", &r.request_id, Some(fresh))
        .await
        .unwrap();
    assert_eq!(s.released(), 2);
    s.h.shutdown().await;
}

#[tokio::test]
async fn a_release_statement_must_be_the_operators_and_bind_all_approvals() {
    let mut s = Signed::start(true).await;
    let r = s.verified(AUDIT).await;
    let approvals = approvals_of(&r);
    // None at all.
    assert_refused(
        s.release_with("olivia", &r.request_id, None).await,
        Code::FailedPrecondition,
        &format!("twokey code release {}", r.request_id),
    );
    // Binding only one of the two approvals.
    let partial = s.release("olivia", &r, &approvals[..1], &new_id(), &new_id());
    assert_refused(
        s.release_with("olivia", &r.request_id, Some(partial)).await,
        Code::FailedPrecondition,
        "set of approvals",
    );
    // Binding another request.
    let other = s.verified(PROD).await;
    let elsewhere = s.release(
        "olivia",
        &other,
        &approvals_of(&other),
        &new_id(),
        &new_id(),
    );
    assert_refused(
        s.release_with("olivia", &r.request_id, Some(elsewhere))
            .await,
        Code::FailedPrecondition,
        "bound to another request",
    );
    // bob's release statement, sent by olivia.
    let bobs = s.release("bob", &r, &approvals, &new_id(), &new_id());
    let (code, message) = code_of(s.release_with("olivia", &r.request_id, Some(bobs)).await);
    assert_eq!(code, Code::PermissionDenied, "{message}");
    // A grant id that is not a UUID.
    let odd = s.release("olivia", &r, &approvals, "grant-1", &new_id());
    let (code, message) = code_of(s.release_with("olivia", &r.request_id, Some(odd)).await);
    assert_eq!(code, Code::InvalidArgument, "{message}");
    // Nothing was released, and the quota is whole.
    assert_eq!(s.released(), 0);
    let r = get(&s.h, "olivia", &r.request_id).await;
    assert_eq!(r.codes_released, 0);
    let refusals = s.refusals().await;
    assert_eq!(refusals.len(), 5, "{refusals:?}");
    s.h.shutdown().await;
}

#[tokio::test]
async fn the_requester_releases_with_the_statements_the_operator_signed_at_verify() {
    let s = Signed::start(true).await;
    let r = s.approved(SELF).await;
    // Without release statements the PIN is not taken (and no attempt
    // counted).
    let (code, message) = code_of(s.verify_with(&r.request_id, vec![]).await);
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert!(message.contains("twokey pin verify"), "{message}");
    let r = get(&s.h, "olivia", &r.request_id).await;
    assert_eq!(
        (state_of(&r), r.pin_attempts),
        (pb::RequestState::Approved, 0)
    );
    // Release statements by someone else than the caller.
    let approvals = approvals_of(&r);
    let bobs = s.release("bob", &r, &approvals, &new_id(), &new_id());
    let (code, _) = code_of(s.verify_with(&r.request_id, vec![bobs]).await);
    assert_eq!(code, Code::PermissionDenied);
    let first = s.release("olivia", &r, &approvals, &new_id(), &new_id());
    let second = s.release("olivia", &r, &approvals, &new_id(), &new_id());
    let r = request_of(
        s.verify_with(&r.request_id, vec![first.clone(), second.clone()])
            .await,
    );
    assert_eq!(state_of(&r), pb::RequestState::Verified);
    // alice releases both codes, the operator's statements in order.
    for _ in 0..2 {
        s.release_with("alice", &r.request_id, None).await.unwrap();
    }
    let evidence = s.h.vault.evidence.lock().unwrap().clone();
    let used: Vec<_> = evidence
        .into_iter()
        .map(|e| e.unwrap().release.unwrap())
        .collect();
    assert_eq!(used, vec![first, second]);
    s.h.shutdown().await;
}

#[tokio::test]
async fn a_request_filed_before_the_policy_must_be_filed_again_and_the_policy_round_trips() {
    let mut s = Signed::start(false).await;
    assert_eq!(s.policy_version("alice").await, 0);
    // No signed policy yet: the flow works without statements.
    let (id, pin) = approved_prod(&s.h).await;
    request_of(verify(&s.h, "olivia", &id, &pin).await);
    // Disabling an account needs a signed policy.
    let (code, message) = code_of(
        s.h.client("adam")
            .set_account_enabled(pb::SetAccountEnabledRequest {
                account_id: PROD.into(),
                enabled: false,
                action_id: String::new(),
            })
            .await,
    );
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert!(
        message.contains("no signed policy is in force"),
        "{message}"
    );

    // adam proposes version 1; only admins may.
    let doc = document(&s.people, 1);
    let propose = |who: &'static str, document: String| {
        let mut client = s.h.client(who);
        async move {
            client
                .propose_policy(pb::ProposePolicyRequest { document })
                .await
        }
    };
    let (code, _) = code_of(propose("bob", doc.clone()).await);
    assert_eq!(code, Code::PermissionDenied);
    let (code, _) = code_of(propose("adam", "version = ".into()).await);
    assert_eq!(code, Code::InvalidArgument);
    let proposal = propose("adam", doc.clone())
        .await
        .unwrap()
        .into_inner()
        .proposal
        .unwrap();
    assert_eq!((proposal.version, proposal.signatures.len()), (1, 0));
    let sign = |who: &'static str, signature: Vec<u8>| {
        let mut client = s.h.client(who);
        async move {
            client
                .sign_policy(pb::SignPolicyRequest {
                    version: 1,
                    signature,
                })
                .await
        }
    };
    let apply = || {
        let mut client = s.h.client("anna");
        async move {
            client
                .apply_policy(pb::ApplyPolicyRequest { version: 1 })
                .await
        }
    };
    // A key that is no pinned admin's, and a signature over another text.
    assert_refused(
        sign("adam", sign_policy(&s.key("bob").key, TD, &doc)).await,
        Code::PermissionDenied,
        "not an admin key of the pinned admin set",
    );
    let (code, message) =
        code_of(sign("adam", sign_policy(&s.key("adam").key, TD, "version = 2")).await);
    assert_eq!(code, Code::PermissionDenied, "{message}");
    let signed = sign("adam", sign_policy(&s.key("adam").key, TD, &doc))
        .await
        .unwrap()
        .into_inner()
        .proposal
        .unwrap();
    assert_eq!(signed.signed_by, vec![spiffe("adam")]);
    // One signature of two: the vault refuses, its status passes through and
    // no version is in force.
    assert_refused(
        apply().await,
        Code::FailedPrecondition,
        "needs 2 distinct admin signatures",
    );
    assert_eq!(s.policy_version("alice").await, 0);
    sign("anna", sign_policy(&s.key("anna").key, TD, &doc))
        .await
        .unwrap();
    let applied = apply().await.unwrap().into_inner().policy.unwrap();
    assert_eq!(applied.version, 1);
    let last = s.h.vault.applies.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last.document, doc);
    // Ed25519 sshsig signatures are deterministic: these are the ones sent.
    assert_eq!(
        last.signatures,
        vec![
            sign_policy(&s.key("adam").key, TD, &doc),
            sign_policy(&s.key("anna").key, TD, &doc)
        ]
    );
    assert_eq!(s.policy_version("alice").await, 1);
    let policy =
        s.h.client("carol")
            .get_policy(pb::GetPolicyRequest {})
            .await
            .unwrap()
            .into_inner();
    assert_eq!(policy.applied.len(), 1);
    // The pinned admins are named by their first principal.
    assert_eq!(
        policy.applied[0].signed_by,
        vec![spiffe("adam"), spiffe("anna")]
    );
    assert!(policy.proposals.is_empty());

    // The request filed before: file it again.
    let (code, message) = code_of(release(&s.h, "olivia", &id).await);
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert!(
        message.contains("filed before a signed policy was in force")
            && message.contains("file it again"),
        "{message}"
    );
    assert_eq!(s.released(), 0);
    s.version = 1;
    let r = s.verified(PROD).await;
    let release = s.release("olivia", &r, &approvals_of(&r), &new_id(), &new_id());
    s.release_with("olivia", &r.request_id, Some(release))
        .await
        .unwrap();
    assert_eq!(s.released(), 1);
    s.h.stop_broker().await;
    let events = s.h.stored_events();
    let actions: Vec<&str> = events
        .iter()
        .map(|e| e.action.as_str())
        .filter(|a| a.starts_with("policy."))
        .collect();
    assert_eq!(
        actions,
        [
            "policy.proposed",
            "policy.signed",
            "policy.signed",
            "policy.applied"
        ]
    );
    // The refused signatures and the non-admin's proposal are on record.
    let refused: Vec<(&str, &str)> = events
        .iter()
        .filter(|e| e.action == "consent.refused" || e.action == "access.denied")
        .map(|e| (e.action.as_str(), e.attributes["attempted"].as_str()))
        .collect();
    assert!(
        refused.contains(&("access.denied", "propose_policy")),
        "{refused:?}"
    );
    let signatures = refused
        .iter()
        .filter(|r| **r == ("consent.refused", "sign_policy"))
        .count();
    assert_eq!(signatures, 2, "{refused:?}");
    s.h.shutdown().await;
}

#[tokio::test]
async fn a_statement_under_a_newer_version_makes_the_broker_fetch_it() {
    let mut s = Signed::start(true).await;
    assert_eq!(s.policy_version("alice").await, 1);
    // v2 applied to the vault behind the broker's back.
    let v1 = verify_chain(&s.root, &s.h.vault.policy.lock().unwrap());
    let v2 = version_of(
        &s.root,
        v1.as_ref(),
        &document(&s.people, 2),
        &[&s.people["adam"], &s.people["anna"]],
    );
    s.h.vault.policy.lock().unwrap().insert(0, v2);
    s.version = 2;
    let r = s.file(PROD).await;
    assert_eq!(r.consent.unwrap().policy_version, 2);
    assert_eq!(s.policy_version("alice").await, 2);
    s.h.shutdown().await;
}

#[tokio::test]
async fn admin_actions_collect_m_admins_and_are_forwarded_with_the_account_call() {
    let mut s = Signed::start(true).await;
    let remove = |who: &'static str, action_id: &str| {
        let mut client = s.h.client(who);
        let action_id = action_id.to_owned();
        async move {
            client
                .remove_account(pb::RemoveAccountRequest {
                    account_id: PROD.into(),
                    reason: "decommissioned".into(),
                    action_id,
                })
                .await
        }
    };
    let sign_action = |who: &'static str, statement: SignedStatement| {
        let mut client = s.h.client(who);
        async move {
            client
                .sign_admin_action(pb::SignAdminActionRequest {
                    statement: Some(statement),
                })
                .await
        }
    };
    let binding = |action: AdminAction, id: &str| twokey_consent::admin_binding(PROD, action, id);
    // No action id.
    assert_refused(
        remove("adam", "").await,
        Code::FailedPrecondition,
        "ADMIN_ACTION_REMOVE",
    );
    let id = new_id();
    let adams = s.sign("adam", binding(AdminAction::Remove, &id));
    let action = sign_action("adam", adams.clone())
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    assert_eq!((action.signed_by.len(), action.needed), (1, 2));
    // One admin is not enough.
    let (code, message) = code_of(remove("adam", &id).await);
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert!(message.contains("needs 2 distinct admins"), "{message}");
    // bob is no admin; anna's statement sent by adam is not adam's; anna
    // signing another action under this id is refused; adam twice too.
    let (code, _) =
        code_of(sign_action("bob", s.sign("bob", binding(AdminAction::Remove, &id))).await);
    assert_eq!(code, Code::PermissionDenied);
    let (code, _) =
        code_of(sign_action("adam", s.sign("anna", binding(AdminAction::Remove, &id))).await);
    assert_eq!(code, Code::PermissionDenied);
    let (code, message) =
        code_of(sign_action("anna", s.sign("anna", binding(AdminAction::Disable, &id))).await);
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    let (code, _) =
        code_of(sign_action("adam", s.sign("adam", binding(AdminAction::Remove, &id))).await);
    assert_eq!(code, Code::FailedPrecondition);
    assert!(s.h.vault.admin_consents.lock().unwrap().is_empty());

    let annas = s.sign("anna", binding(AdminAction::Remove, &id));
    sign_action("anna", annas.clone()).await.unwrap();
    let open =
        s.h.client("anna")
            .list_admin_actions(pb::ListAdminActionsRequest {})
            .await
            .unwrap()
            .into_inner()
            .actions;
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].signed_by, vec![spiffe("adam"), spiffe("anna")]);
    // A REMOVE action is not a DISABLE one.
    let (code, _) = code_of(
        s.h.client("adam")
            .set_account_enabled(pb::SetAccountEnabledRequest {
                account_id: PROD.into(),
                enabled: false,
                action_id: id.clone(),
            })
            .await,
    );
    assert_eq!(code, Code::FailedPrecondition);
    let removed = remove("adam", &id).await.unwrap().into_inner();
    assert_eq!(removed.account_id, PROD);
    let (purpose, consent) = s.h.vault.admin_consents.lock().unwrap()[0].clone();
    assert_eq!(purpose, GrantPurpose::Remove);
    assert_eq!(consent.unwrap().statements, vec![adams, annas]);
    // Carried out: gone from the list, and not usable twice.
    let open =
        s.h.client("adam")
            .list_admin_actions(pb::ListAdminActionsRequest {})
            .await
            .unwrap()
            .into_inner()
            .actions;
    assert!(open.is_empty());
    let (code, _) = code_of(remove("adam", &id).await);
    assert_eq!(code, Code::NotFound);

    // Disable through a DISABLE action, forwarded with a SET_ENABLED grant.
    let id = new_id();
    for who in ["adam", "anna"] {
        sign_action(who, s.sign(who, binding(AdminAction::Disable, &id)))
            .await
            .unwrap();
    }
    let account =
        s.h.client("anna")
            .set_account_enabled(pb::SetAccountEnabledRequest {
                account_id: PROD.into(),
                enabled: false,
                action_id: id,
            })
            .await
            .unwrap()
            .into_inner()
            .account
            .unwrap();
    assert!(account.disabled);
    let (purpose, consent) = s.h.vault.admin_consents.lock().unwrap()[1].clone();
    assert_eq!(purpose, GrantPurpose::SetEnabled);
    assert_eq!(consent.unwrap().statements.len(), 2);
    let grant = s.h.vault.grants.lock().unwrap().last().cloned().unwrap();
    assert_eq!(grant.operator, spiffe("anna"));
    // Enrolling a new account needs no action; replacing one does.
    let enroll = |replace: bool, action_id: String| {
        let mut client = s.h.client("adam");
        async move {
            client
                .enroll_account(pb::EnrollAccountRequest {
                    account_id: AUDIT.into(),
                    seed: Some(pb::enroll_account_request::Seed::Base32Secret(
                        "JBSWY3DPEHPK3PXP".into(),
                    )),
                    replace,
                    action_id,
                    ..Default::default()
                })
                .await
        }
    };
    enroll(false, String::new()).await.unwrap();
    let (code, _) = code_of(enroll(true, String::new()).await);
    assert_eq!(code, Code::FailedPrecondition);
    let refusals = s.refusals().await;
    assert!(
        refusals
            .iter()
            .any(|(a, r)| a == "consent.refused" && r.contains("ADMIN_ACTION_ENROLL_REPLACE")),
        "{refusals:?}"
    );
    s.h.shutdown().await;
}

#[tokio::test]
async fn a_policy_the_vault_cannot_give_at_start_is_fetched_in_the_background() {
    let mut s = Signed::start(true).await;
    let r = s.file(PROD).await;
    s.h.stop_broker().await;
    s.h.vault
        .policy_down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    s.h.start_broker().await;
    // Not loaded yet: no version, so no statement is required...
    assert_eq!(s.policy_version("alice").await, 0);
    // ... and what was stored is still there.
    let got = get(&s.h, "bob", &r.request_id).await;
    assert_eq!(request_statement(&got), request_statement(&r));
    s.h.vault
        .policy_down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let loaded = async {
        while s.policy_version("alice").await != 1 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(20), loaded)
        .await
        .expect("the broker loads the policy once the vault answers");
    let (code, _) = code_of(s.create("alice", PROD, None).await);
    assert_eq!(code, Code::FailedPrecondition);
    s.h.shutdown().await;
}

/// PROD as the signed policy of the tests below has it, unlike the broker's
/// file (approvers bob and dave, one approval, one code): approvers bob and
/// carol, two approvals, two codes.
fn prod_signed_unlike_the_file() -> AccountRoles {
    let mut prod = AccountRoles::new(PROD, "alice", "bob", "olivia");
    prod.approvers.push("carol".into());
    prod.approvals_required = 2;
    prod.codes_per_request = 2;
    prod.releases_per_hour = 60;
    prod
}

#[tokio::test]
async fn the_signed_policy_decides_who_approves_how_many_approvals_and_codes() {
    let mut s = Signed::start_with(Some(|p: &BTreeMap<&'static str, Person>| {
        document_with(p, 1, vec![prod_signed_unlike_the_file()])
    }))
    .await;
    let r = s.file(PROD).await;
    // The signed counts, not the file's.
    assert_eq!((r.approvals_required, r.codes_allowed), (2, 2));
    // dave approves in the broker's file only: refused, nothing recorded.
    assert_refused(
        s.approve("dave", &r).await,
        Code::PermissionDenied,
        "is not an approver for aws-prod-root",
    );
    // carol approves in the signed policy only: her approval counts.
    let r = request_of(s.approve("carol", &r).await);
    assert_eq!(state_of(&r), pb::RequestState::Pending);
    assert_eq!(r.approvals.len(), 1);
    let r = request_of(s.approve("bob", &r).await);
    assert_eq!(state_of(&r), pb::RequestState::Approved);
    let r = request_of(s.verify_with(&r.request_id, vec![]).await);
    // Two codes, where the file allows one.
    for n in 1..=2 {
        let release = s.release("olivia", &r, &approvals_of(&r), &new_id(), &new_id());
        s.release_with("olivia", &r.request_id, Some(release))
            .await
            .unwrap();
        assert_eq!(s.released(), n);
    }
    let r = get(&s.h, "alice", &r.request_id).await;
    assert_eq!(state_of(&r), pb::RequestState::Released);
    let refusals = s.refusals().await;
    assert_eq!(
        refusals,
        vec![(
            "access.denied".to_owned(),
            format!(
                "{} is not an approver for {PROD}; ask an admin to add you to the policy",
                spiffe("dave")
            )
        )]
    );
    s.h.shutdown().await;
}

#[tokio::test]
async fn whoami_reports_the_roles_of_the_signed_policy_and_its_people_the_file_does_not_name() {
    let mut gcp = AccountRoles::new("gcp-root", "mallory", "bob", "olivia");
    gcp.releases_per_hour = 60;
    let s = Signed::start_with(Some(move |p: &BTreeMap<&'static str, Person>| {
        document_with(p, 1, vec![prod_signed_unlike_the_file(), gcp])
    }))
    .await;
    use pb::Role::{Admin, Approver, Operator, Requester};
    assert_eq!(
        s.roles_of("carol").await,
        vec![(PROD.to_owned(), vec![Approver])]
    );
    // dave approves every account in the file; the signed policy gives him
    // nothing.
    assert!(s.roles_of("dave").await.is_empty());
    assert_eq!(
        s.roles_of("bob").await,
        vec![
            ("aws-prod-root".to_owned(), vec![Approver]),
            ("gcp-root".to_owned(), vec![Approver])
        ]
    );
    assert_eq!(
        s.roles_of("adam").await,
        vec![
            ("aws-prod-root".to_owned(), vec![Admin]),
            ("gcp-root".to_owned(), vec![Admin])
        ]
    );
    assert_eq!(
        s.roles_of("olivia").await,
        vec![
            ("aws-prod-root".to_owned(), vec![Operator]),
            ("gcp-root".to_owned(), vec![Operator])
        ]
    );
    // mallory is not in the file: her name comes from the signed policy.
    let me =
        s.h.client("mallory")
            .who_am_i(pb::WhoAmIRequest {})
            .await
            .unwrap()
            .into_inner();
    assert_eq!(me.name, "mallory");
    assert_eq!(me.policy_version, 1);
    assert_eq!(
        s.roles_of("mallory").await,
        vec![("gcp-root".to_owned(), vec![Requester])]
    );
    s.h.shutdown().await;
}

#[tokio::test]
async fn an_account_only_the_signed_policy_names_takes_requests_and_one_only_the_file_names_none() {
    let mut gcp = AccountRoles::new("gcp-root", "mallory", "bob", "olivia");
    gcp.releases_per_hour = 60;
    let s = Signed::start_with(Some(move |p: &BTreeMap<&'static str, Person>| {
        let mut prod = roles(PROD, 1, 1);
        prod.intake.push("bpm".into());
        document_with(p, 1, vec![prod, gcp])
    }))
    .await;
    // mallory, whom the file does not name, files on gcp-root, which the
    // file has no section for; bob approves and she gets a PIN of the
    // default length.
    let statement = s.request_statement("mallory", "gcp-root", "mallory");
    let r = request_of(s.create("mallory", "gcp-root", Some(statement)).await);
    assert_eq!((r.approvals_required, r.codes_allowed), (1, 1));
    let r = request_of(s.approve("bob", &r).await);
    assert_eq!(state_of(&r), pb::RequestState::Approved);
    let pin = s.h.wait_for_pin("mallory", &r.request_id, 1).await;
    assert_eq!(pin.len(), 6);
    // AUDIT is in the file, not in the signed policy: no requests.
    let statement = s.request_statement("alice", AUDIT, "alice");
    let (code, message) = code_of(s.create("alice", AUDIT, Some(statement)).await);
    assert_eq!(code, Code::NotFound, "{message}");
    assert!(
        message.contains("signed policy version 1")
            && message.contains("twokey policy show")
            && message.contains("aws-prod-root, gcp-root"),
        "{message}"
    );
    s.h.shutdown().await;
}

#[tokio::test]
async fn applying_a_new_version_changes_who_may_approve_without_a_restart() {
    let mut s = Signed::start(true).await;
    // Version 1: bob and dave approve, as in the file; carol does not.
    let r = s.file(PROD).await;
    let (code, message) = code_of(s.approve("carol", &r).await);
    assert_eq!(code, Code::PermissionDenied, "{message}");
    assert!(s.roles_of("carol").await.is_empty());
    let on_self = s.file(SELF).await;
    // Version 2, applied through the broker: carol approves PROD, bob no
    // longer does.
    let mut prod = AccountRoles::new(PROD, "alice", "carol", "olivia");
    prod.requesters.push("rita".into());
    prod.approvers.push("dave".into());
    prod.releases_per_hour = 60;
    let v2 = document_with(&s.people, 2, vec![prod, roles(AUDIT, 2, 2)]);
    s.apply(v2).await;
    assert_eq!(s.policy_version("carol").await, 2);
    assert_eq!(
        s.roles_of("carol").await,
        vec![(PROD.to_owned(), vec![pb::Role::Approver])]
    );
    let r = s.file(PROD).await;
    assert_refused(
        s.approve("bob", &r).await,
        Code::PermissionDenied,
        "is not an approver for aws-prod-root",
    );
    let r = request_of(s.approve("carol", &r).await);
    assert_eq!(state_of(&r), pb::RequestState::Approved);
    // SELF, in the file and in version 1, is gone with version 2.
    let statement = s.request_statement("alice", SELF, "alice");
    assert_refused(
        s.create("alice", SELF, Some(statement)).await,
        Code::NotFound,
        "signed policy version 2",
    );
    // A request on SELF filed under version 1 still expires in its time.
    s.h.advance(std::time::Duration::from_secs(3601));
    let got = get(&s.h, "alice", &on_self.request_id).await;
    assert_eq!(state_of(&got), pb::RequestState::Expired);
    s.h.shutdown().await;
}
