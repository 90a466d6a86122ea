//! Go's `golang.org/x/mod/sumdb/tlog` (vendored unchanged in
//! `tests/go/tilecheck`) verifies twokey's C2SP `tlog-tiles` as any standard
//! tile client would: the checkpoint with `sumdb/note`, every hash tile
//! authenticated against it by `tlog.TileHashReader`, the tree hash, every
//! entry's record hash, inclusion proofs and a consistency proof — over
//! tile directories written with twokey-tlog's tile code, and over HTTPS
//! from a real `twokey-audit` process, whose tile routes are also checked
//! here (content types, caching, 403 for who may not read, 404 for any
//! other path). The Go parts are skipped, with a message, where Go is not
//! installed.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use common::*;
use ed25519_dalek::SigningKey;
use twokey_audit::checkpoint::{Checkpoint, CheckpointSigner};
use twokey_tlog::{
    merkle::{Hash, leaf_hash},
    tile::{Kind, Tile, WIDTH, push_entry, subtree_of},
};

/// Writes the tiles, entry bundles and signed checkpoint of a log of
/// `entries` under `log` with twokey-tlog's tile code, the layout the audit
/// store keeps in `DATA_DIR/log`.
fn write_log(log: &Path, entries: &[Vec<u8>], signer: &CheckpointSigner) -> Hash {
    let write = |tile: Tile, bytes: &[u8]| {
        let file = log.join(tile.path());
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, bytes).unwrap();
    };
    let tiles_of = |n: usize| (0..n.div_ceil(WIDTH as usize)).map(|i| (i, i * WIDTH as usize));
    for (index, start) in tiles_of(entries.len()) {
        let chunk = &entries[start..entries.len().min(start + WIDTH as usize)];
        let mut bundle = Vec::new();
        for e in chunk {
            push_entry(&mut bundle, e).unwrap();
        }
        let tile = Tile {
            kind: Kind::Entries,
            index: index as u64,
            width: chunk.len() as u16,
        };
        write(tile, &bundle);
    }
    let mut hashes: Vec<Hash> = entries.iter().map(|e| leaf_hash(e)).collect();
    let mut level = 0u8;
    while !hashes.is_empty() {
        for (index, start) in tiles_of(hashes.len()) {
            let chunk = &hashes[start..hashes.len().min(start + WIDTH as usize)];
            let tile = Tile {
                kind: Kind::Hashes(level),
                index: index as u64,
                width: chunk.len() as u16,
            };
            write(tile, &chunk.concat());
        }
        hashes = hashes
            .chunks_exact(WIDTH as usize)
            .map(|c| subtree_of(c).unwrap())
            .collect();
        level += 1;
    }
    let leaves: Vec<Hash> = entries.iter().map(|e| leaf_hash(e)).collect();
    let root = twokey_tlog::merkle::root(&leaves);
    let note = signer
        .sign(&Checkpoint {
            origin: signer.name().to_owned(),
            size: entries.len() as u64,
            root,
        })
        .unwrap();
    std::fs::write(log.join("checkpoint"), note).unwrap();
    root
}

fn signer() -> CheckpointSigner {
    CheckpointSigner::new("twokey.test/audit", SigningKey::from_bytes(&[5; 32])).unwrap()
}

fn tilecheck_dir(bin: &Path, key: &str, log: &Path) -> Output {
    Command::new(bin)
        .args(["-key", key, "-proofs", "300", "-dir"])
        .arg(log)
        .output()
        .unwrap()
}

/// The record hashes Go printed, in order.
fn record_hashes(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("entry "))
        .map(|l| l.split(' ').nth(1).unwrap().to_owned())
        .collect()
}

fn assert_verified(out: &Output, entries: &[Vec<u8>]) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "Go's sumdb/tlog refused the tiles: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        stdout.lines().take(3).collect::<Vec<_>>().join("\n")
    );
    assert!(
        stdout.starts_with(&format!("checkpoint twokey.test/audit {}\n", entries.len())),
        "{}",
        stdout.lines().next().unwrap_or_default()
    );
    let want: Vec<String> = entries.iter().map(|e| hex::encode(leaf_hash(e))).collect();
    assert_eq!(record_hashes(out), want);
    assert!(stdout.contains("\nconsistent "), "no consistency check");
    assert!(stdout.ends_with("ok\n"));
}

fn tilecheck() -> Option<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::tempdir().unwrap();
    let bin = go_build("tilecheck", dir.path())?;
    Some((dir, bin))
}

#[test]
fn go_tlog_verifies_tiles_written_by_our_tile_code_at_every_edge() {
    let Some((dir, bin)) = tilecheck() else {
        return;
    };
    let key = signer().verifier().to_string();
    // Sizes at the edges of tiles of levels 0, 1 and 2.
    for size in [1usize, 2, 255, 256, 257, 511, 512, 65_535, 65_536, 65_537] {
        let log = dir.path().join(format!("log-{size}"));
        let entries: Vec<Vec<u8>> = (0..size as u32)
            .map(|i| format!("entry {i}").into_bytes())
            .collect();
        write_log(&log, &entries, &signer());
        let out = tilecheck_dir(&bin, &key, &log);
        assert_verified(&out, &entries);
    }
}

#[test]
fn go_tlog_refuses_a_changed_entry_hash_tile_or_checkpoint() {
    let Some((dir, bin)) = tilecheck() else {
        return;
    };
    let key = signer().verifier().to_string();
    let entries: Vec<Vec<u8>> = (0..300u32).map(|i| i.to_be_bytes().to_vec()).collect();
    let fresh = |name: &str| {
        let log = dir.path().join(name);
        write_log(&log, &entries, &signer());
        assert!(tilecheck_dir(&bin, &key, &log).status.success());
        log
    };
    let flip = |file: PathBuf, at: usize| {
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[at] ^= 1;
        std::fs::write(file, bytes).unwrap();
    };
    let refused = |log: &Path, why: &str| {
        let out = tilecheck_dir(&bin, &key, log);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{why}: {stderr}");
        assert!(stderr.contains("log does not verify"), "{why}: {stderr}");
    };

    let log = fresh("entry");
    flip(log.join("tile/entries/001.p/44"), 2 + 3); // a byte of entry 256
    refused(&log, "a changed entry");

    let log = fresh("hash");
    flip(log.join("tile/0/000"), 32 * 7); // leaf hash 7
    refused(&log, "a changed hash tile");

    let log = fresh("checkpoint");
    let other =
        CheckpointSigner::new("twokey.test/audit", SigningKey::from_bytes(&[6; 32])).unwrap();
    write_log(&log, &entries[..299], &other);
    refused(&log, "a checkpoint by another key");

    let log = fresh("missing");
    std::fs::remove_file(log.join("tile/1/000.p/1")).unwrap();
    refused(&log, "a missing tile");
}

/// Starts the real binary with its HTTPS listener on: the running process,
/// its gRPC and its HTTPS address.
fn start_with_https(env: &Env) -> (Running, std::net::SocketAddr, std::net::SocketAddr) {
    use std::io::BufRead;
    let config = env.path().join("audit-http.toml");
    std::fs::write(&config, "http_listen = \"127.0.0.1:0\"\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_twokey-audit"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .args(serve_flags(env))
        .env_remove("TWOKEY_AUDIT_CONFIG")
        .env("TWOKEY_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let running = Running(child);
    let (mut grpc, mut https) = (None, None);
    while grpc.is_none() || https.is_none() {
        let line = lines
            .next()
            .expect("twokey-audit exited before it served")
            .unwrap();
        let parse =
            |svc| twokey_testkit::ready::announced_addr(&line, svc).map(|a| a.parse().unwrap());
        grpc = grpc.or(parse("twokey-audit"));
        https = https.or(parse("twokey-audit-http"));
    }
    std::thread::spawn(move || lines.for_each(drop));
    (running, grpc.unwrap(), https.unwrap())
}

/// `GET path` (or another method) as `name`: status, content type, cache
/// control and body.
async fn get(
    env: &Env,
    addr: std::net::SocketAddr,
    name: &str,
    method: &str,
    path: &str,
) -> (u16, String, String, Vec<u8>) {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = https_connector(env, Some(name), b"http/1.1")
        .connect(
            rustls::pki_types::ServerName::try_from("audit").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "audit")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let header = |h| {
        response
            .headers()
            .get(h)
            .map(|v: &http::HeaderValue| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let (ctype, cache) = (
        header(http::header::CONTENT_TYPE),
        header(http::header::CACHE_CONTROL),
    );
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, ctype, cache, body.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_audit_serves_its_tiles_over_mtls_to_auditors_witnesses_and_go_sumdb_tlog() {
    let env = Env::new();
    let (_audit, grpc, https) = start_with_https(&env);
    // 300 entries: a full tile of each kind at level 0, partial ones after.
    let events = (1..=300u64)
        .map(|seq| event(&env.vault(), seq, "code.released"))
        .collect();
    let answers = append_all(&mut env.client(grpc, "vault"), events)
        .await
        .unwrap();
    assert_eq!(answers.len(), 300);
    assert!(answers.iter().all(Result::is_ok));
    let mut carol = env.client(grpc, "carol");
    assert_eq!(checkpoint(&mut carol).await.tree_size, 300);
    let entries = query_all(&mut carol).await;
    let leaves: Vec<Vec<u8>> = entries
        .iter()
        .map(|e| prost::Message::encode_to_vec(e.signed_event.as_ref().unwrap()))
        .collect();

    let (status, ctype, cache, body) = get(&env, https, "carol", "GET", "/checkpoint").await;
    assert_eq!(
        (status, ctype.as_str(), cache.as_str()),
        (200, "text/plain; charset=utf-8", "no-cache")
    );
    let note = String::from_utf8(body).unwrap();
    assert_eq!(env.verifier().open_checkpoint(&note).unwrap().size, 300);

    let (status, ctype, cache, body) = get(&env, https, "carol", "GET", "/tile/0/000").await;
    assert_eq!(
        (status, ctype.as_str(), cache.as_str()),
        (
            200,
            "application/octet-stream",
            "public, max-age=31536000, immutable"
        )
    );
    let want: Vec<u8> = leaves[..256].iter().flat_map(|l| leaf_hash(l)).collect();
    assert_eq!(body, want);
    let (status, _, cache, body) = get(&env, https, "carol", "GET", "/tile/entries/001.p/44").await;
    assert_eq!((status, cache.as_str()), (200, "no-cache"));
    let mut bundle = Vec::new();
    for l in &leaves[256..] {
        push_entry(&mut bundle, l).unwrap();
    }
    assert_eq!(body, bundle);

    // A source (witness) reads hashes and the checkpoint, not the events.
    assert_eq!(get(&env, https, "vault", "GET", "/tile/0/000").await.0, 200);
    assert_eq!(get(&env, https, "vault", "GET", "/checkpoint").await.0, 200);
    assert_eq!(
        get(&env, https, "vault", "GET", "/tile/entries/000")
            .await
            .0,
        403
    );
    // Anyone else reads nothing.
    assert_eq!(
        get(&env, https, "mallory", "GET", "/checkpoint").await.0,
        403
    );
    assert_eq!(
        get(&env, https, "mallory", "GET", "/tile/0/000").await.0,
        403
    );
    // Only the C2SP grammar, only GET.
    for path in [
        "/tile/0/../../checkpoint",
        "/tile/8/0/000",
        "/tile/0/000/",
        "/tile/0/2",
    ] {
        assert_eq!(
            get(&env, https, "carol", "GET", path).await.0,
            404,
            "{path}"
        );
    }
    assert_eq!(
        get(&env, https, "carol", "POST", "/checkpoint").await.0,
        405
    );

    // Go's sumdb/tlog over HTTPS with carol's certificate.
    let Some(bin) = go_build("tilecheck", &env.path()) else {
        return;
    };
    let pki = env.path();
    let out = Command::new(bin)
        .args(["-key", &env.verifier().to_string(), "-url"])
        .arg(format!("https://{https}"))
        .arg("-ca")
        .arg(pki.join("ca.crt"))
        .arg("-cert")
        .arg(pki.join("carol.crt"))
        .arg("-tlskey")
        .arg(pki.join("carol.key"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "Go's sumdb/tlog refused the served tiles: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("checkpoint twokey.test/audit 300\n"),
        "{stdout}"
    );
    let want: Vec<String> = leaves.iter().map(|l| hex::encode(leaf_hash(l))).collect();
    assert_eq!(record_hashes(&out), want);
    assert!(stdout.ends_with("ok\n"));
}
