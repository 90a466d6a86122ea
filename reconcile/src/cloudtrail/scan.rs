//! Log files in the S3 delivery layout,
//! `AWSLogs/[<org-id>/]<account>/CloudTrail/<region>/YYYY/MM/DD/*.json.gz`,
//! read once each: the caller keeps a [`Seen`] of the files read (path and
//! size) between scans.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

use super::{Event, Problem, ReadOptions, Skip, read_records};

/// The files already read, each by path and size. A file whose size changed
/// since (a partial download completed) is read again; CloudTrail never
/// rewrites a delivered file. Files skipped whole are remembered too, so a
/// broken file is reported once, not on every scan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    files: BTreeSet<(PathBuf, u64)>,
}

impl Seen {
    /// Nothing seen.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether this file at this size was read.
    pub fn contains(&self, path: &Path, size: u64) -> bool {
        self.files.contains(&(path.to_owned(), size))
    }

    /// Remembers a file as read; `false` if it already was.
    pub fn insert(&mut self, path: PathBuf, size: u64) -> bool {
        self.files.insert((path, size))
    }

    /// How many files are remembered.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The files, for the caller to persist.
    pub fn iter(&self) -> impl Iterator<Item = (&Path, u64)> {
        self.files.iter().map(|(p, s)| (p.as_path(), *s))
    }
}

impl FromIterator<(PathBuf, u64)> for Seen {
    fn from_iter<I: IntoIterator<Item = (PathBuf, u64)>>(iter: I) -> Self {
        Self {
            files: iter.into_iter().collect(),
        }
    }
}

/// What one log file held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileRead {
    /// The kept records, in file order.
    pub events: Vec<Event>,
    /// How many records the file had.
    pub records: u64,
    /// The kept records that were skipped, each with its index.
    pub problems: Vec<Problem>,
}

/// Reads one gzip-compressed log file. The file is streamed; only the kept
/// events and the skipped records' reasons are held, so nothing of a file
/// that turns out unreadable half-way is returned (`Err`).
pub fn read_file(path: &Path, options: &ReadOptions) -> Result<FileRead, Skip> {
    let file = File::open(path).map_err(|e| Skip::Unreadable(e.to_string()))?;
    let reader = BufReader::new(MultiGzDecoder::new(BufReader::new(file)));
    let mut read = FileRead::default();
    read.records = read_records(reader, options, |index, record| match record {
        Ok(Some(event)) => read.events.push(event),
        Ok(None) => {}
        Err(reason) => read.problems.push(Problem {
            path: path.to_owned(),
            record: Some(index),
            reason,
        }),
    })?;
    Ok(read)
}

/// What a scan found in the files it had not seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// Kept records of the files read, file by file in path order.
    pub events: Vec<Event>,
    /// Files read (wholly or with some records skipped).
    pub files_read: u64,
    /// Files passed over because [`Seen`] has them.
    pub files_already_seen: u64,
    /// Records in the files read.
    pub records: u64,
    /// Files and records skipped, with their reasons.
    pub problems: Vec<Problem>,
}

/// A scan that could not start.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// Neither the directory nor an `AWSLogs` directory in it is the layout.
    #[error(
        "no AWSLogs directory at or under {0}: point at the directory the trail's bucket (and prefix) is synced to"
    )]
    NoAwsLogs(PathBuf),
}

/// Reads every `*.json.gz` file of the layout under `root` (the synced
/// bucket and prefix, holding `AWSLogs`, or `AWSLogs` itself) that `seen`
/// does not have, in path order, and adds each to `seen`. Files and
/// directories outside the layout (digests, insights, other names) are not
/// read; an unreadable directory inside it is a problem, not an error.
pub fn scan(root: &Path, seen: &mut Seen, options: &ReadOptions) -> Result<Scan, ScanError> {
    let logs = if root.file_name().is_some_and(|n| n == "AWSLogs") && root.is_dir() {
        root.to_owned()
    } else if root.join("AWSLogs").is_dir() {
        root.join("AWSLogs")
    } else {
        return Err(ScanError::NoAwsLogs(root.to_owned()));
    };
    let mut out = Scan::default();
    let mut files = Vec::new();
    for entry in subdirs(&logs, &mut out.problems) {
        let name = file_name(&entry);
        if is_account_id(&name) {
            account_files(&entry, &mut files, &mut out.problems);
        } else if name.starts_with("o-") {
            // An organization trail: AWSLogs/<org-id>/<account>/CloudTrail/...
            for account in subdirs(&entry, &mut out.problems) {
                if is_account_id(&file_name(&account)) {
                    account_files(&account, &mut files, &mut out.problems);
                }
            }
        }
    }
    files.sort();
    for (path, size) in files {
        if seen.contains(&path, size) {
            out.files_already_seen += 1;
            continue;
        }
        match read_file(&path, options) {
            Ok(read) => {
                out.files_read += 1;
                out.records += read.records;
                out.events.extend(read.events);
                out.problems.extend(read.problems);
            }
            Err(reason) => out.problems.push(Problem {
                path: path.clone(),
                record: None,
                reason,
            }),
        }
        seen.insert(path, size);
    }
    Ok(out)
}

/// The files of one account: `CloudTrail/<region>/YYYY/MM/DD/*.json.gz`.
fn account_files(account: &Path, files: &mut Vec<(PathBuf, u64)>, problems: &mut Vec<Problem>) {
    let trail = account.join("CloudTrail");
    if !trail.is_dir() {
        return;
    }
    for region in subdirs(&trail, problems) {
        for year in digits_dirs(&region, 4, problems) {
            for month in digits_dirs(&year, 2, problems) {
                for day in digits_dirs(&month, 2, problems) {
                    for entry in entries(&day, problems) {
                        let path = entry.path();
                        let is_log = file_name(&path).ends_with(".json.gz");
                        match entry.metadata() {
                            Ok(meta) if meta.is_file() && is_log => files.push((path, meta.len())),
                            Ok(_) => {}
                            Err(e) => problems.push(Problem {
                                path,
                                record: None,
                                reason: Skip::Unreadable(e.to_string()),
                            }),
                        }
                    }
                }
            }
        }
    }
}

fn entries(dir: &Path, problems: &mut Vec<Problem>) -> Vec<std::fs::DirEntry> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| match e {
                Ok(e) => Some(e),
                Err(err) => {
                    problems.push(Problem {
                        path: dir.to_owned(),
                        record: None,
                        reason: Skip::Unreadable(err.to_string()),
                    });
                    None
                }
            })
            .collect(),
        Err(e) => {
            problems.push(Problem {
                path: dir.to_owned(),
                record: None,
                reason: Skip::Unreadable(e.to_string()),
            });
            Vec::new()
        }
    }
}

fn subdirs(dir: &Path, problems: &mut Vec<Problem>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = entries(dir, problems)
        .into_iter()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

fn digits_dirs(dir: &Path, len: usize, problems: &mut Vec<Problem>) -> Vec<PathBuf> {
    subdirs(dir, problems)
        .into_iter()
        .filter(|p| {
            let name = file_name(p);
            name.len() == len && name.bytes().all(|b| b.is_ascii_digit())
        })
        .collect()
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Whether `name` is a 12-digit AWS account id.
pub(crate) fn is_account_id(name: &str) -> bool {
    name.len() == 12 && name.bytes().all(|b| b.is_ascii_digit())
}
