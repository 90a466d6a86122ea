//! The mailbox notifier, a development notifier for local use and tests:
//! one JSON line per message appended to `<dir>/<recipient name>.jsonl`
//! (`channel.jsonl` for the channel), fsynced before it counts as delivered.
//! Files are mode 0600 in a 0700 directory: they carry PINs, but only while
//! they are live — a [`PIN_VOID`] message (the PIN was verified, or the
//! request locked, closed or expired) takes the PIN out of the requester's
//! file again. It is overwritten in place with a line of the same length
//! (the PIN field gone, spaces before the newline), so every other byte
//! keeps its offset for readers that tail the file; the mailbox remembers
//! where it wrote each PIN, and scans the file only for PINs written before
//! it started. A file name is a validated policy name
//! ([`crate::policy::valid_name`]); any other name is refused, never
//! rewritten, so it can neither leave the directory nor share a file.

use std::{
    collections::HashMap,
    io::Write,
    os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use futures::future::BoxFuture;
use zeroize::Zeroizing;

use super::{Message, Notifier, NotifyError, PIN_VOID, Recipient};
use crate::policy::valid_name;

/// The channel's file.
const CHANNEL_FILE: &str = "channel.jsonl";

/// Where a line holding a PIN is: its byte offset and length (with `\n`).
type Span = (u64, usize);

/// The lines a mailbox wrote with a PIN, by (file name, request id).
type Written = HashMap<(String, String), Vec<Span>>;

/// Writes messages to files in a directory.
#[derive(Debug, Clone)]
pub struct Mailbox {
    dir: PathBuf,
    /// The lines this mailbox wrote with a PIN, by (file name, request id);
    /// its lock also makes one change of the files at a time.
    pins: Arc<Mutex<Written>>,
}

/// `line` (with its `\n`) without its `pin` field, padded with spaces to the
/// same length, if it is a message about `request_id` that holds a PIN.
fn without_pin(line: &[u8], request_id: &str) -> Option<Zeroizing<Vec<u8>>> {
    let body = line.strip_suffix(b"\n")?;
    let serde_json::Value::Object(mut fields) = serde_json::from_slice(body).ok()? else {
        return None;
    };
    if fields.get("request_id").and_then(|v| v.as_str()) != Some(request_id) {
        return None;
    }
    let serde_json::Value::String(mut pin) = fields.remove("pin")? else {
        return None;
    };
    zeroize::Zeroize::zeroize(&mut pin);
    let mut out = Zeroizing::new(serde_json::to_vec(&fields).ok()?);
    if out.len() > body.len() {
        return None;
    }
    out.resize(body.len(), b' ');
    out.push(b'\n');
    Some(out)
}

impl Mailbox {
    /// A mailbox in `dir` (created if needed when the first message comes).
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            pins: Arc::default(),
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
        let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        if message.kind == PIN_VOID {
            let key = (name, message.request_id.clone());
            let known = pins.remove(&key);
            return self.remove_pins(&key.0, &key.1, known);
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
            .open(self.dir.join(&name))
            .map_err(&io)?;
        // The only writer (the lock above): the line goes at the end.
        let offset = file.metadata().map_err(&io)?.len();
        file.write_all(&bytes).map_err(&io)?;
        file.sync_data().map_err(io)?;
        if message.pin.is_some() {
            pins.entry((name, message.request_id.clone()))
                .or_default()
                .push((offset, bytes.len()));
        }
        Ok(())
    }

    /// Every line of `file` about `request_id` that holds a PIN.
    fn scan(file: &std::fs::File, request_id: &str) -> std::io::Result<Vec<Span>> {
        let mut text = Zeroizing::new(Vec::new());
        std::io::Read::read_to_end(&mut &*file, &mut text)?;
        let mut spans = Vec::new();
        let mut offset = 0u64;
        for line in text.split_inclusive(|b| *b == b'\n') {
            if without_pin(line, request_id).is_some() {
                spans.push((offset, line.len()));
            }
            offset += line.len() as u64;
        }
        Ok(spans)
    }

    /// Takes every PIN for `request_id` out of the file `name`, each line
    /// overwritten in place with one of the same length: at the spans this
    /// mailbox wrote (`known`), or where a scan finds them (PINs written
    /// before it started, or spans that no longer hold one).
    fn remove_pins(
        &self,
        name: &str,
        request_id: &str,
        known: Option<Vec<Span>>,
    ) -> Result<(), NotifyError> {
        let io = self.io();
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.dir.join(name))
        {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(e)),
        };
        let mut edits = Vec::new();
        let mut stale = known.is_none();
        for (offset, len) in known.unwrap_or_default() {
            let mut line = Zeroizing::new(vec![0; len]);
            match file.read_exact_at(&mut line, offset) {
                Ok(()) => match without_pin(&line, request_id) {
                    Some(new) => edits.push((offset, new)),
                    None => stale = true,
                },
                Err(_) => stale = true,
            }
        }
        if stale {
            edits.clear();
            for (offset, len) in Self::scan(&file, request_id).map_err(&io)? {
                let mut line = Zeroizing::new(vec![0; len]);
                file.read_exact_at(&mut line, offset).map_err(&io)?;
                if let Some(new) = without_pin(&line, request_id) {
                    edits.push((offset, new));
                }
            }
        }
        if edits.is_empty() {
            return Ok(());
        }
        for (offset, new) in &edits {
            file.write_all_at(new, *offset).map_err(&io)?;
        }
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
        assert_eq!(after.len(), before.len(), "every byte keeps its offset");
        for (was, now) in before.lines().zip(after.lines()) {
            assert_eq!(was.len(), now.len());
        }
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
        // A PIN written before a restart is found by a scan.
        let restarted = Mailbox::new(dir.path().join("mail"));
        restarted
            .send(&message("alice", "r2", PIN_VOID, None))
            .await
            .unwrap();
        let last = std::fs::read_to_string(&path).unwrap();
        assert!(!last.contains("2718281828"), "{last}");
        assert_eq!(last.len(), before.len());
        // Appends after a removal land after it, whole.
        restarted
            .send(&message("alice", "r3", "pin", Some("3141592653")))
            .await
            .unwrap();
        let grown = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(grown.lines().last().unwrap()).unwrap();
        assert_eq!(v["pin"], "3141592653");
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
