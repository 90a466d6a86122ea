//! The `pkcs11` seal mode on SoftHSM2, the real HSM of these tests: each
//! test makes its own token in a temp dir (`SOFTHSM2_CONF` is set only for
//! the processes it starts), runs the real `twokey-vault init-key --seal
//! pkcs11` and `serve` binaries over real mTLS, and checks that codes come
//! from the same seed across restarts and across a key rotation, that a
//! wrong PIN, key, token or blob is refused by name with no PIN in any
//! output, and that the descriptor holds no key byte.

mod common;

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use twokey_proto::vault::v1::{EnrollRequest, enroll_request::Seed};
use twokey_vault::hsm;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const SECRET: &str = "JBSWY3DPEHPK3PXP";
const OTHER_SECRET: &str = "KRSXG5CTMVRXEZLUKN2XAZLSKNSWG4TF";
const TOKEN: &str = "twokey";
const PIN: &str = "83917461";
const WRONG_PIN: &str = "50287713";
const SO_PIN: &str = "5732195846";

/// A SoftHSM2 token of its own under `dir`: its config, and the user PIN
/// in a file of mode 0600.
struct Token {
    conf: PathBuf,
    pin_file: PathBuf,
    /// The slot SoftHSM2 gave the token.
    slot: u64,
}

impl Token {
    fn new(dir: &Path) -> Self {
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).unwrap();
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                tokens.display()
            ),
        )
        .unwrap();
        let out = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", TOKEN])
            .args(["--pin", PIN, "--so-pin", SO_PIN])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .expect("softhsm2-util runs: install softhsm2 (scripts/test does)");
        assert!(
            out.status.success(),
            "softhsm2-util --init-token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let said = String::from_utf8_lossy(&out.stdout);
        let slot = said
            .split("reassigned to slot ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no slot in softhsm2-util's answer: {said}"));
        let pin_file = dir.join("hsm.pin");
        std::fs::write(&pin_file, format!("{PIN}\n")).unwrap();
        std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        Self {
            conf,
            pin_file,
            slot,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_twokey-vault"));
        c.args(args).env("SOFTHSM2_CONF", &self.conf);
        c
    }

    /// Imports `key` into the token as an AES key labelled `label`.
    fn import(&self, dir: &Path, label: &str, key: &[u8]) {
        let file = dir.join(format!("{label}.aes"));
        std::fs::write(&file, key).unwrap();
        let out = Command::new("softhsm2-util")
            .arg("--import")
            .arg(&file)
            .args(["--aes", "--token", TOKEN, "--label", label, "--id", "0a"])
            .args(["--pin", PIN])
            .env("SOFTHSM2_CONF", &self.conf)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "softhsm2-util --import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `twokey-vault init-key --seal pkcs11` into `out` with wrapping key
    /// `key_label`; its output.
    fn init(&self, out: &Path, key_label: &str) -> std::process::Output {
        self.command(&["init-key", "--seal", "pkcs11", "--module", MODULE])
            .args(["--token-label", TOKEN, "--key-label", key_label])
            .arg("--pin-file")
            .arg(&self.pin_file)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    }
}

/// The `[seal]` lines of a pkcs11 vault.
fn seal_section(descriptor: &Path, token: &str, key_label: &str, pin: &str) -> String {
    format!(
        "\n[seal]\nmode = \"pkcs11\"\ndescriptor = \"{}\"\nmodule = \"{MODULE}\"\ntoken_label = \"{token}\"\nkey_label = \"{key_label}\"\n{pin}\n",
        descriptor.display()
    )
}

/// A vault config file for the real binary, with `seal` appended.
fn write_config(fx: &Fixture, audit: std::net::SocketAddr, name: &str, seal: &str) -> PathBuf {
    let mut config = fx.vault_config(audit);
    let text = format!(
        "listen = \"127.0.0.1:0\"\ntrust_domain = \"{TD}\"\ndata_dir = \"{data}\"\nevent_key_file = \"{event}\"\nbroker_id = \"{broker}\"\ngrant_public_key = \"{grant}\"\naudit_address = \"{audit}\"\n\n[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\nca = \"{ca}\"\n\n[consent]\nadmins_file = \"{admins}\"\nthreshold = 2\n{seal}",
        data = config.data_dir.display(),
        event = config.event_key_file.display(),
        broker = config.broker_id,
        grant = config.grant_public_key,
        audit = config.audit_address,
        cert = config.tls.cert.display(),
        key = config.tls.key.display(),
        ca = config.tls.ca.display(),
        admins = config.consent.take().unwrap().admins_file.display(),
    );
    let path = fx.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A vault process, killed when dropped.
struct Vault {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Drop for Vault {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn serve(token: &Token, config: &Path, log: &Path) -> Vault {
    let mut command = token.command(&["serve", "--config"]);
    command.arg(config);
    let log = std::fs::File::create(log).unwrap();
    let (child, addr) = tokio::task::spawn_blocking(move || {
        twokey_testkit::ready::start(command, "twokey-vault", log, Duration::from_secs(60))
    })
    .await
    .unwrap()
    .expect("the pkcs11 vault unwraps its key and serves");
    Vault { child, addr }
}

/// Runs `serve` expecting it to refuse to start: its exit code and
/// everything it printed.
fn refused(token: &Token, config: &Path) -> (Option<i32>, String) {
    let dir = config.parent().unwrap();
    let (out, err) = (dir.join("refused.out"), dir.join("refused.err"));
    let mut child = token
        .command(&["serve", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the vault did not stop: it should have refused to start");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&out).unwrap() + &std::fs::read_to_string(&err).unwrap();
    (status.code(), text)
}

async fn enroll(fx: &Fixture, addr: std::net::SocketAddr, account: &str, secret: &str) {
    let enrolled = fx
        .broker_client(addr)
        .enroll(EnrollRequest {
            account_id: account.into(),
            seed: Some(Seed::Base32Secret(secret.into())),
            grant: Some(fx.enroll_grant(account, "adam")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for code in [enrolled.current.unwrap(), enrolled.next.unwrap()] {
        assert_eq!(code.code, code_of(secret, code.step));
    }
}

async fn release(fx: &Fixture, addr: std::net::SocketAddr, account: &str, secret: &str) {
    let release = fx.consented(account, 1);
    let code = fx
        .broker_client(addr)
        .generate_code(release.request())
        .await
        .unwrap()
        .into_inner()
        .code
        .unwrap();
    assert_eq!(code.code, code_of(secret, code.step));
}

#[tokio::test]
async fn a_vault_sealed_by_softhsm2_serves_codes_of_the_same_seeds_across_restarts() {
    let fx = Fixture::new();
    let token = Token::new(fx.path());
    let seal = fx.path().join("seal");
    let out = token.init(&seal, "twokey-master");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("made the AES-256 key \"twokey-master\" in token \"twokey\""),
        "{stdout}"
    );
    let files: Vec<_> = std::fs::read_dir(&seal)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(files, ["seal.toml"]);
    let descriptor = seal.join(hsm::DESCRIPTOR_FILE);
    let d = hsm::Descriptor::load(&descriptor).unwrap();
    assert_eq!(
        (d.mode.as_str(), d.key_label.as_str()),
        ("pkcs11", "twokey-master")
    );

    let audit = start_fake_audit(&fx, FakeAudit::default()).await;
    let pin_line = format!("pin_file = \"{}\"", token.pin_file.display());
    let config = write_config(
        &fx,
        audit.addr,
        "vault.toml",
        &seal_section(&descriptor, TOKEN, "twokey-master", &pin_line),
    );
    let log = fx.path().join("vault.log");
    let vault = serve(&token, &config, &log).await;
    fx.apply(vault.addr, 1, &["aws-prod-root", "aws-dev-root"])
        .await;
    enroll(&fx, vault.addr, "aws-prod-root", SECRET).await;
    enroll(&fx, vault.addr, "aws-dev-root", OTHER_SECRET).await;
    release(&fx, vault.addr, "aws-prod-root", SECRET).await;
    drop(vault);

    // Restarted, the HSM unwraps the same key: the seeds sealed before open,
    // and the policy head sealed under it checks.
    let vault = serve(&token, &config, &log).await;
    release(&fx, vault.addr, "aws-dev-root", OTHER_SECRET).await;
    drop(vault);

    // The PIN from a variable instead of a file serves the same.
    let config = write_config(
        &fx,
        audit.addr,
        "vault-env.toml",
        &seal_section(
            &descriptor,
            TOKEN,
            "twokey-master",
            "pin_env = \"TWOKEY_TEST_HSM_PIN\"",
        ),
    );
    let mut command = token.command(&["serve", "--config"]);
    command.arg(&config).env("TWOKEY_TEST_HSM_PIN", PIN);
    let log_file = std::fs::File::create(&log).unwrap();
    let (child, addr) = tokio::task::spawn_blocking(move || {
        twokey_testkit::ready::start(command, "twokey-vault", log_file, Duration::from_secs(60))
    })
    .await
    .unwrap()
    .expect("the vault serves with the PIN from pin_env");
    let vault = Vault { child, addr };
    let status = fx
        .broker_client(vault.addr)
        .status(twokey_proto::vault::v1::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!status.sealed);
    drop(vault);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("pkcs11: the master key was unwrapped by the HSM"),
        "{logged}"
    );
    assert!(!logged.contains(PIN), "the PIN in the log: {logged}");
}

#[tokio::test]
async fn a_wrong_pin_is_refused_by_name_and_printed_nowhere() {
    let fx = Fixture::new();
    let token = Token::new(fx.path());
    let seal = fx.path().join("seal");
    assert!(token.init(&seal, "master").status.success());
    let audit = start_fake_audit(&fx, FakeAudit::default()).await;
    let wrong = fx.path().join("wrong.pin");
    std::fs::write(&wrong, format!("{WRONG_PIN}\n")).unwrap();
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = write_config(
        &fx,
        audit.addr,
        "vault.toml",
        &seal_section(
            &seal.join(hsm::DESCRIPTOR_FILE),
            TOKEN,
            "master",
            &format!("pin_file = \"{}\"", wrong.display()),
        ),
    );
    let (code, text) = refused(&token, &config);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "cannot start: pkcs11: the token refused the PIN; check pin_file {} (each wrong PIN counts toward the token's lockout)",
            wrong.display()
        )),
        "{text}"
    );
    assert!(!text.contains(WRONG_PIN) && !text.contains(PIN), "{text}");
    assert!(!text.contains("panicked"), "{text}");

    // A PIN file others can read is refused before the token sees it.
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, text) = refused(&token, &config);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("pkcs11: pin_file: key file") && text.contains("chmod 600"),
        "{text}"
    );
}

#[tokio::test]
async fn a_wrong_key_token_or_blob_is_refused_by_name() {
    let fx = Fixture::new();
    let token = Token::new(fx.path());
    let (seal, other) = (fx.path().join("seal"), fx.path().join("other"));
    assert!(token.init(&seal, "master").status.success());
    // A second seal, wrapped by another key of the same token.
    assert!(token.init(&other, "another").status.success());
    let descriptor = seal.join(hsm::DESCRIPTOR_FILE);
    let audit = start_fake_audit(&fx, FakeAudit::default()).await;
    let pin = format!("pin_file = \"{}\"", token.pin_file.display());
    let refusal = |name: &str, seal: String| {
        let config = write_config(&fx, audit.addr, name, &seal);
        let (code, text) = refused(&token, &config);
        assert_eq!(code, Some(1), "{text}");
        assert!(!text.contains(PIN), "{text}");
        text
    };

    let text = refusal(
        "no-key.toml",
        seal_section(&descriptor, TOKEN, "nope", &pin),
    );
    assert!(
        text.contains(&format!(
            "cannot start: pkcs11: no AES key labelled \"nope\" in token \"twokey\"; check [seal] key_label (init-key wrapped {} with the key \"master\" in token \"twokey\")",
            descriptor.display()
        )),
        "{text}"
    );

    let text = refusal(
        "no-token.toml",
        seal_section(&descriptor, "elsewhere", "master", &pin),
    );
    assert!(
        text.contains("cannot start: pkcs11: no token \"elsewhere\" in /usr/lib/softhsm/libsofthsm2.so (tokens: \"twokey\" in slot "),
        "{text}"
    );

    // The other seal's blob under this seal's key: named as another key's.
    let foreign = other.join(hsm::DESCRIPTOR_FILE);
    let text = refusal(
        "foreign.toml",
        seal_section(&foreign, TOKEN, "master", &pin),
    );
    assert!(
        text.contains(&format!(
            "cannot start: pkcs11: the key labelled \"master\" in token \"twokey\" is not the key that wrapped {} (its check value differs; init-key used the key \"another\")",
            foreign.display()
        )),
        "{text}"
    );

    // A blob changed by one byte: the HSM's GCM tag refuses it.
    let mut d = hsm::Descriptor::load(&descriptor).unwrap();
    let mut wrapped = base64_decode(&d.wrapped_key);
    wrapped[0] ^= 1;
    d.wrapped_key = base64_encode(&wrapped);
    let changed = fx.path().join("changed.toml");
    d.write(&changed).unwrap();
    let text = refusal(
        "changed.toml.vault",
        seal_section(&changed, TOKEN, "master", &pin),
    );
    assert!(
        text.contains(&format!(
            "cannot start: pkcs11: the wrapped key in {} does not open under this key",
            changed.display()
        )),
        "{text}"
    );

    // A descriptor whose key check is another key's.
    let mut d = hsm::Descriptor::load(&descriptor).unwrap();
    d.key_check = hsm::Descriptor::load(&foreign).unwrap().key_check;
    let checked = fx.path().join("checked.toml");
    d.write(&checked).unwrap();
    let text = refusal(
        "checked.toml.vault",
        seal_section(&checked, TOKEN, "master", &pin),
    );
    assert!(
        text.contains(&format!(
            "cannot start: pkcs11: the unwrapped master key fails the key check in {}",
            checked.display()
        )),
        "{text}"
    );
}

#[test]
fn init_key_makes_or_finds_the_wrapping_key_refuses_an_unfit_one_and_never_overwrites() {
    let fx = Fixture::new();
    let token = Token::new(fx.path());
    let text = |o: &std::process::Output| {
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
    };
    let first = fx.path().join("first");
    let o = token.init(&first, "master");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).starts_with(
            "made the AES-256 key \"master\" in token \"twokey\" (sensitive, never extractable)"
        ),
        "{}",
        text(&o)
    );
    // The same label again: found, not made twice; the same key wraps.
    let second = fx.path().join("second");
    let o = token.init(&second, "master");
    assert!(
        text(&o).starts_with("found the AES-256 key \"master\""),
        "{}",
        text(&o)
    );
    let load = |dir: &Path| hsm::Descriptor::load(&dir.join(hsm::DESCRIPTOR_FILE)).unwrap();
    assert_eq!(
        load(&first).wrapping_key_check,
        load(&second).wrapping_key_check
    );

    // The token by its slot number finds the same key.
    let by_slot = fx.path().join("by-slot");
    let o = token
        .command(&["init-key", "--seal", "pkcs11", "--module", MODULE])
        .args(["--slot", &token.slot.to_string(), "--key-label", "master"])
        .arg("--pin-file")
        .arg(&token.pin_file)
        .arg("--out")
        .arg(&by_slot)
        .output()
        .unwrap();
    assert!(
        text(&o).starts_with(&format!(
            "found the AES-256 key \"master\" in the token in slot {}",
            token.slot
        )),
        "{}",
        text(&o)
    );
    let d = load(&by_slot);
    assert_eq!(
        (d.token_label.as_str(), d.wrapping_key_check.as_str()),
        (TOKEN, load(&first).wrapping_key_check.as_str())
    );

    // Never overwritten, and refused before the token is touched.
    let before = std::fs::read(first.join(hsm::DESCRIPTOR_FILE)).unwrap();
    let o = token.init(&first, "master");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("seal.toml exists and is never overwritten"),
        "{}",
        text(&o)
    );
    assert_eq!(
        std::fs::read(first.join(hsm::DESCRIPTOR_FILE)).unwrap(),
        before
    );

    // An AES-128 key of that label is not fit: refused, nothing written.
    token.import(fx.path(), "short", &[7u8; 16]);
    let short = fx.path().join("short");
    let o = token.init(&short, "short");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains(
            "pkcs11: the key labelled \"short\" in token \"twokey\" is not a sensitive, non-extractable AES-256 key that may encrypt and decrypt (128 bits); choose another --key-label"
        ),
        "{}",
        text(&o)
    );
    assert!(!short.exists());

    // An imported AES-256 key serves, and init says copies may exist.
    token.import(fx.path(), "imported", &[9u8; 32]);
    let o = token.init(&fx.path().join("imported"), "imported");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("but imported: copies of it may exist outside the token"),
        "{}",
        text(&o)
    );

    // No PIN source: refused, saying never on the command line.
    let o = token
        .command(&["init-key", "--seal", "pkcs11", "--module", MODULE])
        .args(["--token-label", TOKEN, "--key-label", "master", "--out"])
        .arg(fx.path().join("no-pin"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains(
            "--pin-file FILE (mode 0600) or --pin-env VARIABLE; never on the command line"
        ),
        "{}",
        text(&o)
    );
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Set in the child process of
/// [`the_descriptor_holds_no_key_byte_and_unwraps_to_the_same_key`]: the
/// directory of its token.
const CHILD_DIR: &str = "TWOKEY_TEST_HSM_CHILD_DIR";

/// The library's wrap and unwrap with a key the test knows, run in a child
/// process of this test binary so that only it has `SOFTHSM2_CONF` set.
#[test]
fn the_descriptor_holds_no_key_byte_and_unwraps_to_the_same_key() {
    if let Ok(dir) = std::env::var(CHILD_DIR) {
        return wrap_and_unwrap_a_known_key(Path::new(&dir));
    }
    let dir = tempfile::tempdir().unwrap();
    let token = Token::new(dir.path());
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "the_descriptor_holds_no_key_byte_and_unwraps_to_the_same_key",
            "--test-threads=1",
            "--nocapture",
        ])
        .env("SOFTHSM2_CONF", &token.conf)
        .env(CHILD_DIR, dir.path())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    // The child ran the checks (a filter that matched nothing passes too).
    assert_eq!(
        std::fs::read_to_string(dir.path().join("checked")).unwrap(),
        "wrapped, unwrapped, found"
    );
}

fn wrap_and_unwrap_a_known_key(dir: &Path) {
    use twokey_runtime::keys::SecretKey;
    let settings = hsm::Settings {
        module: MODULE.into(),
        token: hsm::TokenRef::Label(TOKEN.into()),
        key_label: "known".into(),
        pin: hsm::PinSource::File(dir.join("hsm.pin")),
    };
    let key = SecretKey::generate();
    let wrapped = hsm::wrap(&settings, &key).unwrap();
    assert!(wrapped.made && wrapped.born_inside);
    let d = wrapped.descriptor;
    let path = dir.join(hsm::DESCRIPTOR_FILE);
    d.write(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    let k = key.expose();
    assert!(!bytes.windows(32).any(|w| w == k), "the raw key");
    let hex: String = k.iter().map(|b| format!("{b:02x}")).collect();
    for spelling in [base64_encode(k), hex, format!("{:?}", &k[..8])] {
        assert!(!text.contains(spelling.trim_end_matches(']')), "{spelling}");
    }
    let unwrapped = hsm::unwrap(&settings, &hsm::Descriptor::load(&path).unwrap(), &path).unwrap();
    assert_eq!(unwrapped.expose(), key.expose());
    // A second wrap finds the same key instead of making one.
    let again = hsm::wrap(&settings, &key).unwrap();
    assert!(!again.made && again.born_inside);
    let again = again.descriptor;
    assert_eq!(again.wrapping_key_check, d.wrapping_key_check);
    assert_ne!(again.wrapped_key, d.wrapped_key, "a fresh IV and seal id");
    std::fs::write(dir.join("checked"), "wrapped, unwrapped, found").unwrap();
}

/// The keyring's state, as any identity of the trust domain may ask.
async fn key_state(
    fx: &Fixture,
    addr: std::net::SocketAddr,
) -> twokey_proto::vault::v1::KeyringState {
    twokey_proto::vault::v1::key_service_client::KeyServiceClient::new(fx.channel(addr, "mallory"))
        .key_status(twokey_proto::vault::v1::KeyStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .state
        .unwrap()
}

#[tokio::test]
async fn a_key_rotation_under_a_softhsm2_seal_keeps_every_seed_across_a_restart() {
    let fx = Fixture::new();
    let token = Token::new(fx.path());
    let seal = fx.path().join("seal");
    assert!(token.init(&seal, "master").status.success());
    let audit = start_fake_audit(&fx, FakeAudit::default()).await;
    let pin_line = format!("pin_file = \"{}\"", token.pin_file.display());
    let config = write_config(
        &fx,
        audit.addr,
        "vault.toml",
        &seal_section(&seal.join(hsm::DESCRIPTOR_FILE), TOKEN, "master", &pin_line),
    );
    let log = fx.path().join("vault.log");
    let vault = serve(&token, &config, &log).await;
    fx.apply(vault.addr, 1, &["aws-prod-root", "aws-dev-root"])
        .await;
    enroll(&fx, vault.addr, "aws-prod-root", SECRET).await;
    enroll(&fx, vault.addr, "aws-dev-root", OTHER_SECRET).await;
    assert_eq!(key_state(&fx, vault.addr).await.current_generation, 1);
    let descriptor = seal.join(hsm::DESCRIPTOR_FILE);
    let old_descriptor = std::fs::read_to_string(&descriptor).unwrap();
    let old_seal_id = hsm::Descriptor::load(&descriptor).unwrap().seal_id;
    let master = key_state(&fx, vault.addr).await.master.unwrap();
    assert_eq!(
        (
            master.generation,
            master.seal_mode.as_str(),
            master.seal_id.as_str()
        ),
        (1, "pkcs11", old_seal_id.as_str())
    );

    // Two admins rotate; the vault re-seals both seeds under generation 2
    // and replaces the master key, wrapped anew by the same HSM key.
    let consent = fx.admin_consent(
        1,
        "",
        twokey_consent::AdminAction::RotateKey,
        &[&fx.people.adam, &fx.people.anna],
    );
    let answer = twokey_proto::vault::v1::key_service_client::KeyServiceClient::new(
        // Any identity of the trust domain: the statements are the authority.
        fx.channel(vault.addr, "mallory"),
    )
    .rotate_key(twokey_proto::vault::v1::RotateKeyRequest {
        consent: Some(consent),
    })
    .await
    .unwrap()
    .into_inner();
    assert!(answer.started);
    let replaced = answer.master_replaced.unwrap();
    let new = hsm::Descriptor::load(&descriptor).unwrap();
    assert_eq!(replaced.generation, 2);
    assert_eq!(replaced.seal_id, new.seal_id);
    assert_ne!(new.seal_id, old_seal_id);
    assert_ne!(
        new.key_check,
        toml::from_str::<hsm::Descriptor>(&old_descriptor)
            .unwrap()
            .key_check
    );
    assert_eq!(replaced.files, [descriptor.display().to_string()]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut state = key_state(&fx, vault.addr).await;
    while state.rotation.is_some() {
        assert!(
            Instant::now() < deadline,
            "the rotation did not end: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        state = key_state(&fx, vault.addr).await;
    }
    let generations = |s: &twokey_proto::vault::v1::KeyringState| -> Vec<(u32, u64)> {
        s.generations
            .iter()
            .map(|g| (g.generation, g.seeds))
            .collect()
    };
    assert_eq!(state.current_generation, 2);
    assert_eq!(generations(&state), [(2, 2)]);
    release(&fx, vault.addr, "aws-prod-root", SECRET).await;
    drop(vault);

    // Restarted, the HSM unwraps the same master key, which opens the
    // rotated keyring: the same seeds, the same codes.
    let vault = serve(&token, &config, &log).await;
    let state = key_state(&fx, vault.addr).await;
    assert_eq!(
        (state.current_generation, generations(&state)),
        (2, vec![(2, 2)])
    );
    release(&fx, vault.addr, "aws-dev-root", OTHER_SECRET).await;
    let master = state.master.unwrap();
    assert_eq!((master.generation, master.seal_id), (2, new.seal_id));
    drop(vault);

    // The old seal.toml unwraps the old master key, which opens nothing.
    let old_seal = fx.path().join("old-seal");
    std::fs::create_dir(&old_seal).unwrap();
    std::fs::write(old_seal.join(hsm::DESCRIPTOR_FILE), &old_descriptor).unwrap();
    let old_config = write_config(
        &fx,
        audit.addr,
        "old-vault.toml",
        &seal_section(
            &old_seal.join(hsm::DESCRIPTOR_FILE),
            TOKEN,
            "master",
            &pin_line,
        ),
    );
    let (code, text) = refused(&token, &old_config);
    assert_ne!(code, Some(0));
    assert!(
        text.contains("not the key this data directory was created with"),
        "{text}"
    );
}
