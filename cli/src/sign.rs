//! Signing with the person's own OpenSSH key, in OpenSSH's `sshsig` form
//! (what `ssh-keygen -Y sign` writes): through the agent at `$SSH_AUTH_SOCK`
//! when it is set — the identity whose public key is the profile's
//! `ssh_key` (read from `FILE.pub`, else from `FILE`) — else with the
//! unencrypted `ssh-ed25519` key file itself. A security key
//! (`sk-ssh-ed25519@openssh.com`) and an encrypted key file sign only
//! through the agent.
//!
//! The agent client is the two requests of the agent protocol twokey needs
//! (draft-miller-ssh-agent: REQUEST_IDENTITIES 11 → IDENTITIES_ANSWER 12,
//! SIGN_REQUEST 13 → SIGN_RESPONSE 14), written here over `ssh-encoding`:
//! the maintained client crate needs `ssh-key`'s `crypto` feature (RSA, DSA
//! and the NIST curves, which twokey refuses anyway), and feature
//! unification would build those into every crate using `ssh-key`.
//!
//! No private key is ever printed, logged or put in an error.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use ssh_encoding::Decode;
use twokey_consent::{
    Binding, SignedStatement, Statement, consent_namespace, encode_statement, new_statement,
    policy_namespace,
    ssh_key::{Algorithm, HashAlg, LineEnding, PrivateKey, PublicKey, Signature, SshSig},
};

use twokey_proto::broker::v1::{GetRequestRequest, Request, WhoAmIRequest};
use zeroize::Zeroizing;

use crate::{
    error::{CliError, Target},
    profile::{BrokerClient, Settings},
};

/// SSH_AGENT_FAILURE.
const AGENT_FAILURE: u8 = 5;
/// SSH_AGENTC_REQUEST_IDENTITIES.
const REQUEST_IDENTITIES: u8 = 11;
/// SSH_AGENT_IDENTITIES_ANSWER.
const IDENTITIES_ANSWER: u8 = 12;
/// SSH_AGENTC_SIGN_REQUEST.
const SIGN_REQUEST: u8 = 13;
/// SSH_AGENT_SIGN_RESPONSE.
const SIGN_RESPONSE: u8 = 14;
/// Largest agent answer read.
const MAX_AGENT_MESSAGE: usize = 256 * 1024;
/// How long the agent may take (a security key waits for a touch).
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);

/// The hash sshsig signatures are made with, as `ssh-keygen -Y sign` does.
const HASH: HashAlg = HashAlg::Sha512;

/// Where signatures come from.
enum Source {
    /// The unencrypted private key file.
    File(Box<PrivateKey>),
    /// The agent listening on this socket.
    Agent(PathBuf),
}

/// A person's signing key, ready to sign.
pub struct SshSigner {
    public: PublicKey,
    path: PathBuf,
    source: Source,
    /// The way around the agent that its refusals name.
    without_agent: &'static str,
}

/// The way around the agent for commands that sign through it whenever
/// `SSH_AUTH_SOCK` is set.
const UNSET_AGENT: &str = "or unset SSH_AUTH_SOCK to sign with the unencrypted key file";

impl std::fmt::Debug for SshSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshSigner")
            .field("key", &self.path)
            .field("fingerprint", &self.fingerprint())
            .field(
                "via",
                &match &self.source {
                    Source::File(_) => "key file".to_owned(),
                    Source::Agent(sock) => format!("agent at {}", sock.display()),
                },
            )
            .finish()
    }
}

fn key_error(path: &Path, what: &str) -> CliError {
    CliError::Input(format!("cannot use ssh_key {}: {what}", path.display()))
}

/// The public half of the key at `path`: `PATH.pub` when present, else
/// the public part of the private key file (readable even when encrypted).
pub fn read_public(path: &Path) -> Result<PublicKey, CliError> {
    let mut pub_path = path.as_os_str().to_owned();
    pub_path.push(".pub");
    let pub_path = PathBuf::from(pub_path);
    if pub_path.exists() {
        return PublicKey::read_openssh_file(&pub_path)
            .map_err(|e| key_error(&pub_path, &format!("it is not an OpenSSH public key ({e})")));
    }
    read_private(path).map(|k| k.public_key().clone())
}

fn read_private(path: &Path) -> Result<PrivateKey, CliError> {
    let text = std::fs::read(path).map_err(CliError::io("read ssh_key", path))?;
    // The file's content never goes into the error.
    PrivateKey::from_openssh(&text).map_err(|_| {
        key_error(
            path,
            "it is not an OpenSSH private key (make one with `ssh-keygen -t ed25519 -f FILE`)",
        )
    })
}

fn supported(algorithm: &Algorithm) -> bool {
    matches!(algorithm, Algorithm::Ed25519 | Algorithm::SkEd25519)
}

impl SshSigner {
    /// The signer the settings name (`ssh_key` in the profile, or
    /// `--ssh-key`), through `$SSH_AUTH_SOCK` when it is set.
    pub fn from_settings(settings: &Settings) -> Result<Self, CliError> {
        let Some(path) = settings.values.ssh_key.clone() else {
            return Err(CliError::Usage(format!(
                "no ssh_key in {}: this step is signed with your own OpenSSH key — add `ssh_key = \"PATH\"` to the profile or pass --ssh-key FILE (an ssh-ed25519 key; `ssh-keygen -t ed25519 -f FILE` makes one, and admins list its public key in the signed policy)",
                settings.source()
            )));
        };
        let agent = std::env::var_os("SSH_AUTH_SOCK")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        Self::open(&path, agent)
    }

    /// The key at `path`, signing through the agent at `agent` when given,
    /// else with the key file.
    pub fn open(path: &Path, agent: Option<PathBuf>) -> Result<Self, CliError> {
        let public = read_public(path)?;
        if !supported(&public.algorithm()) {
            return Err(key_error(
                path,
                &format!(
                    "it is a {} key; twokey signs with ssh-ed25519 or sk-ssh-ed25519@openssh.com keys",
                    public.algorithm()
                ),
            ));
        }
        let source = match agent {
            Some(sock) => Source::Agent(sock),
            None => {
                let private = read_private(path)?;
                if private.is_encrypted() {
                    return Err(key_error(
                        path,
                        &format!(
                            "it is encrypted with a passphrase, and twokey does not ask for it — add it to your agent with `ssh-add {}` and sign through the agent (set SSH_AUTH_SOCK)",
                            path.display()
                        ),
                    ));
                }
                if private.public_key().key_data() != public.key_data() {
                    return Err(key_error(
                        path,
                        "its .pub file holds another key; put the matching public key beside it",
                    ));
                }
                if private.algorithm() != Algorithm::Ed25519 {
                    return Err(key_error(
                        path,
                        &format!(
                            "a security key signs only through the agent: `ssh-add {}` and set SSH_AUTH_SOCK",
                            path.display()
                        ),
                    ));
                }
                Source::File(Box::new(private))
            }
        };
        Ok(Self {
            public,
            path: path.to_owned(),
            source,
            without_agent: UNSET_AGENT,
        })
    }

    /// The same signer, whose agent refusals name `advice` (e.g. `or drop
    /// --ssh-agent …`) as the way around the agent instead of unsetting
    /// `SSH_AUTH_SOCK`: for commands where the agent is chosen by a flag.
    pub fn advising(mut self, advice: &'static str) -> Self {
        self.without_agent = advice;
        self
    }

    /// The public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// `SHA256:…`, as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> String {
        self.public.fingerprint(HashAlg::Sha256).to_string()
    }

    /// Whether signatures come from the agent.
    pub fn via_agent(&self) -> bool {
        matches!(self.source, Source::Agent(_))
    }

    /// An armored sshsig signature over `message` under `namespace`.
    pub fn sign(&self, namespace: &str, message: &[u8]) -> Result<Vec<u8>, CliError> {
        let sig = match &self.source {
            Source::File(key) => key
                .sign(namespace, HASH, message)
                .map_err(|e| key_error(&self.path, &format!("signing with it failed ({e})")))?,
            Source::Agent(sock) => {
                let data = SshSig::signed_data(namespace, HASH, message)
                    .map_err(|e| CliError::Input(format!("cannot prepare the signature: {e}")))?;
                let signature = self.agent_sign(sock, &data)?;
                let sig = SshSig::new(self.public.key_data().clone(), namespace, HASH, signature)
                    .map_err(|e| {
                    CliError::Input(format!("the agent's signature is not usable: {e}"))
                })?;
                self.public.verify(namespace, message, &sig).map_err(|_| {
                    CliError::Input(format!(
                        "the agent at {} answered with a signature that does not verify with {} ({})",
                        sock.display(),
                        self.path.display(),
                        self.fingerprint()
                    ))
                })?;
                sig
            }
        };
        sig.to_pem(LineEnding::LF)
            .map(String::into_bytes)
            .map_err(|e| CliError::Input(format!("cannot armor the signature: {e}")))
    }

    /// A plain Ed25519 signature (RFC 8032, deterministic) over `data`, no
    /// sshsig framing: from the key file, or from the agent and then
    /// verified against the public key. Only for `ssh-ed25519` keys; the
    /// caller keeps the data apart from every other use of the key.
    pub fn sign_ed25519(&self, data: &[u8]) -> Result<Zeroizing<[u8; 64]>, CliError> {
        let public = self
            .public
            .key_data()
            .ed25519()
            .ok_or_else(|| key_error(&self.path, "it is not an ssh-ed25519 key"))?;
        let signature = match &self.source {
            Source::File(key) => {
                let pair = key
                    .key_data()
                    .ed25519()
                    .ok_or_else(|| key_error(&self.path, "it is not an ssh-ed25519 key"))?;
                let seed = Zeroizing::new(pair.private.to_bytes());
                let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
                Zeroizing::new(ed25519_dalek::Signer::sign(&signing, data).to_bytes())
            }
            Source::Agent(sock) => {
                let signature = self.agent_sign(sock, data)?;
                let bytes = <[u8; 64]>::try_from(signature.as_bytes()).map_err(|_| {
                    CliError::Input(format!(
                        "the agent at {} answered with a signature that is not Ed25519",
                        sock.display()
                    ))
                })?;
                Zeroizing::new(bytes)
            }
        };
        let verifying = ed25519_dalek::VerifyingKey::from_bytes(&public.0)
            .map_err(|_| key_error(&self.path, "its public key is not a valid Ed25519 point"))?;
        verifying
            .verify_strict(data, &ed25519_dalek::Signature::from_bytes(&signature))
            .map_err(|_| {
                CliError::Input(format!(
                    "the signature from {} does not verify with {} ({})",
                    if self.via_agent() {
                        "the agent"
                    } else {
                        "the key file"
                    },
                    self.path.display(),
                    self.fingerprint()
                ))
            })?;
        Ok(signature)
    }

    /// Signs a consent statement under `twokey-consent@<trust domain>`.
    pub fn sign_statement(
        &self,
        trust_domain: &str,
        statement: &Statement,
    ) -> Result<SignedStatement, CliError> {
        let bytes = encode_statement(statement);
        let signature = self.sign(&consent_namespace(trust_domain), &bytes)?;
        Ok(SignedStatement {
            statement: bytes,
            signature,
        })
    }

    /// A detached signature over a policy document under
    /// `twokey-policy@<trust domain>`.
    pub fn sign_policy(&self, trust_domain: &str, document: &str) -> Result<Vec<u8>, CliError> {
        self.sign(&policy_namespace(trust_domain), document.as_bytes())
    }

    fn agent_sign(&self, sock: &Path, data: &[u8]) -> Result<Signature, CliError> {
        let agent_error = |what: String| {
            CliError::Input(format!(
                "cannot sign through the agent at {} (SSH_AUTH_SOCK): {what}",
                sock.display()
            ))
        };
        let blob = self
            .public
            .to_bytes()
            .map_err(|e| agent_error(format!("cannot encode the public key: {e}")))?;
        let held = agent_identities(sock).map_err(agent_error)?;
        if !held.contains(&blob) {
            return Err(agent_error(format!(
                "it does not hold your key {} ({}) — add it with `ssh-add {}`, {}",
                self.path.display(),
                self.fingerprint(),
                self.path.display(),
                self.without_agent
            )));
        }
        let mut request = vec![SIGN_REQUEST];
        put_string(&mut request, &blob);
        put_string(&mut request, data);
        request.extend(0u32.to_be_bytes());
        let answer = agent_call(sock, &request).map_err(agent_error)?;
        match answer.split_first() {
            Some((&SIGN_RESPONSE, mut rest)) => {
                let sig_blob = Vec::<u8>::decode(&mut rest)
                    .map_err(|e| agent_error(format!("malformed answer: {e}")))?;
                Signature::decode(&mut sig_blob.as_slice())
                    .map_err(|e| agent_error(format!("malformed signature: {e}")))
            }
            Some((&AGENT_FAILURE, _)) => Err(agent_error(format!(
                "it refused to sign with {} (for a security key: was it touched?) — {}",
                self.fingerprint(),
                self.without_agent
                    .strip_prefix("or ")
                    .unwrap_or(self.without_agent)
            ))),
            _ => Err(agent_error("unexpected answer".into())),
        }
    }
}

/// Who signs, and under which policy version: the broker's WhoAmI answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signing {
    /// The caller's SPIFFE ID: the statement's signer.
    pub identity: String,
    /// Its trust domain: the namespaces are `twokey-consent@TD` and
    /// `twokey-policy@TD`.
    pub trust_domain: String,
    /// The active signed policy version; 0 before the first is applied
    /// (then no statement is signed).
    pub policy_version: u64,
}

impl Signing {
    /// Asks the broker who the caller is and which policy is in force.
    pub async fn ask(broker: &mut BrokerClient, target: &Target) -> Result<Self, CliError> {
        let me = target.answer(broker.who_am_i(WhoAmIRequest {}).await)?;
        Ok(Self {
            trust_domain: trust_domain_of(&me.identity)?,
            identity: me.identity,
            policy_version: me.policy_version,
        })
    }

    /// Whether a signed policy is in force, so statements are required.
    pub fn required(&self) -> bool {
        self.policy_version > 0
    }

    /// `binding` issued now, signed by `signer` as the caller under the
    /// active policy version.
    pub fn sign(&self, signer: &SshSigner, binding: Binding) -> Result<SignedStatement, CliError> {
        self.sign_at(signer, SystemTime::now(), binding)
    }

    /// [`Signing::sign`], issued at `at`.
    pub fn sign_at(
        &self,
        signer: &SshSigner,
        at: SystemTime,
        binding: Binding,
    ) -> Result<SignedStatement, CliError> {
        let statement = new_statement(self.policy_version, &self.identity, at, binding);
        signer.sign_statement(&self.trust_domain, &statement)
    }
}

/// The trust domain of a SPIFFE ID.
pub fn trust_domain_of(id: &str) -> Result<String, CliError> {
    id.strip_prefix("spiffe://")
        .and_then(|rest| rest.split('/').next())
        .filter(|td| !td.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| {
            CliError::Input(format!(
                "the broker named you {id:?}, which is not a SPIFFE ID; check that --cert is your twokey certificate"
            ))
        })
}

/// One request, as the broker shows it (with its signed consent so far).
pub async fn fetch_request(
    broker: &mut BrokerClient,
    target: &Target,
    id: &str,
) -> Result<Request, CliError> {
    target
        .answer(
            broker
                .get_request(GetRequestRequest {
                    request_id: id.to_owned(),
                })
                .await,
        )?
        .request
        .ok_or_else(|| CliError::Input(format!("the broker sent no request for {id}")))
}

/// The request statement a request carries, for approvals and releases to
/// bind to.
pub fn request_statement(r: &Request) -> Result<&SignedStatement, CliError> {
    r.consent
        .as_ref()
        .and_then(|c| c.request.as_ref())
        .ok_or_else(|| {
            CliError::Input(format!(
                "request {} carries no signed request statement (it was filed before a signed policy was in force): the requester files a new one with `twokey request create`",
                r.request_id
            ))
        })
}

fn put_string(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.extend((bytes.len() as u32).to_be_bytes());
    buf.extend(bytes);
}

/// The public key blobs the agent holds.
fn agent_identities(sock: &Path) -> Result<Vec<Vec<u8>>, String> {
    let answer = agent_call(sock, &[REQUEST_IDENTITIES])?;
    let Some((&IDENTITIES_ANSWER, mut rest)) = answer.split_first() else {
        return Err("it did not list its keys".into());
    };
    let count = u32::decode(&mut rest).map_err(|e| format!("malformed key list: {e}"))?;
    let mut keys = Vec::new();
    for _ in 0..count {
        let blob = Vec::<u8>::decode(&mut rest).map_err(|e| format!("malformed key list: {e}"))?;
        let _comment =
            Vec::<u8>::decode(&mut rest).map_err(|e| format!("malformed key list: {e}"))?;
        keys.push(blob);
    }
    Ok(keys)
}

/// One request and its answer, each framed as a big-endian u32 length and
/// the message.
fn agent_call(sock: &Path, request: &[u8]) -> Result<Vec<u8>, String> {
    let mut stream = UnixStream::connect(sock).map_err(|e| format!("cannot connect: {e}"))?;
    stream
        .set_read_timeout(Some(AGENT_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(AGENT_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let mut frame = (request.len() as u32).to_be_bytes().to_vec();
    frame.extend(request);
    stream
        .write_all(&frame)
        .map_err(|e| format!("cannot send: {e}"))?;
    let mut len = [0u8; 4];
    stream
        .read_exact(&mut len)
        .map_err(|e| format!("no answer: {e}"))?;
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_AGENT_MESSAGE {
        return Err(format!("an answer of {len} bytes"));
    }
    let mut answer = vec![0u8; len];
    stream
        .read_exact(&mut answer)
        .map_err(|e| format!("a cut-off answer: {e}"))?;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_in(dir: &Path, name: &str) -> (PathBuf, PrivateKey) {
        let key = twokey_testkit::consent::generate_key();
        let path = twokey_testkit::consent::write_key(dir, name, &key).unwrap();
        (path, key)
    }

    #[test]
    fn a_key_file_signs_sshsig_that_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let (path, key) = key_in(dir.path(), "alice");
        let signer = SshSigner::open(&path, None).unwrap();
        assert!(!signer.via_agent());
        let sig = signer.sign("twokey-consent@t", b"hello").unwrap();
        let sig = SshSig::from_pem(std::str::from_utf8(&sig).unwrap()).unwrap();
        key.public_key()
            .verify("twokey-consent@t", b"hello", &sig)
            .unwrap();
        assert!(
            key.public_key()
                .verify("twokey-consent@t", b"other", &sig)
                .is_err()
        );
    }

    #[test]
    fn the_public_half_comes_from_the_key_file_without_a_pub_file() {
        let dir = tempfile::tempdir().unwrap();
        let (path, key) = key_in(dir.path(), "bob");
        std::fs::remove_file(dir.path().join("bob.ssh.pub")).unwrap();
        assert_eq!(read_public(&path).unwrap(), *key.public_key());
    }

    #[test]
    fn a_pub_file_of_another_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = key_in(dir.path(), "bob");
        let (_, other) = key_in(dir.path(), "eve");
        std::fs::copy(
            dir.path().join("eve.ssh.pub"),
            dir.path().join("bob.ssh.pub"),
        )
        .unwrap();
        let _ = other;
        let err = SshSigner::open(&path, None).unwrap_err().one_line();
        assert!(err.contains("another key"), "{err}");
    }

    #[test]
    fn the_trust_domain_comes_from_the_spiffe_id() {
        assert_eq!(
            trust_domain_of("spiffe://twokey.local/user/alice").unwrap(),
            "twokey.local"
        );
        assert!(trust_domain_of("alice").is_err());
        assert!(trust_domain_of("spiffe:///x").is_err());
    }

    #[test]
    fn a_missing_ssh_key_says_what_to_add() {
        let err = SshSigner::from_settings(&Settings::default())
            .unwrap_err()
            .one_line();
        assert!(err.contains("ssh_key"), "{err}");
        assert!(err.contains("--ssh-key"), "{err}");
    }

    #[test]
    fn the_debug_form_holds_no_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let (path, key) = key_in(dir.path(), "olivia");
        let signer = SshSigner::open(&path, None).unwrap();
        let shown = format!("{signer:?}");
        let private = key.to_openssh(LineEnding::LF).unwrap();
        let secret_line = private.lines().nth(3).unwrap();
        assert!(!shown.contains(secret_line), "{shown}");
        assert!(shown.contains("SHA256:"), "{shown}");
    }
}
