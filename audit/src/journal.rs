//! The audit log's write-ahead journal: one framed, checksummed record per
//! group commit, appended and made durable with one `fdatasync` before the
//! group is acknowledged. The tiles, sled indexes and checkpoint file are
//! written from memory afterwards, off the acknowledgement path, and synced
//! in the background ([`crate::service::AuditLog::apply`]); a record is no
//! longer needed once they hold it.
//!
//! On disk: `<data dir>/journal/wal-NN`, segments of [`SEGMENT_BYTES`]
//! filled with zeros when made, so an append rewrites blocks that exist and
//! its `fdatasync` flushes no size or extent change. A segment whose records
//! are all applied is reused: its next record is written at offset 0 under
//! a new generation number, and what is left of its older records no longer
//! follows on. At most [`MAX_SEGMENTS`]: the journal is bounded, so opening
//! costs the same at any log size.
//!
//! A record is a [`HEADER`]-byte header (magic, CRC-32 of the header, the
//! segment's generation, the first entry's index, the count of entries,
//! the payload's length and CRC-32) and the payload (the group's signed
//! checkpoint, if any, and each entry's leaf data and received time),
//! starting at a multiple of [`ALIGN`]. At open, a record that does not
//! check out ends its segment: at the end of the journal it is a torn
//! write that was never acknowledged, and is cut; if a whole record of the
//! same generation holding entries not yet applied follows it, or a later
//! segment does not follow on, the journal is damaged in the middle and
//! opening fails, naming the file and the offset.

use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use prost::Message;
use twokey_proto::{
    Timestamp,
    audit::v1::{Event, LogEntry, SignedEvent},
};

use crate::{error::AuditError, merkle::leaf_hash, store::LogStore};

/// The journal's directory in the data directory.
pub const DIR: &str = "journal";

/// Bytes of one segment.
pub const SEGMENT_BYTES: u64 = 8 << 20;

/// Segments at most: when every one holds records not yet applied, the
/// next group commit waits for an apply.
pub const MAX_SEGMENTS: usize = 16;

/// Segments made when the journal is created.
const INITIAL_SEGMENTS: usize = 1;

/// Records start at multiples of this.
pub const ALIGN: u64 = 512;

/// Bytes of a record's header.
pub const HEADER: usize = 40;

/// Payload bytes of one record at most; a larger group is written as
/// several records.
pub const MAX_PAYLOAD: usize = 1 << 20;

const MAGIC: [u8; 4] = *b"TKJ1";

/// One entry of a group: its Merkle leaf data (the encoded `SignedEvent`)
/// and when it was received (seconds, nanoseconds), if known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The leaf data.
    pub data: Vec<u8>,
    /// The received time.
    pub received_at: Option<(i64, i32)>,
}

/// A group's entries from index `first` on, and the checkpoint signed over
/// the log up to its last entry (the last record of a group only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The index of the first entry.
    pub first: u64,
    /// The entries.
    pub entries: Vec<Entry>,
    /// The signed checkpoint note of size `first + entries.len()`, if any.
    pub checkpoint: Option<String>,
}

impl Record {
    /// The index after its last entry.
    pub fn end(&self) -> u64 {
        self.first + self.entries.len() as u64
    }

    fn payload(&self) -> Vec<u8> {
        let note = self.checkpoint.as_deref().unwrap_or("").as_bytes();
        let mut b = Vec::with_capacity(
            8 + note.len()
                + self
                    .entries
                    .iter()
                    .map(|e| e.data.len() + 17)
                    .sum::<usize>(),
        );
        b.extend_from_slice(&(note.len() as u32).to_le_bytes());
        b.extend_from_slice(note);
        for e in &self.entries {
            let (secs, nanos, has) = match e.received_at {
                Some((s, n)) => (s, n, 1u8),
                None => (0, 0, 0),
            };
            b.push(has);
            b.extend_from_slice(&secs.to_le_bytes());
            b.extend_from_slice(&nanos.to_le_bytes());
            b.extend_from_slice(&(e.data.len() as u32).to_le_bytes());
            b.extend_from_slice(&e.data);
        }
        b
    }

    fn parse(first: u64, count: u32, payload: &[u8]) -> Option<Self> {
        let mut r = Reader(payload);
        let note_len = r.u32()? as usize;
        let note = r.take(note_len)?;
        let checkpoint = if note.is_empty() {
            None
        } else {
            Some(String::from_utf8(note.to_vec()).ok()?)
        };
        let mut entries = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let has = r.take(1)?[0];
            let secs = i64::from_le_bytes(r.take(8)?.try_into().ok()?);
            let nanos = i32::from_le_bytes(r.take(4)?.try_into().ok()?);
            let len = r.u32()? as usize;
            let data = r.take(len)?.to_vec();
            entries.push(Entry {
                data,
                received_at: (has == 1).then_some((secs, nanos)),
            });
        }
        r.0.is_empty().then_some(Self {
            first,
            entries,
            checkpoint,
        })
    }

    /// Splits a group into records of at most [`MAX_PAYLOAD`] payload
    /// bytes (at least one entry each); the checkpoint goes in the last.
    pub fn group(first: u64, entries: Vec<Entry>, checkpoint: Option<String>) -> Vec<Self> {
        let mut records = Vec::new();
        let mut current = Self {
            first,
            entries: Vec::new(),
            checkpoint: None,
        };
        let mut bytes = 0;
        for e in entries {
            let cost = e.data.len() + 17;
            if !current.entries.is_empty() && bytes + cost > MAX_PAYLOAD {
                let next = current.end();
                records.push(std::mem::replace(
                    &mut current,
                    Self {
                        first: next,
                        entries: Vec::new(),
                        checkpoint: None,
                    },
                ));
                bytes = 0;
            }
            bytes += cost;
            current.entries.push(e);
        }
        current.checkpoint = checkpoint;
        records.push(current);
        records
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
}

/// A record's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    generation: u64,
    first: u64,
    count: u32,
    len: u32,
    crc: u32,
}

impl Header {
    fn end(&self) -> u64 {
        self.first + u64::from(self.count)
    }

    fn bytes(&self) -> [u8; HEADER] {
        let mut b = [0u8; HEADER];
        b[..4].copy_from_slice(&MAGIC);
        b[8..16].copy_from_slice(&self.generation.to_le_bytes());
        b[16..24].copy_from_slice(&self.first.to_le_bytes());
        b[24..28].copy_from_slice(&self.count.to_le_bytes());
        b[28..32].copy_from_slice(&self.len.to_le_bytes());
        b[32..36].copy_from_slice(&self.crc.to_le_bytes());
        let crc = crc32fast::hash(&b[8..]);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// The header in `b`, if it checks out and its payload fits in a
    /// segment of `room` bytes from here.
    fn parse(b: &[u8], room: u64) -> Option<Self> {
        if b.len() < HEADER || b[..4] != MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(b[4..8].try_into().ok()?);
        if crc32fast::hash(&b[8..HEADER]) != crc {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let h = Self {
            generation: u64_at(8),
            first: u64_at(16),
            count: u32_at(24),
            len: u32_at(28),
            crc: u32_at(32),
        };
        (HEADER as u64 + u64::from(h.len) <= room).then_some(h)
    }
}

fn align(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

/// One segment file.
#[derive(Debug)]
struct Segment {
    path: PathBuf,
    file: File,
    /// The generation of its records, if it holds any.
    generation: Option<u64>,
    /// The index after its last record, if it holds any.
    end: Option<u64>,
}

/// What [`Journal::open`] found: the journal, positioned to write, and the
/// records holding entries the store did not hold yet, in order.
#[derive(Debug)]
pub struct Opened {
    /// The journal.
    pub journal: Journal,
    /// Records holding entries at or beyond the applied size, oldest first.
    pub replay: Vec<Record>,
    /// The checkpoint of the newest record, if it could be read.
    pub newest_checkpoint: Option<String>,
}

/// The journal, open for appending.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    segments: Vec<Segment>,
    /// The segment written to.
    current: usize,
    /// Where the next record goes in it.
    pos: u64,
    next_generation: u64,
    /// Entries the tiles, sled and checkpoint file hold durably.
    applied: u64,
    /// The index after the last entry journaled.
    end: u64,
}

fn io(path: &Path, what: &str, e: std::io::Error) -> AuditError {
    AuditError::Store(format!(
        "cannot {what} the journal {}: {e}; check the disk and the permissions of the data \
         directory",
        path.display()
    ))
}

fn damaged(path: &Path, offset: u64, why: &str) -> AuditError {
    AuditError::Store(format!(
        "the journal {} is damaged at offset {offset}: {why}. Acknowledged entries after that \
         point cannot be read, so the log does not start; restore the data directory from a \
         backup (the sources then send back what they kept), and check the disk",
        path.display()
    ))
}

/// Makes a segment of [`SEGMENT_BYTES`] zeros, synced, and syncs the
/// directory.
fn make_segment(dir: &Path, n: usize) -> Result<Segment, AuditError> {
    let path = dir.join(format!("wal-{n:02}"));
    let mut tmp = path.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let zeros = vec![0u8; 1 << 20];
    let mut file = File::create(&tmp).map_err(|e| io(&tmp, "create", e))?;
    for _ in 0..SEGMENT_BYTES / zeros.len() as u64 {
        file.write_all(&zeros).map_err(|e| io(&tmp, "write", e))?;
    }
    file.sync_all().map_err(|e| io(&tmp, "sync", e))?;
    fs::rename(&tmp, &path).map_err(|e| io(&path, "create", e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, "sync", e))?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| io(&path, "open", e))?;
    Ok(Segment {
        path,
        file,
        generation: None,
        end: None,
    })
}

/// What the records of one segment file hold.
#[derive(Debug)]
struct Scan {
    generation: Option<u64>,
    /// Live records (of its generation, from offset 0): header, offset,
    /// and the record when its payload was read.
    records: Vec<(Header, u64, Option<Record>)>,
    /// Where its live records end: the next write's place.
    stop: u64,
}

fn read_at(file: &File, path: &Path, offset: u64, len: usize) -> Result<Vec<u8>, AuditError> {
    let mut b = vec![0u8; len];
    file.read_exact_at(&mut b, offset)
        .map_err(|e| io(path, "read", e))?;
    Ok(b)
}

/// The payload of the record `h` at `offset`, if its CRC checks out.
fn payload(
    file: &File,
    path: &Path,
    h: &Header,
    offset: u64,
) -> Result<Option<Record>, AuditError> {
    let b = read_at(file, path, offset + HEADER as u64, h.len as usize)?;
    if crc32fast::hash(&b) != h.crc {
        return Ok(None);
    }
    Ok(Record::parse(h.first, h.count, &b))
}

/// Reads the live records of a segment: payloads of those holding entries
/// at or beyond `applied`.
fn scan(file: &File, path: &Path, applied: u64) -> Result<Scan, AuditError> {
    let mut s = Scan {
        generation: None,
        records: Vec::new(),
        stop: 0,
    };
    let mut pos = 0u64;
    while pos + HEADER as u64 <= SEGMENT_BYTES {
        let b = read_at(file, path, pos, HEADER)?;
        let Some(h) = Header::parse(&b, SEGMENT_BYTES - pos) else {
            break;
        };
        if s.generation.is_some_and(|g| g != h.generation) {
            break;
        }
        if let Some((last, _, _)) = s.records.last()
            && h.first != last.end()
        {
            return Err(damaged(
                path,
                pos,
                &format!(
                    "the record there starts at entry {}, the one before it ends at entry {}",
                    h.first,
                    last.end()
                ),
            ));
        }
        let record = if h.end() > applied {
            match payload(file, path, &h, pos)? {
                Some(r) => Some(r),
                None => break,
            }
        } else {
            None
        };
        s.generation = Some(h.generation);
        s.records.push((h, pos, record));
        pos = align(pos + HEADER as u64 + u64::from(h.len));
    }
    s.stop = pos;
    Ok(s)
}

/// The offset of a whole record of `generation` (any, if `None`) holding
/// entries beyond `applied`, after `from`, if there is one.
fn whole_record_after(
    file: &File,
    path: &Path,
    from: u64,
    generation: Option<u64>,
    applied: u64,
) -> Result<Option<u64>, AuditError> {
    if from >= SEGMENT_BYTES {
        return Ok(None);
    }
    let rest = read_at(file, path, from, (SEGMENT_BYTES - from) as usize)?;
    let mut at = ALIGN;
    while at as usize + HEADER <= rest.len() {
        let here = from + at;
        if let Some(h) = Header::parse(&rest[at as usize..], SEGMENT_BYTES - here)
            && generation.is_none_or(|g| g == h.generation)
            && h.end() > applied
        {
            let body = &rest[at as usize + HEADER..at as usize + HEADER + h.len as usize];
            if crc32fast::hash(body) == h.crc {
                return Ok(Some(here));
            }
        }
        at += ALIGN;
    }
    Ok(None)
}

impl Journal {
    /// Opens (creating if needed) the journal in `data_dir`, where the
    /// store holds `applied` entries durably: reads the records holding
    /// entries from `applied` on, checks that they follow on from it, cuts
    /// a torn record at the end, and refuses a journal damaged in the
    /// middle (see the module documentation).
    pub fn open(data_dir: &Path, applied: u64) -> Result<Opened, AuditError> {
        Self::open_in(data_dir, applied, true)
    }

    /// What [`Journal::open`] reads, without creating or changing anything
    /// (for `verify-store`); a journal that is not there holds nothing.
    pub fn read(data_dir: &Path, applied: u64) -> Result<Opened, AuditError> {
        Self::open_in(data_dir, applied, false)
    }

    fn open_in(data_dir: &Path, applied: u64, create: bool) -> Result<Opened, AuditError> {
        let dir = data_dir.join(DIR);
        if create {
            fs::create_dir_all(&dir).map_err(|e| io(&dir, "create", e))?;
        }
        let listing = match fs::read_dir(&dir) {
            Err(e) if !create && e.kind() == std::io::ErrorKind::NotFound => None,
            other => Some(other.map_err(|e| io(&dir, "read", e))?),
        };
        let mut names: Vec<(usize, PathBuf)> = listing
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name();
                let n = name.to_str()?.strip_prefix("wal-")?.parse::<usize>().ok()?;
                Some((n, e.path()))
            })
            .collect();
        names.sort();
        let mut segments = Vec::new();
        let mut scans = Vec::new();
        for (_, path) in names {
            let file = OpenOptions::new()
                .read(true)
                .write(create)
                .open(&path)
                .map_err(|e| io(&path, "open", e))?;
            let len = file.metadata().map_err(|e| io(&path, "read", e))?.len();
            if len != SEGMENT_BYTES {
                return Err(damaged(
                    &path,
                    len,
                    &format!("the segment is {len} bytes, not {SEGMENT_BYTES}"),
                ));
            }
            let s = scan(&file, &path, applied)?;
            segments.push(Segment {
                path,
                file,
                generation: s.generation,
                end: s.records.last().map(|(h, _, _)| h.end()),
            });
            scans.push(s);
        }
        let newest = (0..segments.len())
            .filter(|i| segments[*i].generation.is_some())
            .max_by_key(|i| segments[*i].generation);
        // A whole record after the end of the live records of the newest
        // segment, or of one whose first record is damaged, means damage
        // in the middle: acknowledged entries would be dropped.
        for (i, (seg, s)) in segments.iter().zip(&scans).enumerate() {
            let check = Some(i) == newest || s.generation.is_none();
            if check
                && let Some(at) =
                    whole_record_after(&seg.file, &seg.path, s.stop, s.generation, applied)?
            {
                return Err(damaged(
                    &seg.path,
                    s.stop,
                    &format!(
                        "the record there does not check out, and a whole record holding \
                         entries not yet applied follows at offset {at}"
                    ),
                ));
            }
        }
        // The live records of every segment, oldest generation first, must
        // follow on from `applied`.
        let mut order: Vec<usize> = (0..segments.len())
            .filter(|i| segments[*i].generation.is_some())
            .collect();
        order.sort_by_key(|i| segments[*i].generation);
        let mut replay = Vec::new();
        let mut expected: Option<u64> = None;
        for &i in &order {
            for (h, offset, record) in &scans[i].records {
                if h.end() <= applied {
                    continue;
                }
                let want = expected.unwrap_or(applied);
                let follows = match expected {
                    Some(e) => h.first == e,
                    None => h.first <= applied,
                };
                if !follows {
                    return Err(damaged(
                        &segments[i].path,
                        *offset,
                        &format!(
                            "the record there starts at entry {}, where entry {want} comes next: \
                             records between are missing",
                            h.first
                        ),
                    ));
                }
                expected = Some(h.end());
                replay.push(record.clone().ok_or_else(|| {
                    damaged(&segments[i].path, *offset, "its payload cannot be read")
                })?);
            }
        }
        let newest_checkpoint = match newest {
            Some(i) => {
                let seg = &segments[i];
                match scans[i].records.last() {
                    Some((_, _, Some(r))) => r.checkpoint.clone(),
                    Some((h, offset, None)) => {
                        payload(&seg.file, &seg.path, h, *offset)?.and_then(|r| r.checkpoint)
                    }
                    None => None,
                }
            }
            None => None,
        };
        let next_generation = segments
            .iter()
            .filter_map(|s| s.generation)
            .max()
            .map_or(1, |g| g + 1);
        let end = replay.last().map_or(applied, Record::end).max(applied);
        let mut journal = Self {
            dir,
            segments,
            current: 0,
            pos: 0,
            next_generation,
            applied,
            end,
        };
        match newest {
            Some(i) => {
                journal.current = i;
                journal.pos = scans[i].stop;
            }
            None if !create => {}
            None => {
                while journal.segments.len() < INITIAL_SEGMENTS {
                    let n = journal.segments.len();
                    journal.segments.push(make_segment(&journal.dir, n)?);
                }
                // Writing starts in a fresh generation at offset 0 of
                // segment 0.
                journal.current = 0;
                journal.pos = 0;
            }
        }
        Ok(Opened {
            journal,
            replay,
            newest_checkpoint,
        })
    }

    /// The index after the last entry journaled.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Entries held durably elsewhere, as last told.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Segments in use: holding records not yet applied, or written to.
    pub fn segments_in_use(&self) -> usize {
        (0..self.segments.len())
            .filter(|i| *i == self.current || !self.free(*i))
            .count()
    }

    fn free(&self, i: usize) -> bool {
        i != self.current && self.segments[i].end.is_none_or(|e| e <= self.applied)
    }

    /// The tiles, sled and checkpoint file hold the first `size` entries
    /// durably: segments holding nothing beyond may be reused.
    pub fn set_applied(&mut self, size: u64) {
        self.applied = self.applied.max(size);
    }

    /// Appends `records` (following on from [`Journal::end`]) and syncs
    /// them: one `fdatasync` of the segment written last, and one of each
    /// segment left full on the way. `Ok(false)`, with nothing written,
    /// when they do not fit in the segments free: apply, then call again.
    pub fn append(&mut self, records: &[Record]) -> Result<bool, AuditError> {
        let Some(first) = records.first() else {
            return Ok(true);
        };
        if first.first != self.end {
            return Err(AuditError::Store(format!(
                "journal record starts at entry {}, not at the end of the journal {}",
                first.first, self.end
            )));
        }
        let framed: Vec<(Header, Vec<u8>)> = records
            .iter()
            .map(|r| {
                let p = r.payload();
                (
                    Header {
                        generation: 0,
                        first: r.first,
                        count: r.entries.len() as u32,
                        len: p.len() as u32,
                        crc: crc32fast::hash(&p),
                    },
                    p,
                )
            })
            .collect();
        // Where each record goes: a plan first, so nothing is written
        // unless all fit.
        let (mut seg, mut pos) = (self.current, self.pos);
        let mut taken: Vec<usize> = Vec::new();
        let mut plan = Vec::with_capacity(framed.len());
        let mut made = 0;
        for (_, p) in &framed {
            let need = align(HEADER as u64 + p.len() as u64);
            if pos + need > SEGMENT_BYTES {
                let next = (0..self.segments.len())
                    .find(|i| *i != seg && self.free(*i) && !taken.contains(i));
                seg = match next {
                    Some(i) => i,
                    None if self.segments.len() + made < MAX_SEGMENTS => {
                        made += 1;
                        self.segments.len() + made - 1
                    }
                    None => return Ok(false),
                };
                taken.push(seg);
                pos = 0;
            }
            plan.push((seg, pos));
            pos += need;
        }
        for _ in 0..made {
            let n = self.segments.len();
            self.segments.push(make_segment(&self.dir, n)?);
        }
        let mut touched: Vec<usize> = Vec::new();
        for ((h, p), (seg, at)) in framed.iter().zip(&plan) {
            if *at == 0 {
                // A segment starts a new generation at offset 0.
                self.segments[*seg].generation = Some(self.next_generation);
                self.next_generation += 1;
            }
            let generation = self.segments[*seg].generation.unwrap_or_default();
            let mut bytes = Header { generation, ..*h }.bytes().to_vec();
            bytes.extend_from_slice(p);
            let s = &self.segments[*seg];
            twokey_runtime::durable::fail_stop(&s.path, || {
                s.file
                    .write_all_at(&bytes, *at)
                    .map_err(|e| io(&s.path, "write", e))
            })?;
            if !touched.contains(seg) {
                touched.push(*seg);
            }
        }
        // One sync per segment written, the current one last.
        for seg in &touched {
            let s = &self.segments[*seg];
            twokey_runtime::durable::fail_stop(&s.path, || {
                s.file.sync_data().map_err(|e| io(&s.path, "sync", e))
            })?;
        }
        for (r, (seg, _)) in records.iter().zip(&plan) {
            self.segments[*seg].end = Some(r.end());
        }
        if let Some((seg, at)) = plan.last() {
            self.current = *seg;
            self.pos = at + align(HEADER as u64 + framed.last().map_or(0, |(_, p)| p.len()) as u64);
        }
        self.end = records.last().map_or(self.end, Record::end);
        Ok(true)
    }
}

/// Stages the entries of `records` the store does not hold yet, in order:
/// each entry the store holds too must be the same (its leaf hash), each
/// other must be the next of its source's sequence. Returns how many were
/// staged. The store is not synced.
pub fn replay_into<S: LogStore>(store: &S, records: &[Record]) -> Result<u64, AuditError> {
    let bad = |index: u64, why: String| {
        AuditError::Store(format!(
            "journal entry {index}: {why}; the journal and the store disagree, so the log does \
             not start: restore the data directory from a backup"
        ))
    };
    let mut replayed = 0u64;
    for r in records {
        for (index, e) in (r.first..).zip(&r.entries) {
            let leaf = leaf_hash(&e.data);
            let size = store.size();
            if index < size {
                if store.node(0, index)? != leaf {
                    return Err(bad(index, "it differs from the entry stored there".into()));
                }
                continue;
            }
            if index > size {
                return Err(bad(index, format!("the store holds only {size} entries")));
            }
            let signed = SignedEvent::decode(e.data.as_slice())
                .map_err(|err| bad(index, format!("it does not decode: {err}")))?;
            let event = Event::decode(signed.event.as_slice())
                .map_err(|err| bad(index, format!("its event does not decode: {err}")))?;
            let expected = store.next_seq(&event.source)?;
            if event.seq != expected {
                return Err(bad(
                    index,
                    format!(
                        "it is seq {} of {}, where {expected} comes next",
                        event.seq, event.source
                    ),
                ));
            }
            let entry = LogEntry {
                index,
                signed_event: Some(signed),
                event: Some(event),
                received_at: e
                    .received_at
                    .map(|(seconds, nanos)| Timestamp { seconds, nanos }),
            };
            store.append(&entry, &leaf)?;
            replayed += 1;
        }
    }
    Ok(replayed)
}

#[cfg(test)]
mod tests;
