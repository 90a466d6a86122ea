//! Key rotation (issue 19): M admins of the policy start it over the
//! `KeyService`; the real `twokey-vault` binary, killed with SIGKILL at
//! random points of rotations in 20 rounds and started again each time,
//! resumes by itself, serves codes meanwhile and ends with every seed
//! readable under one generation; every refusal has its exact status and
//! is audited; no seed or key reaches a log or a file in the clear; a
//! sealed vault answers the key service UNAVAILABLE. Each rotation also
//! replaces the master key (file mode: the key file); kills land inside
//! that too, and at the end the first master key file opens nothing.

mod common;

use std::{
    io::Write,
    process::{Child, Command},
    time::Duration,
};

use common::*;
use rand::{Rng, RngCore};
use tonic::{Code, transport::Channel};
use twokey_consent::AdminAction;
use twokey_proto::{
    audit::v1::Event,
    vault::v1::{
        EnrollRequest, GenerateCodeRequest, KeyStatusRequest, KeyringState, RotateKeyRequest,
        enroll_request::Seed, key_service_client::KeyServiceClient,
    },
};
use twokey_testkit::ready;

/// Seeds enrolled: enough that a rotation in batches of two, with a pause
/// after each, takes long enough for a kill to land inside it.
const ACCOUNTS: usize = 30;
const ROUNDS: usize = 20;

fn account(i: usize) -> String {
    format!("acct-{i:02}")
}

/// A fresh random 160-bit seed, Base32.
fn secret() -> String {
    let mut seed = [0u8; 20];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    data_encoding::BASE32_NOPAD.encode(&seed)
}

fn write_config(fx: &Fixture, audit: std::net::SocketAddr) -> std::path::PathBuf {
    let c = fx.vault_config(audit);
    let text = format!(
        r#"listen = "127.0.0.1:0"
trust_domain = "{td}"
data_dir = "{data}"
master_key_file = "{master}"
event_key_file = "{event}"
broker_id = "{broker}"
grant_public_key = "{grant}"
audit_address = "{audit}"
[tls]
{tls}
[consent]
admins_file = {admins:?}
threshold = 2
"#,
        td = c.trust_domain,
        data = c.data_dir.display(),
        master = c.master_key_file.display(),
        event = c.event_key_file.display(),
        broker = c.broker_id,
        grant = c.grant_public_key,
        audit = c.audit_address,
        tls = toml::to_string(&c.tls).unwrap(),
        admins = fx
            .path()
            .join("admins.allowed_signers")
            .display()
            .to_string(),
    );
    let path = fx.path().join("vault.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts the vault binary, re-sealing in batches of two seeds with a
/// 25 ms pause after each, logging at trace level to `vault.log` (appended
/// across starts); waits for its "listening on" line.
async fn start_process(config: &std::path::Path) -> (Child, std::net::SocketAddr) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_twokey-vault"));
    cmd.arg("serve")
        .arg("--config")
        .arg(config)
        .env("TWOKEY_LOG", "trace")
        .env("TWOKEY_VAULT_ROTATION_BATCH", "2")
        .env("TWOKEY_VAULT_ROTATION_PAUSE_MS", "25")
        .env("TWOKEY_VAULT_MASTER_PAUSE_MS", "300");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(config.with_extension("log"))
        .unwrap();
    writeln!(log, "--- start").unwrap();
    tokio::task::spawn_blocking(move || {
        ready::start(cmd, "twokey-vault", log, Duration::from_secs(60))
    })
    .await
    .unwrap()
    .expect("the vault serves")
}

fn keys_client(fx: &Fixture, addr: std::net::SocketAddr, cert: &str) -> KeyServiceClient<Channel> {
    KeyServiceClient::new(fx.channel(addr, cert))
}

async fn key_status(fx: &Fixture, addr: std::net::SocketAddr) -> KeyringState {
    keys_client(fx, addr, "mallory")
        .key_status(KeyStatusRequest {})
        .await
        .expect("any identity of the trust domain may ask")
        .into_inner()
        .state
        .unwrap()
}

/// adam's and anna's consent to rotate the key (a new action id).
fn rotate_request(fx: &Fixture, admins: &[&twokey_testkit::consent::Person]) -> RotateKeyRequest {
    RotateKeyRequest {
        consent: Some(fx.admin_consent(1, "", AdminAction::RotateKey, admins)),
    }
}

/// Enrolls `account` with `secret` (one-second steps: releases of one
/// account never wait long for a step no code was handed out for).
async fn enroll(fx: &Fixture, addr: std::net::SocketAddr, account: &str, secret: &str) {
    fx.broker_client(addr)
        .enroll(EnrollRequest {
            account_id: account.into(),
            seed: Some(Seed::Base32Secret(secret.into())),
            period: 1,
            grant: Some(fx.enroll_grant(account, "adam")),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// One code of `account`, checked against the code computed here from
/// its known seed for the step the vault chose.
async fn right_code(fx: &Fixture, addr: std::net::SocketAddr, account: &str, secret: &str) {
    let release = fx.consented(account, 1);
    for _ in 0..40 {
        match fx
            .broker_client(addr)
            .generate_code(GenerateCodeRequest {
                grant: Some(release.grant.clone()),
                evidence: Some(release.evidence.clone()),
            })
            .await
        {
            Err(e) if e.code() == Code::Unavailable && e.message().contains("try again") => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Ok(r) => {
                let code = r.into_inner().code.unwrap();
                assert_eq!(code.code, code_of(secret, code.step), "{account}");
                return;
            }
            Err(e) => panic!("{account}: {e:?}"),
        }
    }
    panic!("{account}: no step came free");
}

fn events_named(audit: &FakeAudit, action: &str) -> Vec<Event> {
    audit
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.action == action)
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_killed_at_random_points_in_20_rounds_leave_every_seed_readable() {
    let fx = Fixture::new();
    let audit = FakeAudit::default();
    let audit_server = start_fake_audit(&fx, audit.clone()).await;
    let config = write_config(&fx, audit_server.addr);
    let (mut child, mut addr) = start_process(&config).await;
    // ACCOUNTS enrolled first, one more in each round while a rotation runs.
    let mut accounts: Vec<String> = (0..ACCOUNTS).map(account).collect();
    let late: Vec<String> = (0..ROUNDS).map(|r| format!("late-{r:02}")).collect();
    let names: Vec<&str> = accounts.iter().chain(&late).map(String::as_str).collect();
    fx.apply(addr, 1, &names).await;
    let mut secrets: Vec<String> = (0..ACCOUNTS).map(|_| secret()).collect();
    for (id, secret) in accounts.iter().zip(&secrets) {
        enroll(&fx, addr, id, secret).await;
    }
    let first = key_status(&fx, addr).await;
    assert_eq!(first.current_generation, 1);
    assert_eq!(first.generations.len(), 1);
    assert_eq!(first.generations[0].seeds, ACCOUNTS as u64);

    let admins = [&fx.people.adam, &fx.people.anna];
    let key_file = fx.path().join("master.key");
    let first_key = std::fs::read_to_string(&key_file).unwrap();
    let mut masters = vec![first_key.clone()];
    let mut started = 0;
    let mut in_flight = 0;
    let mut killed_mid_rotation = 0;
    for (round, late_id) in late.iter().enumerate() {
        if round % 2 == 1 {
            // Killed inside the master key's replacement, after its step 1
            // (odd rounds 1, 5, ...) or its step 2 (3, 7, ...): once the
            // rotation before has ended, a RotateKey call runs and the kill
            // follows the step's log line (each step is followed by a
            // 300 ms pause).
            for _ in 0..600 {
                if key_status(&fx, addr).await.rotation.is_none() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            in_flight += 1;
            let marker = if round % 4 == 1 {
                "the next key is recorded; writing its seal material"
            } else {
                "the seal material is written; promoting"
            };
            let log_file = config.with_extension("log");
            let seen = || {
                std::fs::read_to_string(&log_file)
                    .unwrap()
                    .matches(marker)
                    .count()
            };
            let before = seen();
            let mut keys = keys_client(&fx, addr, "mallory");
            let request = rotate_request(&fx, &admins);
            let call = tokio::spawn(async move { keys.rotate_key(request).await });
            for _ in 0..3000 {
                if seen() > before {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            assert!(seen() > before, "round {round}: {marker:?} not logged");
            child.kill().unwrap();
            child.wait().unwrap();
            let _ = call.await;
            (child, addr) = start_process(&config).await;
            let state = key_status(&fx, addr).await;
            let master = state.master.clone().unwrap();
            // Finished or promoted at the start, before serving.
            assert_eq!(master.pending_generation, 0, "round {round}");
            assert_eq!(master.generation, state.current_generation, "round {round}");
            masters.push(std::fs::read_to_string(&key_file).unwrap());
        }
        let state = key_status(&fx, addr).await;
        if state.rotation.is_none() {
            let answer = keys_client(&fx, addr, "mallory")
                .rotate_key(rotate_request(&fx, &admins))
                .await
                .expect("two admins rotate the key")
                .into_inner();
            assert!(answer.started);
            let replaced = answer.master_replaced.expect("the master key is replaced");
            assert_eq!(replaced.files, [key_file.display().to_string()]);
            let now = std::fs::read_to_string(&key_file).unwrap();
            assert!(
                !masters.contains(&now),
                "round {round}: the key file did not change"
            );
            masters.push(now);
            started += 1;
        }
        // A seed enrolled meanwhile is sealed under the newest generation.
        let secret = secret();
        enroll(&fx, addr, late_id, &secret).await;
        accounts.push(late_id.clone());
        secrets.push(secret);
        // Codes are served while it runs.
        let i = round % ACCOUNTS;
        right_code(&fx, addr, &accounts[i], &secrets[i]).await;
        let delay = rand::thread_rng().gen_range(0..350);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        child.kill().unwrap();
        child.wait().unwrap();
        (child, addr) = start_process(&config).await;
        masters.push(std::fs::read_to_string(&key_file).unwrap());
        // Every seed is readable by the vault at every point.
        let state = key_status(&fx, addr).await;
        assert_eq!(
            state.master.as_ref().unwrap().generation,
            state.current_generation,
            "round {round}"
        );
        let seeds: u64 = state.generations.iter().map(|g| g.seeds).sum();
        assert_eq!(seeds, accounts.len() as u64, "round {round}");
        if state.rotation.is_some() {
            killed_mid_rotation += 1;
        }
    }
    // Let the last one finish by itself.
    let mut state = key_status(&fx, addr).await;
    for _ in 0..200 {
        if state.rotation.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        state = key_status(&fx, addr).await;
    }
    assert!(state.rotation.is_none(), "{state:?}");
    // One generation in use: the newest, every seed under it.
    assert_eq!(state.generations.len(), 1, "{state:?}");
    assert_eq!(state.generations[0].generation, state.current_generation);
    assert_eq!(state.generations[0].seeds, (ACCOUNTS + ROUNDS) as u64);
    // Every rotation started, answered or killed in flight, made a
    // generation and a master key.
    assert!(state.current_generation > started, "{state:?}");
    let master = state.master.clone().unwrap();
    assert_eq!(master.generation, state.current_generation);
    assert_eq!(master.pending_generation, 0);
    assert_eq!(master.seal_mode, "file");
    eprintln!(
        "{started} rotations started; {killed_mid_rotation} of {ROUNDS} kills landed inside one"
    );
    assert!(killed_mid_rotation >= 1, "no kill landed inside a rotation");
    for (id, secret) in accounts.iter().zip(&secrets) {
        right_code(&fx, addr, id, secret).await;
    }
    // Each step audited, the resumptions too.
    assert!(events_named(&audit, "key.rotation.started").len() >= started as usize);
    assert!(!events_named(&audit, "key.rotation.resumed").is_empty());
    assert!(!events_named(&audit, "key.rotation.batch").is_empty());
    assert!(
        events_named(&audit, "key.master.replaced").len() >= started as usize,
        "each rotation replaced the master key"
    );
    let finished = events_named(&audit, "key.rotation.finished");
    assert!(!finished.is_empty());
    assert!(finished.iter().all(|e| e.actor.contains("/user/adam")));
    child.kill().unwrap();
    child.wait().unwrap();

    // No seed, and not the master key, in the log or any file in the
    // clear; no event carries one either.
    let log = std::fs::read_to_string(config.with_extension("log")).unwrap();
    assert!(log.contains("resuming the key rotation"), "not logged");
    let resumed = log.matches("resuming the master key replacement").count();
    let promoted = log
        .matches("interrupted after its seal material was written is promoted")
        .count();
    eprintln!(
        "of {in_flight} kills inside a master key replacement, {resumed} resumed writing the seal material at the next start, {promoted} promoted it"
    );
    assert!(resumed >= 1, "no kill landed between steps 1 and 2");
    assert!(promoted >= 1, "no kill landed between steps 2 and 3");
    assert!(!events_named(&audit, "key.master.resumed").is_empty());

    // A copy of the first master key file opens nothing any more.
    let old_key = fx.path().join("old-master.key");
    std::fs::write(&old_key, &first_key).unwrap();
    std::fs::set_permissions(
        &old_key,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let old_config = fx.path().join("old-vault.toml");
    std::fs::write(
        &old_config,
        std::fs::read_to_string(&config).unwrap().replace(
            &format!("master_key_file = \"{}\"", key_file.display()),
            &format!("master_key_file = \"{}\"", old_key.display()),
        ),
    )
    .unwrap();
    let refused = refused_start(&old_config).await;
    assert!(
        refused.contains("the master key file is not the key this data directory was created with"),
        "{refused}"
    );
    let master = std::fs::read_to_string(fx.path().join("master.key")).unwrap();
    let master_keys: Vec<Vec<u8>> = masters
        .iter()
        .map(|m| {
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, m.trim()).unwrap()
        })
        .collect();
    let events = format!("{:?}", audit.events.lock().unwrap());
    for secret in &secrets {
        assert!(!log.contains(secret.as_str()), "a seed in the log");
        assert!(!events.contains(secret.as_str()), "a seed in an event");
    }
    for m in &masters {
        assert!(!log.contains(m.trim()), "a master key in the log");
        assert!(!events.contains(m.trim()), "a master key in an event");
    }
    assert!(masters.contains(&master));
    let raw: Vec<Vec<u8>> = secrets
        .iter()
        .map(|s| data_encoding::BASE32_NOPAD.decode(s.as_bytes()).unwrap())
        .collect();
    for file in files_under(&fx.path().join("vault-data")) {
        let bytes = std::fs::read(&file).unwrap();
        for seed in raw.iter().chain(&master_keys) {
            assert!(
                !bytes.windows(seed.len()).any(|w| w == seed.as_slice()),
                "{} holds a seed or the master key",
                file.display()
            );
        }
    }
}

/// Runs the vault binary with `config`, which must refuse to start:
/// returns what it printed.
async fn refused_start(config: &std::path::Path) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_twokey-vault"))
        .arg("serve")
        .arg("--config")
        .arg(config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..600 {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            assert!(!out.status.success());
            return format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.kill().unwrap();
    panic!("the vault started with a master key it should refuse");
}

#[tokio::test]
async fn rotate_key_needs_m_admins_of_the_policy_and_each_refusal_has_its_status() {
    let fx = Fixture::new();
    let audit = FakeAudit::default();
    let audit_server = start_fake_audit(&fx, audit.clone()).await;
    let vault = start_vault(fx.vault_config(audit_server.addr)).await;
    let addr = vault.addr;
    let keys = || keys_client(&fx, addr, "mallory");
    let (adam, anna, alice) = (&fx.people.adam, &fx.people.anna, &fx.people.alice);

    // No policy in force: nobody's statements can count.
    let err = keys()
        .rotate_key(rotate_request(&fx, &[adam, anna]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("no signed policy is in force"),
        "{err:?}"
    );

    fx.apply(addr, 1, &["aws-prod-root"]).await;
    fx.broker_client(addr)
        .enroll(EnrollRequest {
            account_id: "aws-prod-root".into(),
            seed: Some(Seed::Base32Secret(secret())),
            grant: Some(fx.enroll_grant("aws-prod-root", "adam")),
            ..Default::default()
        })
        .await
        .unwrap();
    let refused = |consent| RotateKeyRequest {
        consent: Some(consent),
    };
    let cases = [
        (
            refused(fx.admin_consent(1, "", AdminAction::RotateKey, &[adam])),
            Code::FailedPrecondition,
            "rotate-key of the vault needs 2 distinct admins, 1 signed (adam)",
        ),
        (
            refused(fx.admin_consent(1, "", AdminAction::RotateKey, &[adam, alice])),
            Code::PermissionDenied,
            "admin",
        ),
        (
            refused(fx.admin_consent(1, "aws-prod-root", AdminAction::RotateKey, &[adam, anna])),
            Code::FailedPrecondition,
            "the vault is asked to rotate-key of the vault",
        ),
        (
            refused(fx.admin_consent(1, "", AdminAction::SealVault, &[adam, anna])),
            Code::FailedPrecondition,
            "it consents to seal of the vault",
        ),
        (
            RotateKeyRequest { consent: None },
            Code::PermissionDenied,
            "admin statement #1 is missing",
        ),
    ];
    for (request, code, says) in cases {
        let err = keys().rotate_key(request).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(says), "{says}: {err:?}");
        let event = stored_event(&audit, |e| {
            e.action == "admin_action.refused"
                && e.attributes.get("reason") == Some(&err.message().to_owned())
        })
        .await;
        assert_eq!(event.attributes["admin_action"], "rotate-key");
        assert!(event.actor.ends_with("/user/mallory"), "{event:?}");
    }
    // Nothing changed: one generation, no rotation.
    let state = key_status(&fx, addr).await;
    assert_eq!(state.current_generation, 1);
    assert!(state.rotation.is_none() && state.last_rotation.is_none());

    // Two admins: started; the same request again answers that rotation.
    let request = rotate_request(&fx, &[adam, anna]);
    let first = keys()
        .rotate_key(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(first.started);
    let rotation = first
        .state
        .as_ref()
        .and_then(|s| s.rotation.clone().or(s.last_rotation.clone()))
        .unwrap();
    assert_eq!(rotation.generation, 2);
    assert_eq!(
        rotation.admins,
        [adam.id().to_owned(), anna.id().to_owned()]
    );
    let again = keys()
        .rotate_key(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(!again.started);
    // Finished (one seed), it is the last rotation; a second one retires
    // generation 2 in turn.
    let mut state = key_status(&fx, addr).await;
    for _ in 0..100 {
        if state.rotation.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        state = key_status(&fx, addr).await;
    }
    let last = state.last_rotation.clone().unwrap();
    assert_eq!((last.generation, last.retired.clone()), (2, vec![1]));
    assert_eq!(last.phase, "finished");
    let second = keys()
        .rotate_key(rotate_request(&fx, &[adam, anna]))
        .await
        .unwrap()
        .into_inner();
    assert!(second.started);
    // The first rotation's statements once more: that action was carried
    // out and is not the last rotation, so it is a replay.
    let mut replayed = None;
    for _ in 0..100 {
        let state = key_status(&fx, addr).await;
        if state.rotation.is_none() {
            replayed = Some(keys().rotate_key(request.clone()).await.unwrap_err());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = replayed.expect("the second rotation finished");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("was carried out already"), "{err:?}");
    let state = key_status(&fx, addr).await;
    assert_eq!(state.current_generation, 3);
    assert_eq!(state.generations.len(), 1);
    assert_eq!(
        (state.generations[0].generation, state.generations[0].seeds),
        (3, 1)
    );
    vault.stop().await;
}

/// `name`'s share in `dir`, decrypted with their ssh key as `twokey vault
/// unseal` does.
fn share(fx: &Fixture, dir: &std::path::Path, name: &str) -> Vec<u8> {
    use twokey_consent::ssh_key::LineEnding;
    let encrypted = std::fs::read(dir.join(format!("{name}.share.age"))).unwrap();
    let person = fx
        .people
        .all()
        .into_iter()
        .find(|p| p.name == name)
        .unwrap();
    let pem = person.key.to_openssh(LineEnding::LF).unwrap();
    let identity = age::ssh::Identity::from_buffer(pem.as_bytes(), None).unwrap();
    age::decrypt(&identity, &encrypted).unwrap()
}

#[tokio::test]
async fn the_key_service_answers_unavailable_while_the_vault_is_sealed() {
    use twokey_proto::vault::v1::{
        SealRequest, UnsealRequest, seal_service_client::SealServiceClient,
    };
    use twokey_vault::{
        config::SealConfig,
        unseal::{self, HolderSpec},
    };
    let fx = Fixture::new();
    // A 2-of-2 split between alice and bob.
    let specs: Vec<HolderSpec> = [&fx.people.alice, &fx.people.bob]
        .iter()
        .map(|p| HolderSpec {
            name: p.name.clone(),
            spiffe_id: p.id().to_owned(),
            public_key: p.key.public_key().to_openssh().unwrap(),
        })
        .collect();
    for name in ["alice", "bob"] {
        fx.ca
            .issue_user(TD, name)
            .unwrap()
            .write(fx.path(), name)
            .unwrap();
    }
    let dir = fx.path().join("seal");
    std::fs::create_dir(&dir).unwrap();
    let split = unseal::split(&twokey_runtime::keys::SecretKey::generate(), 2, &specs).unwrap();
    unseal::write_split(&dir, &split).unwrap();
    let audit = start_fake_audit(&fx, FakeAudit::default()).await;
    let config = twokey_vault::VaultConfig {
        seal: Some(SealConfig {
            mode: "shamir".into(),
            descriptor: dir.join(unseal::DESCRIPTOR_FILE),
            unseal_timeout: "10m".into(),
            ..Default::default()
        }),
        ..fx.vault_config(audit.addr)
    };
    let vault = start_vault(config).await;
    let addr = vault.addr;
    let unavailable = |e: tonic::Status| {
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(e.message().starts_with("vault is sealed"), "{e:?}");
    };
    unavailable(
        keys_client(&fx, addr, "mallory")
            .key_status(KeyStatusRequest {})
            .await
            .unwrap_err(),
    );
    unavailable(
        keys_client(&fx, addr, "mallory")
            .rotate_key(rotate_request(&fx, &[&fx.people.adam, &fx.people.anna]))
            .await
            .unwrap_err(),
    );
    for name in ["alice", "bob"] {
        SealServiceClient::new(fx.channel(addr, name))
            .unseal(UnsealRequest {
                share: share(&fx, &dir, name),
            })
            .await
            .unwrap();
    }
    // Unsealed: the keyring's first generation.
    assert_eq!(key_status(&fx, addr).await.current_generation, 1);
    fx.apply(addr, 1, &["aws-prod-root"]).await;
    let rotated = keys_client(&fx, addr, "mallory")
        .rotate_key(rotate_request(&fx, &[&fx.people.adam, &fx.people.anna]))
        .await
        .unwrap()
        .into_inner();
    assert!(rotated.started);
    // Sealed by two admins: the key service is closed again.
    SealServiceClient::new(fx.channel(addr, "mallory"))
        .seal(SealRequest {
            consent: Some(fx.admin_consent(
                1,
                "",
                AdminAction::SealVault,
                &[&fx.people.adam, &fx.people.anna],
            )),
        })
        .await
        .unwrap();
    unavailable(
        keys_client(&fx, addr, "mallory")
            .key_status(KeyStatusRequest {})
            .await
            .unwrap_err(),
    );
    vault.stop().await;
}
