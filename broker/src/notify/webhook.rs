//! The webhook notifier: a JSON POST per message, signed as GitHub signs its
//! webhooks — `X-Twokey-Signature-256: sha256=<hex HMAC-SHA256(secret, body)>`
//! — for ticket systems and BPMs. It takes channel messages, and PIN
//! messages only when configured to carry PINs (`send_pins`).

use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::{Message, Notifier, NotifyError, Recipient, http};

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-twokey-signature-256";

/// Posts messages to one URL.
pub struct Webhook {
    url: String,
    secret: Zeroizing<Vec<u8>>,
    send_pins: bool,
    client: http::HttpClient,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &http::redact_url(&self.url))
            .field("send_pins", &self.send_pins)
            .finish_non_exhaustive()
    }
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

impl Webhook {
    /// A webhook posting to `url`, signing with `secret`.
    pub fn new(
        url: String,
        secret: Zeroizing<Vec<u8>>,
        send_pins: bool,
        client: http::HttpClient,
    ) -> Self {
        Self {
            url,
            secret,
            send_pins,
            client,
        }
    }

    fn body(&self, message: &Message) -> Zeroizing<Vec<u8>> {
        message.json_bytes()
    }
}

impl Notifier for Webhook {
    fn name(&self) -> &'static str {
        "webhook"
    }

    fn accepts(&self, message: &Message) -> bool {
        match message.to {
            Recipient::Channel => true,
            Recipient::Person { .. } => {
                (self.send_pins && message.pin.is_some()) || super::is_finding(message)
            }
        }
    }

    fn send<'a>(&'a self, message: &'a Message) -> BoxFuture<'a, Result<(), NotifyError>> {
        Box::pin(async move {
            let body = self.body(message);
            let headers = [
                ("content-type", "application/json".to_owned()),
                (SIGNATURE_HEADER, signature(&self.secret, &body)),
                ("x-twokey-event", message.kind.clone()),
                ("x-twokey-delivery", message.id.clone()),
            ];
            let response = self.client.post(&self.url, &headers, body.to_vec()).await?;
            if (200..300).contains(&response.status) {
                Ok(())
            } else {
                Err(NotifyError(format!(
                    "webhook {} answered HTTP {}",
                    http::redact_url(&self.url),
                    response.status
                )))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{notify::testserver::TestServer, pin::Pin};

    fn message(to: Recipient, pin: Option<&str>) -> Message {
        Message {
            id: "d1".into(),
            kind: if pin.is_some() {
                "pin"
            } else {
                "request.created"
            }
            .into(),
            request_id: "r1".into(),
            account_id: "aws-prod-root".into(),
            to,
            text: "New request".into(),
            pin: pin.map(Pin::from_text),
            at_ms: 5,
        }
    }

    #[tokio::test]
    async fn webhook_posts_json_signed_with_the_secret() {
        let server = TestServer::start(204, "").await;
        let hook = Webhook::new(
            format!("{}/hooks/twokey", server.url),
            Zeroizing::new(b"s3cret".to_vec()),
            false,
            http::HttpClient::new(None).unwrap(),
        );
        hook.send(&message(Recipient::Channel, None)).await.unwrap();
        let seen = server.requests();
        assert_eq!(seen.len(), 1);
        let req = &seen[0];
        assert_eq!(req.method, "POST");
        assert_eq!(req.path, "/hooks/twokey");
        assert_eq!(req.headers["content-type"], "application/json");
        assert_eq!(req.headers["x-twokey-event"], "request.created");
        assert_eq!(req.headers["x-twokey-delivery"], "d1");
        // Recompute as a receiver would, from the raw body.
        assert_eq!(
            req.headers[SIGNATURE_HEADER].to_str().unwrap(),
            signature(b"s3cret", &req.body)
        );
        assert!(
            req.headers[SIGNATURE_HEADER]
                .to_str()
                .unwrap()
                .starts_with("sha256=")
        );
        assert_ne!(
            signature(b"other", &req.body),
            signature(b"s3cret", &req.body)
        );
        let json: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(json["request_id"], "r1");
        assert_eq!(json["account_id"], "aws-prod-root");
        assert_eq!(json["kind"], "request.created");
        assert!(json.get("pin").is_none());
    }

    #[tokio::test]
    async fn webhook_posts_over_https_to_an_endpoint_of_a_configured_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        let server = TestServer::start_tls(200, "", &ca).await;
        assert!(server.url.starts_with("https://127.0.0.1:"));
        let untrusted = Webhook::new(
            format!("{}/h", server.url),
            Zeroizing::new(b"k".to_vec()),
            false,
            http::HttpClient::new(None).unwrap(),
        );
        let err = untrusted
            .send(&message(Recipient::Channel, None))
            .await
            .unwrap_err();
        assert!(err.0.contains("TLS"), "{err}");
        let trusted = Webhook::new(
            format!("{}/h", server.url),
            Zeroizing::new(b"k".to_vec()),
            false,
            http::HttpClient::new(Some(&ca)).unwrap(),
        );
        trusted
            .send(&message(Recipient::Channel, None))
            .await
            .unwrap();
        let seen = server.requests();
        assert_eq!(seen.len(), 1);
        assert_eq!(
            seen[0].headers[SIGNATURE_HEADER].to_str().unwrap(),
            signature(b"k", &seen[0].body)
        );
    }

    #[tokio::test]
    async fn webhook_takes_pins_only_when_configured_and_reports_http_errors() {
        let person = Recipient::Person {
            name: "alice".into(),
            identity: "spiffe://t/user/alice".into(),
            slack: None,
        };
        let off = Webhook::new(
            "http://127.0.0.1:1/x".into(),
            Zeroizing::new(vec![1]),
            false,
            http::HttpClient::new(None).unwrap(),
        );
        assert!(!off.accepts(&message(person.clone(), Some("123456"))));
        let server = TestServer::start(500, "oops").await;
        let on = Webhook::new(
            format!("{}/x", server.url),
            Zeroizing::new(vec![1]),
            true,
            http::HttpClient::new(None).unwrap(),
        );
        assert!(on.accepts(&message(person.clone(), Some("123456"))));
        let err = on.send(&message(person, Some("123456"))).await.unwrap_err();
        assert!(err.0.contains("HTTP 500"), "{err}");
        assert!(!err.0.contains("123456"));
    }
}
