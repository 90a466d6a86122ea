//! Tests of the journal's file format: records read back, a torn last record
//! cut, damage in the middle refused with the file and offset, segments
//! reused once applied.

use super::*;

fn entry(i: u64) -> Entry {
    Entry {
        data: format!("entry {i}").into_bytes(),
        received_at: i
            .is_multiple_of(2)
            .then_some((1_700_000_000 + i as i64, i as i32)),
    }
}

fn record(first: u64, n: u64) -> Record {
    Record {
        first,
        entries: (first..first + n).map(entry).collect(),
        checkpoint: Some(format!("checkpoint of {}\n", first + n)),
    }
}

/// Opens the journal in `dir` (created if needed) at `applied`.
fn open(dir: &Path, applied: u64) -> Opened {
    Journal::open(dir, applied).unwrap()
}

/// Where the records of the newest generation are in the newest segment.
fn offsets(dir: &Path) -> (PathBuf, Vec<u64>) {
    let opened = open(dir, 0);
    let j = opened.journal;
    let seg = &j.segments[j.current];
    let s = scan(&seg.file, &seg.path, 0).unwrap();
    (
        seg.path.clone(),
        s.records.iter().map(|(_, at, _)| *at).collect(),
    )
}

fn flip(path: &Path, at: u64) {
    let mut b = fs::read(path).unwrap();
    b[at as usize] ^= 0x40;
    fs::write(path, b).unwrap();
}

#[test]
fn records_are_read_back_in_order_with_the_newest_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = open(dir.path(), 0).journal;
    assert!(j.append(&[record(0, 3)]).unwrap());
    assert!(j.append(&[record(3, 1), record(4, 5)]).unwrap());
    assert_eq!(j.end(), 9);
    drop(j);
    let opened = open(dir.path(), 0);
    assert_eq!(
        opened.replay,
        vec![record(0, 3), record(3, 1), record(4, 5)]
    );
    assert_eq!(
        opened.newest_checkpoint.as_deref(),
        Some("checkpoint of 9\n")
    );
    // Only what the store does not hold yet is handed back; a record the
    // store holds part of comes whole.
    let opened = open(dir.path(), 5);
    assert_eq!(opened.replay, vec![record(4, 5)]);
    assert_eq!(opened.journal.end(), 9);
    let opened = open(dir.path(), 9);
    assert!(opened.replay.is_empty());
    assert_eq!(
        opened.newest_checkpoint.as_deref(),
        Some("checkpoint of 9\n"),
        "the newest checkpoint is read even when applied"
    );
}

#[test]
fn a_record_not_following_on_from_the_journal_end_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = open(dir.path(), 0).journal;
    j.append(&[record(0, 2)]).unwrap();
    let err = j.append(&[record(5, 1)]).unwrap_err().to_string();
    assert!(
        err.contains("starts at entry 5, not at the end of the journal 2"),
        "{err}"
    );
}

#[test]
fn a_torn_last_record_is_cut_and_writing_goes_on_in_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = open(dir.path(), 0).journal;
    for r in [record(0, 2), record(2, 2), record(4, 3)] {
        j.append(&[r]).unwrap();
    }
    drop(j);
    let (path, at) = offsets(dir.path());
    // A byte of the last record's payload never reached the disk.
    flip(&path, at[2] + HEADER as u64 + 6);
    let opened = open(dir.path(), 0);
    assert_eq!(opened.replay, vec![record(0, 2), record(2, 2)]);
    assert_eq!(
        opened.newest_checkpoint.as_deref(),
        Some("checkpoint of 4\n")
    );
    let mut j = opened.journal;
    assert_eq!(j.end(), 4, "the torn record was never acknowledged");
    j.append(&[record(4, 1)]).unwrap();
    drop(j);
    assert_eq!(
        offsets(dir.path()).1[2],
        at[2],
        "written where the torn one was"
    );
    assert_eq!(
        open(dir.path(), 0).replay,
        vec![record(0, 2), record(2, 2), record(4, 1)]
    );

    // A header torn as well: the same.
    let (path, at) = offsets(dir.path());
    flip(&path, at[2] + 20);
    assert_eq!(open(dir.path(), 0).replay, vec![record(0, 2), record(2, 2)]);
}

#[test]
fn a_damaged_record_in_the_middle_is_refused_naming_the_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = open(dir.path(), 0).journal;
    for r in [record(0, 2), record(2, 2), record(4, 3)] {
        j.append(&[r]).unwrap();
    }
    drop(j);
    let (path, at) = offsets(dir.path());
    flip(&path, at[1] + HEADER as u64 + 6);
    let err = Journal::open(dir.path(), 0).unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "the journal {} is damaged at offset {}",
            path.display(),
            at[1]
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "a whole record holding entries not yet applied follows at offset {}",
            at[2]
        )),
        "{err}"
    );
    assert!(
        err.contains("restore the data directory from a backup"),
        "{err}"
    );
    // Once the store holds everything after the damage, it does not matter.
    assert!(Journal::open(dir.path(), 7).unwrap().replay.is_empty());
}

#[test]
fn applied_segments_are_reused_and_the_journal_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = open(dir.path(), 0).journal;
    // Records of about 64 KiB: a segment holds about 127.
    let big = |first: u64| Record {
        first,
        entries: vec![Entry {
            data: vec![first as u8; 64 << 10],
            received_at: None,
        }],
        checkpoint: None,
    };
    for first in 0..1000u64 {
        assert!(j.append(&[big(first)]).unwrap());
        // The store catches up every 100 records.
        if first % 100 == 99 {
            j.set_applied(first + 1);
        }
    }
    assert!(j.segments.len() <= 3, "{} segments", j.segments.len());
    drop(j);
    let opened = open(dir.path(), 900);
    assert_eq!(opened.replay, (900..1000).map(big).collect::<Vec<_>>());
    // Files of an older generation left in a reused segment are not
    // records of the journal.
    let opened = open(dir.path(), 990);
    assert_eq!(opened.replay, (990..1000).map(big).collect::<Vec<_>>());
}

#[test]
fn a_full_journal_asks_for_an_apply_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = open(dir.path(), 0).journal;
    let big = |first: u64| Record {
        first,
        entries: vec![Entry {
            data: vec![1; MAX_PAYLOAD - 64],
            received_at: None,
        }],
        checkpoint: None,
    };
    let mut first = 0;
    while j.append(&[big(first)]).unwrap() {
        first += 1;
        assert!(first < 1000, "the journal never filled");
    }
    assert_eq!(j.segments.len(), MAX_SEGMENTS);
    assert_eq!(j.end(), first, "nothing written when it did not fit");
    j.set_applied(first);
    assert!(j.append(&[big(first)]).unwrap());
    assert_eq!(j.segments.len(), MAX_SEGMENTS);
}

#[test]
fn a_journal_starting_past_the_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = open(dir.path(), 10).journal;
    j.append(&[record(10, 2)]).unwrap();
    drop(j);
    // A store that lost entries 5..10 (and the journal's older segments).
    let err = Journal::open(dir.path(), 5).unwrap_err().to_string();
    assert!(
        err.contains("starts at entry 10, where entry 5 comes next"),
        "{err}"
    );
}

#[test]
fn a_group_larger_than_a_record_is_split_with_the_checkpoint_last() {
    let entries: Vec<Entry> = (0..40)
        .map(|i| Entry {
            data: vec![i as u8; 60_000],
            received_at: None,
        })
        .collect();
    let records = Record::group(7, entries.clone(), Some("cp".into()));
    assert!(records.len() > 1);
    assert!(records.iter().all(|r| r.payload().len() <= MAX_PAYLOAD));
    assert!(
        records[..records.len() - 1]
            .iter()
            .all(|r| r.checkpoint.is_none())
    );
    assert_eq!(records.last().unwrap().checkpoint.as_deref(), Some("cp"));
    assert_eq!(records[0].first, 7);
    for w in records.windows(2) {
        assert_eq!(w[0].end(), w[1].first);
    }
    let flat: Vec<Entry> = records.into_iter().flat_map(|r| r.entries).collect();
    assert_eq!(flat, entries);
}

#[test]
fn a_new_journal_is_one_segment_and_its_first_record_goes_at_offset_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = open(dir.path(), 0).journal;
    j.append(&[record(0, 1)]).unwrap();
    drop(j);
    let files: Vec<_> = fs::read_dir(dir.path().join(DIR)).unwrap().collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(offsets(dir.path()).1, vec![0]);
}
