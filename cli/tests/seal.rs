//! `twokey vault seal|reshare` with the real `twokey` binary against the
//! real services (the local system's vault runs in the `file` mode): the
//! admins' statement files reach the vault, which answers in one line that
//! only the shamir mode can be sealed or re-shared; a statement for another
//! action is refused before anything is sent.

mod common;

use common::{json, local_system, one_line_error, twokey_as};

#[test]
fn seal_and_reshare_reach_the_vault_which_says_the_file_mode_has_no_holders() {
    let (tmp, sys) = local_system();
    let cfg = &sys.config;
    let file = |name: &str| tmp.path().join(name).display().to_string();

    let adam = json(twokey_as(cfg, "adam").args([
        "vault",
        "sign-action",
        "seal",
        "--out",
        &file("adam.json"),
    ]));
    assert_eq!(adam["action"], "seal", "{adam}");
    let id = adam["actionId"].as_str().unwrap().to_owned();
    json(twokey_as(cfg, "anna").args([
        "vault",
        "sign-action",
        "seal",
        "--action-id",
        &id,
        "--out",
        &file("anna.json"),
    ]));
    let err = one_line_error(
        twokey_as(cfg, "carol").args([
            "vault",
            "seal",
            "--vault",
            &sys.vault,
            "--consent",
            &file("adam.json"),
            &file("anna.json"),
        ]),
        1,
    );
    assert!(
        err.contains("this vault does not run in the shamir seal mode"),
        "{err}"
    );

    // A rotate-key statement is not one for a seal: refused locally.
    json(twokey_as(cfg, "adam").args([
        "vault",
        "sign-action",
        "rotate-key",
        "--out",
        &file("rotate.json"),
    ]));
    let err = one_line_error(
        twokey_as(cfg, "carol").args([
            "vault",
            "seal",
            "--vault",
            &sys.vault,
            "--consent",
            &file("rotate.json"),
        ]),
        1,
    );
    assert!(
        err.contains("is not a statement for `twokey vault seal`"),
        "{err}"
    );

    // Re-sharing needs holders too.
    let key = sys.ssh_key("alice");
    let public = format!("{}.pub", key.display());
    let err = one_line_error(
        twokey_as(cfg, "alice").args([
            "vault",
            "reshare",
            "start",
            "--vault",
            &sys.vault,
            "--threshold",
            "2",
            "--holder",
            &format!("alice=spiffe://twokey.local/user/alice={public}"),
            "--holder",
            &format!("bob=spiffe://twokey.local/user/bob={public}"),
        ]),
        1,
    );
    assert!(
        err.contains("this vault does not run in the shamir seal mode"),
        "{err}"
    );
}
