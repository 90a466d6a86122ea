//! The log's C2SP `tlog-tiles` resources, read-only, for the HTTPS listener
//! ([`crate::http`]): `GET /checkpoint`, `/tile/<L>/<N>[.p/<W>]` and
//! `/tile/entries/<N>[.p/<W>]`, each the file of that name under
//! `DATA_DIR/log/`, so standard tile clients (Go's `sumdb/tlog`
//! `TileReader`, witnesses) verify the log themselves.
//!
//! A path is served only if it is exactly what [`Tile::path`] writes for the
//! tile it names (C2SP's grammar, one spelling per tile): no `..`, no empty
//! or extra element, no leading zeroes, no percent-escapes; anything else is
//! not a resource here (404). Hash tiles and the checkpoint are open to
//! auditors and sources (the witnesses); entry bundles, which hold the
//! events, only to auditors, as `Query` is.

use std::path::{Path, PathBuf};

use http::{HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use twokey_tlog::tile::{Kind, Tile};

use crate::http::{Body, error};

/// The checkpoint's URL path.
pub const CHECKPOINT_PATH: &str = "/checkpoint";

/// `Cache-Control` of a full tile: it never changes.
pub const IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// `Cache-Control` of the checkpoint and of partial tiles: they are replaced
/// as the log grows.
pub const NO_CACHE: &str = "no-cache";

/// The longest resource path: level 7, 7 index groups, `.p/255`.
const MAX_PATH_BYTES: usize = 64;

/// One resource of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// `/checkpoint`: the signed checkpoint note.
    Checkpoint,
    /// `/tile/...`: a hash tile or an entry bundle.
    Tile(Tile),
}

/// Whether a request path is the log's (the checkpoint or under `/tile/`):
/// the HTTP listener routes it here, where anything not exactly a
/// resource is 404.
pub fn is_log_path(path: &str) -> bool {
    path == CHECKPOINT_PATH || path.starts_with("/tile/")
}

/// What a caller may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    /// A configured auditor: everything.
    Auditor,
    /// A configured source (a witness): the checkpoint and hash tiles.
    Witness,
    /// Anyone else: nothing.
    Stranger,
}

impl Resource {
    /// The resource a request's URL path names, if it names one exactly.
    pub fn parse(path: &str) -> Option<Self> {
        if path == CHECKPOINT_PATH {
            return Some(Self::Checkpoint);
        }
        if path.len() > MAX_PATH_BYTES {
            return None;
        }
        let tile = Tile::parse(path.strip_prefix('/')?)?;
        // One spelling per tile: what `Tile::path` writes, nothing else.
        (tile.path() == path[1..]).then_some(Self::Tile(tile))
    }

    /// Its file under the log directory (`DATA_DIR/log`).
    pub fn file(&self, log_dir: &Path) -> PathBuf {
        match self {
            Self::Checkpoint => log_dir.join("checkpoint"),
            Self::Tile(tile) => log_dir.join(tile.path()),
        }
    }

    /// Its `Content-Type`, as C2SP `tlog-tiles` gives it.
    pub fn content_type(&self) -> &'static str {
        match self {
            Self::Checkpoint => "text/plain; charset=utf-8",
            Self::Tile(_) => "application/octet-stream",
        }
    }

    /// Its `Cache-Control`: full tiles are immutable, the rest is not.
    pub fn cache_control(&self) -> &'static str {
        match self {
            Self::Tile(tile) if tile.is_full() => IMMUTABLE,
            _ => NO_CACHE,
        }
    }

    /// Whether `reader` may read it.
    pub fn readable_by(&self, reader: Reader) -> bool {
        match (self, reader) {
            (_, Reader::Auditor) => true,
            (
                Self::Tile(Tile {
                    kind: Kind::Entries,
                    ..
                }),
                _,
            ) => false,
            (_, Reader::Witness) => true,
            (_, Reader::Stranger) => false,
        }
    }
}

/// Answers `GET path` from the log directory `log_dir` for `reader`: the
/// file with its content type and caching, 404 for a path that names no
/// resource or a tile not written (yet), 403 for a resource the caller may
/// not read.
pub async fn get(log_dir: &Path, path: &str, reader: Reader) -> http::Response<Body> {
    let Some(resource) = Resource::parse(path) else {
        return not_found(path);
    };
    if !resource.readable_by(reader) {
        let what = match reader {
            Reader::Witness => "entry bundles are for auditors: add the caller to auditors",
            _ => "log tiles are for auditors and sources: add the caller to auditors",
        };
        return error(StatusCode::FORBIDDEN, "permission_denied", what);
    }
    match tokio::fs::read(resource.file(log_dir)).await {
        Ok(bytes) => {
            let mut response = http::Response::new(Full::new(Bytes::from(bytes)).boxed());
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(resource.content_type()),
            );
            headers.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static(resource.cache_control()),
            );
            response
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => not_found(path),
        Err(e) => {
            tracing::error!(path, "cannot read a log tile: {e}");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "cannot read the log now: try again later",
            )
        }
    }
}

fn not_found(path: &str) -> http::Response<Body> {
    let shown: String = path.chars().take(80).collect();
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no log resource {shown:?}: GET /checkpoint, then the tiles it names \
             (/tile/<L>/<N>[.p/<W>], /tile/entries/<N>[.p/<W>])"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tile(path: &str) -> Tile {
        match Resource::parse(path) {
            Some(Resource::Tile(t)) => t,
            other => panic!("{path}: {other:?}"),
        }
    }

    #[test]
    fn c2sp_paths_name_their_tiles() {
        assert_eq!(Resource::parse("/checkpoint"), Some(Resource::Checkpoint));
        let t = tile("/tile/0/x001/x234/067");
        assert_eq!(
            (t.kind, t.index, t.width),
            (Kind::Hashes(0), 1_234_067, 256)
        );
        let t = tile("/tile/entries/x001/x234/067.p/5");
        assert_eq!((t.kind, t.index, t.width), (Kind::Entries, 1_234_067, 5));
        let t = tile("/tile/3/000.p/1");
        assert_eq!((t.kind, t.index, t.width), (Kind::Hashes(3), 0, 1));
        let t = tile("/tile/1/255");
        assert_eq!((t.kind, t.index, t.width), (Kind::Hashes(1), 255, 256));
    }

    #[test]
    fn hostile_or_non_canonical_paths_name_nothing() {
        for path in [
            "",
            "/",
            "checkpoint",
            "/checkpoint/",
            "/checkpoint/..",
            "//checkpoint",
            "/CHECKPOINT",
            "/checkpoint%00",
            "/tile",
            "/tile/",
            "/tile/0",
            "/tile/0/",
            "/tile/0/../../checkpoint",
            "/tile/../checkpoint",
            "/tile/0/../0/000",
            "/tile/0/./000",
            "/tile/0//000",
            "/tile/0/000/",
            "/tile/0/%2e%2e/000",
            "/tile/0/00",
            "/tile/0/0000",
            "/tile/0/1",
            "/tile/0/x000/001",
            "/tile/0/x001",
            "/tile/0/001/x234",
            "/tile/0/x1/000",
            "/tile/0/-01",
            "/tile/0/+01",
            "/tile/0/ 01",
            "/tile/00/000",
            "/tile/01/000",
            "/tile/8/000",
            "/tile/99999999999999999999/000",
            "/tile/-1/000",
            "/tile/data/000",
            "/tile/entry/000",
            "/tile/Entries/000",
            "/tile/8/0/000",
            "/tile/8/data/000",
            "/tile/0/000.p/0",
            "/tile/0/000.p/256",
            "/tile/0/000.p/05",
            "/tile/0/000.p/",
            "/tile/0/000.p/5/",
            "/tile/0/000.p/5/6",
            "/tile/0/000.P/5",
            "/tile/0/000.p/5.p/5",
            "/tile/entries/000.p/99999999999999999999",
            "/tile/0/x999/x999/x999/x999/x999/x999/x999/999",
            "/tile/0/x018/x446/x744/x073/x709/x551/616",
            "/tile/0/000\0",
            "/tile/0/000?x=1",
            "/tile/0/\u{0660}\u{0660}\u{0660}",
            "\\tile\\0\\000",
            "/tile\\0\\000",
        ] {
            assert_eq!(Resource::parse(path), None, "{path:?} parsed");
        }
        let long = format!("/tile/0/{}000", "x000/".repeat(20));
        assert_eq!(Resource::parse(&long), None);
    }

    #[test]
    fn every_parsed_path_is_the_tiles_own_path_under_the_log_directory() {
        let dir = Path::new("/data/log");
        for path in [
            "/tile/0/000",
            "/tile/2/x001/000.p/17",
            "/tile/entries/x999/999",
        ] {
            let resource = Resource::parse(path).unwrap();
            let file = resource.file(dir);
            assert_eq!(file, Path::new(&format!("/data/log{path}")));
            assert!(file.starts_with(dir));
            assert!(file.components().all(|c| matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::RootDir
            )));
        }
        assert_eq!(
            Resource::Checkpoint.file(dir),
            Path::new("/data/log/checkpoint")
        );
    }

    #[test]
    fn content_types_and_caching_follow_the_spec() {
        assert_eq!(
            Resource::Checkpoint.content_type(),
            "text/plain; charset=utf-8"
        );
        assert_eq!(Resource::Checkpoint.cache_control(), NO_CACHE);
        let full = Resource::parse("/tile/0/001").unwrap();
        assert_eq!(full.content_type(), "application/octet-stream");
        assert_eq!(full.cache_control(), IMMUTABLE);
        let partial = Resource::parse("/tile/entries/001.p/3").unwrap();
        assert_eq!(partial.content_type(), "application/octet-stream");
        assert_eq!(partial.cache_control(), NO_CACHE);
    }

    #[test]
    fn entry_bundles_are_for_auditors_only() {
        let entries = Resource::parse("/tile/entries/000").unwrap();
        let hashes = Resource::parse("/tile/0/000").unwrap();
        assert!(entries.readable_by(Reader::Auditor));
        assert!(!entries.readable_by(Reader::Witness));
        assert!(!entries.readable_by(Reader::Stranger));
        for r in [hashes, Resource::Checkpoint] {
            assert!(r.readable_by(Reader::Auditor));
            assert!(r.readable_by(Reader::Witness));
            assert!(!r.readable_by(Reader::Stranger));
        }
    }

    async fn answer(dir: &Path, path: &str, reader: Reader) -> (StatusCode, String, Vec<u8>) {
        let response = get(dir, path, reader).await;
        let status = response.status();
        let cache = response
            .headers()
            .get(header::CACHE_CONTROL)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, cache, body.to_vec())
    }

    #[tokio::test]
    async fn files_are_served_and_everything_else_is_refused_with_its_status() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        std::fs::create_dir_all(log.join("tile/entries/000.p")).unwrap();
        std::fs::create_dir_all(log.join("tile/0/000.p")).unwrap();
        std::fs::write(log.join("checkpoint"), "note\n").unwrap();
        std::fs::write(log.join("tile/0/000.p/1"), [7u8; 32]).unwrap();
        std::fs::write(log.join("tile/entries/000.p/1"), [0u8, 1, 9]).unwrap();
        // A file beside the log that a path escaping it would reach.
        std::fs::write(dir.path().join("secret"), "no").unwrap();

        let (status, cache, body) = answer(&log, "/checkpoint", Reader::Witness).await;
        assert_eq!(
            (status, cache.as_str(), &body[..]),
            (StatusCode::OK, NO_CACHE, &b"note\n"[..])
        );
        let (status, _, body) = answer(&log, "/tile/0/000.p/1", Reader::Witness).await;
        assert_eq!((status, body), (StatusCode::OK, vec![7u8; 32]));
        let (status, _, body) = answer(&log, "/tile/entries/000.p/1", Reader::Auditor).await;
        assert_eq!((status, body), (StatusCode::OK, vec![0u8, 1, 9]));

        let (status, _, _) = answer(&log, "/tile/entries/000.p/1", Reader::Witness).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let (status, _, _) = answer(&log, "/checkpoint", Reader::Stranger).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let (status, _, _) = answer(&log, "/tile/0/000", Reader::Auditor).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "a tile not written yet");
        let (status, _, body) = answer(&log, "/tile/../../secret", Reader::Auditor).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(!String::from_utf8(body).unwrap().contains("no\""));
    }
}
