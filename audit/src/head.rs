//! The largest tree head this log ever signed, kept outside sled so that a
//! store that lost its tail (a corrupt sled record dropped on reopen, a
//! rolled-back data directory, entries deleted by hand) cannot make the log
//! sign a smaller tree unnoticed.
//!
//! The file (`<data dir>/log/checkpoint`, the C2SP `tlog-tiles` checkpoint
//! next to the tiles) holds the signed note of that checkpoint, verbatim:
//! origin, size and root inside, readable by any signed-note tool. It is
//! replaced atomically (temporary file, `fsync`, `rename`, `fsync` of the
//! directory) before a checkpoint of a larger size is returned to anyone,
//! and only then; a checkpoint of a size already persisted needs no write.
//! Earlier versions kept it in `<data dir>/tree-head`; loading moves that
//! file (checked first) to its new place.

use std::{
    fs::{self, File},
    io::Write,
    path::{Path, PathBuf},
};

use crate::{checkpoint::NoteVerifier, error::AuditError, merkle::Hash};

/// The file of the tree head in the data directory.
pub const FILE_NAME: &str = "log/checkpoint";

/// Where earlier versions kept it.
pub const LEGACY_FILE_NAME: &str = "tree-head";

/// A signed tree head: size, root and the signed note that says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeHead {
    /// Entries covered.
    pub size: u64,
    /// Their root hash.
    pub root: Hash,
    /// The signed note (a C2SP checkpoint).
    pub note: String,
}

impl TreeHead {
    /// The root in hex, as errors and the CLI show it.
    pub fn root_hex(&self) -> String {
        hex::encode(self.root)
    }
}

/// The largest signed tree head: where it is persisted (if anywhere) and
/// its value.
#[derive(Debug, Default)]
pub struct TreeHeadFile {
    path: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    head: Option<TreeHead>,
    /// The size of the head in the file (0 for none): with a journal the
    /// head is durable in the journal first and reaches the file later.
    persisted: u64,
    /// Whether the file was absent when loaded.
    missing: bool,
}

impl TreeHeadFile {
    /// A head kept in memory only (tests of the domain, tools).
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Loads `<dir>/tree-head`, checking that it is a checkpoint signed by
    /// `verifier` (this log's own key). A missing file is not an error:
    /// [`TreeHeadFile::was_missing`] says so and the log decides.
    pub fn load(dir: &Path, verifier: &NoteVerifier) -> Result<Self, AuditError> {
        let path = dir.join(FILE_NAME);
        let legacy = dir.join(LEGACY_FILE_NAME);
        if !path.exists() && legacy.exists() {
            Self::check(&legacy, verifier)?;
            let moved = fs::read(&legacy)
                .and_then(|note| {
                    fs::create_dir_all(path.parent().unwrap_or(dir))?;
                    write_atomically(&path, &note)
                })
                .and_then(|()| fs::remove_file(&legacy));
            moved.map_err(|e| {
                AuditError::HeadFile(format!(
                    "cannot move the tree-head file {} to {}: {e}; make the data directory                      writable by the audit service",
                    legacy.display(),
                    path.display()
                ))
            })?;
        }
        let mut loaded = Self::check(&path, verifier)?;
        loaded.data_dir = Some(dir.to_owned());
        Ok(loaded)
    }

    /// Loads the head kept at `path`.
    fn check(path: &Path, verifier: &NoteVerifier) -> Result<Self, AuditError> {
        let path = path.to_owned();
        let note = match fs::read_to_string(&path) {
            Ok(note) => note,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self {
                    path: Some(path),
                    data_dir: None,
                    head: None,
                    persisted: 0,
                    missing: true,
                });
            }
            Err(e) => {
                return Err(AuditError::HeadFile(format!(
                    "cannot read the tree-head file {}: {e}; make it readable by the audit service",
                    path.display()
                )));
            }
        };
        let checkpoint = verifier.open_checkpoint(&note).map_err(|e| {
            AuditError::HeadFile(format!(
                "the tree-head file {} is not a checkpoint signed by this log's key {verifier}: {e}. \
                 It was altered, or the checkpoint key or origin changed. Restore the file from a \
                 backup; if the key or origin was changed on purpose, move the file away (the log \
                 then trusts its store as it is and writes a new one)",
                path.display()
            ))
        })?;
        Ok(Self {
            path: Some(path),
            data_dir: None,
            head: Some(TreeHead {
                size: checkpoint.size,
                root: checkpoint.root,
                note,
            }),
            persisted: checkpoint.size,
            missing: false,
        })
    }

    /// The largest signed tree head known, if any.
    pub fn head(&self) -> Option<&TreeHead> {
        self.head.as_ref()
    }

    /// The persisted size (0 with no head).
    pub fn size(&self) -> u64 {
        self.head.as_ref().map_or(0, |h| h.size)
    }

    /// Whether a file was expected but absent when loaded.
    pub fn was_missing(&self) -> bool {
        self.missing
    }

    /// Where the head is persisted, if anywhere.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The data directory the head was loaded from, if any.
    pub fn data_dir(&self) -> Option<&Path> {
        self.data_dir.as_deref()
    }

    /// A description of where the head is kept, for messages.
    pub fn location(&self) -> String {
        self.path
            .as_ref()
            .map_or_else(|| "memory".to_owned(), |p| p.display().to_string())
    }

    /// Records `head` if it is larger than the one kept, writing the file
    /// durably first. Returns whether anything was written.
    pub fn record(&mut self, head: TreeHead) -> Result<bool, AuditError> {
        if head.size == 0 || self.head.as_ref().is_some_and(|h| h.size >= head.size) {
            return Ok(false);
        }
        if let Some(path) = &self.path {
            write_atomically(path, head.note.as_bytes()).map_err(|e| {
                AuditError::Store(format!(
                    "cannot write the tree head of {} entries to {}: {e}; free space or fix the \
                     permissions of the data directory (no checkpoint of that size is served \
                     until it is written)",
                    head.size,
                    path.display()
                ))
            })?;
        }
        self.persisted = head.size;
        self.head = Some(head);
        self.missing = false;
        Ok(true)
    }

    /// Records `head` if it is larger than the one kept, without writing
    /// the file: the caller made it durable in the journal
    /// ([`crate::journal`]) and writes the file later
    /// ([`TreeHeadFile::persisted`]).
    /// Returns whether it was larger.
    pub fn record_journaled(&mut self, head: TreeHead) -> bool {
        if head.size == 0 || self.head.as_ref().is_some_and(|h| h.size >= head.size) {
            return false;
        }
        self.head = Some(head);
        self.missing = false;
        true
    }

    /// The size of the head in the file (0 for none).
    pub fn persisted_size(&self) -> u64 {
        self.persisted
    }

    /// The file now holds a head of `size` entries.
    pub fn persisted(&mut self, size: u64) {
        self.persisted = self.persisted.max(size);
    }
}

/// Replaces `path` with `bytes`: a temporary file in the same directory,
/// synced, renamed over `path`, and the directory synced, so that after a
/// crash the file holds either the old or the new content, durably.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    let tmp = dir.join(name);
    fs::create_dir_all(dir)?;
    {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{Checkpoint, CheckpointSigner};
    use ed25519_dalek::SigningKey;

    fn signer() -> CheckpointSigner {
        CheckpointSigner::new("t/audit", SigningKey::from_bytes(&[3; 32])).unwrap()
    }

    fn head(size: u64) -> TreeHead {
        let root = [size as u8; 32];
        let note = signer()
            .sign(&Checkpoint {
                origin: "t/audit".into(),
                size,
                root,
            })
            .unwrap();
        TreeHead { size, root, note }
    }

    #[test]
    fn only_a_larger_head_is_written_and_it_survives_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let verifier = signer().verifier();
        let mut file = TreeHeadFile::load(dir.path(), &verifier).unwrap();
        assert!(file.was_missing());
        assert!(file.head().is_none());
        assert!(file.record(head(5)).unwrap());
        assert!(!file.record(head(5)).unwrap(), "same size: no write");
        assert!(!file.record(head(3)).unwrap(), "smaller: never written");
        let on_disk = fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        assert_eq!(on_disk, head(5).note);
        assert!(!dir.path().join("log/checkpoint.tmp").exists());

        let again = TreeHeadFile::load(dir.path(), &verifier).unwrap();
        assert!(!again.was_missing());
        assert_eq!(again.head(), Some(&head(5)));
        assert_eq!(again.size(), 5);
    }

    #[test]
    fn the_tree_head_file_of_earlier_versions_moves_to_log_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let verifier = signer().verifier();
        fs::write(dir.path().join(LEGACY_FILE_NAME), head(7).note).unwrap();
        let file = TreeHeadFile::load(dir.path(), &verifier).unwrap();
        assert_eq!(file.head(), Some(&head(7)));
        assert!(!dir.path().join(LEGACY_FILE_NAME).exists());
        assert_eq!(
            fs::read_to_string(dir.path().join(FILE_NAME)).unwrap(),
            head(7).note
        );
        // One that is not this log's is refused, and left where it is.
        let other = tempfile::tempdir().unwrap();
        let mut note = head(9).note;
        note = note.replacen("\n9\n", "\n10\n", 1);
        fs::write(other.path().join(LEGACY_FILE_NAME), &note).unwrap();
        let err = TreeHeadFile::load(other.path(), &verifier).unwrap_err();
        assert!(
            err.to_string().contains("is not a checkpoint signed"),
            "{err}"
        );
        assert!(other.path().join(LEGACY_FILE_NAME).exists());
        assert!(!other.path().join(FILE_NAME).exists());
    }

    #[test]
    fn a_head_file_not_signed_by_this_log_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("log")).unwrap();
        let mut note = head(9).note;
        note = note.replacen("\n9\n", "\n10\n", 1);
        fs::write(dir.path().join(FILE_NAME), note).unwrap();
        let err = TreeHeadFile::load(dir.path(), &signer().verifier())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is not a checkpoint signed by this log's key"),
            "{err}"
        );
        assert!(err.contains("move the file away"), "{err}");

        let other = CheckpointSigner::new("t/audit", SigningKey::from_bytes(&[4; 32])).unwrap();
        fs::write(dir.path().join(FILE_NAME), head(9).note).unwrap();
        let err = TreeHeadFile::load(dir.path(), &other.verifier())
            .unwrap_err()
            .to_string();
        assert!(err.contains("checkpoint key or origin changed"), "{err}");
    }
}
