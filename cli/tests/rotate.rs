//! `twokey vault sign-action|rotate-key|key-status` with the real `twokey`
//! binary against the real services: two admins sign statement files, any
//! identity hands them to the vault, the rotation runs to its end and
//! retires the old generation; one admin's statement alone is refused in
//! one line.

mod common;

use common::{json, local_system, one_line_error, twokey_as};

#[test]
fn two_admins_rotate_the_vaults_key_with_statement_files() {
    let (tmp, sys) = local_system();
    let cfg = &sys.config;
    let file = |name: &str| tmp.path().join(name).display().to_string();

    let before = json(twokey_as(cfg, "carol").args(["vault", "key-status", "--vault", &sys.vault]));
    assert_eq!(before["state"]["currentGeneration"], 1, "{before}");

    let adam = json(twokey_as(cfg, "adam").args([
        "vault",
        "sign-action",
        "rotate-key",
        "--out",
        &file("adam.json"),
    ]));
    let id = adam["actionId"].as_str().unwrap().to_owned();
    assert_eq!(adam["action"], "rotate-key");
    // adam alone: refused by the vault, in one line, naming the count.
    let err = one_line_error(
        twokey_as(cfg, "carol").args([
            "vault",
            "rotate-key",
            "--vault",
            &sys.vault,
            "--consent",
            &file("adam.json"),
        ]),
        1,
    );
    assert!(
        err.contains("rotate-key of the vault needs 2 distinct admins, 1 signed (adam)"),
        "{err}"
    );
    json(twokey_as(cfg, "anna").args([
        "vault",
        "sign-action",
        "rotate-key",
        "--action-id",
        &id,
        "--out",
        &file("anna.json"),
    ]));
    let started = json(twokey_as(cfg, "carol").args([
        "vault",
        "rotate-key",
        "--vault",
        &sys.vault,
        "--consent",
        &file("adam.json"),
        &file("anna.json"),
    ]));
    assert_eq!(started["started"], true, "{started}");
    let done = json(twokey_as(cfg, "carol").args([
        "vault",
        "key-status",
        "--vault",
        &sys.vault,
        "--wait",
        "--interval",
        "100ms",
    ]));
    let state = &done["state"];
    assert_eq!(state["currentGeneration"], 2, "{done}");
    assert!(state["rotation"].is_null(), "{done}");
    assert_eq!(state["lastRotation"]["actionId"], id.as_str(), "{done}");
    assert_eq!(
        state["lastRotation"]["retired"],
        serde_json::json!([1]),
        "{done}"
    );
    assert_eq!(
        state["generations"].as_array().map(Vec::len),
        Some(1),
        "{done}"
    );
}
