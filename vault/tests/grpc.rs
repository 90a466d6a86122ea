//! The vault's gRPC API over real mTLS on loopback, called as the broker:
//! enrollment, release for a grant, and one test per rejection, each
//! asserting the exact status code.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use ed25519_dalek::SigningKey;
use prost::Message;
use tonic::Code;
use twokey_consent::AdminAction;
use twokey_proto::vault::v1::{
    EnrollRequest, GenerateCodeRequest, GrantPurpose, ListAccountsRequest, RemoveAccountRequest,
    SignedGrant, StatusRequest, enroll_request::Seed, vault_service_client::VaultServiceClient,
};

const SECRET: &str = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP";

fn aws_uri() -> String {
    format!(
        "otpauth://totp/Amazon%20Web%20Services:root@123456789012?secret={SECRET}&issuer=Amazon%20Web%20Services"
    )
}

/// An enrollment of `account` with `uri`, for a fresh enrollment grant from
/// `fx`'s broker key naming admin adam.
fn enroll(fx: &Fixture, account: &str, uri: &str) -> EnrollRequest {
    EnrollRequest {
        account_id: account.into(),
        seed: Some(Seed::OtpauthUri(uri.into())),
        grant: Some(fx.enroll_grant(account, "adam")),
        ..Default::default()
    }
}

/// Accounts the test policy (version 1) lists: the ones codes are released
/// for.
fn policy_accounts() -> Vec<String> {
    let mut accounts = vec!["aws-prod-root".to_owned(), "aws-dev-root".to_owned()];
    for (alg, _, _) in RFC_SEEDS {
        for digits in [6u32, 7, 8] {
            for period in [30u32, 60] {
                accounts.push(format!("{}-{digits}-{period}", alg.to_ascii_lowercase()));
            }
        }
    }
    accounts
}

/// Applies the test policy (version 1) to the vault on `addr`.
async fn apply_test_policy(fx: &Fixture, addr: std::net::SocketAddr) {
    let accounts = policy_accounts();
    let names: Vec<&str> = accounts.iter().map(String::as_str).collect();
    fx.apply(addr, 1, &names).await;
}

/// `grant` with the honest evidence for it under policy version 1.
fn with_evidence(fx: &Fixture, grant: SignedGrant) -> GenerateCodeRequest {
    GenerateCodeRequest {
        evidence: Some(fx.evidence_for(&grant, 1)),
        grant: Some(grant),
    }
}

struct Env {
    fx: Fixture,
    audit_events: FakeAudit,
    _audit: Running,
    vault: Running,
}

impl Env {
    async fn new() -> Self {
        let fx = Fixture::new();
        let audit_events = FakeAudit::default();
        let audit = start_fake_audit(&fx, audit_events.clone()).await;
        let vault = start_vault(fx.vault_config(audit.addr)).await;
        apply_test_policy(&fx, vault.addr).await;
        Self {
            fx,
            audit_events,
            _audit: audit,
            vault,
        }
    }

    fn client(&self) -> VaultServiceClient<tonic::transport::Channel> {
        self.fx.broker_client(self.vault.addr)
    }

    async fn enrolled(account: &str) -> Self {
        let env = Self::new().await;
        env.client()
            .enroll(enroll(&env.fx, account, &aws_uri()))
            .await
            .unwrap();
        env
    }

    async fn release(
        &self,
        grant: twokey_proto::vault::v1::SignedGrant,
    ) -> Result<String, tonic::Status> {
        self.release_code(grant).await.map(|c| c.code)
    }

    /// The released code with its step and window.
    async fn release_code(
        &self,
        grant: twokey_proto::vault::v1::SignedGrant,
    ) -> Result<twokey_proto::types::v1::Code, tonic::Status> {
        self.client()
            .generate_code(with_evidence(&self.fx, grant))
            .await
            .map(|r| r.into_inner().code.unwrap())
    }

    /// A release grant for aws-prod-root, issued `issued_ago` for `life`.
    fn release_grant_timed(
        &self,
        issued_ago: Duration,
        life: Duration,
    ) -> twokey_proto::vault::v1::SignedGrant {
        let key = &self.fx.grant_key;
        let purpose = GrantPurpose::Release;
        self.fx
            .grant_with("aws-prod-root", purpose, issued_ago, life, key)
    }

    /// Releasing with `grant` fails with `code`; the status.
    async fn refused(
        &self,
        grant: twokey_proto::vault::v1::SignedGrant,
        code: Code,
    ) -> tonic::Status {
        let err = self.release(grant).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        err
    }
}

#[tokio::test]
async fn enrollment_returns_the_current_and_next_codes() {
    let env = Env::new().await;
    let reply = env
        .client()
        .enroll(enroll(&env.fx, "aws-prod-root", &aws_uri()))
        .await
        .unwrap()
        .into_inner();
    let current = reply.current.unwrap();
    let next = reply.next.unwrap();
    assert_eq!(next.step, current.step + 1);
    assert_eq!(current.code, code_of(SECRET, current.step));
    assert_eq!(next.code, code_of(SECRET, next.step));
    assert_eq!(
        current.valid_until.unwrap().seconds as u64,
        (current.step + 1) * 30
    );
    let account = reply.account.unwrap();
    assert_eq!(account.issuer, "Amazon Web Services");
    assert_eq!(account.seed_bits, 320);
    assert!(reply.warnings.is_empty());
    let events = env.audit_events.events.lock().unwrap().clone();
    assert!(
        events
            .iter()
            .any(|e| e.action == "account.enrolled" && e.account_id == "aws-prod-root")
    );
}

#[tokio::test]
async fn a_weak_80_bit_seed_is_enrolled_with_a_warning() {
    let env = Env::new().await;
    let reply = env
        .client()
        .enroll(enroll(
            &env.fx,
            "github",
            "otpauth://totp/GitHub:me?secret=JBSWY3DPEHPK3PXP",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.account.unwrap().weak_seed);
    assert!(
        reply.warnings[0].contains("weak seed"),
        "{:?}",
        reply.warnings
    );
}

#[tokio::test]
async fn an_existing_account_is_not_overwritten_unless_asked() {
    let env = Env::enrolled("aws-prod-root").await;
    let err = env
        .client()
        .enroll(enroll(
            &env.fx,
            "aws-prod-root",
            "otpauth://totp/x?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let mut replace = enroll(
        &env.fx,
        "aws-prod-root",
        "otpauth://totp/x?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ",
    );
    replace.replace = true;
    replace.consent = Some(env.admins(AdminAction::EnrollReplace));
    env.client().enroll(replace).await.unwrap();
}

#[tokio::test]
async fn malformed_seeds_are_invalid_arguments_with_a_reason() {
    let env = Env::new().await;
    let s = "secret=JBSWY3DPEHPK3PXP";
    let cases = [
        (
            "otpauth://totp/x?secret=JBSWY3DPEHPK3PX1".to_owned(),
            "Base32",
        ),
        (format!("otpauth://totp/x?{s}&digits=0"), "digits"),
        (format!("otpauth://totp/x?{s}&digits=10"), "digits"),
        (format!("otpauth://totp/x?{s}&period=0"), "period"),
        (format!("otpauth://totp/x?{s}&algorithm=SHA3"), "algorithm"),
        (format!("otpauth://totp/%C3%28?{s}"), "UTF-8"),
    ];
    for (uri, reason) in cases {
        let err = env
            .client()
            .enroll(enroll(&env.fx, "acct", &uri))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{uri}: {err:?}");
        assert!(err.message().contains(reason), "{uri}: {}", err.message());
    }
    let mut base32 = enroll(&env.fx, "acct", "");
    base32.seed = Some(Seed::Base32Secret("not base32!".into()));
    let err = env.client().enroll(base32).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = env
        .client()
        .enroll(enroll(&env.fx, "Bad Id", &aws_uri()))
        .await
        .unwrap_err();
    assert_refused(&err, Code::InvalidArgument, "account id");
}

#[tokio::test]
async fn a_valid_grant_releases_the_code_once() {
    let env = Env::enrolled("aws-prod-root").await;
    let grant = env.fx.grant("aws-prod-root", GrantPurpose::Release);
    let code = env.release_code(grant.clone()).await.unwrap();
    assert_eq!(code.code, code_of(SECRET, code.step));
    let events = env.audit_events.events.lock().unwrap().clone();
    assert!(
        events
            .iter()
            .any(|e| e.action == "code.released" && e.request_id == "req-1")
    );
    let err = env.refused(grant, Code::PermissionDenied).await;
    assert!(err.message().contains("already used"), "{}", err.message());
}

#[tokio::test]
async fn a_grant_with_another_keys_signature_is_refused() {
    let env = Env::enrolled("aws-prod-root").await;
    let other = SigningKey::generate(&mut rand::rngs::OsRng);
    let grant = env.fx.grant_with(
        "aws-prod-root",
        GrantPurpose::Release,
        Duration::ZERO,
        Duration::from_secs(60),
        &other,
    );
    let err = env.refused(grant, Code::PermissionDenied).await;
    assert!(err.message().contains("signature"));
}

#[tokio::test]
async fn a_tampered_grant_is_refused() {
    let env = Env::enrolled("aws-prod-root").await;
    let mut grant = env.fx.grant("aws-prod-root", GrantPurpose::Release);
    let last = grant.grant.len() - 1;
    grant.grant[last] ^= 1;
    env.refused(grant, Code::PermissionDenied).await;
}

#[tokio::test]
async fn an_expired_grant_is_refused() {
    let env = Env::enrolled("aws-prod-root").await;
    let grant = env.release_grant_timed(Duration::from_secs(90), Duration::from_secs(60));
    let err = env.refused(grant, Code::PermissionDenied).await;
    assert!(err.message().contains("expired"));
}

#[tokio::test]
async fn a_grant_living_longer_than_120_seconds_is_refused() {
    let env = Env::enrolled("aws-prod-root").await;
    let grant = env.release_grant_timed(Duration::ZERO, Duration::from_secs(121));
    let err = env.refused(grant, Code::PermissionDenied).await;
    assert!(err.message().contains("120"));
}

#[tokio::test]
async fn a_removal_grant_does_not_release_a_code() {
    let env = Env::enrolled("aws-prod-root").await;
    let err = env
        .refused(
            env.fx.grant("aws-prod-root", GrantPurpose::Remove),
            Code::PermissionDenied,
        )
        .await;
    assert!(err.message().contains("purpose"));
}

#[tokio::test]
async fn a_grant_for_an_unknown_account_is_not_found() {
    let env = Env::enrolled("aws-prod-root").await;
    env.refused(
        env.fx.grant("aws-dev-root", GrantPurpose::Release),
        Code::NotFound,
    )
    .await;
}

#[tokio::test]
async fn a_used_grant_stays_used_after_a_restart() {
    let fx = Fixture::new();
    let audit = start_fake_audit(&fx, FakeAudit::default()).await;
    let vault = start_vault(fx.vault_config(audit.addr)).await;
    apply_test_policy(&fx, vault.addr).await;
    let grant = fx.grant("aws-prod-root", GrantPurpose::Release);
    {
        let mut client = fx.broker_client(vault.addr);
        client
            .enroll(enroll(&fx, "aws-prod-root", &aws_uri()))
            .await
            .unwrap();
        client
            .generate_code(with_evidence(&fx, grant.clone()))
            .await
            .unwrap();
    }
    vault.stop().await;
    let vault = start_vault(fx.vault_config(audit.addr)).await;
    let err = fx
        .broker_client(vault.addr)
        .generate_code(with_evidence(&fx, grant))
        .await
        .unwrap_err();
    assert_refused(&err, Code::PermissionDenied, "already used");
}

#[tokio::test]
async fn removal_needs_a_removal_grant() {
    let env = Env::enrolled("aws-prod-root").await;
    let err = env
        .client()
        .remove_account(RemoveAccountRequest {
            grant: Some(env.fx.grant("aws-prod-root", GrantPurpose::Release)),
            consent: Some(env.admins(AdminAction::Remove)),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    env.client()
        .remove_account(RemoveAccountRequest {
            grant: Some(env.fx.grant("aws-prod-root", GrantPurpose::Remove)),
            consent: Some(env.admins(AdminAction::Remove)),
        })
        .await
        .unwrap();
    let list = env
        .client()
        .list_accounts(ListAccountsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(list.accounts.is_empty());
}

#[tokio::test]
async fn listing_and_status_show_metadata_only() {
    let env = Env::enrolled("aws-prod-root").await;
    let list = env
        .client()
        .list_accounts(ListAccountsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.accounts.len(), 1);
    assert!(!format!("{list:?}").contains(SECRET));
    let status = env
        .client()
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.account_count, 1);
    assert!(status.server_time.is_some());
}

#[tokio::test]
async fn a_caller_other_than_the_broker_is_permission_denied() {
    let env = Env::new().await;
    let mut client = VaultServiceClient::new(env.fx.channel(env.vault.addr, "mallory"));
    let err = client.status(StatusRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("user/mallory"), "{}", err.message());
}

#[tokio::test]
async fn a_client_without_a_certificate_cannot_connect() {
    let env = Env::new().await;
    let ca = tonic::transport::Certificate::from_pem(
        std::fs::read(env.fx.path().join("ca.crt")).unwrap(),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", env.vault.addr))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(ca)
                .domain_name("vault"),
        )
        .unwrap()
        .connect_lazy();
    // The TLS handshake fails: the server demands a certificate.
    assert_handshake_fails(channel, "CertificateRequired").await;
}

/// A call on `channel` fails in the TLS handshake, for a reason whose
/// debug form contains `why`.
async fn assert_handshake_fails(channel: tonic::transport::Channel, why: &str) {
    let err = VaultServiceClient::new(channel)
        .status(StatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unknown, "{err:?}");
    assert!(format!("{err:?}").contains(why), "{err:?}");
}

#[tokio::test]
async fn a_certificate_from_another_ca_cannot_connect() {
    let env = Env::new().await;
    let tls = foreign_broker_cert(env.fx.path());
    let channel = tls
        .channel(&format!("https://{}", env.vault.addr), "vault")
        .unwrap();
    // The TLS handshake fails: the certificate does not chain to the CA.
    assert_handshake_fails(channel, "received fatal alert").await;
}

#[tokio::test]
async fn audit_down_means_no_code_and_other_calls_still_answer() {
    let fx = Fixture::new();
    let audit = start_fake_audit(&fx, FakeAudit::default()).await;
    let audit_addr = audit.addr;
    let vault = start_vault(fx.vault_config(audit_addr)).await;
    apply_test_policy(&fx, vault.addr).await;
    let mut client = fx.broker_client(vault.addr);
    client
        .enroll(enroll(&fx, "aws-prod-root", &aws_uri()))
        .await
        .unwrap();
    audit.stop().await;

    let started = std::time::Instant::now();
    let err = client
        .generate_code(with_evidence(
            &fx,
            fx.grant("aws-prod-root", GrantPurpose::Release),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message()
            .contains("audit unavailable, no code released")
    );
    // The deadline (1 s in this config) bounds the wait: no global hang.
    assert!(started.elapsed() < Duration::from_secs(10));
    client.status(StatusRequest {}).await.unwrap();

    // Audit back on the same address: releases work again.
    let _audit = start_fake_audit_on(&fx, FakeAudit::default(), &audit_addr.to_string()).await;
    let code = client
        .generate_code(with_evidence(
            &fx,
            fx.grant("aws-prod-root", GrantPurpose::Release),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code.code.unwrap().code.len(), 6);
}

#[tokio::test]
async fn seeds_never_reach_the_disk_in_the_clear() {
    let env = Env::enrolled("aws-prod-root").await;
    env.release(env.fx.grant("aws-prod-root", GrantPurpose::Release))
        .await
        .unwrap();
    let raw = data_encoding::BASE32_NOPAD
        .decode(SECRET.as_bytes())
        .unwrap();
    for file in files_under(&env.fx.path().join("vault-data")) {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !bytes.windows(raw.len()).any(|w| w == raw.as_slice()),
            "raw seed in {}",
            file.display()
        );
        assert!(
            !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "Base32 seed in {}",
            file.display()
        );
        assert!(
            !bytes.windows(16).any(|w| w == &SECRET.as_bytes()[..16]),
            "Base32 seed prefix in {}",
            file.display()
        );
    }
}

#[tokio::test]
async fn events_carry_the_callers_trace_id() {
    let env = Env::enrolled("aws-prod-root").await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(with_evidence(
        &env.fx,
        env.fx.grant("aws-prod-root", GrantPurpose::Release),
    ));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-00f067aa0ba902b7-01").parse().unwrap(),
    );
    env.client().generate_code(request).await.unwrap();
    let events = env.audit_events.events.lock().unwrap().clone();
    let released = events.iter().find(|e| e.action == "code.released").unwrap();
    assert_eq!(released.trace_id, trace);
    // A call without traceparent still gets a fresh trace id.
    let enrolled = events
        .iter()
        .find(|e| e.action == "account.enrolled")
        .unwrap();
    assert_eq!(enrolled.trace_id.len(), 32);
    assert_ne!(enrolled.trace_id, trace);
}

// Enrollment needs the broker's ENROLL grant for the same account: a
// `svc/broker` certificate alone (the broker's TLS key, or one minted with
// the CA key) neither replaces nor plants a seed. Each attack asserts the
// exact status, that the old seed still yields the old codes, and that no
// enrollment event was stored.

/// Another seed, as an attacker would plant it.
const ATTACKER_URI: &str = "otpauth://totp/x?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ";

/// A replacement of `account`'s seed with the attacker's, carrying `grant`
/// and an `actor` that names someone else.
fn hostile_replace(account: &str, grant: Option<SignedGrant>) -> EnrollRequest {
    EnrollRequest {
        account_id: account.into(),
        seed: Some(Seed::OtpauthUri(ATTACKER_URI.into())),
        replace: true,
        actor: format!("spiffe://{TD}/user/adam"),
        grant,
        ..Default::default()
    }
}

impl Env {
    /// adam's and anna's consent to `action` on aws-prod-root.
    fn admins(&self, action: AdminAction) -> twokey_proto::vault::v1::AdminConsent {
        let p = &self.fx.people;
        self.fx
            .admin_consent(1, "aws-prod-root", action, &[&p.adam, &p.anna])
    }

    /// Enrolling with `request` fails with `code`, saying `says`.
    async fn enroll_refused(&self, request: EnrollRequest, code: Code, says: &str) {
        let err = self.client().enroll(request).await.unwrap_err();
        assert_refused(&err, code, says);
        assert!(!err.message().contains("GEZDGNBVGY3TQOJQ"), "{err:?}");
    }

    /// `aws-prod-root` still has the original seed (a release yields the
    /// code of `SECRET`), and the log holds `enrollments` enrollment events.
    async fn assert_seed_unchanged(&self, enrollments: usize) {
        let code = self
            .release_code(self.fx.grant("aws-prod-root", GrantPurpose::Release))
            .await
            .unwrap();
        assert_eq!(
            code.code,
            code_of(SECRET, code.step),
            "the seed was replaced"
        );
        let events = self.audit_events.events.lock().unwrap().clone();
        let enrolled = events
            .iter()
            .filter(|e| e.action.starts_with("account.enrolled"))
            .count();
        assert_eq!(enrolled, enrollments, "{events:?}");
    }

    /// An enrollment refused as `code` saying `says`, after which the vault
    /// still lists only `aws-prod-root`, with its original seed and one
    /// enrollment event.
    async fn enroll_refused_and_nothing_changed(
        &self,
        request: EnrollRequest,
        code: Code,
        says: &str,
    ) {
        self.enroll_refused(request, code, says).await;
        assert_eq!(self.account_ids().await, ["aws-prod-root"]);
        self.assert_seed_unchanged(1).await;
    }

    /// A hostile `replace` of `aws-prod-root` carrying `grant` is refused as
    /// `code` saying `says`; the seed is unchanged and the log holds
    /// `enrollments` enrollment events.
    async fn replace_refused(
        &self,
        grant: Option<SignedGrant>,
        code: Code,
        says: &str,
        enrollments: usize,
    ) {
        self.enroll_refused(hostile_replace("aws-prod-root", grant), code, says)
            .await;
        self.assert_seed_unchanged(enrollments).await;
    }

    async fn account_ids(&self) -> Vec<String> {
        let list = self
            .client()
            .list_accounts(ListAccountsRequest {})
            .await
            .unwrap()
            .into_inner();
        list.accounts.into_iter().map(|a| a.account_id).collect()
    }
}

#[tokio::test]
async fn a_broker_certificate_without_a_grant_neither_replaces_nor_plants_a_seed() {
    let env = Env::enrolled("aws-prod-root").await;
    env.enroll_refused(
        hostile_replace("aws-prod-root", None),
        Code::InvalidArgument,
        "malformed grant: no grant given",
    )
    .await;
    // An empty grant is no better.
    env.enroll_refused(
        hostile_replace("aws-prod-root", Some(SignedGrant::default())),
        Code::PermissionDenied,
        "grant signature does not verify with the broker's grant key",
    )
    .await;
    // Nor is planting a new account.
    env.enroll_refused_and_nothing_changed(
        hostile_replace("aws-planted", None),
        Code::InvalidArgument,
        "malformed grant: no grant given",
    )
    .await;
}

#[tokio::test]
async fn an_enroll_grant_signed_by_another_key_is_refused() {
    // What a holder of the CA key would have to forge: a certificate is not
    // enough, and a grant signed with any key but the broker's is refused.
    let env = Env::enrolled("aws-prod-root").await;
    let forger = SigningKey::generate(&mut rand::rngs::OsRng);
    let forged = env.fx.grant_with(
        "aws-prod-root",
        GrantPurpose::Enroll,
        Duration::ZERO,
        Duration::from_secs(60),
        &forger,
    );
    env.replace_refused(
        Some(forged),
        Code::PermissionDenied,
        "grant signature does not verify with the broker's grant key",
        1,
    )
    .await;
}

#[tokio::test]
async fn a_removal_or_release_grant_does_not_enroll() {
    let env = Env::enrolled("aws-prod-root").await;
    for (purpose, name) in [
        (GrantPurpose::Remove, "GRANT_PURPOSE_REMOVE"),
        (GrantPurpose::Release, "GRANT_PURPOSE_RELEASE"),
    ] {
        let grant = env.fx.grant("aws-prod-root", purpose);
        env.enroll_refused(
            hostile_replace("aws-prod-root", Some(grant)),
            Code::PermissionDenied,
            &format!("grant purpose is {name}, this call needs GRANT_PURPOSE_ENROLL"),
        )
        .await;
    }
    // Nor does an enrollment grant release a code or remove the account.
    let enroll = env.fx.enroll_grant("aws-prod-root", "adam");
    let err = env.release(enroll.clone()).await.unwrap_err();
    assert_refused(
        &err,
        Code::PermissionDenied,
        "this call needs GRANT_PURPOSE_RELEASE",
    );
    let err = env
        .client()
        .remove_account(RemoveAccountRequest {
            grant: Some(enroll),
            consent: Some(env.admins(AdminAction::Remove)),
        })
        .await
        .unwrap_err();
    assert_refused(
        &err,
        Code::PermissionDenied,
        "this call needs GRANT_PURPOSE_REMOVE",
    );
    env.assert_seed_unchanged(1).await;
}

#[tokio::test]
async fn an_enroll_grant_for_another_account_is_refused() {
    let env = Env::enrolled("aws-prod-root").await;
    let other = env.fx.enroll_grant("aws-other", "adam");
    env.enroll_refused_and_nothing_changed(
        hostile_replace("aws-prod-root", Some(other)),
        Code::PermissionDenied,
        "is for account \"aws-other\", not \"aws-prod-root\"; ask the broker for a grant for this account",
    )
    .await;
}

#[tokio::test]
async fn a_replayed_enroll_grant_is_refused() {
    let env = Env::enrolled("aws-prod-root").await;
    // The admin's replacement, with the same seed, uses the grant up...
    let grant = env.fx.enroll_grant("aws-prod-root", "adam");
    let mut honest = enroll(&env.fx, "aws-prod-root", &aws_uri());
    honest.grant = Some(grant.clone());
    honest.replace = true;
    let consent = env.admins(AdminAction::EnrollReplace);
    honest.consent = Some(consent.clone());
    env.client().enroll(honest).await.unwrap();
    // ...so whoever captured it cannot replay it to plant their own seed:
    // without the admins' consent, nor with theirs replayed.
    env.enroll_refused(
        hostile_replace("aws-prod-root", Some(grant.clone())),
        Code::PermissionDenied,
        "admin statement #1 is missing",
    )
    .await;
    let mut replayed = hostile_replace("aws-prod-root", Some(grant));
    replayed.consent = Some(consent);
    env.enroll_refused(replayed, Code::PermissionDenied, "was carried out already")
        .await;
    env.assert_seed_unchanged(2).await;
}

#[tokio::test]
async fn enrollment_events_name_the_verified_admins_not_the_callers_actor() {
    let env = Env::enrolled("aws-prod-root").await;
    let mut request = hostile_replace("aws-prod-root", None);
    request.seed = Some(Seed::OtpauthUri(aws_uri()));
    request.actor = format!("spiffe://{TD}/user/mallory");
    let grant = env.fx.enroll_grant("aws-prod-root", "ada");
    request.grant = Some(grant.clone());
    request.consent = Some(env.admins(AdminAction::EnrollReplace));
    env.client().enroll(request).await.unwrap();
    let grant_id = twokey_proto::vault::v1::Grant::decode(grant.grant.as_slice())
        .unwrap()
        .grant_id;
    let events = env.audit_events.events.lock().unwrap().clone();
    let replaced: Vec<_> = events
        .iter()
        .filter(|e| e.action == "account.enrolled.replace")
        .collect();
    assert_eq!(replaced.len(), 1, "{events:?}");
    // A replacement names the admins whose signed consent verified, not the
    // grant's operator nor the caller's actor.
    assert_eq!(
        replaced[0].actor,
        format!("spiffe://{TD}/user/adam,spiffe://{TD}/user/anna")
    );
    assert_eq!(replaced[0].account_id, "aws-prod-root");
    assert_eq!(replaced[0].attributes["grant_id"], grant_id);
    // The first enrollment, too, names the grant's admin.
    let first = events
        .iter()
        .find(|e| e.action == "account.enrolled")
        .unwrap();
    assert_eq!(first.actor, format!("spiffe://{TD}/user/adam"));
    assert!(events.iter().all(|e| !e.actor.contains("mallory")));
}

/// Asserts the exact refusal: its code, and a message that says why.
fn assert_refused(err: &tonic::Status, code: Code, says: &str) {
    assert_eq!(err.code(), code, "{err:?}");
    assert!(err.message().contains(says), "{}", err.message());
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A release is either a fresh step's code above `above`, or refused as
/// UNAVAILABLE with the wait (when every step up to two ahead is spent).
fn fresh_or_wait(
    released: Result<twokey_proto::types::v1::Code, tonic::Status>,
    above: u64,
) -> Option<twokey_proto::types::v1::Code> {
    match released {
        Ok(code) => {
            assert!(
                code.step > above,
                "step {} repeats one up to {above}",
                code.step
            );
            assert_eq!(code.code, code_of(SECRET, code.step));
            Some(code)
        }
        Err(e) => {
            assert_refused(&e, Code::Unavailable, "try again in");
            None
        }
    }
}

#[tokio::test]
async fn releases_never_repeat_a_registration_code_or_a_step_even_after_a_restart() {
    let fx = Fixture::new();
    let audit = start_fake_audit(&fx, FakeAudit::default()).await;
    let vault = start_vault(fx.vault_config(audit.addr)).await;
    apply_test_policy(&fx, vault.addr).await;
    let mut client = fx.broker_client(vault.addr);
    let enrolled = client
        .enroll(enroll(&fx, "aws-prod-root", &aws_uri()))
        .await
        .unwrap()
        .into_inner();
    let (current, next) = (enrolled.current.unwrap(), enrolled.next.unwrap());
    let release = |client: &mut VaultServiceClient<tonic::transport::Channel>| {
        let request = with_evidence(&fx, fx.grant("aws-prod-root", GrantPurpose::Release));
        let mut client = client.clone();
        async move {
            client
                .generate_code(request)
                .await
                .map(|r| r.into_inner().code.unwrap())
        }
    };
    // Right after enrollment: above both registration steps, another code.
    let first = release(&mut client).await.unwrap();
    assert!(first.step > next.step, "{} <= {}", first.step, next.step);
    assert_ne!(first.code, current.code);
    assert_ne!(first.code, next.code);
    assert_eq!(first.code, code_of(SECRET, first.step));
    let from = first.valid_from.unwrap().seconds as u64;
    assert_eq!(from, first.step * 30);
    assert_eq!(first.valid_until.unwrap().seconds as u64, from + 30);
    assert!(from > unix_now().saturating_sub(30));
    // A second release in the same step: the next step, or a wait.
    let mut highest = first.step;
    if let Some(second) = fresh_or_wait(release(&mut client).await, highest) {
        assert_eq!(second.step, first.step + 1);
        assert_ne!(second.code, first.code);
        highest = second.step;
    }
    // A vault reopened on the same data directory remembers the steps.
    drop(client);
    vault.stop().await;
    let vault = start_vault(fx.vault_config(audit.addr)).await;
    let mut client = fx.broker_client(vault.addr);
    fresh_or_wait(release(&mut client).await, highest);
}

/// HOTP (RFC 4226 §5.3) with dynamic truncation written out, over HMAC from
/// the `hmac`, `sha1` and `sha2` crates: no totp-rs, no vault code.
fn hotp(algorithm: &str, key: &[u8], counter: u64, digits: u32) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    fn mac<M: Mac + KeyInit>(key: &[u8], msg: &[u8]) -> Vec<u8> {
        let mut m = <M as KeyInit>::new_from_slice(key).unwrap();
        m.update(msg);
        m.finalize().into_bytes().to_vec()
    }
    let msg = counter.to_be_bytes();
    let hash = match algorithm {
        "SHA1" => mac::<Hmac<sha1::Sha1>>(key, &msg),
        "SHA256" => mac::<Hmac<sha2::Sha256>>(key, &msg),
        "SHA512" => mac::<Hmac<sha2::Sha512>>(key, &msg),
        other => panic!("{other}"),
    };
    let offset = usize::from(hash[hash.len() - 1] & 0x0f);
    let binary = (u32::from(hash[offset]) & 0x7f) << 24
        | u32::from(hash[offset + 1]) << 16
        | u32::from(hash[offset + 2]) << 8
        | u32::from(hash[offset + 3]);
    let code = binary % 10u32.pow(digits);
    format!("{code:0width$}", width = digits as usize)
}

/// RFC 6238 appendix B: the seed of each algorithm.
const RFC_SEEDS: [(&str, &[u8], i32); 3] = [
    ("SHA1", b"12345678901234567890", 1),
    ("SHA256", b"12345678901234567890123456789012", 2),
    (
        "SHA512",
        b"1234567890123456789012345678901234567890123456789012345678901234",
        3,
    ),
];

#[test]
fn the_independent_hotp_matches_rfc_6238_appendix_b() {
    for (time, codes) in [
        (59u64, ["94287082", "46119246", "90693936"]),
        (1111111109, ["07081804", "68084774", "25091201"]),
        (20000000000, ["65353130", "77737706", "47863826"]),
    ] {
        for ((alg, seed, _), want) in RFC_SEEDS.iter().zip(codes) {
            assert_eq!(hotp(alg, seed, time / 30, 8), want, "{alg} at {time}");
        }
    }
}

#[tokio::test]
async fn released_codes_match_an_independent_totp_for_every_algorithm_digits_and_period() {
    let env = Env::new().await;
    let mut client = env.client();
    for (alg, seed, algorithm) in RFC_SEEDS {
        for digits in [6u32, 7, 8] {
            for period in [30u32, 60] {
                let account = format!("{}-{digits}-{period}", alg.to_ascii_lowercase());
                client
                    .enroll(EnrollRequest {
                        account_id: account.clone(),
                        seed: Some(Seed::Base32Secret(data_encoding::BASE32_NOPAD.encode(seed))),
                        algorithm,
                        digits,
                        period,
                        grant: Some(env.fx.enroll_grant(&account, "adam")),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                let code = client
                    .generate_code(with_evidence(
                        &env.fx,
                        env.fx.grant(&account, GrantPurpose::Release),
                    ))
                    .await
                    .unwrap()
                    .into_inner()
                    .code
                    .unwrap();
                assert_eq!(code.period, period);
                let from = code.valid_from.unwrap().seconds as u64;
                assert_eq!(from, code.step * u64::from(period), "{account}");
                assert_eq!(
                    code.valid_until.unwrap().seconds as u64,
                    from + u64::from(period)
                );
                assert_eq!(code.code.len(), digits as usize, "{account}");
                assert_eq!(code.code, hotp(alg, seed, code.step, digits), "{account}");
            }
        }
    }
}

#[tokio::test]
async fn a_minimum_not_below_the_period_is_refused() {
    let env = Env::new().await;
    let mut request = enroll(&env.fx, "aws-prod-root", &aws_uri());
    request.min_seconds_left = 30;
    let err = env.client().enroll(request).await.unwrap_err();
    assert_refused(&err, Code::InvalidArgument, "below the period of 30 s");
}

#[tokio::test]
async fn an_audit_serving_a_forked_checkpoint_stops_releases_until_it_is_consistent_again() {
    let fx = Fixture::new();
    let receipts = FakeReceipts::new();
    let mut audit = FakeAudit::default();
    audit.receipts = Some(receipts.clone());
    let _audit = start_fake_audit(&fx, audit).await;
    let mut config = fx.vault_config(_audit.addr);
    config.audit_checkpoint_key = Some(receipts.signer.verifier().to_string());
    let vault = start_vault(config).await;
    apply_test_policy(&fx, vault.addr).await;
    let client = fx.broker_client(vault.addr);
    client
        .clone()
        .enroll(enroll(&fx, "aws-prod-root", &aws_uri()))
        .await
        .unwrap();
    let release = || {
        let request = with_evidence(&fx, fx.grant("aws-prod-root", GrantPurpose::Release));
        let mut client = client.clone();
        async move { client.generate_code(request).await }
    };
    // Consistent receipts: the code leaves.
    let first = release().await.unwrap().into_inner().code.unwrap();
    assert_eq!(first.code, code_of(SECRET, first.step));

    // Audit now serves another history under the same key.
    receipts
        .fork
        .store(true, std::sync::atomic::Ordering::SeqCst);
    // Any event gets a receipt: a release without the people's consent is
    // refused and audited (the codes of the next steps may all be out).
    let unconsented = GenerateCodeRequest {
        grant: Some(fx.grant("aws-prod-root", GrantPurpose::Release)),
        evidence: None,
    };
    client.clone().generate_code(unconsented).await.unwrap_err();
    // The vault has seen the fork: every release is refused, naming both heads.
    let mut message = String::new();
    for _ in 0..100 {
        let err = release().await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        message = err.message().to_owned();
        if message.starts_with("audit served") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        message.starts_with("audit served a checkpoint inconsistent with one it signed before: "),
        "{message}"
    );
    assert!(
        message.contains("; no code is released until audit serves a checkpoint consistent with "),
        "{message}"
    );

    // Consistent again: releases resume (or wait for the next step when the
    // codes of the steps ahead are out, which is not the audit's doing).
    receipts
        .fork
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let mut outcome = None;
    for _ in 0..100 {
        match release().await {
            Err(e) if e.message().starts_with("audit served") => {}
            other => {
                outcome = Some(other);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match outcome.expect("the refusal clears once audit is consistent again") {
        Ok(code) => {
            let code = code.into_inner().code.unwrap();
            assert_eq!(code.code, code_of(SECRET, code.step));
        }
        Err(e) => assert!(e.message().contains("handed out already"), "{e:?}"),
    }
}
