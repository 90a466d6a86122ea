//! The mailbox notifier, for local use and tests: one JSON line per message
//! appended to `<dir>/<recipient name>.jsonl` (`channel.jsonl` for the
//! channel), fsynced before it counts as delivered. Files are mode 0600 in
//! a 0700 directory: they carry PINs.

use std::{
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::PathBuf,
};

use futures::future::BoxFuture;

use super::{Message, Notifier, NotifyError, Recipient};

/// Writes messages to files in a directory.
#[derive(Debug, Clone)]
pub struct Mailbox {
    dir: PathBuf,
}

impl Mailbox {
    /// A mailbox in `dir` (created if needed when the first message comes).
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn file_name(to: &Recipient) -> String {
        match to {
            Recipient::Channel => "channel.jsonl".into(),
            Recipient::Person { name, .. } => {
                let safe: String = name
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
                format!("{}.jsonl", safe.trim_start_matches('.'))
            }
        }
    }

    fn write(&self, message: &Message) -> Result<(), NotifyError> {
        let io = |e: std::io::Error| NotifyError(format!("mailbox {}: {e}", self.dir.display()));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io)?;
        let mut bytes = message.json_bytes();
        bytes.push(b'\n');
        let path = self.dir.join(Self::file_name(&message.to));
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
        file.sync_data().map_err(io)
    }
}

impl Notifier for Mailbox {
    fn name(&self) -> &'static str {
        "mailbox"
    }

    fn accepts(&self, _: &Message) -> bool {
        true
    }

    fn send<'a>(&'a self, message: &'a Message) -> BoxFuture<'a, Result<(), NotifyError>> {
        Box::pin(async move {
            let this = self.clone();
            let message = message.clone();
            tokio::task::spawn_blocking(move || this.write(&message))
                .await
                .map_err(|e| NotifyError(e.to_string()))?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pin::Pin;

    #[tokio::test]
    async fn each_recipient_gets_its_own_file_of_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let mailbox = Mailbox::new(dir.path().join("mail"));
        let mut m = Message {
            id: "1".into(),
            kind: "pin".into(),
            request_id: "r".into(),
            account_id: "a".into(),
            to: Recipient::Person {
                name: "alice".into(),
                identity: "spiffe://t/user/alice".into(),
                slack: None,
            },
            text: "A PIN was issued".into(),
            pin: Some(Pin::from_text("123456")),
            at_ms: 1,
        };
        mailbox.send(&m).await.unwrap();
        m.to = Recipient::Channel;
        m.pin = None;
        m.kind = "request.created".into();
        mailbox.send(&m).await.unwrap();
        let alice = std::fs::read_to_string(dir.path().join("mail/alice.jsonl")).unwrap();
        let line: serde_json::Value = serde_json::from_str(alice.trim()).unwrap();
        assert_eq!(line["pin"], "123456");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("mail/alice.jsonl"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let channel = std::fs::read_to_string(dir.path().join("mail/channel.jsonl")).unwrap();
        assert!(!channel.contains("123456"));
        assert_eq!(channel.lines().count(), 1);
    }
}
