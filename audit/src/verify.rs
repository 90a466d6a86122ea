//! Offline verification of an exported log (`twokey audit verify`): every
//! signature, every source's sequence 1, 2, 3… without gaps or repeats,
//! indices 0..n, and the Merkle root against a signed checkpoint. Also the
//! export format: JSON lines, one proto3-JSON `LogEntry` per line.
//!
//! The Merkle leaf covers the signed event; `received_at` is the audit
//! service's own note and is not covered by any signature.

use std::{
    collections::BTreeMap,
    io::{BufRead, Write},
};

use ed25519_dalek::VerifyingKey;
use prost::Message;
use twokey_proto::audit::v1::{Event, LogEntry};
use twokey_runtime::events::verify_event;

use crate::{
    checkpoint::{CheckpointError, NoteVerifier},
    merkle::{self, Hash},
};

/// What a successful verification covered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Entries checked.
    pub entries: u64,
    /// The last sequence number of each source.
    pub last_seq: BTreeMap<String, u64>,
    /// Root hash of all entries.
    pub root: Hash,
    /// Size of the checkpoint the entries were checked against.
    pub checkpoint_size: Option<u64>,
}

/// The first thing found wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// An entry is wrong in itself or in its place.
    #[error("entry {position} (index {index}, source {source_id:?}, seq {seq}): {problem}")]
    Entry {
        /// Its position in the export, from 0.
        position: u64,
        /// The index it claims.
        index: u64,
        /// The source it names.
        source_id: String,
        /// The sequence number it claims.
        seq: u64,
        /// What is wrong.
        problem: String,
    },
    /// The checkpoint does not verify.
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
    /// Fewer entries than the checkpoint covers.
    #[error(
        "the log has {have} entries but the signed checkpoint covers {signed}: entries were dropped"
    )]
    Truncated {
        /// Entries present.
        have: u64,
        /// Entries the checkpoint covers.
        signed: u64,
    },
    /// The entries do not hash to the signed root.
    #[error(
        "the first {size} entries do not hash to the signed root: an entry was altered, inserted or removed"
    )]
    RootMismatch {
        /// The checkpoint size.
        size: u64,
    },
    /// A line of an export does not parse.
    #[error("export line {line}: {why}")]
    Export {
        /// Line number, from 1.
        line: u64,
        /// Why.
        why: String,
    },
}

/// Checks `entries` (a whole log, in order) against the sources' keys and,
/// when given, a signed checkpoint `(note, verifier)`.
pub fn verify_log(
    entries: &[LogEntry],
    sources: &BTreeMap<String, VerifyingKey>,
    checkpoint: Option<(&str, &NoteVerifier)>,
) -> Result<VerifyReport, VerifyError> {
    let mut last_seq: BTreeMap<String, u64> = BTreeMap::new();
    let mut leaves = Vec::with_capacity(entries.len());
    for (position, entry) in entries.iter().enumerate() {
        let position = position as u64;
        let claimed = entry
            .signed_event
            .as_ref()
            .and_then(|s| Event::decode(s.event.as_slice()).ok());
        let fail = |problem: String| VerifyError::Entry {
            position,
            index: entry.index,
            source_id: claimed
                .as_ref()
                .map(|e| e.source.clone())
                .unwrap_or_default(),
            seq: claimed.as_ref().map_or(0, |e| e.seq),
            problem,
        };
        if entry.index != position {
            return Err(fail(format!("index out of place: expected {position}")));
        }
        let signed = entry
            .signed_event
            .as_ref()
            .ok_or_else(|| fail("no signed event".into()))?;
        let claimed_ref = claimed
            .as_ref()
            .ok_or_else(|| fail("signed event bytes do not decode".into()))?;
        let key = sources
            .get(&claimed_ref.source)
            .ok_or_else(|| fail("unknown source: no key given for it".into()))?;
        let event =
            verify_event(signed, key).map_err(|_| fail("signature does not verify".into()))?;
        if entry.event.as_ref() != Some(&event) {
            return Err(fail(
                "the readable event differs from the signed event".into(),
            ));
        }
        let last = last_seq.entry(event.source.clone()).or_insert(0);
        if event.seq != *last + 1 {
            let what = if event.seq <= *last {
                "repeats or goes back"
            } else {
                "skips"
            };
            return Err(fail(format!(
                "sequence {what}: previous seq of this source is {last}"
            )));
        }
        *last = event.seq;
        leaves.push(merkle::leaf_hash(&signed.encode_to_vec()));
    }
    let mut checkpoint_size = None;
    if let Some((note, verifier)) = checkpoint {
        let cp = verifier.open_checkpoint(note)?;
        let have = leaves.len() as u64;
        if cp.size > have {
            return Err(VerifyError::Truncated {
                have,
                signed: cp.size,
            });
        }
        if merkle::root(&leaves[..cp.size as usize]) != cp.root {
            return Err(VerifyError::RootMismatch { size: cp.size });
        }
        checkpoint_size = Some(cp.size);
    }
    Ok(VerifyReport {
        entries: leaves.len() as u64,
        last_seq,
        root: merkle::root(&leaves),
        checkpoint_size,
    })
}

/// The Merkle leaf hash of a log entry: the hash of its `SignedEvent`,
/// encoded canonically, as the log computed it; `None` without one.
pub fn entry_leaf_hash(entry: &LogEntry) -> Option<merkle::Hash> {
    entry
        .signed_event
        .as_ref()
        .map(|s| merkle::leaf_hash(&s.encode_to_vec()))
}

/// One export line: the proto3-JSON form of `entry`, without a newline.
pub fn export_line(entry: &LogEntry) -> String {
    serde_json::to_string(entry).expect("log entries always serialise")
}

/// Writes `entries` as JSON lines.
pub fn write_export<'a>(
    out: &mut impl Write,
    entries: impl IntoIterator<Item = &'a LogEntry>,
) -> std::io::Result<()> {
    for entry in entries {
        writeln!(out, "{}", export_line(entry))?;
    }
    Ok(())
}

/// Reads a JSON-lines export; blank lines are skipped.
pub fn read_export(input: impl BufRead) -> Result<Vec<LogEntry>, VerifyError> {
    let mut entries = Vec::new();
    for (n, line) in input.lines().enumerate() {
        let line_no = n as u64 + 1;
        let line = line.map_err(|e| VerifyError::Export {
            line: line_no,
            why: e.to_string(),
        })?;
        if line.trim().is_empty() {
            continue;
        }
        entries.push(
            serde_json::from_str(&line).map_err(|e| VerifyError::Export {
                line: line_no,
                why: format!("not a LogEntry in proto3 JSON: {e}"),
            })?,
        );
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{Checkpoint, CheckpointSigner};
    use ed25519_dalek::SigningKey;
    use std::time::{Duration, SystemTime};
    use twokey_runtime::{
        SpiffeId,
        events::{EventDraft, EventSigner},
        time::to_timestamp,
    };

    struct Log {
        entries: Vec<LogEntry>,
        sources: BTreeMap<String, VerifyingKey>,
        signer: CheckpointSigner,
    }

    fn log(n: u64) -> Log {
        let signers = [
            EventSigner::new(
                SpiffeId::parse("spiffe://t/svc/vault").unwrap(),
                SigningKey::from_bytes(&[1; 32]),
            ),
            EventSigner::new(
                SpiffeId::parse("spiffe://t/svc/broker").unwrap(),
                SigningKey::from_bytes(&[2; 32]),
            ),
        ];
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut seqs = [0u64; 2];
        let entries = (0..n)
            .map(|index| {
                let which = (index % 3 == 0) as usize;
                seqs[which] += 1;
                let at = start + Duration::from_secs(index);
                let event = EventDraft::new("spiffe://t/user/alice", "request.approved")
                    .account("aws-prod")
                    .request("r-1")
                    .attr("state", "APPROVED")
                    .into_event(signers[which].source(), seqs[which], at);
                LogEntry {
                    index,
                    signed_event: Some(signers[which].sign(&event)),
                    event: Some(event),
                    received_at: Some(to_timestamp(at + Duration::from_millis(5))),
                }
            })
            .collect();
        let sources = signers
            .iter()
            .map(|s| (s.source().to_string(), s.verifying_key()))
            .collect();
        let signer = CheckpointSigner::new("t/audit", SigningKey::from_bytes(&[3; 32])).unwrap();
        Log {
            entries,
            sources,
            signer,
        }
    }

    impl Log {
        fn checkpoint(&self, size: u64) -> String {
            let leaves: Vec<Hash> = self.entries[..size as usize]
                .iter()
                .map(|e| merkle::leaf_hash(&e.signed_event.as_ref().unwrap().encode_to_vec()))
                .collect();
            self.signer
                .sign(&Checkpoint {
                    origin: "t/audit".into(),
                    size,
                    root: merkle::root(&leaves),
                })
                .unwrap()
        }
    }

    #[test]
    fn an_intact_log_verifies_against_its_checkpoint() {
        let l = log(9);
        let note = l.checkpoint(9);
        let report =
            verify_log(&l.entries, &l.sources, Some((&note, &l.signer.verifier()))).unwrap();
        assert_eq!(report.entries, 9);
        assert_eq!(report.checkpoint_size, Some(9));
        assert_eq!(report.last_seq["spiffe://t/svc/vault"], 6);
        assert_eq!(report.last_seq["spiffe://t/svc/broker"], 3);
        // An earlier checkpoint covers a prefix.
        let early = l.checkpoint(4);
        verify_log(&l.entries, &l.sources, Some((&early, &l.signer.verifier()))).unwrap();
    }

    #[test]
    fn one_flipped_byte_anywhere_in_a_stored_entry_is_detected() {
        let l = log(6);
        let note = l.checkpoint(5);
        let verifier = l.signer.verifier();
        let target = 3usize;
        let bytes = l.entries[target].encode_to_vec();
        // received_at is the audit service's own note, outside the leaf: its
        // bytes are the tail of the encoding (field 4).
        let received_len = LogEntry {
            received_at: l.entries[target].received_at,
            ..LogEntry::default()
        }
        .encode_to_vec()
        .len();
        let covered = bytes.len() - received_len;
        let mut checked = 0;
        for pos in 0..covered {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut tampered = bytes.clone();
                tampered[pos] ^= mask;
                let Ok(entry) = LogEntry::decode(tampered.as_slice()) else {
                    checked += 1; // The store reports an undecodable entry.
                    continue;
                };
                let mut entries = l.entries.clone();
                entries[target] = entry;
                let result = verify_log(&entries, &l.sources, Some((&note, &verifier)));
                assert!(
                    result.is_err(),
                    "flipping byte {pos} with {mask:#04x} went unnoticed"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, covered * 3);
    }

    #[test]
    fn the_error_names_the_first_bad_entry() {
        let l = log(6);
        let mut entries = l.entries.clone();
        let event = &mut entries[4].signed_event.as_mut().unwrap().event;
        let last = event.len() - 1;
        event[last] ^= 1;
        let err = verify_log(&entries, &l.sources, None).unwrap_err();
        assert!(
            matches!(&err, VerifyError::Entry { position: 4, index: 4, problem, .. } if problem.contains("signature")),
            "{err}"
        );
    }

    #[test]
    fn a_dropped_tail_entry_is_detected_against_an_earlier_checkpoint() {
        let l = log(6);
        let note = l.checkpoint(6);
        let err = verify_log(
            &l.entries[..5],
            &l.sources,
            Some((&note, &l.signer.verifier())),
        )
        .unwrap_err();
        assert_eq!(err, VerifyError::Truncated { have: 5, signed: 6 });
    }

    #[test]
    fn gaps_repeats_and_misplaced_indices_are_detected() {
        let l = log(7);
        // Dropping a middle entry breaks its source's sequence.
        let mut dropped = l.entries.clone();
        dropped.remove(3);
        for (i, e) in dropped.iter_mut().enumerate() {
            e.index = i as u64;
        }
        let err = verify_log(&dropped, &l.sources, None).unwrap_err();
        assert!(
            matches!(&err, VerifyError::Entry { problem, .. } if problem.contains("skips")),
            "{err}"
        );

        let mut repeated = l.entries.clone();
        repeated.insert(4, l.entries[3].clone());
        for (i, e) in repeated.iter_mut().enumerate() {
            e.index = i as u64;
        }
        let err = verify_log(&repeated, &l.sources, None).unwrap_err();
        assert!(
            matches!(&err, VerifyError::Entry { position: 4, problem, .. } if problem.contains("repeats")),
            "{err}"
        );

        let mut misplaced = l.entries.clone();
        misplaced[2].index = 7;
        assert!(matches!(
            verify_log(&misplaced, &l.sources, None),
            Err(VerifyError::Entry { position: 2, .. })
        ));

        let mut unknown = l.sources.clone();
        unknown.remove("spiffe://t/svc/broker");
        assert!(matches!(
            verify_log(&l.entries, &unknown, None),
            Err(VerifyError::Entry { position: 0, .. })
        ));
    }

    #[test]
    fn a_checkpoint_from_another_key_is_refused() {
        let l = log(3);
        let note = l.checkpoint(3);
        let other = CheckpointSigner::new("t/audit", SigningKey::from_bytes(&[4; 32])).unwrap();
        assert!(matches!(
            verify_log(&l.entries, &l.sources, Some((&note, &other.verifier()))),
            Err(VerifyError::Checkpoint(_))
        ));
    }

    #[test]
    fn the_json_lines_export_round_trips() {
        let l = log(4);
        let mut out = Vec::new();
        write_export(&mut out, &l.entries).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 4);
        assert!(text.lines().next().unwrap().contains("\"signedEvent\""));
        let back = read_export(text.as_bytes()).unwrap();
        assert_eq!(back, l.entries);
        let err = read_export("{\"index\": \"0\"}\nnot json\n".as_bytes()).unwrap_err();
        assert!(matches!(err, VerifyError::Export { line: 2, .. }));
    }
}
