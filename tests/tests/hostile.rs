//! Hostile input against the real binaries over mTLS: messages over the
//! size limit, oversized and malformed fields, forged grants, events out of
//! sequence, random bytes on every gRPC port and slow-loris TLS clients.
//! Each gets an exact status or a closed connection, never a panic, and
//! other clients keep being served.

use std::{
    io::ErrorKind,
    net::SocketAddr,
    time::{Duration, Instant, SystemTime},
};

use ed25519_dalek::SigningKey;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::{Code, Status, transport::Channel};
use twokey_e2e::System;
use twokey_proto::{
    audit::v1::{
        AppendRequest, AppendResponse, AppendStatus, Event, GetCheckpointRequest, QueryRequest,
        SignedEvent, audit_service_client::AuditServiceClient,
    },
    broker::v1::{
        CreateRequestRequest, EnrollAccountRequest, WhoAmIRequest, enroll_account_request::Seed,
    },
    vault::v1::{
        GenerateCodeRequest, SignedGrant, StatusRequest, vault_service_client::VaultServiceClient,
    },
};
use twokey_runtime::{serve::MAX_MESSAGE_BYTES, time::to_timestamp, tls::TlsFiles};
use twokey_testkit::local::ACCOUNT;

const TD: &str = "twokey.local";
const OVER: usize = MAX_MESSAGE_BYTES + 16 * 1024;

fn tls(sys: &System, name: &str) -> TlsFiles {
    TlsFiles::in_dir(&sys.local.dir.join("pki"), name)
}

/// A vault client presenting `name`'s certificate.
fn vault(sys: &System, name: &str) -> VaultServiceClient<Channel> {
    VaultServiceClient::new(tls(sys, name).channel(&sys.local.vault, "vault").unwrap())
}

/// An audit client presenting `name`'s certificate, without a send limit of
/// its own (the server's limit is what is tested).
fn audit(sys: &System, name: &str) -> AuditServiceClient<Channel> {
    AuditServiceClient::new(tls(sys, name).channel(&sys.local.audit, "audit").unwrap())
}

fn addr(url: &str) -> SocketAddr {
    url.trim_start_matches("https://").parse().unwrap()
}

fn assert_status(result: Result<impl std::fmt::Debug, Status>, code: Code, says: &str) {
    let status = result.unwrap_err();
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(says),
        "{status:?} should say {says:?}"
    );
}

fn assert_over_limit<T: std::fmt::Debug>(result: Result<T, Status>) {
    assert_status(
        result,
        Code::ResourceExhausted,
        &format!("over the limit of {MAX_MESSAGE_BYTES} bytes"),
    );
}

/// Appends `events` as the vault over one stream; the answers, or the
/// status the stream ended with.
async fn append(sys: &System, events: Vec<SignedEvent>) -> Result<Vec<AppendResponse>, Status> {
    let requests = events.into_iter().map(|e| AppendRequest {
        event: Some(e),
        ..Default::default()
    });
    let mut stream = audit(sys, "vault")
        .append(tokio_stream::iter(requests))
        .await?
        .into_inner();
    let mut answers = Vec::new();
    while let Some(answer) = stream.message().await? {
        answers.push(answer);
    }
    Ok(answers)
}

fn vault_event_key(sys: &System) -> SigningKey {
    twokey_runtime::keys::load_signing_key(&sys.local.dir.join("keys/vault-event.key")).unwrap()
}

fn vault_event(key: &SigningKey, seq: u64) -> SignedEvent {
    let event = Event {
        source: format!("spiffe://{TD}/svc/vault"),
        seq,
        time: Some(to_timestamp(SystemTime::now())),
        actor: format!("spiffe://{TD}/svc/broker"),
        action: "code.released".into(),
        account_id: ACCOUNT.into(),
        ..Default::default()
    };
    twokey_runtime::events::sign_event(key, &event)
}

#[tokio::test]
async fn messages_over_the_size_limit_are_resource_exhausted_on_every_service() {
    let sys = System::start();
    let huge = "x".repeat(OVER);

    // Broker: refused by the decoder, before authentication or the domain.
    let created = sys
        .broker("alice")
        .create_request(CreateRequestRequest {
            account_id: ACCOUNT.into(),
            reason: huge.clone(),
            ..Default::default()
        })
        .await;
    assert_over_limit(created);

    // Vault: a grant blob over the limit.
    let generated = vault(&sys, "broker")
        .generate_code(GenerateCodeRequest {
            grant: Some(SignedGrant {
                grant: vec![0; OVER],
                signature: vec![0; 64],
            }),
            evidence: None,
        })
        .await;
    assert_over_limit(generated);

    // Audit: a query, and an event on the append stream.
    let queried = audit(&sys, "carol")
        .query(QueryRequest {
            account_id: huge.clone(),
            ..Default::default()
        })
        .await;
    assert_over_limit(queried);
    let mut event = vault_event(&vault_event_key(&sys), 1);
    event.signature = vec![0; OVER];
    assert_over_limit(append(&sys, vec![event]).await);

    // Every service still answers.
    sys.broker("alice")
        .who_am_i(WhoAmIRequest {})
        .await
        .unwrap();
    vault(&sys, "broker")
        .status(StatusRequest {})
        .await
        .unwrap();
    audit(&sys, "carol")
        .get_checkpoint(GetCheckpointRequest {})
        .await
        .unwrap();
}

/// EnrollAccountRequest with its otpauth URI as raw bytes, so a client can
/// send what a Rust `String` cannot hold.
#[derive(Clone, PartialEq, prost::Message)]
struct RawEnroll {
    #[prost(string, tag = "1")]
    account_id: String,
    #[prost(bytes = "vec", tag = "2")]
    otpauth_uri: Vec<u8>,
}

async fn raw_enroll(sys: &System, uri: Vec<u8>) -> Result<(), Status> {
    let channel = tls(sys, "adam")
        .channel(&sys.local.broker, "broker")
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<RawEnroll, RawEnroll>::default();
    let path =
        http::uri::PathAndQuery::from_static("/twokey.broker.v1.BrokerService/EnrollAccount");
    let request = RawEnroll {
        account_id: ACCOUNT.into(),
        otpauth_uri: uri,
    };
    grpc.unary(tonic::Request::new(request), path, codec)
        .await
        .map(|_| ())
}

#[tokio::test]
async fn hostile_fields_get_an_exact_status_over_the_wire() {
    let sys = System::start();

    // A 100 KB reason: under the message limit, over the broker's field limit.
    let created = sys
        .broker("alice")
        .create_request(CreateRequestRequest {
            account_id: ACCOUNT.into(),
            reason: "r".repeat(100 * 1024),
            ..Default::default()
        })
        .await;
    assert_status(
        created,
        Code::InvalidArgument,
        "reason is longer than 1000 characters",
    );
    let long_ticket = sys
        .broker("alice")
        .create_request(CreateRequestRequest {
            account_id: ACCOUNT.into(),
            reason: "rotate keys".into(),
            ticket: "t".repeat(100 * 1024),
            ..Default::default()
        })
        .await;
    assert_status(
        long_ticket,
        Code::InvalidArgument,
        "ticket is longer than 200 characters",
    );
    let long_account = sys
        .broker("alice")
        .create_request(CreateRequestRequest {
            account_id: "a".repeat(100 * 1024),
            reason: "rotate keys".into(),
            ..Default::default()
        })
        .await;
    assert_status(
        long_account,
        Code::InvalidArgument,
        "account_id must be 1 to 64 characters",
    );

    // otpauth URIs and Base32 secrets the vault must refuse, through the broker.
    let s = "secret=JBSWY3DPEHPK3PXP";
    for (uri, says) in [
        (format!("otpauth://totp/a\u{7}b?{s}"), "control characters"),
        (format!("otpauth://totp/a%00b?{s}"), "control characters"),
        (format!("otpauth://totp/%FF%FE?{s}"), "not valid UTF-8"),
        (
            format!("otpauth://totp/{}?{s}", "l".repeat(100 * 1024)),
            "label is longer than 256 bytes",
        ),
        (
            format!("otpauth://totp/x?{s}&issuer={}", "i".repeat(100 * 1024)),
            "issuer is longer than 256 bytes",
        ),
        (
            "otpauth://totp/x?secret=JBSWY3DP!!!!".into(),
            "not valid Base32",
        ),
        (
            format!("otpauth://totp/x?{s}&digits=0"),
            "digits must be 6, 7 or 8, not 0",
        ),
        (
            format!("otpauth://totp/x?{s}&digits=10"),
            "digits must be 6, 7 or 8, not 10",
        ),
        (
            format!("otpauth://totp/x?{s}&period=0"),
            "period must be 1 to 300 seconds, not 0",
        ),
        (
            format!("otpauth://totp/x?{s}&period=1000000000"),
            "period must be 1 to 300 seconds, not 1000000000",
        ),
    ] {
        let enrolled = sys
            .broker("adam")
            .enroll_account(EnrollAccountRequest {
                account_id: ACCOUNT.into(),
                seed: Some(Seed::OtpauthUri(uri.clone())),
                ..Default::default()
            })
            .await;
        let status = enrolled.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{uri}: {status:?}");
        assert!(status.message().contains(says), "{uri}: {status:?}");
    }
    let long_label = sys
        .broker("adam")
        .enroll_account(EnrollAccountRequest {
            account_id: ACCOUNT.into(),
            seed: Some(Seed::Base32Secret("JBSWY3DPEHPK3PXP".into())),
            label: "l".repeat(100 * 1024),
            ..Default::default()
        })
        .await;
    assert_status(
        long_label,
        Code::InvalidArgument,
        "label must be at most 256 characters",
    );
    for (secret, digits, period, says) in [
        ("JBSWY3DP 1890 ====", 6, 30, "not valid Base32"),
        (
            "JBSWY3DPEHPK3PXP",
            10,
            30,
            "digits must be 6, 7 or 8, not 10",
        ),
        (
            "JBSWY3DPEHPK3PXP",
            6,
            1_000_000_000,
            "period must be 1 to 300",
        ),
    ] {
        let enrolled = sys
            .broker("adam")
            .enroll_account(EnrollAccountRequest {
                account_id: ACCOUNT.into(),
                seed: Some(Seed::Base32Secret(secret.into())),
                digits,
                period,
                ..Default::default()
            })
            .await;
        let status = enrolled.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{secret}: {status:?}");
        assert!(status.message().contains(says), "{secret}: {status:?}");
        assert!(!status.message().contains(secret.trim()), "{status:?}");
    }
    // Raw invalid UTF-8 in a string field does not even decode: gRPC's
    // status for a request that does not parse is INTERNAL.
    let raw = raw_enroll(
        &sys,
        b"otpauth://totp/\xff\xfe?secret=JBSWY3DPEHPK3PXP".to_vec(),
    )
    .await;
    assert_status(raw, Code::Internal, "failed to decode Protobuf message");

    // The account enrolled (as adam, properly), then a grant signed by
    // another key, presented by the broker's identity, with the consent of alice, bob and olivia: the broker's signature is
    // still one of the signatures a code needs.
    sys.enroll().await;
    let version = sys.policy_version().await;
    let (_, evidence) = sys.signed_release(version, ACCOUNT);
    let grant_id = twokey_e2e::grant_id_of(evidence.release.as_ref().unwrap());
    let request_id = twokey_e2e::request_id_of(evidence.request.as_ref().unwrap());
    let grant =
        twokey_testkit::grants::release(TD, &grant_id, &request_id, ACCOUNT, SystemTime::now());
    let forger = SigningKey::from_bytes(&[9; 32]);
    let generated = vault(&sys, "broker")
        .generate_code(GenerateCodeRequest {
            grant: Some(twokey_runtime::grant::sign_grant(&forger, &grant)),
            evidence: Some(evidence),
        })
        .await;
    assert_status(
        generated,
        Code::PermissionDenied,
        "grant signature does not verify",
    );
    // A valid grant, signed with the broker's own grant key, without the
    // people's consent: the broker's key alone yields nothing.
    let generated = vault(&sys, "broker")
        .generate_code(GenerateCodeRequest {
            grant: Some(sys.sign_grant("no-consent-1")),
            evidence: None,
        })
        .await;
    assert_status(generated, Code::PermissionDenied, "missing");
    let released = |log: &[twokey_proto::audit::v1::LogEntry]| {
        log.iter()
            .filter_map(|e| e.event.as_ref())
            .filter(|e| e.action == "code.released")
            .count()
    };
    let log = sys
        .log_until(Duration::from_secs(10), |log| {
            log.iter().filter_map(|e| e.event.as_ref()).any(|e| {
                e.action == "code.refused"
                    && e.attributes.get("grant_id").map(String::as_str) == Some("no-consent-1")
            })
        })
        .await;
    assert!(
        log.iter()
            .filter_map(|e| e.event.as_ref())
            .any(|e| e.action == "code.refused"
                && e.attributes.get("grant_id").map(String::as_str) == Some("no-consent-1")),
        "the refusal is not in the audit log"
    );
    assert_eq!(released(&log), 0, "a code left the vault");

    // Events out of sequence: a gap is answered GAP with the expected
    // number and nothing is stored; seq 0 is INVALID_ARGUMENT.
    let key = vault_event_key(&sys);
    let answers = append(&sys, vec![vault_event(&key, 1_000)]).await.unwrap();
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].status(), AppendStatus::Gap);
    assert_eq!(answers[0].seq, 1_000);
    assert!(answers[0].expected_seq < 1_000, "{:?}", answers[0]);
    let zero = append(&sys, vec![vault_event(&key, 0)]).await;
    assert_status(zero, Code::InvalidArgument, "event seq 0");
    assert!(
        sys.log().await.iter().all(|e| e
            .event
            .as_ref()
            .is_none_or(|e| e.seq != 1_000 && e.seq != 0)),
        "an event out of sequence was stored"
    );
}

/// Reads until the server closes the connection; how long that took, or
/// `None` if it was still open after `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    })
    .await
    .ok()
    .map(|()| start.elapsed())
}

/// Deterministic noise (xorshift): random bytes without a dependency.
fn noise(len: usize, mut state: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// The first bytes of a TLS ClientHello: a handshake record header that
/// promises 512 bytes, and the start of the message.
const PARTIAL_CLIENT_HELLO: [u8; 9] = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc];

async fn serves_everyone(sys: &System) {
    sys.broker("alice")
        .who_am_i(WhoAmIRequest {})
        .await
        .unwrap();
    vault(sys, "broker").status(StatusRequest {}).await.unwrap();
    audit(sys, "carol")
        .get_checkpoint(GetCheckpointRequest {})
        .await
        .unwrap();
}

#[tokio::test]
async fn random_bytes_on_each_grpc_port_close_only_that_connection() {
    let sys = System::start();
    for (i, url) in [&sys.local.broker, &sys.local.vault, &sys.local.audit]
        .into_iter()
        .enumerate()
    {
        for (len, seed) in [(16, 1), (4096, 2), (64 * 1024, 3)] {
            let mut stream = TcpStream::connect(addr(url)).await.unwrap();
            // The server may close while we are still writing.
            let _ = stream.write_all(&noise(len, seed + i as u64 * 7)).await;
            let closed = closed_within(&mut stream, Duration::from_secs(5)).await;
            assert!(
                closed.is_some(),
                "{url} kept a connection sending {len} random bytes"
            );
            eprintln!("{url}: {len} random bytes, closed after {closed:?}");
        }
    }
    serves_everyone(&sys).await;
}

#[tokio::test]
async fn slow_loris_clients_are_cut_off_and_never_stall_others() {
    let sys = System::start();
    let handshake_timeout = twokey_runtime::tls::HANDSHAKE_TIMEOUT;
    let mut held = Vec::new();
    for i in 0..50 {
        // Most at the broker, the public face; some at vault and audit.
        let url = match i % 5 {
            3 => &sys.local.vault,
            4 => &sys.local.audit,
            _ => &sys.local.broker,
        };
        let mut stream = TcpStream::connect(addr(url)).await.unwrap();
        if i % 2 == 0 {
            stream.write_all(&PARTIAL_CLIENT_HELLO).await.unwrap();
        }
        held.push((Instant::now(), stream));
    }

    // While all 50 are held, a whole enrollment (broker → vault → audit)
    // and a call to each service go through.
    let start = Instant::now();
    sys.broker("adam")
        .enroll_account(EnrollAccountRequest {
            account_id: ACCOUNT.into(),
            seed: Some(Seed::Base32Secret(
                "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP".into(),
            )),
            ..Default::default()
        })
        .await
        .unwrap();
    serves_everyone(&sys).await;
    let served_in = start.elapsed();
    assert!(
        served_in < handshake_timeout,
        "other clients waited {served_in:?} behind the slow ones"
    );

    // Each held connection is closed by the server after the handshake timeout.
    let bound = handshake_timeout + Duration::from_secs(5);
    let mut longest = Duration::ZERO;
    for (i, (opened, mut stream)) in held.into_iter().enumerate() {
        let left = bound.saturating_sub(opened.elapsed());
        assert!(
            closed_within(&mut stream, left).await.is_some(),
            "slow connection {i} still open {bound:?} after it was opened"
        );
        longest = longest.max(opened.elapsed());
    }
    eprintln!("others served in {served_in:?}; slow connections closed after at most {longest:?}");
    serves_everyone(&sys).await;
}
