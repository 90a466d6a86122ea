//! House rules a test keeps true (rust-analyzer's `tidy.rs` is the model):
//! every Rust module opens with a `//!` line saying what it is for; the
//! services' domain modules never name `tonic` (only their thin gRPC layer
//! and wiring do); a TODO names its issue; no service's normal dependencies
//! include the development PKI.

use std::path::{Path, PathBuf};

/// The workspace root (this crate sits one level below it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit sits in the workspace")
        .to_owned()
}

/// Every `.rs` file under `dir`, skipping build output.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') && name != "corpus" {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

fn all_rust_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    rust_files(&root(), &mut files);
    files.sort();
    assert!(files.len() > 100, "found only {} .rs files", files.len());
    files
}

fn relative(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Whether a module's first non-blank line is a `//!` line.
fn opens_with_doc(text: &str) -> bool {
    text.trim_start().starts_with("//!")
}

#[test]
fn every_module_opens_with_a_doc_line() {
    let missing: Vec<String> = all_rust_files()
        .into_iter()
        .filter(|f| !opens_with_doc(&std::fs::read_to_string(f).unwrap_or_default()))
        .map(|f| relative(&f))
        .collect();
    assert!(
        missing.is_empty(),
        "these modules do not open with a `//!` line saying what they are for: {missing:#?}"
    );
}

/// Whether `file` (relative to a service crate's `src/`) belongs to the thin
/// gRPC/HTTP layer or the wiring, where `tonic` may appear.
fn is_thin_layer(file: &str) -> bool {
    matches!(file, "grpc.rs" | "convert.rs" | "lib.rs" | "main.rs")
        || file.starts_with("http/")
        || file.starts_with("grpc/")
}

/// Whether code (not a comment) in `text` names the `tonic` crate.
fn names_tonic(text: &str) -> bool {
    text.lines()
        .map(str::trim_start)
        .filter(|l| !l.starts_with("//"))
        .any(|l| l.contains("tonic::") || l.contains("use tonic"))
}

#[test]
fn service_domain_modules_do_not_name_tonic() {
    let mut offenders = Vec::new();
    for service in ["vault", "broker", "audit"] {
        let src = root().join(service).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        assert!(!files.is_empty(), "{service}/src has no modules");
        for f in files {
            let inner = f.strip_prefix(&src).unwrap().display().to_string();
            if is_thin_layer(&inner) {
                continue;
            }
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            if names_tonic(&text) {
                offenders.push(relative(&f));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "domain modules must not use tonic (map to it in grpc.rs/convert.rs): {offenders:#?}"
    );
}

#[test]
fn a_todo_names_its_issue() {
    let bare: Vec<String> = all_rust_files()
        .into_iter()
        .filter(|f| !f.ends_with("testkit/tests/tidy.rs"))
        .flat_map(|f| {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            text.lines()
                .enumerate()
                .filter(|(_, l)| {
                    let l = l.to_ascii_uppercase();
                    (l.contains("TODO") || l.contains("FIXME")) && !l.contains("ISSUE ")
                })
                .map(|(n, _)| format!("{}:{}", relative(&f), n + 1))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        bare.is_empty(),
        "a TODO or FIXME must say which issue tracks it (\"issue N\"): {bare:#?}"
    );
}

#[test]
fn the_tidy_rules_catch_what_they_forbid() {
    // The doc-line rule reads the first non-blank line.
    assert!(opens_with_doc("\n//! what\nfn x() {}"));
    assert!(!opens_with_doc("use std::fs;\n//! late"));
    assert!(!opens_with_doc("/// an item doc\nfn x() {}"));
    // The thin layer is exactly the gRPC/HTTP edge and the wiring.
    assert!(is_thin_layer("grpc.rs") && is_thin_layer("http/mod.rs"));
    assert!(!is_thin_layer("service.rs") && !is_thin_layer("state.rs"));
    // Code that names tonic is caught; a comment about it is not.
    assert!(names_tonic("use tonic::Status;\n"));
    assert!(names_tonic("fn f() -> tonic::Status { todo() }"));
    assert!(!names_tonic(
        "//! No tonic here; grpc.rs maps the errors.\n"
    ));
}

#[test]
fn no_service_links_the_development_pki() {
    for service in ["vault", "broker", "audit"] {
        let manifest = std::fs::read_to_string(root().join(service).join("Cargo.toml")).unwrap();
        let normal = manifest
            .split("[dev-dependencies]")
            .next()
            .unwrap_or_default();
        for forbidden in ["rcgen", "twokey-testkit"] {
            assert!(
                !normal.contains(forbidden),
                "{service}'s normal dependencies name {forbidden}; the dev PKI belongs to testkit"
            );
        }
    }
    let runtime = std::fs::read_to_string(root().join("runtime/Cargo.toml")).unwrap();
    let normal = runtime
        .split("[dev-dependencies]")
        .next()
        .unwrap_or_default();
    assert!(
        !normal.contains("rcgen"),
        "runtime links rcgen into every service"
    );
}
