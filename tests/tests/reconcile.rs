//! End to end (issue 20): the three real binaries over mTLS on loopback with
//! audit's reconciler on. A flow releases a code; a CloudTrail log file with
//! a matching root sign-in is dropped into the trail directory and audit
//! writes `reconcile.matched`; a second sign-in that no release explains
//! becomes `reconcile.unexplained` in the log and reaches a webhook server
//! (a real HTTP server on 127.0.0.1) addressed to the account's admins; an
//! EventBridge post over mTLS from the allowed poster is taken and
//! reconciled, from another identity refused (403), without a client
//! certificate refused in the handshake; `twokey audit reconcile` finds the
//! same from the policy's mapping.

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use twokey_e2e::{System, user_id};
use twokey_proto::audit::v1::LogEntry;
use twokey_reconcile::fixture::{Record, write_log_file};
use twokey_testkit::local::{ACCOUNT, AWS_ACCOUNT_ID, RECONCILE_ID};

/// A webhook receiver on 127.0.0.1: every body it was sent.
async fn webhook() -> (String, Arc<Mutex<Vec<Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/twokey", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let bodies = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let bodies = bodies.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |r: http::Request<Incoming>| {
                    let bodies = bodies.clone();
                    async move {
                        let bytes = r.into_body().collect().await.unwrap().to_bytes();
                        if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
                            bodies.lock().unwrap().push(v);
                        }
                        let mut answer = http::Response::new(Full::new(Bytes::new()));
                        *answer.status_mut() = http::StatusCode::NO_CONTENT;
                        Ok::<_, Infallible>(answer)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (url, seen)
}

/// A TLS connector trusting the dev CA, presenting `name`'s certificate or none.
fn tls(sys: &System, name: Option<&str>) -> tokio_rustls::TlsConnector {
    twokey_testkit::pki::https_connector(&sys.local.dir.join("pki"), name, &[b"http/1.1"])
}

/// Posts one EventBridge event to audit's HTTP listener as `name`.
async fn post(sys: &System, name: Option<&str>, body: Vec<u8>) -> std::io::Result<(u16, Value)> {
    let addr = sys
        .local
        .audit_http
        .trim_start_matches("https://")
        .to_owned();
    let tcp = TcpStream::connect(addr).await?;
    let stream = tls(sys, name)
        .connect(ServerName::try_from("audit").unwrap(), tcp)
        .await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let request = http::Request::post("/v1/cloudtrail/events")
        .header("host", "audit")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = sender
        .send_request(request)
        .await
        .map_err(std::io::Error::other)?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

fn finding<'a>(log: &'a [LogEntry], action: &str, event_id: &str) -> Option<&'a LogEntry> {
    log.iter().find(|e| {
        e.event.as_ref().is_some_and(|ev| {
            ev.action == action
                && ev.source == RECONCILE_ID
                && ev.attributes.get("cloudtrail_event_id").map(String::as_str) == Some(event_id)
        })
    })
}

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn sign_ins_are_reconciled_with_released_codes_and_an_unexplained_one_alerts_the_admins() {
    let (url, alerts) = webhook().await;
    let sys = System::start_reconciling(Some(url));
    sys.enroll().await;
    let request = sys.verified_request("reconcile a root sign-in").await;
    sys.release_as_operator(&request.request_id)
        .await
        .expect("operator releases");
    // AWS saw the root sign-in with that code a moment later.
    let now = time::OffsetDateTime::now_utc();
    write_log_file(
        &sys.local.cloudtrail_dir,
        AWS_ACCOUNT_ID,
        "us-east-1",
        now,
        "first",
        [Record::console_login(AWS_ACCOUNT_ID, now).event_id("ev-matched")],
    )
    .unwrap();
    let log = sys
        .log_until(WAIT, |log| {
            finding(log, "reconcile.matched", "ev-matched").is_some()
        })
        .await;
    let matched = finding(&log, "reconcile.matched", "ev-matched")
        .expect("a reconcile.matched event in the log")
        .event
        .as_ref()
        .unwrap();
    assert_eq!(matched.account_id, ACCOUNT);
    assert_eq!(matched.request_id, request.request_id);
    assert_eq!(matched.attributes["aws_account_id"], AWS_ACCOUNT_ID);

    // A second sign-in, two hours earlier: no release explains it.
    let earlier = now - Duration::from_secs(2 * 3600);
    write_log_file(
        &sys.local.cloudtrail_dir,
        AWS_ACCOUNT_ID,
        "us-east-1",
        earlier,
        "second",
        [Record::console_login(AWS_ACCOUNT_ID, earlier).event_id("ev-unexplained")],
    )
    .unwrap();
    let log = sys
        .log_until(WAIT, |log| {
            finding(log, "reconcile.unexplained", "ev-unexplained").is_some()
        })
        .await;
    assert!(
        finding(&log, "reconcile.unexplained", "ev-unexplained").is_some(),
        "no reconcile.unexplained in the log"
    );
    // The alert reaches the webhook, addressed to each admin of the account.
    let deadline = tokio::time::Instant::now() + WAIT;
    let admins = [user_id("adam"), user_id("anna")];
    let to = loop {
        let to: Vec<String> = alerts
            .lock()
            .unwrap()
            .iter()
            .filter(|b| b["kind"] == "reconcile.unexplained")
            .map(|b| b["to"]["identity"].as_str().unwrap_or_default().to_owned())
            .collect();
        if to.len() >= admins.len() || tokio::time::Instant::now() >= deadline {
            break to;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut to_sorted = to.clone();
    to_sorted.sort();
    assert_eq!(to_sorted, admins, "webhook deliveries: {to:?}");
    let alert = alerts
        .lock()
        .unwrap()
        .iter()
        .find(|b| b["kind"] == "reconcile.unexplained")
        .cloned()
        .unwrap();
    assert_eq!(alert["account_id"], ACCOUNT);
    assert!(
        alert["text"].as_str().unwrap().contains(AWS_ACCOUNT_ID),
        "{alert}"
    );
    // A matched sign-in alerts nobody.
    assert!(
        !alerts
            .lock()
            .unwrap()
            .iter()
            .any(|b| b["kind"] == "reconcile.matched")
    );

    // EventBridge: another identity than the poster is refused, ...
    let posted = Record::console_login(AWS_ACCOUNT_ID, now)
        .event_id("ev-posted")
        .without_mfa();
    let (status, body) = post(&sys, Some("broker"), posted.eventbridge())
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "permission_denied");
    // ... a client without a certificate is refused in the handshake, ...
    let refused = post(&sys, None, posted.eventbridge()).await;
    assert!(
        refused.is_err(),
        "answered without a certificate: {refused:?}"
    );
    // ... and the poster's event is taken and reconciled.
    let (status, body) = post(&sys, Some("vault"), posted.eventbridge())
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    let log = sys
        .log_until(WAIT, |log| {
            finding(log, "reconcile.unprotected", "ev-posted").is_some()
        })
        .await;
    assert!(
        finding(&log, "reconcile.unprotected", "ev-posted").is_some(),
        "no reconcile.unprotected for the posted event"
    );
    // The auditor's offline check reads the mapping from the signed policy
    // (no --account) and agrees on the files.
    let output = std::process::Command::new(twokey_e2e::bin_dir().join("twokey"))
        .env("TWOKEY_CONFIG", &sys.local.config)
        .env("TWOKEY_PROFILE", "carol")
        .args([
            "audit",
            "reconcile",
            "--since",
            "3h",
            "--json",
            "--cloudtrail",
        ])
        .arg(&sys.local.cloudtrail_dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let offline: Value = serde_json::from_slice(&output.stdout).unwrap();
    let kinds: Vec<&str> = offline["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["unexplained", "matched"], "{offline}");
    // Each finding once.
    let findings = log
        .iter()
        .filter_map(|e| e.event.as_ref())
        .filter(|e| e.source == RECONCILE_ID)
        .count();
    assert_eq!(findings, 3);
}
