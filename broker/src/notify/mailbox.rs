//! The mailbox notifier, a development notifier for local use and tests:
//! one JSON line per message appended to `<dir>/<recipient name>.jsonl`
//! (`channel.jsonl` for the channel), fsynced before it counts as delivered.
//! Files are mode 0600 in a 0700 directory: they carry PINs, but only while
//! they are live — a [`PIN_VOID`] message (the PIN was verified, or the
//! request locked, closed or expired) takes the PIN out of the requester's
//! file again. A file name is a validated policy name
//! ([`crate::policy::valid_name`]); any other name is refused, never
//! rewritten, so it can neither leave the directory nor share a file.

use std::{
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use futures::future::BoxFuture;
use zeroize::Zeroizing;

use super::{Message, Notifier, NotifyError, PIN_VOID, Recipient};
use crate::policy::valid_name;

/// The channel's file.
const CHANNEL_FILE: &str = "channel.jsonl";

/// Writes messages to files in a directory.
#[derive(Debug, Clone)]
pub struct Mailbox {
    dir: PathBuf,
    /// One change of the files at a time (appends and PIN removals).
    lock: Arc<Mutex<()>>,
}

impl Mailbox {
    /// A mailbox in `dir` (created if needed when the first message comes).
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            lock: Arc::default(),
        }
    }

    /// The file of `to`: `channel.jsonl`, or `<name>.jsonl` for a person
    /// whose name is a valid policy name (and not `channel`).
    fn file_name(to: &Recipient) -> Result<String, NotifyError> {
        match to {
            Recipient::Channel => Ok(CHANNEL_FILE.into()),
            Recipient::Person { name, identity, .. } => {
                if !valid_name(name) || format!("{name}.jsonl") == CHANNEL_FILE {
                    return Err(NotifyError(format!(
                        "the mailbox has no file for {identity}: its name {:?} is not a valid policy name (1 to 64 of a-z, 0-9, '.', '_', '-', not starting with '.', not \"channel\"); name it in the policy's [identities]",
                        name.chars().take(70).collect::<String>()
                    )));
                }
                Ok(format!("{name}.jsonl"))
            }
        }
    }

    fn io(&self) -> impl Fn(std::io::Error) -> NotifyError + '_ {
        |e| NotifyError(format!("mailbox {}: {e}", self.dir.display()))
    }

    fn write(&self, message: &Message) -> Result<(), NotifyError> {
        let name = Self::file_name(&message.to)?;
        let _one = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if message.kind == PIN_VOID {
            return self.remove_pins(&name, &message.request_id);
        }
        let io = self.io();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(&io)?;
        let mut bytes = message.json_bytes();
        bytes.push(b'\n');
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(self.dir.join(name))
            .map_err(&io)?;
        file.write_all(&bytes).map_err(&io)?;
        file.sync_data().map_err(io)
    }

    /// Takes every PIN for `request_id` out of the file `name`: the lines
    /// stay (a PIN was issued), their `pin` goes. The file is replaced
    /// atomically (a new file, synced, renamed over it, the directory
    /// synced); nothing to take out leaves it untouched.
    fn remove_pins(&self, name: &str, request_id: &str) -> Result<(), NotifyError> {
        let io = self.io();
        let path = self.dir.join(name);
        let text = match std::fs::read(&path) {
            Ok(bytes) => Zeroizing::new(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(e)),
        };
        let mut out = Zeroizing::new(Vec::with_capacity(text.len()));
        let mut removed = false;
        for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let parsed = serde_json::from_slice::<serde_json::Value>(line).ok();
            match parsed {
                Some(serde_json::Value::Object(mut fields))
                    if fields.get("request_id").and_then(|v| v.as_str()) == Some(request_id)
                        && fields.contains_key("pin") =>
                {
                    if let Some(serde_json::Value::String(mut pin)) = fields.remove("pin") {
                        zeroize::Zeroize::zeroize(&mut pin);
                    }
                    removed = true;
                    out.extend(
                        serde_json::to_vec(&fields)
                            .map_err(|e| NotifyError(format!("mailbox {}: {e}", path.display())))?,
                    );
                }
                _ => out.extend_from_slice(line),
            }
            out.push(b'\n');
        }
        if !removed {
            return Ok(());
        }
        // Valid names never start with '.': no mailbox file is this one.
        let fresh = self.dir.join(format!(".{name}.new"));
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&fresh)
            .map_err(&io)?;
        file.write_all(&out).map_err(&io)?;
        file.sync_data().map_err(&io)?;
        std::fs::rename(&fresh, &path).map_err(&io)?;
        sync_dir(&self.dir).map_err(io)
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
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

    fn message(name: &str, request_id: &str, kind: &str, pin: Option<&str>) -> Message {
        Message {
            id: uuid::Uuid::new_v4().to_string(),
            kind: kind.into(),
            request_id: request_id.into(),
            account_id: "a".into(),
            to: Recipient::Person {
                name: name.into(),
                identity: format!("spiffe://t/user/{name}"),
                slack: None,
            },
            text: "A PIN was issued".into(),
            pin: pin.map(Pin::from_text),
            at_ms: 1,
        }
    }

    #[tokio::test]
    async fn a_void_takes_that_requests_pins_out_of_the_file_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let mailbox = Mailbox::new(dir.path().join("mail"));
        // Nothing to take out yet: no file, no error.
        mailbox
            .send(&message("alice", "r1", PIN_VOID, None))
            .await
            .unwrap();
        assert!(!dir.path().join("mail/alice.jsonl").exists());
        for m in [
            message("alice", "r1", "pin", Some("4815162342")),
            message("alice", "r2", "pin", Some("2718281828")),
            message("alice", "r1", "pin", Some("1414213562")),
            message("alice", "r1", "request.approved", None),
        ] {
            mailbox.send(&m).await.unwrap();
        }
        let path = dir.path().join("mail/alice.jsonl");
        let before = std::fs::read_to_string(&path).unwrap();
        mailbox
            .send(&message("alice", "r1", PIN_VOID, None))
            .await
            .unwrap();
        let after = std::fs::read_to_string(&path).unwrap();
        assert!(!after.contains("4815162342"), "{after}");
        assert!(!after.contains("1414213562"), "{after}");
        assert!(after.contains("2718281828"), "another request's PIN went");
        let lines: Vec<serde_json::Value> = after
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let old: Vec<serde_json::Value> = before
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 4, "lines stay, only their PINs go");
        for (mut was, now) in old.into_iter().zip(&lines) {
            if was["request_id"] == "r1" {
                was.as_object_mut().unwrap().remove("pin");
            }
            assert_eq!(&was, now);
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<String> = std::fs::read_dir(dir.path().join("mail"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["alice.jsonl"], "no file left behind");
        // A second void changes nothing.
        mailbox
            .send(&message("alice", "r1", PIN_VOID, None))
            .await
            .unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), after);
    }

    #[tokio::test]
    async fn a_hostile_name_gets_no_file_inside_or_outside_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let mail = dir.path().join("mail");
        let mailbox = Mailbox::new(mail.clone());
        for name in [
            "../escaped",
            "..",
            ".",
            ".hidden",
            "a/b",
            "/tmp/abs",
            "a\\b",
            "",
            "Alice",
            "al ice",
            "channel",
            "al\0ice",
            &"a".repeat(65),
        ] {
            for kind in ["pin", PIN_VOID] {
                let err = mailbox
                    .send(&message(name, "r1", kind, Some("4815162342")))
                    .await
                    .unwrap_err();
                assert!(err.0.contains("not a valid policy name"), "{name:?}: {err}");
                assert!(!err.0.contains("4815162342"));
            }
        }
        // Nothing was written anywhere under the temporary directory.
        let mut stack = vec![dir.path().to_owned()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                assert!(path.is_dir(), "{} was written", path.display());
                stack.push(path);
            }
        }
        // A valid name still works.
        mailbox
            .send(&message("a.b-c_9", "r1", "pin", Some("4815162342")))
            .await
            .unwrap();
        assert!(mail.join("a.b-c_9.jsonl").exists());
    }
}
