//! The format checked against the reference implementation: statements and
//! policies signed by OpenSSH's own `ssh-keygen -Y sign` verify here, and
//! signatures made here verify with `ssh-keygen -Y verify` against the
//! policy's `allowed_signers`. Also a FIDO2 `sk-ssh-ed25519` signature,
//! made by a software stand-in for a security key.
//!
//! ssh-keygen is required: without it these tests fail, they never pass
//! silently.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use sha2::{Digest, Sha256};
use twokey_consent::ssh_key::{
    Algorithm, HashAlg, PrivateKey, PublicKey, SshSig, public::Ed25519PublicKey, public::KeyData,
    public::SkEd25519,
};
use twokey_consent::{
    ConsentError, SignedStatement, StatementRef, TrustRoot, consent_namespace, policy_namespace,
    verify_policy_update,
};

fn ssh_keygen() -> Command {
    let probe = Command::new("ssh-keygen")
        .arg("-?")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if probe.is_err() {
        panic!(
            "ssh-keygen (OpenSSH 8.2 or later) is required for the OpenSSH interoperability tests and was not found on PATH; install openssh-client"
        );
    }
    Command::new("ssh-keygen")
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().expect("run ssh-keygen");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Generates an ed25519 key with ssh-keygen and loads it.
fn keygen(dir: &Path, name: &str) -> (PathBuf, PrivateKey) {
    let path = dir.join(name);
    run(ssh_keygen()
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&path));
    let key = PrivateKey::read_openssh_file(&path).expect("load ssh-keygen's key");
    (path, key)
}

/// `ssh-keygen -Y sign -n <namespace> -f <key> <file>`: the armored
/// signature it writes to `<file>.sig`.
fn openssh_sign(key: &Path, namespace: &str, data: &[u8], dir: &Path, name: &str) -> Vec<u8> {
    let file = dir.join(name);
    let sig = dir.join(format!("{name}.sig"));
    std::fs::write(&file, data).unwrap();
    // ssh-keygen asks before overwriting a .sig and, with no answer, keeps
    // the old one and exits 0: never let it find one.
    let _ = std::fs::remove_file(&sig);
    run(ssh_keygen()
        .args(["-Y", "sign", "-n", namespace, "-f"])
        .arg(key)
        .arg(&file)
        .stdin(Stdio::null()));
    std::fs::read(&sig).expect("ssh-keygen wrote no signature")
}

/// `ssh-keygen -Y verify -f allowed_signers -I principal -n namespace -s sig < data`.
fn openssh_verify(
    allowed_signers: &Path,
    principal: &str,
    namespace: &str,
    sig: &[u8],
    data: &[u8],
    dir: &Path,
) -> bool {
    let sig_path = dir.join("check.sig");
    std::fs::write(&sig_path, sig).unwrap();
    let mut child = ssh_keygen()
        .args(["-Y", "verify", "-f"])
        .arg(allowed_signers)
        .args(["-I", principal, "-n", namespace, "-s"])
        .arg(&sig_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ssh-keygen");
    child.stdin.take().unwrap().write_all(data).unwrap();
    child.wait_with_output().unwrap().status.success()
}

struct OpenSshWorld {
    dir: tempfile::TempDir,
    paths: BTreeMap<&'static str, PathBuf>,
    world: World,
}

fn openssh_world() -> OpenSshWorld {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = BTreeMap::new();
    let mut keys = BTreeMap::new();
    for &n in NAMES {
        let (p, k) = keygen(dir.path(), n);
        paths.insert(n, p);
        keys.insert(n, k);
    }
    OpenSshWorld {
        dir,
        paths,
        world: World::with_keys(keys),
    }
}

/// Re-signs a statement's exact bytes with ssh-keygen.
fn resign(o: &OpenSshWorld, key: &str, s: &SignedStatement, name: &str) -> SignedStatement {
    SignedStatement {
        statement: s.statement.clone(),
        signature: openssh_sign(
            &o.paths[key],
            &consent_namespace(TD),
            &s.statement,
            o.dir.path(),
            name,
        ),
    }
}

#[test]
fn statements_signed_by_ssh_keygen_release_a_code() {
    let o = openssh_world();
    let w = &o.world;
    let mut a = w.build(&w.plan());
    let theirs = |a: &mut common::Attempt| {
        a.request = resign(&o, "rita", &a.request, "request");
        a.approvals[0] = resign(&o, "adam", &a.approvals[0], "approval-0");
        a.approvals[1] = resign(&o, "anna", &a.approvals[1], "approval-1");
        a.release = resign(&o, "otto", &a.release, "release");
    };
    theirs(&mut a);
    assert!(
        a.release
            .signature
            .starts_with(b"-----BEGIN SSH SIGNATURE-----"),
        "ssh-keygen writes armored signatures"
    );
    let v = a.check(&w.policy).expect("ssh-keygen's signatures verify");
    assert_eq!(v.operator.person, "otto");

    // The raw (binary) form of the same signatures verifies too.
    use ssh_encoding::Encode;
    let raw = |s: &SignedStatement| {
        let pem = String::from_utf8(s.signature.clone()).unwrap();
        let sig = SshSig::from_pem(pem.trim()).unwrap();
        SignedStatement {
            statement: s.statement.clone(),
            signature: {
                let mut out = Vec::new();
                sig.encode(&mut out).unwrap();
                out
            },
        }
    };
    let mut b = w.build(&w.plan());
    theirs(&mut b);
    b.request = raw(&b.request);
    b.release = raw(&b.release);
    assert!(b.release.signature.starts_with(b"SSHSIG"));
    b.check(&w.policy).expect("raw sshsig verifies");

    // ssh-keygen signing under the wrong namespace is refused.
    let mut c = w.build(&w.plan());
    theirs(&mut c);
    c.release.signature = openssh_sign(
        &o.paths["otto"],
        "git",
        &c.release.statement,
        o.dir.path(),
        "git",
    );
    let e = c.check(&w.policy).unwrap_err();
    assert!(
        matches!(&e, ConsentError::WrongNamespace { statement: StatementRef::Release, found, .. } if found == "git"),
        "{e:?}"
    );
}

#[test]
fn a_policy_signed_by_ssh_keygen_verifies() {
    let o = openssh_world();
    let w = &o.world;
    let doc = w.policy_toml(2, "");
    let ns = policy_namespace(TD);
    let admins = ["alice", "bob"];
    // Both admins sign `doc` with ssh-keygen -Y sign.
    let sign_all = |doc: &str, tag: &str| -> Vec<Vec<u8>> {
        admins
            .iter()
            .map(|who| {
                let name = format!("{tag}-{who}");
                openssh_sign(&o.paths[*who], &ns, doc.as_bytes(), o.dir.path(), &name)
            })
            .collect()
    };
    let sigs = sign_all(&doc, "p");
    let v2 = verify_policy_update(Some(&w.policy), &w.root, doc.as_bytes(), &sigs)
        .expect("ssh-keygen's policy signatures verify");
    assert_eq!(v2.signed_by(), admins);

    // The pinned set, read from an allowed_signers file as ssh-keygen reads it.
    let pinned: String = admins
        .iter()
        .map(|who| {
            let public = std::fs::read_to_string(o.paths[*who].with_extension("pub")).unwrap();
            format!("{} {}\n", id(who), public.trim())
        })
        .collect();
    let root = TrustRoot::from_allowed_signers(TD, &pinned, 2).unwrap();
    let doc1 = w.policy_toml(1, "");
    let sigs = sign_all(&doc1, "p1");
    verify_policy_update(None, &root, doc1.as_bytes(), &sigs).expect("first policy");
}

#[test]
fn our_signatures_verify_with_ssh_keygen() {
    let o = openssh_world();
    let w = &o.world;
    let dir = o.dir.path();
    let allowed = dir.join("allowed_signers");
    std::fs::write(&allowed, w.policy.allowed_signers()).unwrap();

    let a = w.build(&w.plan());
    let ns = consent_namespace(TD);
    for (s, who) in [
        (&a.request, id("rita")),
        (&a.approvals[0], id("adam")),
        (&a.approvals[1], id("anna")),
        (&a.release, id("otto")),
    ] {
        assert!(
            openssh_verify(&allowed, &who, &ns, &s.signature, &s.statement, dir),
            "ssh-keygen -Y verify refused our signature for {who}"
        );
    }
    // Not vacuous: the wrong principal, namespace or bytes fail.
    let (anna, otto) = (id("anna"), id("otto"));
    let statement = a.release.statement.as_slice();
    for (principal, namespace, data) in [
        (&anna, ns.as_str(), statement),
        (&otto, "git", statement),
        (&otto, ns.as_str(), b"other bytes".as_slice()),
    ] {
        assert!(
            !openssh_verify(
                &allowed,
                principal,
                namespace,
                &a.release.signature,
                data,
                dir
            ),
            "{principal} {namespace}"
        );
    }
    // rita's second SPIFFE ID is a principal of the same key.
    assert!(openssh_verify(
        &allowed,
        &alt_id("rita"),
        &ns,
        &a.request.signature,
        &a.request.statement,
        dir
    ));

    // Our policy signature verifies under the policy namespace, for admins
    // only (allowed_signers limits each key's namespaces).
    let doc = w.policy_toml(2, "");
    let pns = policy_namespace(TD);
    let sig = w.sign_policy("alice", &doc);
    assert!(openssh_verify(
        &allowed,
        &id("alice"),
        &pns,
        &sig,
        doc.as_bytes(),
        dir
    ));
    let not_admin = twokey_consent::sshsig::sign(&w.keys["rita"], &pns, doc.as_bytes()).unwrap();
    assert!(!openssh_verify(
        &allowed,
        &id("rita"),
        &pns,
        &not_admin,
        doc.as_bytes(),
        dir
    ));
}

/// A software stand-in for a FIDO2 token: an `sk-ssh-ed25519@openssh.com`
/// key whose signatures are made as a token makes them (over
/// SHA-256(application) ‖ flags ‖ counter ‖ SHA-256(message)).
struct SoftToken {
    signing: ed25519_dalek::SigningKey,
    public: PublicKey,
}

impl SoftToken {
    fn new() -> Self {
        let signing = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let key = SkEd25519::new(Ed25519PublicKey(signing.verifying_key().to_bytes()), "ssh:");
        Self {
            signing,
            public: PublicKey::new(KeyData::SkEd25519(key), "token"),
        }
    }

    fn sign(&self, namespace: &str, msg: &[u8], flags: u8) -> Vec<u8> {
        use ed25519_dalek::Signer;
        let signed_data = SshSig::signed_data(namespace, HashAlg::Sha512, msg).unwrap();
        let counter: u32 = 7;
        let mut m = Vec::new();
        m.extend(Sha256::digest(b"ssh:"));
        m.push(flags);
        m.extend(counter.to_be_bytes());
        m.extend(Sha256::digest(&signed_data));
        let mut sig = self.signing.sign(&m).to_bytes().to_vec();
        sig.push(flags);
        sig.extend(counter.to_be_bytes());
        let sig = twokey_consent::ssh_key::Signature::new(Algorithm::SkEd25519, sig).unwrap();
        SshSig::new(
            self.public.key_data().clone(),
            namespace,
            HashAlg::Sha512,
            sig,
        )
        .unwrap()
        .to_pem(twokey_consent::ssh_key::LineEnding::LF)
        .unwrap()
        .into_bytes()
    }
}

#[test]
fn security_key_signatures_need_user_presence() {
    let w = World::new();
    let token = SoftToken::new();
    // otto's entry lists his token as a second key.
    let doc = w.policy_toml(2, "").replace(
        &format!("keys = [\"{}\"]", w.key("otto")),
        &format!(
            "keys = [\"{}\", \"{}\"]",
            w.key("otto"),
            token.public.to_openssh().unwrap()
        ),
    );
    let v2 = verify_policy_update(
        Some(&w.policy),
        &w.root,
        doc.as_bytes(),
        &[w.sign_policy("alice", &doc), w.sign_policy("bob", &doc)],
    )
    .unwrap();
    let mut p = w.plan();
    p.version = 2;
    let mut a = w.build(&p);
    let ns = consent_namespace(TD);
    a.release.signature = token.sign(&ns, &a.release.statement, 0x01);
    let v = a.check(&v2).expect("a touched security key verifies");
    assert_eq!(v.operator.person, "otto");

    a.release.signature = token.sign(&ns, &a.release.statement, 0x00);
    let e = a.check(&v2).unwrap_err();
    assert!(
        matches!(&e, ConsentError::BadSignature { detail, .. } if detail.contains("presence")),
        "{e:?}"
    );
    // Flags are signed: flipping them after signing breaks the signature.
    let mut sig = token.sign(&ns, &a.release.statement, 0x00);
    let pem = String::from_utf8(sig.clone()).unwrap();
    let parsed = SshSig::from_pem(pem.trim()).unwrap();
    let mut bytes = parsed.signature_bytes().to_vec();
    let n = bytes.len();
    bytes[n - 5] = 0x01;
    sig = SshSig::new(
        parsed.public_key().clone(),
        &ns,
        HashAlg::Sha512,
        twokey_consent::ssh_key::Signature::new(Algorithm::SkEd25519, bytes).unwrap(),
    )
    .unwrap()
    .to_pem(twokey_consent::ssh_key::LineEnding::LF)
    .unwrap()
    .into_bytes();
    a.release.signature = sig;
    let e = a.check(&v2).unwrap_err();
    assert!(matches!(&e, ConsentError::BadSignature { .. }), "{e:?}");
}
