//! A CLI that never hangs: against real listeners on 127.0.0.1 that accept
//! and never answer (one that never completes TLS, one that completes TLS
//! and then says nothing), the CLI exits 1 within a bound with a message
//! naming the service and its address; a closed port fails fast; `--json`
//! errors are JSON; and --timeout beats $TWOKEY_TIMEOUT beats the profile.
//! Also: destructive admin actions refuse to run without a terminal unless
//! --yes is given. An audit stream that starts and then goes silent is
//! cut off by the same per-call timeout.

mod common;

use std::{
    io::Read,
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use common::{pki_init, twokey_as};
use futures::StreamExt;
use twokey_proto::audit::v1::{
    self as apb,
    audit_service_server::{AuditService, AuditServiceServer},
};

/// A listener that accepts connections and never sends a byte: TLS never
/// completes. It lives as long as the test process.
fn silent_tcp() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held: Vec<TcpStream> = Vec::new();
        for conn in listener.incoming().flatten() {
            held.push(conn);
        }
    });
    addr.to_string()
}

/// A listener that completes the TLS handshake as the broker (ALPN h2,
/// client certificate required) and then reads and never writes: the
/// connection is up, the call is never answered.
fn silent_tls(pki: &Path) -> String {
    let tls = twokey_runtime::tls::TlsFiles::in_dir(pki, "broker")
        .server_tls(twokey_runtime::tls::ClientAuth::Required)
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let config = Arc::clone(&tls.config);
            std::thread::spawn(move || {
                let Ok(server) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut stream = rustls::StreamOwned::new(server, conn);
                while stream.conn.is_handshaking() {
                    if stream.conn.complete_io(&mut stream.sock).is_err() {
                        return;
                    }
                }
                let mut buf = [0u8; 4096];
                while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    addr.to_string()
}

/// An audit service over mTLS whose Query stream sends one batch and then
/// goes silent, never ending the stream; its other calls are unimplemented.
struct StallingAudit;

type Silent<T> =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, tonic::Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AuditService for StallingAudit {
    type AppendStream = Silent<apb::AppendResponse>;
    type QueryStream = Silent<apb::QueryResponse>;

    async fn append(
        &self,
        _: tonic::Request<tonic::Streaming<apb::AppendRequest>>,
    ) -> Result<tonic::Response<Self::AppendStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this fake"))
    }

    async fn query(
        &self,
        _: tonic::Request<apb::QueryRequest>,
    ) -> Result<tonic::Response<Self::QueryStream>, tonic::Status> {
        let first = apb::QueryResponse {
            entries: vec![apb::LogEntry {
                index: 0,
                ..Default::default()
            }],
            next_page_token: "1".into(),
        };
        let stream =
            futures::stream::once(async move { Ok(first) }).chain(futures::stream::pending());
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn get_checkpoint(
        &self,
        _: tonic::Request<apb::GetCheckpointRequest>,
    ) -> Result<tonic::Response<apb::GetCheckpointResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this fake"))
    }

    async fn get_inclusion_proof(
        &self,
        _: tonic::Request<apb::GetInclusionProofRequest>,
    ) -> Result<tonic::Response<apb::GetInclusionProofResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this fake"))
    }

    async fn get_consistency_proof(
        &self,
        _: tonic::Request<apb::GetConsistencyProofRequest>,
    ) -> Result<tonic::Response<apb::GetConsistencyProofResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this fake"))
    }

    async fn restore(
        &self,
        _: tonic::Request<tonic::Streaming<apb::RestoreRequest>>,
    ) -> Result<tonic::Response<apb::RestoreResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this fake"))
    }
}

/// Serves [`StallingAudit`] with the dev PKI's audit certificate, client
/// certificates required, on its own runtime for the life of the test
/// process.
fn stalling_audit(pki: &Path) -> String {
    let tls = twokey_runtime::tls::TlsFiles::in_dir(pki, "audit")
        .server_tls(twokey_runtime::tls::ClientAuth::Required)
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            tonic::transport::Server::builder()
                .add_service(AuditServiceServer::new(StallingAudit))
                .serve_with_incoming(twokey_runtime::serve::incoming(listener, tls))
                .await
                .unwrap();
        });
    });
    addr.to_string()
}

/// A port nothing listens on.
fn closed_port() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    addr
}

/// A PKI and profile file for alice (requester) and adam (admin).
fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path().join("pki");
    let config = pki_init(
        &pki,
        &["alice:requester", "adam:admin"],
        "127.0.0.1:1",
        "127.0.0.1:1",
    );
    (tmp, pki, config)
}

/// Runs `cmd`; its exit code, stderr and how long it took.
fn run(cmd: &mut assert_cmd::Command) -> (Option<i32>, String, Duration) {
    let started = Instant::now();
    let out = cmd.timeout(Duration::from_secs(60)).output().unwrap();
    let took = started.elapsed();
    assert!(out.stdout.is_empty(), "stdout not empty on error");
    (
        out.status.code(),
        String::from_utf8(out.stderr).unwrap(),
        took,
    )
}

#[test]
fn a_broker_that_accepts_and_never_completes_tls_is_given_up_on_within_the_connect_timeout() {
    let (_tmp, _pki, config) = setup();
    let addr = silent_tcp();
    let (code, err, took) = run(twokey_as(&config, "alice").args([
        "whoami",
        "--broker",
        &addr,
        "--connect-timeout",
        "1s",
    ]));
    assert_eq!(code, Some(1), "{err}");
    assert!(took < Duration::from_secs(10), "took {took:?}: {err}");
    assert!(
        err.starts_with(&format!(
            "twokey: the broker at https://{addr} did not answer within 1s"
        )),
        "{err}"
    );
    assert!(err.contains("is it running"), "{err}");
    assert!(err.contains("--connect-timeout"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // As JSON: the same message, code deadline_exceeded, exit 1.
    let (code, err, _) = run(twokey_as(&config, "alice").args([
        "whoami",
        "--json",
        "--broker",
        &addr,
        "--connect-timeout",
        "1s",
    ]));
    assert_eq!(code, Some(1), "{err}");
    let v: serde_json::Value = serde_json::from_str(err.trim_end()).expect("JSON error");
    assert_eq!(v["code"], "deadline_exceeded", "{v}");
    assert!(
        v["message"].as_str().unwrap().starts_with(&format!(
            "the broker at https://{addr} did not answer within 1s"
        )),
        "{v}"
    );
}

#[test]
fn a_broker_that_completes_tls_and_never_answers_is_given_up_on_within_the_call_timeout() {
    let (_tmp, pki, config) = setup();
    let addr = silent_tls(&pki);
    let (code, err, took) = run(twokey_as(&config, "alice").args([
        "request",
        "list",
        "--broker",
        &addr,
        "--timeout",
        "1500ms",
    ]));
    assert_eq!(code, Some(1), "{err}");
    assert!(took < Duration::from_secs(10), "took {took:?}: {err}");
    assert_eq!(
        err.trim_end(),
        format!(
            "twokey: the broker at https://{addr} did not answer within 1500ms; is it running? raise --timeout (now 1500ms) if it is only slow"
        )
    );
}

#[test]
fn the_audit_service_is_named_when_it_is_the_one_that_is_silent() {
    let (tmp, _pki, config) = setup();
    let addr = silent_tcp();
    let mut cmd = twokey_as(&config, "alice");
    cmd.args(["audit", "checkpoint", "--audit", &addr, "--out"])
        .arg(tmp.path().join("checkpoint.txt"))
        .env("TWOKEY_CONNECT_TIMEOUT", "1s");
    let (code, err, took) = run(&mut cmd);
    assert_eq!(code, Some(1), "{err}");
    assert!(took < Duration::from_secs(10), "took {took:?}: {err}");
    assert!(
        err.contains(&format!(
            "the audit at https://{addr} did not answer within 1s"
        )),
        "{err}"
    );
}

#[test]
fn an_audit_stream_that_goes_silent_after_its_first_message_is_given_up_on() {
    let (tmp, pki, config) = setup();
    let addr = stalling_audit(&pki);
    let message = format!(
        "the audit at https://{addr} did not answer within 1500ms; is it running? raise --timeout (now 1500ms) if it is only slow"
    );
    let query = ["audit", "query", "--audit", &addr, "--timeout", "1500ms"];
    let (code, err, took) = run(twokey_as(&config, "alice").args(query));
    assert_eq!(code, Some(1), "{err}");
    assert!(took < Duration::from_secs(10), "took {took:?}: {err}");
    assert_eq!(err.trim_end(), format!("twokey: {message}"));

    // As JSON: the batch that came is on stdout, the error on stderr.
    let out = twokey_as(&config, "alice")
        .args(query)
        .arg("--json")
        .timeout(Duration::from_secs(60))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    let v: serde_json::Value = serde_json::from_str(err.trim_end()).expect("JSON error");
    assert_eq!(v["code"], "deadline_exceeded", "{v}");
    assert_eq!(v["message"], message.as_str(), "{v}");

    // The export is cut off the same way, and leaves no file behind.
    let export = tmp.path().join("log.jsonl");
    let mut cmd = twokey_as(&config, "alice");
    cmd.args(["audit", "export", "--audit", &addr, "--out"])
        .arg(&export)
        .env("TWOKEY_TIMEOUT", "1500ms");
    let (code, err, took) = run(&mut cmd);
    assert_eq!(code, Some(1), "{err}");
    assert!(took < Duration::from_secs(10), "took {took:?}: {err}");
    assert_eq!(err.trim_end(), format!("twokey: {message}"));
    assert!(!export.exists(), "an export was written");
    assert!(
        !tmp.path().join("log.partial").exists(),
        "a half-written export was left behind"
    );
}

#[test]
fn a_closed_port_is_a_connect_error_at_once() {
    let (_tmp, _pki, config) = setup();
    let addr = closed_port();
    let (code, err, took) = run(twokey_as(&config, "alice").args(["whoami", "--broker", &addr]));
    assert_eq!(code, Some(1), "{err}");
    assert!(took < Duration::from_secs(4), "took {took:?}: {err}");
    assert!(
        err.starts_with(&format!(
            "twokey: cannot reach the broker at https://{addr}"
        )),
        "{err}"
    );
}

#[test]
fn a_plain_http_address_is_refused_before_any_connection() {
    let (_tmp, _pki, config) = setup();
    let (code, err, _) =
        run(twokey_as(&config, "alice").args(["whoami", "--broker", "http://127.0.0.1:7400"]));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("address \"http://127.0.0.1:7400\" is not https://")
            && err.contains("use https://HOST:PORT")
            && !err.contains("frame"),
        "{err}"
    );
}

#[test]
fn json_errors_are_one_json_object_on_stderr_with_code_and_message() {
    let (_tmp, pki, config) = setup();
    // A silent broker: deadline_exceeded.
    let addr = silent_tls(&pki);
    let (code, err, _) = run(twokey_as(&config, "alice").args([
        "whoami",
        "--json",
        "--broker",
        &addr,
        "--timeout",
        "1s",
    ]));
    assert_eq!(code, Some(1), "{err}");
    let v: serde_json::Value = serde_json::from_str(err.trim_end()).expect("JSON error");
    assert_eq!(v["code"], "deadline_exceeded", "{v}");
    assert_eq!(v["exit"], 1, "{v}");
    assert!(
        v["message"].as_str().unwrap().starts_with(&format!(
            "the broker at https://{addr} did not answer within 1s"
        )),
        "{v}"
    );

    // A closed port: unavailable.
    let (code, err, _) =
        run(twokey_as(&config, "alice").args(["whoami", "--json", "--broker", &closed_port()]));
    assert_eq!(code, Some(1), "{err}");
    let v: serde_json::Value = serde_json::from_str(err.trim_end()).expect("JSON error");
    assert_eq!(v["code"], "unavailable", "{v}");

    // A usage error from the command line itself keeps exit 2.
    let (code, err, _) = run(twokey_as(&config, "alice").args(["whoami", "--json", "--bogus"]));
    assert_eq!(code, Some(2), "{err}");
    let v: serde_json::Value = serde_json::from_str(err.trim_end()).expect("JSON error");
    assert_eq!(v["code"], "usage", "{v}");
    assert!(v["message"].as_str().unwrap().contains("--bogus"), "{v}");

    // A bad duration is a usage error too.
    let (code, err, _) =
        run(twokey_as(&config, "alice").args(["whoami", "--json", "--timeout", "soon"]));
    assert_eq!(code, Some(2), "{err}");
    let v: serde_json::Value = serde_json::from_str(err.trim_end()).expect("JSON error");
    assert_eq!(v["code"], "usage", "{v}");
}

#[test]
fn the_flag_beats_the_environment_which_beats_the_profile() {
    let (_tmp, _pki, config) = setup();
    let addr = silent_tcp();
    // adam's profile says 3s; alice's says nothing (the default, 5s).
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replace(
        "[profiles.\"adam\"]",
        "[profiles.\"adam\"]\nconnect_timeout = \"3s\"\ntimeout = \"3s\"",
    );
    assert!(text.contains("connect_timeout = \"3s\""), "{text}");
    std::fs::write(&config, text).unwrap();

    let within = |cmd: &mut assert_cmd::Command| {
        let (code, err, _) = run(cmd.args(["whoami", "--broker", &addr]));
        assert_eq!(code, Some(1), "{err}");
        let rest = err
            .split("did not answer within ")
            .nth(1)
            .unwrap_or_else(|| panic!("{err}"));
        rest.split(' ').next().unwrap().to_owned()
    };
    // Profile alone.
    assert_eq!(within(&mut twokey_as(&config, "adam")), "3s");
    // Environment over profile.
    assert_eq!(
        within(twokey_as(&config, "adam").env("TWOKEY_CONNECT_TIMEOUT", "2s")),
        "2s"
    );
    // Flag over environment and profile.
    assert_eq!(
        within(
            twokey_as(&config, "adam")
                .env("TWOKEY_CONNECT_TIMEOUT", "2s")
                .args(["--connect-timeout", "1s"])
        ),
        "1s"
    );
    // A bad value in the profile names the key.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("timeout = \"3s\"\n", "timeout = \"later\"\n");
    std::fs::write(&config, text).unwrap();
    let (code, err, _) = run(twokey_as(&config, "adam").args(["whoami", "--broker", &addr]));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("timeout in profile \"adam\""), "{err}");
}

#[test]
fn destructive_admin_actions_refuse_without_a_terminal_unless_yes_is_given() {
    let (_tmp, _pki, config) = setup();
    let dead = closed_port();
    for args in [
        &["account", "remove", "aws", "--reason", "gone"][..],
        &[
            "account", "remove", "aws", "--reason", "gone", "--action", "a-1",
        ],
        &["account", "enroll", "aws", "--replace"],
        &["account", "enroll", "aws", "--replace", "--action", "a-1"],
    ] {
        let mut cmd = twokey_as(&config, "adam");
        cmd.args(args).args(["--broker", &dead]).write_stdin("");
        let (code, err, _) = run(&mut cmd);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains("pass --yes"), "{args:?}: {err}");
        assert!(err.contains("aws"), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    // With --yes it goes ahead (and here meets the missing broker).
    let (code, err, _) = run(twokey_as(&config, "adam").args([
        "account",
        "enroll",
        "aws",
        "--replace",
        "--yes",
        "--broker",
        &dead,
    ]));
    assert_eq!(code, Some(1), "{err}");
    assert!(!err.contains("pass --yes"), "{err}");
}
