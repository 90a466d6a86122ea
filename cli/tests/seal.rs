//! `twokey vault seal|reshare|unseal|status` with the real `twokey` binary
//! against the real services. The local system's vault runs in the `file`
//! mode: the admins' statement files reach it, and it answers in one line
//! that only the shamir mode can be sealed or re-shared; a statement for
//! another action is refused before anything is sent. Beside it, a second
//! vault in the `shamir` mode (with an audit of its own) goes through
//! unseal, reshare, seal and an unseal with the new shares only.

mod common;

use std::{path::Path, process::Child, time::Duration};

use common::{json, local_system, one_line_error, service_binaries, twokey_as};

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

/// Processes started by a test, killed when it ends.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `text` (a service config) with its `data_dir` line set to `dir`.
fn with_data_dir(text: &str, dir: &Path) -> String {
    text.lines()
        .map(|l| {
            if l.starts_with("data_dir = ") {
                format!("data_dir = {:?}", dir.display().to_string())
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// Starts `bin serve --config config`; its address.
fn serve(bin: &str, config: &Path, log: &Path, children: &mut Children) -> String {
    let mut command = std::process::Command::new(service_binaries().join(bin));
    command.arg("serve").arg("--config").arg(config);
    let log = std::fs::File::create(log).unwrap();
    let (child, addr) =
        twokey_testkit::ready::start(command, bin, log, Duration::from_secs(60)).unwrap();
    children.0.push(child);
    format!("https://{addr}")
}

#[test]
fn holders_unseal_reshare_and_admins_seal_a_shamir_vault_through_the_cli() {
    let (tmp, mut sys) = local_system();
    let cfg = sys.config.clone();
    let dir = tmp.path();
    let pki = sys.dir.join("pki");
    let mut children = Children(Vec::new());

    // An audit and a vault of their own: the same keys, fresh data, the
    // vault sealed 2-of-3 among alice, bob and carol.
    let audit_text = std::fs::read_to_string(&sys.audit_config).unwrap();
    let audit_config = dir.join("audit2.toml");
    std::fs::write(
        &audit_config,
        with_data_dir(&audit_text, &dir.join("audit2")),
    )
    .unwrap();
    let audit = serve(
        "twokey-audit",
        &audit_config,
        &dir.join("audit2.log"),
        &mut children,
    );
    let seal_dir = dir.join("seal");
    let mut init = std::process::Command::new(service_binaries().join("twokey-vault"));
    init.args(["init-key", "--seal", "shamir", "--threshold", "2", "--out"])
        .arg(&seal_dir);
    for name in ["alice", "bob", "carol"] {
        init.arg(format!(
            "--holder={name}=spiffe://twokey.local/user/{name}={}",
            pki.join(format!("{name}.ssh.pub")).display()
        ));
    }
    let out = init.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vault_text = std::fs::read_to_string(sys.dir.join("vault.toml")).unwrap();
    let vault_text = with_data_dir(&vault_text, &dir.join("vault2")).replace(&sys.audit, &audit)
        + &format!(
            "\n[seal]\nmode = \"shamir\"\ndescriptor = {:?}\n",
            seal_dir.join("seal.toml").display().to_string()
        );
    let vault_config = dir.join("vault2.toml");
    std::fs::write(&vault_config, vault_text).unwrap();
    let vault = serve(
        "twokey-vault",
        &vault_config,
        &dir.join("vault2.log"),
        &mut children,
    );
    let file = |name: &str| dir.join(name).display().to_string();
    let key = |name: &str| pki.join(format!("{name}.ssh")).display().to_string();
    let share = |name: &str| {
        seal_dir
            .join(format!("{name}.share.age"))
            .display()
            .to_string()
    };
    let status = || json(twokey_as(&cfg, "carol").args(["vault", "status", "--vault", &vault]));

    assert_eq!(status()["sealed"], true);
    let unseal = |name: &str, share: &str| {
        json(twokey_as(&cfg, name).args([
            "vault",
            "unseal",
            "--vault",
            &vault,
            "--share",
            share,
            "--identity",
            &key(name),
        ]))
    };
    unseal("alice", &share("alice"));
    let p = unseal("bob", &share("bob"));
    assert_ne!(p["sealed"], true, "unsealed: {p}");
    let old_seal = status()["sealId"].as_str().unwrap().to_owned();
    // The admins' policy, applied to this vault as the broker would.
    sys.vault = vault.clone();
    sys.apply_policy(&sys.policy_spec(), &["adam", "anna"])
        .unwrap();

    // Re-share 2-of-3 among alice, bob and olivia.
    let holder = |name: &str| {
        format!(
            "{name}=spiffe://twokey.local/user/{name}={}",
            pki.join(format!("{name}.ssh.pub")).display()
        )
    };
    let started = json(twokey_as(&cfg, "alice").args([
        "vault",
        "reshare",
        "start",
        "--vault",
        &vault,
        "--threshold",
        "2",
        "--holder",
        &holder("alice"),
        "--holder",
        &holder("bob"),
        "--holder",
        &holder("olivia"),
    ]));
    let plan = started["progress"]["reshare"]["planId"]
        .as_str()
        .unwrap()
        .to_owned();
    let shown = status();
    assert_eq!(shown["reshare"]["planId"], plan.as_str(), "{shown}");
    let reshare = |name: &str| {
        twokey_as(&cfg, name)
            .args(["vault", "reshare", "--vault", &vault, "--plan", &plan])
            .args(["--share", &share(name), "--identity", &key(name)])
            .args(["--out", &file(&format!("new-{name}"))])
            .assert()
            .success();
    };
    reshare("carol");
    // The same holder again: refused in one line, nothing changed.
    let err = one_line_error(
        twokey_as(&cfg, "carol").args([
            "vault",
            "reshare",
            "--vault",
            &vault,
            "--plan",
            &plan,
            "--share",
            &share("carol"),
            "--identity",
            &key("carol"),
            "--out",
            &file("again"),
        ]),
        1,
    );
    assert!(err.contains("carol's share was received already"), "{err}");
    reshare("bob");
    let new_shares = dir.join("new-bob");
    let mut names: Vec<String> = std::fs::read_dir(&new_shares)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["alice.share.age", "bob.share.age", "olivia.share.age"]
    );
    let now = status();
    assert_ne!(now["sealId"], old_seal.as_str(), "{now}");
    assert!(now["reshare"].is_null(), "{now}");

    // Two admins seal it with statement files.
    let id = json(twokey_as(&cfg, "adam").args([
        "vault",
        "sign-action",
        "seal",
        "--out",
        &file("adam.json"),
    ]))["actionId"]
        .as_str()
        .unwrap()
        .to_owned();
    json(twokey_as(&cfg, "anna").args([
        "vault",
        "sign-action",
        "seal",
        "--action-id",
        &id,
        "--out",
        &file("anna.json"),
    ]));
    let sealed = json(twokey_as(&cfg, "carol").args([
        "vault",
        "seal",
        "--vault",
        &vault,
        "--consent",
        &file("adam.json"),
        &file("anna.json"),
    ]));
    assert_eq!(
        sealed["admins"],
        serde_json::json!([
            "spiffe://twokey.local/user/adam",
            "spiffe://twokey.local/user/anna"
        ]),
        "{sealed}"
    );
    assert_eq!(status()["sealed"], true);

    // The old shares no longer open it; two of the new ones do.
    let err = one_line_error(
        twokey_as(&cfg, "alice").args([
            "vault",
            "unseal",
            "--vault",
            &vault,
            "--share",
            &share("alice"),
            "--identity",
            &key("alice"),
        ]),
        1,
    );
    assert!(err.contains("foreign share"), "{err}");
    let new = |name: &str| {
        new_shares
            .join(format!("{name}.share.age"))
            .display()
            .to_string()
    };
    unseal("olivia", &new("olivia"));
    let p = unseal("alice", &new("alice"));
    assert_ne!(p["sealed"], true, "unsealed: {p}");
}
