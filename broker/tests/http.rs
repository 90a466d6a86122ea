//! The HTTP/JSON (Connect protocol) API driven by a real HTTP client
//! (hyper over tokio-rustls, with client certificates) against the running
//! broker: every unary method, WatchRequests as Server-Sent Events, the error
//! mappings, the OpenAPI document, trace ids in audit events, and
//! one rule checked identically over HTTP and gRPC.

mod common;

use std::time::Duration;

use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::Code;
use twokey_broker::http::{PREFIX, STREAMING, UNARY, openapi};

/// A TLS client config trusting the dev CA, presenting `user`'s certificate
/// (or none), offering `alpn`.
fn tls(h: &Harness, user: Option<&str>, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    twokey_testkit::pki::https_connector(&pki_dir(h.dir.path()), user, alpn)
}

async fn connect(
    h: &Harness,
    user: Option<&str>,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(h.http_addr()).await.unwrap();
    tls(h, user, alpn)
        .connect(ServerName::try_from("broker").unwrap(), tcp)
        .await
        .unwrap()
}

/// One answer: status, headers and the body as JSON.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: Value,
}

/// Sends one request over HTTP/1.1 as `user` (or without a certificate).
async fn send(h: &Harness, user: Option<&str>, request: http::Request<Full<Bytes>>) -> Answer {
    let io = TokioIo::new(connect(h, user, &[b"http/1.1"]).await);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Answer {
        status,
        headers,
        body,
    }
}

fn post(path: &str, content_type: &str, body: impl Into<Bytes>) -> http::Request<Full<Bytes>> {
    http::Request::post(path)
        .header("host", "broker")
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .unwrap()
}

/// Calls `method` as `user` with `body`.
async fn call(h: &Harness, user: &str, method: &str, body: Value) -> Answer {
    send(
        h,
        Some(user),
        post(
            &format!("{PREFIX}{method}"),
            "application/json",
            body.to_string(),
        ),
    )
    .await
}

/// Calls `method` and expects 200; returns the body.
async fn ok(h: &Harness, user: &str, method: &str, body: Value) -> Value {
    let a = call(h, user, method, body).await;
    assert_eq!(a.status, 200, "{method} as {user}: {a:?}");
    assert_eq!(a.headers["content-type"], "application/json");
    a.body
}

/// Asserts a Connect error: HTTP status, code, and a piece of the message.
fn refused(a: &Answer, status: u16, code: &str, text: &str) {
    assert_eq!(a.status, status, "{a:?}");
    assert_eq!(a.body["code"], code, "{a:?}");
    let message = a.body["message"].as_str().unwrap_or_default();
    assert!(message.contains(text), "{text:?} not in {message:?}");
}

#[tokio::test]
async fn every_unary_method_works_over_http_with_client_certificates() {
    let h = Harness::start().await;

    let me = ok(&h, "bpm", "WhoAmI", json!({})).await;
    assert_eq!(me["identity"], "spiffe://twokey.local/svc/bpm");

    // The BPM files on alice's behalf; alice sees it as hers.
    let created = ok(
        &h,
        "bpm",
        "CreateRequest",
        json!({ "accountId": PROD, "reason": "rotate root keys", "ticket": "OPS-42", "onBehalfOf": "alice" }),
    )
    .await;
    let request = &created["request"];
    assert_eq!(request["state"], "REQUEST_STATE_PENDING");
    assert_eq!(request["requester"], "spiffe://twokey.local/user/alice");
    assert_eq!(request["filedBy"], "spiffe://twokey.local/svc/bpm");
    let created_at = request["createdAt"].as_str().unwrap();
    assert!(created_at.starts_with("2030-"), "{created_at}");
    let id = request["requestId"].as_str().unwrap().to_owned();

    let got = ok(&h, "bpm", "GetRequest", json!({ "requestId": id })).await;
    assert_eq!(got["request"]["requestId"], id.as_str());
    let filed = ok(&h, "bpm", "ListRequests", json!({ "mine": true })).await;
    assert_eq!(filed["requests"][0]["requestId"], id.as_str());
    let listed = ok(
        &h,
        "alice",
        "ListRequests",
        json!({ "mine": true, "state": "REQUEST_STATE_PENDING" }),
    )
    .await;
    assert_eq!(listed["requests"][0]["requestId"], id.as_str());

    // bob approves; the PIN goes to alice; she asks for a new one.
    let approved = ok(
        &h,
        "bob",
        "ApproveRequest",
        json!({ "requestId": id, "comment": "ticket checked" }),
    )
    .await;
    assert_eq!(approved["request"]["state"], "REQUEST_STATE_APPROVED");
    h.wait_for_pin("alice", &id, 1).await;
    let resent = ok(&h, "alice", "ResendPin", json!({ "requestId": id })).await;
    assert_eq!(resent["request"]["state"], "REQUEST_STATE_APPROVED");
    let pin = h.wait_for_pin("alice", &id, 2).await;
    // alice, and only alice, is shown it.
    let shown = ok(&h, "alice", "ShowPin", json!({ "requestId": id })).await;
    assert_eq!(shown["pin"], pin.as_str());
    assert_eq!(shown["request"]["pinLength"], 6);
    let a = call(&h, "olivia", "ShowPin", json!({ "requestId": id })).await;
    refused(
        &a,
        403,
        "permission_denied",
        "only the requester may see its PIN",
    );
    assert!(!a.body.to_string().contains(&pin));

    // olivia verifies the PIN and releases the code.
    let verified = ok(
        &h,
        "olivia",
        "VerifyPin",
        json!({ "requestId": id, "pin": pin }),
    )
    .await;
    assert_eq!(verified["request"]["state"], "REQUEST_STATE_VERIFIED");
    let a = call(&h, "alice", "ShowPin", json!({ "requestId": id })).await;
    refused(&a, 400, "failed_precondition", "already verified");
    let released = ok(&h, "olivia", "ReleaseCode", json!({ "requestId": id })).await;
    assert_eq!(released["code"]["code"], FAKE_CODE);
    // uint64 in the proto3 JSON mapping: a string.
    assert_eq!(released["code"]["step"], "1");
    assert_eq!(released["request"]["state"], "REQUEST_STATE_RELEASED");

    // Deny and cancel.
    let other = ok(
        &h,
        "alice",
        "CreateRequest",
        json!({ "accountId": PROD, "reason": "second" }),
    )
    .await["request"]["requestId"]
        .as_str()
        .unwrap()
        .to_owned();
    let denied = ok(
        &h,
        "bob",
        "DenyRequest",
        json!({ "requestId": other, "reason": "no ticket" }),
    )
    .await;
    assert_eq!(denied["request"]["state"], "REQUEST_STATE_DENIED");
    let third = ok(
        &h,
        "alice",
        "CreateRequest",
        json!({ "accountId": PROD, "reason": "third" }),
    )
    .await["request"]["requestId"]
        .as_str()
        .unwrap()
        .to_owned();
    let cancelled = ok(
        &h,
        "alice",
        "CancelRequest",
        json!({ "requestId": third, "reason": "not needed" }),
    )
    .await;
    assert_eq!(cancelled["request"]["state"], "REQUEST_STATE_CANCELLED");

    // Accounts (admin).
    let enrolled = ok(
        &h,
        "adam",
        "EnrollAccount",
        json!({ "accountId": PROD, "base32Secret": "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP", "replace": true }),
    )
    .await;
    assert_eq!(enrolled["current"]["code"], FAKE_CODE);
    let accounts = ok(&h, "adam", "ListAccounts", json!({})).await;
    let ids: Vec<&str> = accounts["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["accountId"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&PROD), "{ids:?}");
    let removed = ok(
        &h,
        "adam",
        "RemoveAccount",
        json!({ "accountId": PROD, "reason": "decommissioned" }),
    )
    .await;
    assert_eq!(removed["accountId"], PROD);

    // The signed policy and admin actions (this broker has no [consent]
    // and the vault no policy: proposing works, the rest says why not).
    let policy = ok(&h, "carol", "GetPolicy", json!({})).await;
    assert_eq!(policy, json!({}));
    let people: Vec<twokey_testkit::consent::Person> = ["adam", "anna"]
        .iter()
        .map(|n| {
            twokey_testkit::consent::Person::generate(n, vec![format!("spiffe://{TD}/user/{n}")])
        })
        .collect();
    let document = twokey_testkit::consent::PolicySpec::adam_and_anna(
        1,
        TD,
        &people.iter().collect::<Vec<_>>(),
        vec![],
    )
    .to_toml();
    let proposed = ok(&h, "adam", "ProposePolicy", json!({ "document": document })).await;
    assert_eq!(proposed["proposal"]["version"], "1");
    assert_eq!(
        proposed["proposal"]["proposedBy"],
        "spiffe://twokey.local/user/adam"
    );
    let a = call(
        &h,
        "adam",
        "SignPolicy",
        json!({ "version": "1", "signature": "AAAA" }),
    )
    .await;
    refused(&a, 400, "failed_precondition", "[consent]");
    let a = call(&h, "adam", "ApplyPolicy", json!({ "version": "1" })).await;
    refused(&a, 400, "failed_precondition", "no root");
    let open = ok(&h, "adam", "ListAdminActions", json!({})).await;
    assert_eq!(open, json!({}));
    let a = call(
        &h,
        "adam",
        "SignAdminAction",
        json!({ "statement": { "statement": "AAAA", "signature": "AAAA" } }),
    )
    .await;
    refused(
        &a,
        400,
        "failed_precondition",
        "no signed policy is in force",
    );
    let a = call(
        &h,
        "adam",
        "SetAccountEnabled",
        json!({ "accountId": PROD, "enabled": false }),
    )
    .await;
    refused(
        &a,
        400,
        "failed_precondition",
        "no signed policy is in force",
    );
    let a = call(&h, "adam", "RestoreAccount", json!({ "accountId": PROD })).await;
    refused(
        &a,
        400,
        "failed_precondition",
        "no signed policy is in force",
    );
    h.shutdown().await;
}

#[tokio::test]
async fn the_http_methods_are_exactly_the_methods_of_the_descriptors() {
    let doc = openapi::document();
    let mut paths: Vec<String> = doc["paths"].as_object().unwrap().keys().cloned().collect();
    paths.sort();
    let mut served: Vec<String> = UNARY
        .iter()
        .chain(STREAMING)
        .map(|m| format!("{PREFIX}{m}"))
        .collect();
    served.sort();
    assert_eq!(paths, served);
}

#[tokio::test]
async fn errors_are_connect_errors_with_the_connect_http_statuses() {
    let h = Harness::start().await;
    let path = format!("{PREFIX}GetRequest");

    // Wrong content type: 415.
    let a = send(&h, Some("alice"), post(&path, "text/plain", "{}")).await;
    refused(&a, 415, "invalid_argument", "application/json");
    assert_eq!(a.headers["accept-post"], "application/json");
    // A charset parameter is fine.
    let a = send(
        &h,
        Some("alice"),
        post(
            &path,
            "application/json; charset=utf-8",
            r#"{"requestId":"nope"}"#,
        ),
    )
    .await;
    refused(&a, 404, "not_found", "nope");

    // Malformed JSON: 400 with the parser's words.
    let a = send(
        &h,
        Some("alice"),
        post(&path, "application/json", "{\"requestId\":"),
    )
    .await;
    refused(
        &a,
        400,
        "invalid_argument",
        "malformed JSON for GetRequestRequest",
    );
    assert!(a.body["message"].as_str().unwrap().contains("EOF"), "{a:?}");
    // Unknown fields are rejected, as the proto3 JSON spec asks of parsers by default.
    let a = call(
        &h,
        "alice",
        "GetRequest",
        json!({ "requestId": "x", "bogus": 1 }),
    )
    .await;
    refused(&a, 400, "invalid_argument", "unknown field `bogus`");
    // A wrongly typed value is not quoted back (it may be a PIN).
    let a = call(
        &h,
        "olivia",
        "VerifyPin",
        json!({ "requestId": "x", "pin": 918273 }),
    )
    .await;
    refused(
        &a,
        400,
        "invalid_argument",
        "invalid type: integer (value not shown)",
    );
    assert!(!a.body.to_string().contains("918273"), "{a:?}");
    // Empty body.
    let a = send(&h, Some("alice"), post(&path, "application/json", "")).await;
    refused(&a, 400, "invalid_argument", "empty body");

    // An unknown method is `unimplemented` (Connect's table: 501); a path
    // outside the API is plain 404.
    let a = call(&h, "alice", "MakeMeRoot", json!({})).await;
    refused(&a, 501, "unimplemented", "MakeMeRoot");
    let a = send(
        &h,
        Some("alice"),
        post("/nowhere", "application/json", "{}"),
    )
    .await;
    refused(&a, 404, "not_found", "/nowhere");
    // Another service's procedure is not served here: unimplemented too.
    let a = send(
        &h,
        Some("alice"),
        post(
            "/twokey.vault.v1.VaultService/Enroll",
            "application/json",
            "{}",
        ),
    )
    .await;
    refused(
        &a,
        501,
        "unimplemented",
        "twokey.vault.v1.VaultService/Enroll is not served here",
    );
    // The streaming method checks its request like any other.
    let a = call(&h, "alice", "WatchRequests", json!({ "accountId": 7 })).await;
    refused(&a, 400, "invalid_argument", "WatchRequestsRequest");
    // Not POST: 405.
    let get = http::Request::get(&path)
        .header("host", "broker")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let a = send(&h, Some("alice"), get).await;
    refused(&a, 405, "unimplemented", "POST");
    assert_eq!(a.headers["allow"], "POST");

    // Too large: resource_exhausted, 429 as in Connect's table, whether
    // declared or streamed.
    let big = format!(r#"{{"requestId":"{}"}}"#, "x".repeat(300 * 1024));
    let a = send(
        &h,
        Some("alice"),
        post(&path, "application/json", big.clone()),
    )
    .await;
    refused(&a, 429, "resource_exhausted", "larger than 262144 bytes");
    let chunked = http::Request::post(&path)
        .header("host", "broker")
        .header("content-type", "application/json")
        .body(http_body_util::StreamBody::new(futures::stream::iter(
            big.into_bytes()
                .chunks(16 * 1024)
                .map(|c| {
                    Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                        Bytes::copy_from_slice(c),
                    ))
                })
                .collect::<Vec<_>>(),
        )))
        .unwrap();
    let io = TokioIo::new(connect(&h, Some("alice"), &[b"http/1.1"]).await);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let response = sender.send_request(chunked).await.unwrap();
    assert_eq!(response.status(), 429);

    // No client certificate: the handshake succeeds (as on the gRPC port),
    // every method answers 401; the OpenAPI document is public.
    let a = send(&h, None, post(&path, "application/json", "{}")).await;
    refused(&a, 401, "unauthenticated", "no client certificate");

    // Domain errors through the one BrokerError → Status → Connect mapping.
    let a = call(
        &h,
        "bob",
        "CreateRequest",
        json!({ "accountId": PROD, "reason": "x" }),
    )
    .await;
    refused(&a, 403, "permission_denied", "bob");
    let a = call(&h, "alice", "CreateRequest", json!({ "accountId": PROD })).await;
    refused(&a, 400, "invalid_argument", "reason");
    let (id, _pin) = approved_prod(&h).await;
    let a = call(&h, "dave", "ApproveRequest", json!({ "requestId": id })).await;
    refused(&a, 400, "failed_precondition", "");
    let a = call(&h, "olivia", "ReleaseCode", json!({ "requestId": id })).await;
    refused(&a, 400, "failed_precondition", "");
    h.shutdown().await;
}

#[tokio::test]
async fn a_body_that_never_arrives_times_out() {
    let h = Harness::start().await;
    let mut tls = connect(&h, Some("alice"), &[b"http/1.1"]).await;
    let head = format!(
        "POST {PREFIX}WhoAmI HTTP/1.1\r\nhost: broker\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n{{"
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4096];
        loop {
            let n = tls.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer within 20 s");
    let text = String::from_utf8_lossy(&answer);
    // Connect's table: deadline_exceeded is 504 (408 would invite a retry).
    assert!(text.starts_with("HTTP/1.1 504"), "{text}");
    assert!(
        text.contains(r#"{"code":"deadline_exceeded","message":"the request body did not arrive within 10 s"}"#),
        "{text}"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn http2_is_served_too() {
    let h = Harness::start().await;
    let tls = connect(&h, Some("alice"), &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = http::Request::post(format!("https://broker{PREFIX}WhoAmI"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["identity"], "spiffe://twokey.local/user/alice");
    h.shutdown().await;
}

#[tokio::test]
async fn self_approval_is_refused_identically_over_http_and_grpc() {
    // alice is made an approver too, so only separation of duties stops her.
    let policy = POLICY.replace(
        "approvers = [\"bob\", \"dave\"]",
        "approvers = [\"bob\", \"dave\", \"alice\"]",
    );
    let h = Harness::start_with_policy(&policy).await;
    let id = file(&h, "alice", PROD).await;

    let (code, grpc_message) = code_of(approve(&h, "alice", &id).await);
    assert_eq!(code, Code::PermissionDenied, "{grpc_message}");

    let a = call(&h, "alice", "ApproveRequest", json!({ "requestId": id })).await;
    assert_eq!(a.status, 403, "{a:?}");
    assert_eq!(a.body["code"], "permission_denied");
    assert_eq!(a.body["message"], grpc_message.as_str());
    assert!(grpc_message.contains("own request"), "{grpc_message}");
    assert_eq!(
        state_of(&get(&h, "bob", &id).await),
        twokey_proto::broker::v1::RequestState::Pending
    );
    h.shutdown().await;
}

#[tokio::test]
async fn the_openapi_document_is_served_and_matches_the_checked_in_copy() {
    let h = Harness::start().await;
    let get = http::Request::get("/openapi.json")
        .header("host", "broker")
        .body(Full::new(Bytes::new()))
        .unwrap();
    // Public, like gRPC reflection: no client certificate needed.
    let a = send(&h, None, get).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body, openapi::document());
    h.shutdown().await;

    let checked_in = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
    let text = std::fs::read_to_string(&checked_in).unwrap_or_default();
    assert!(
        text == openapi::json_text(),
        "docs/openapi.json is stale: run `cargo run -q -p twokey-broker -- openapi > docs/openapi.json`"
    );
    // Spot checks of the proto3 JSON mapping in the schemas.
    let doc = openapi::document();
    let schemas = &doc["components"]["schemas"];
    assert_eq!(
        schemas["twokey.types.v1.Code"]["properties"]["step"]["type"],
        "string"
    );
    assert_eq!(
        schemas["twokey.broker.v1.Request"]["properties"]["createdAt"]["format"],
        "date-time"
    );
    assert_eq!(
        schemas["twokey.broker.v1.RequestState"]["enum"][1],
        "REQUEST_STATE_PENDING"
    );
    assert!(
        schemas["twokey.broker.v1.CreateRequestRequest"]["properties"]["onBehalfOf"]["description"]
            .as_str()
            .unwrap()
            .contains("intake")
    );
    // A license, and no schema that nothing refers to.
    assert_eq!(doc["info"]["license"]["identifier"], "Apache-2.0");
    let text = doc.to_string();
    let unused: Vec<&String> = schemas
        .as_object()
        .unwrap()
        .keys()
        .filter(|name| !text.contains(&format!("\"#/components/schemas/{name}\"")))
        .collect();
    assert!(unused.is_empty(), "schemas nothing refers to: {unused:?}");
}

#[tokio::test]
async fn audit_events_of_an_http_call_carry_its_traceparent_trace_id() {
    use prost::Message;
    use twokey_proto::audit::v1::{Event, SignedEvent};

    let mut h = Harness::start().await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let request = http::Request::post(format!("{PREFIX}CreateRequest"))
        .header("host", "broker")
        .header("content-type", "application/json")
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .body(Full::new(Bytes::from(
            json!({ "accountId": PROD, "reason": "traced" }).to_string(),
        )))
        .unwrap();
    let a = send(&h, Some("alice"), request).await;
    assert_eq!(a.status, 200, "{a:?}");
    let id = a.body["request"]["requestId"].as_str().unwrap().to_owned();
    // A malformed traceparent never fails a call (a fresh trace id is made).
    let request = http::Request::post(format!("{PREFIX}WhoAmI"))
        .header("host", "broker")
        .header("content-type", "application/json")
        .header("traceparent", "garbage")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(send(&h, Some("alice"), request).await.status, 200);

    h.stop_broker().await;
    let db = twokey_runtime::durable::DurableDb::open(&h.config.data_dir).unwrap();
    let outbox = db.tree("outbox").unwrap();
    let created: Vec<Event> = outbox
        .iter()
        .filter_map(Result::ok)
        .filter_map(|(_, v)| SignedEvent::decode(v.as_ref()).ok())
        .filter_map(|s| Event::decode(s.event.as_slice()).ok())
        .filter(|e| e.action == "request.created" && e.request_id == id)
        .collect();
    assert_eq!(created.len(), 1, "{created:?}");
    assert_eq!(created[0].trace_id, trace_id);
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_at_the_handshake() {
    let h = Harness::start().await;
    // alice's SPIFFE ID, in the right trust domain, from a CA of its own.
    let rogue = twokey_testkit::pki::DevCa::new(TD).unwrap();
    let pki = pki_dir(h.dir.path());
    rogue
        .issue_user(TD, "alice")
        .unwrap()
        .write(&pki, "rogue")
        .unwrap();
    let tcp = TcpStream::connect(h.http_addr()).await.unwrap();
    let result = async {
        let mut tls = tls(&h, Some("rogue"), &[b"http/1.1"])
            .connect(ServerName::try_from("broker").unwrap(), tcp)
            .await?;
        // With TLS 1.3 the server's verdict arrives after the client's finish.
        tls.write_all(b"POST /twokey.broker.v1.BrokerService/WhoAmI HTTP/1.1\r\nhost: broker\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}").await?;
        tls.flush().await?;
        let mut buf = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    }
    .await;
    match result {
        Err(_) => {}
        Ok(answer) => assert!(
            answer.is_empty(),
            "the broker answered a rogue certificate: {}",
            String::from_utf8_lossy(&answer)
        ),
    }
    h.shutdown().await;
}

#[test]
fn the_openapi_subcommand_prints_the_checked_in_document() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_twokey-broker"))
        .arg("openapi")
        .output()
        .unwrap();
    assert!(out.status.success());
    let checked_in = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
    assert!(
        out.stdout == std::fs::read(checked_in).unwrap(),
        "docs/openapi.json is stale: run `cargo run -q -p twokey-broker -- openapi > docs/openapi.json`"
    );
}

#[tokio::test]
async fn watch_requests_streams_changes_as_server_sent_events() {
    let h = Harness::start().await;
    let io = TokioIo::new(connect(&h, Some("bob"), &[b"http/1.1"]).await);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let response = sender
        .send_request(post(
            &format!("{PREFIX}WatchRequests"),
            "application/json",
            json!({ "accountId": PROD }).to_string(),
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();

    let id = file(&h, "alice", PROD).await;
    let mut seen = String::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        while !seen.contains("\n\n") {
            let frame = body.frame().await.unwrap().unwrap();
            if let Ok(data) = frame.into_data() {
                seen.push_str(&String::from_utf8_lossy(&data));
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no event within 20 s: {seen:?}");
    let mut lines = seen.lines();
    assert_eq!(lines.next(), Some("event: request.created"), "{seen}");
    let data: Value =
        serde_json::from_str(lines.next().unwrap().strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(data["action"], "request.created");
    assert_eq!(data["request"]["requestId"], id.as_str());
    // Shutdown ends the stream rather than waiting for it.
    h.shutdown().await;
}

#[tokio::test]
async fn connect_timeout_ms_must_be_a_positive_number_of_at_most_ten_digits() {
    let h = Harness::start().await;
    let with_timeout = |value: &str| {
        http::Request::post(format!("{PREFIX}WhoAmI"))
            .header("host", "broker")
            .header("content-type", "application/json")
            .header("connect-timeout-ms", value)
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };
    for bad in ["abc", "0", "-5", "1.5", "12345678901", ""] {
        let a = send(&h, Some("alice"), with_timeout(bad)).await;
        refused(&a, 400, "invalid_argument", "Connect-Timeout-Ms");
    }
    for good in ["1500", "9999999999"] {
        let a = send(&h, Some("alice"), with_timeout(good)).await;
        assert_eq!(a.status, 200, "{good}: {a:?}");
        assert_eq!(a.body["identity"], "spiffe://twokey.local/user/alice");
    }
    h.shutdown().await;
}

#[tokio::test]
async fn without_a_certificate_a_large_upload_still_gets_its_401() {
    let h = Harness::start().await;
    let body = Bytes::from(format!(r#"{{"reason":"{}"}}"#, "x".repeat(200 * 1024)));
    let request = || {
        post(
            &format!("{PREFIX}CreateRequest"),
            "application/json",
            body.clone(),
        )
    };
    // HTTP/1.1: the whole body is read before the answer, so the client
    // gets the 401 instead of a broken pipe.
    let a = send(&h, None, request()).await;
    refused(&a, 401, "unauthenticated", "no client certificate");
    // Byte by byte: half the body sent, no answer yet (the server is still
    // reading); the rest sent, then the 401. A server that answered before
    // reading would have answered already and closed under the upload.
    let mut tls = connect(&h, None, &[b"http/1.1"]).await;
    let head = format!(
        "POST {PREFIX}CreateRequest HTTP/1.1\r\nhost: broker\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let (first, rest) = body.split_at(body.len() / 2);
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(first).await.unwrap();
    tls.flush().await.unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(500), tls.read(&mut byte)).await;
    assert!(
        early.is_err(),
        "the server answered before reading the body"
    );
    tls.write_all(rest).await.unwrap();
    tls.flush().await.unwrap();
    let mut answer = Vec::new();
    let status_line = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 1024];
        while !answer.windows(2).any(|w| w == b"\r\n") {
            match tls.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
        }
        String::from_utf8_lossy(&answer).into_owned()
    })
    .await
    .expect("an answer within 10 s");
    assert!(status_line.starts_with("HTTP/1.1 401"), "{status_line}");
    // A body past the message limit (1 MiB) is read and thrown away too:
    // with half of it sent the server is still reading (no answer), the
    // other half is written without a broken pipe, then the 401 comes.
    let big = vec![b'x'; 1024 * 1024];
    let (first, rest) = big.split_at(big.len() / 2);
    let mut tls = connect(&h, None, &[b"http/1.1"]).await;
    let head = format!(
        "POST {PREFIX}CreateRequest HTTP/1.1\r\nhost: broker\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        big.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(first).await.unwrap();
    tls.flush().await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(500), tls.read(&mut byte)).await;
    assert!(
        early.is_err(),
        "the server answered before reading a body past the limit"
    );
    tls.write_all(rest)
        .await
        .expect("the whole body is accepted, no broken pipe");
    tls.flush().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 1024];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") || !answer.ends_with(b"}") {
            match tls.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("an answer within 10 s");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(
        answer.ends_with(&format!(
            r#"{{"code":"unauthenticated","message":"{}"}}"#,
            "no client certificate: connect with mutual TLS and a certificate from the twokey CA"
        )),
        "{answer}"
    );
    // HTTP/2, the same.
    let io = TokioIo::new(connect(&h, None, &[b"h2"]).await);
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let response = sender.send_request(request()).await.unwrap();
    assert_eq!(response.status(), 401);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let answer: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(answer["code"], "unauthenticated", "{answer}");
    h.shutdown().await;
}

#[test]
fn every_grpc_code_has_the_connect_name_and_http_status_of_the_protocol_table() {
    use twokey_broker::http::connect_code;
    // The Connect protocol's "Error Codes" table, written out.
    let table = [
        (Code::Cancelled, "canceled", 499),
        (Code::Unknown, "unknown", 500),
        (Code::InvalidArgument, "invalid_argument", 400),
        (Code::DeadlineExceeded, "deadline_exceeded", 504),
        (Code::NotFound, "not_found", 404),
        (Code::AlreadyExists, "already_exists", 409),
        (Code::PermissionDenied, "permission_denied", 403),
        (Code::ResourceExhausted, "resource_exhausted", 429),
        (Code::FailedPrecondition, "failed_precondition", 400),
        (Code::Aborted, "aborted", 409),
        (Code::OutOfRange, "out_of_range", 400),
        (Code::Unimplemented, "unimplemented", 501),
        (Code::Internal, "internal", 500),
        (Code::Unavailable, "unavailable", 503),
        (Code::DataLoss, "data_loss", 500),
        (Code::Unauthenticated, "unauthenticated", 401),
    ];
    for (code, name, status) in table {
        let (n, s) = connect_code(code);
        assert_eq!((n, s.as_u16()), (name, status), "{code:?}");
    }
}

#[tokio::test]
async fn connect_protocol_version_when_sent_must_be_1() {
    let h = Harness::start().await;
    let with_version = |value: &'static str| {
        http::Request::post(format!("{PREFIX}WhoAmI"))
            .header("host", "broker")
            .header("content-type", "application/json")
            .header("connect-protocol-version", value)
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };
    let a = send(&h, Some("alice"), with_version("1")).await;
    assert_eq!(a.status, 200, "{a:?}");
    for bad in ["2", "v1", ""] {
        let a = send(&h, Some("alice"), with_version(bad)).await;
        refused(
            &a,
            400,
            "invalid_argument",
            "is not supported: send 1, or leave it out",
        );
    }
    h.shutdown().await;
}

/// A proto3 JSON timestamp exactly as the mapping writes it: UTC with `Z`,
/// fractional digits only when not zero.
fn assert_z_timestamp(value: &Value, expected: &str) {
    assert_eq!(value.as_str(), Some(expected), "{value}");
}

#[tokio::test]
async fn http_json_timestamps_are_z_normalized() {
    let h = Harness::start().await;
    // The harness clock starts at 1_900_000_000 s = 2030-03-17T17:46:40Z.
    let created = ok(
        &h,
        "alice",
        "CreateRequest",
        json!({ "accountId": PROD, "reason": "rotate root keys" }),
    )
    .await;
    assert_z_timestamp(&created["request"]["createdAt"], "2030-03-17T17:46:40Z");
    let id = created["request"]["requestId"].as_str().unwrap().to_owned();
    // A quarter of a second later: three fractional digits, still `Z`.
    h.advance(Duration::from_millis(250));
    let approved = ok(&h, "bob", "ApproveRequest", json!({ "requestId": id })).await;
    let request = &approved["request"];
    assert_z_timestamp(&request["createdAt"], "2030-03-17T17:46:40Z");
    assert_z_timestamp(&request["updatedAt"], "2030-03-17T17:46:40.250Z");
    assert_z_timestamp(
        &request["approvals"][0]["approvedAt"],
        "2030-03-17T17:46:40.250Z",
    );
    let got = ok(&h, "bob", "GetRequest", json!({ "requestId": id })).await;
    assert_z_timestamp(&got["request"]["updatedAt"], "2030-03-17T17:46:40.250Z");
    assert!(!got.to_string().contains("+00:00"), "{got}");
    h.shutdown().await;
}
