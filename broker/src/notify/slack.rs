//! The Slack notifier: Web API `chat.postMessage` with a bot token. The PIN
//! goes as a direct message to the requester's member id (from the policy's
//! `[slack]` table); request filed, approved, denied and released go to the
//! channel. The base URL is configurable so tests use a local server.

use futures::future::BoxFuture;
use zeroize::Zeroizing;

use super::{Message, Notifier, NotifyError, Recipient, http};

/// Posts to Slack.
pub struct Slack {
    api_base: String,
    token: Zeroizing<String>,
    channel: Option<String>,
    client: http::HttpClient,
}

impl std::fmt::Debug for Slack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slack")
            .field("api_base", &self.api_base)
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

const CHANNEL_KINDS: &[&str] = &[
    "request.created",
    "request.approved",
    "request.denied",
    "code.released",
];

impl Slack {
    /// A Slack notifier; `api_base` like `https://slack.com/api`.
    pub fn new(
        api_base: String,
        token: Zeroizing<String>,
        channel: Option<String>,
        client: http::HttpClient,
    ) -> Self {
        Self {
            api_base: api_base.trim_end_matches('/').to_owned(),
            token,
            channel,
            client,
        }
    }

    fn target(&self, message: &Message) -> Option<String> {
        match &message.to {
            Recipient::Person { slack, .. }
                if message.pin.is_some() || super::is_finding(message) =>
            {
                slack.clone()
            }
            Recipient::Channel if CHANNEL_KINDS.contains(&message.kind.as_str()) => {
                self.channel.clone()
            }
            _ => None,
        }
    }
}

impl Notifier for Slack {
    fn name(&self) -> &'static str {
        "slack"
    }

    fn accepts(&self, message: &Message) -> bool {
        self.target(message).is_some()
    }

    fn send<'a>(&'a self, message: &'a Message) -> BoxFuture<'a, Result<(), NotifyError>> {
        Box::pin(async move {
            let channel = self
                .target(message)
                .ok_or_else(|| NotifyError("slack has no target for this message".into()))?;
            let text = Zeroizing::new(message.text_with_pin());
            let body = Zeroizing::new(
                serde_json::to_vec(&serde_json::json!({
                    "channel": channel,
                    "text": text.as_str(),
                    "unfurl_links": false,
                }))
                .expect("JSON values serialize"),
            );
            let headers = [
                ("content-type", "application/json; charset=utf-8".to_owned()),
                ("authorization", format!("Bearer {}", self.token.as_str())),
            ];
            let url = format!("{}/chat.postMessage", self.api_base);
            let response = self.client.post(&url, &headers, body.to_vec()).await?;
            if response.status == 429 {
                return Err(NotifyError(
                    "slack rate-limited the message (HTTP 429)".into(),
                ));
            }
            if !(200..300).contains(&response.status) {
                return Err(NotifyError(format!(
                    "slack answered HTTP {}",
                    response.status
                )));
            }
            let answer: serde_json::Value =
                serde_json::from_slice(&response.body).map_err(|_| {
                    NotifyError("slack answered with something that is not JSON".into())
                })?;
            if answer["ok"] == true {
                Ok(())
            } else {
                let error = answer["error"].as_str().unwrap_or("unknown error");
                Err(NotifyError(format!("slack refused the message: {error}")))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{notify::testserver::TestServer, pin::Pin};

    fn message(to: Recipient, kind: &str, pin: Option<&str>) -> Message {
        Message {
            id: "m".into(),
            kind: kind.into(),
            request_id: "r1".into(),
            account_id: "aws-prod-root".into(),
            to,
            text: "A PIN was issued for your request.".into(),
            pin: pin.map(Pin::from_text),
            at_ms: 1,
        }
    }

    fn alice(slack: Option<&str>) -> Recipient {
        Recipient::Person {
            name: "alice".into(),
            identity: "spiffe://t/user/alice".into(),
            slack: slack.map(Into::into),
        }
    }

    #[tokio::test]
    async fn slack_sends_the_pin_as_a_dm_and_news_to_the_channel() {
        let server = TestServer::start(200, r#"{"ok":true}"#).await;
        let slack = Slack::new(
            format!("{}/api/", server.url),
            Zeroizing::new("xoxb-test".into()),
            Some("#root-access".into()),
            http::HttpClient::new(None).unwrap(),
        );
        slack
            .send(&message(alice(Some("U0123")), "pin", Some("246810")))
            .await
            .unwrap();
        slack
            .send(&message(Recipient::Channel, "request.approved", None))
            .await
            .unwrap();
        let seen = server.requests();
        assert_eq!(seen.len(), 2);
        for req in &seen {
            assert_eq!(req.method, "POST");
            assert_eq!(req.path, "/api/chat.postMessage");
            assert_eq!(req.headers["authorization"], "Bearer xoxb-test");
            assert_eq!(
                req.headers["content-type"],
                "application/json; charset=utf-8"
            );
        }
        let dm: serde_json::Value = serde_json::from_slice(&seen[0].body).unwrap();
        assert_eq!(dm["channel"], "U0123");
        assert!(dm["text"].as_str().unwrap().contains("246810"));
        let news: serde_json::Value = serde_json::from_slice(&seen[1].body).unwrap();
        assert_eq!(news["channel"], "#root-access");
        assert!(!news["text"].as_str().unwrap().contains("246810"));
    }

    #[tokio::test]
    async fn slack_skips_people_without_a_member_id_and_reports_api_errors() {
        let server = TestServer::start(200, r#"{"ok":false,"error":"channel_not_found"}"#).await;
        let slack = Slack::new(
            server.url.clone(),
            Zeroizing::new("t".into()),
            None,
            http::HttpClient::new(None).unwrap(),
        );
        assert!(!slack.accepts(&message(alice(None), "pin", Some("1"))));
        assert!(!slack.accepts(&message(Recipient::Channel, "request.created", None)));
        assert!(!slack.accepts(&message(alice(Some("U1")), "request.denied", None)));
        let err = slack
            .send(&message(alice(Some("U1")), "pin", Some("13579")))
            .await
            .unwrap_err();
        assert!(err.0.contains("channel_not_found"), "{err}");
        assert!(!err.0.contains("13579"));
    }
}
