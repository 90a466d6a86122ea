//! `twokey policy …`: the admin-signed consent policy. An admin proposes a
//! new version (`propose FILE`, signing it too), other admins sign it with
//! their own OpenSSH keys (`sign VERSION`, a detached sshsig over the exact
//! document under `twokey-policy@<trust domain>`), and once M admins signed
//! anyone of them applies it (`apply VERSION`): the vault checks the
//! signatures against the admins of the version in force and refuses a
//! version not above it. `show` prints the active version, who signed it,
//! and a line diff against the version before.

use clap::{Args, Subcommand};
use twokey_proto::broker::v1::{
    ApplyPolicyRequest, GetPolicyRequest, GetPolicyResponse, PolicyDocument, ProposePolicyRequest,
    SignPolicyRequest,
};

use crate::{
    error::CliError,
    output::{Output, time},
    profile::Settings,
    sign::{Signing, SshSigner},
};

/// Policy commands.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Propose a new policy version from a TOML file (admin) and sign it
    /// with your ssh_key; other admins then run `twokey policy sign VERSION`.
    Propose(ProposeArgs),
    /// Sign a proposed version with your ssh_key (admin), after reading it
    /// with `twokey policy show --proposal VERSION`. With --file, sign a
    /// document offline instead (e.g. the first version, before any
    /// service runs) and print the detached signature.
    Sign(SignArgs),
    /// Apply a proposed version that enough admins signed (admin): the
    /// vault verifies the signatures and puts it in force.
    Apply(VersionArg),
    /// Show the active version, its signers and its changes from the
    /// version before, and the open proposals.
    Show(ShowArgs),
}

/// `policy propose`.
#[derive(Debug, Args)]
pub struct ProposeArgs {
    /// The policy document (TOML); its `version` must be above the active one.
    #[arg(value_name = "FILE")]
    pub file: std::path::PathBuf,
    /// Only propose; do not sign it yourself.
    #[arg(long)]
    pub no_sign: bool,
}

/// A policy version.
#[derive(Debug, Args)]
pub struct VersionArg {
    /// The version number.
    #[arg(value_name = "VERSION")]
    pub number: u64,
}

/// `policy sign`.
#[derive(Debug, Args)]
pub struct SignArgs {
    /// The proposed version to sign.
    #[arg(
        value_name = "VERSION",
        required_unless_present = "file",
        conflicts_with = "file"
    )]
    pub number: Option<u64>,
    /// Sign this policy document offline (the namespace's trust domain is
    /// the document's `trust_domain`); the armored signature goes to stdout
    /// or --out, as `ssh-keygen -Y sign -n twokey-policy@TD` would write it.
    #[arg(long, value_name = "FILE")]
    pub file: Option<std::path::PathBuf>,
    /// With --file: write the signature here instead of stdout.
    #[arg(long, value_name = "SIG", requires = "file")]
    pub out: Option<std::path::PathBuf>,
}

/// What `policy sign --file` did, for `--json`.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OfflineSignature {
    /// The document's version.
    pub version: u64,
    /// The namespace signed under.
    pub namespace: String,
    /// The signing key's fingerprint.
    pub fingerprint: String,
    /// The armored signature.
    pub signature: String,
}

/// `policy show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Show this open proposal instead: its document, its signers, and its
    /// diff against the active version.
    #[arg(long, value_name = "VERSION")]
    pub proposal: Option<u64>,
}

/// Runs a policy command.
pub async fn run(cmd: PolicyCommand, settings: Settings, out: Output) -> Result<(), CliError> {
    if let PolicyCommand::Sign(SignArgs {
        file: Some(file),
        out: sig_out,
        ..
    }) = &cmd
    {
        return sign_offline(&settings, file, sig_out.as_deref(), out);
    }
    let (mut broker, target) = settings.broker()?;
    match cmd {
        PolicyCommand::Propose(a) => {
            let document =
                std::fs::read_to_string(&a.file).map_err(CliError::io("read", &a.file))?;
            let signer = if a.no_sign {
                None
            } else {
                Some(SshSigner::from_settings(&settings)?)
            };
            let mut proposal = target
                .answer(
                    broker
                        .propose_policy(ProposePolicyRequest {
                            document: document.clone(),
                        })
                        .await,
                )?
                .proposal
                .unwrap_or_default();
            if let Some(signer) = signer {
                let signing = Signing::ask(&mut broker, &target).await?;
                let signature = signer.sign_policy(&signing.trust_domain, &proposal.document)?;
                proposal = target
                    .answer(
                        broker
                            .sign_policy(SignPolicyRequest {
                                version: proposal.version,
                                signature,
                            })
                            .await,
                    )?
                    .proposal
                    .unwrap_or(proposal);
            }
            out.answer(&proposal, || {
                format!(
                    "proposed policy version {v} (sha256 {})\n  signed by  {}\nnext: the other admins read it with `twokey policy show --proposal {v}` and sign it with `twokey policy sign {v}`; once enough signed, `twokey policy apply {v}`",
                    hex(&proposal.digest),
                    signers(&proposal),
                    v = proposal.version,
                )
            })
        }
        PolicyCommand::Sign(SignArgs {
            file: Some(file),
            out: sig_out,
            ..
        }) => sign_offline(&settings, &file, sig_out.as_deref(), out),
        PolicyCommand::Sign(a) => {
            let version = a.number.unwrap_or_default();
            let signer = SshSigner::from_settings(&settings)?;
            let signing = Signing::ask(&mut broker, &target).await?;
            let all = target.answer(broker.get_policy(GetPolicyRequest {}).await)?;
            let proposal = find_proposal(&all, version)?;
            let signature = signer.sign_policy(&signing.trust_domain, &proposal.document)?;
            let signed = target
                .answer(
                    broker
                        .sign_policy(SignPolicyRequest { version, signature })
                        .await,
                )?
                .proposal
                .unwrap_or_default();
            out.answer(&signed, || {
                format!(
                    "signed policy version {v} (sha256 {}) with {}\n  signed by  {}\nnext: once enough admins signed, `twokey policy apply {v}`",
                    hex(&signed.digest),
                    signer.fingerprint(),
                    signers(&signed),
                    v = signed.version,
                )
            })
        }
        PolicyCommand::Apply(a) => {
            let applied = target
                .answer(
                    broker
                        .apply_policy(ApplyPolicyRequest { version: a.number })
                        .await,
                )?
                .policy
                .unwrap_or_default();
            out.answer(&applied, || {
                format!(
                    "policy version {} (sha256 {}) is in force, signed by {}",
                    applied.version,
                    hex(&applied.digest),
                    signers(&applied)
                )
            })
        }
        PolicyCommand::Show(a) => {
            let all = target.answer(broker.get_policy(GetPolicyRequest {}).await)?;
            if let Some(v) = a.proposal {
                let proposal = find_proposal(&all, v)?;
                return out.answer(proposal, || show_proposal(proposal, all.applied.first()));
            }
            out.answer(&all, || show(&all))
        }
    }
}

/// Signs a policy document file offline under its own trust domain.
fn sign_offline(
    settings: &Settings,
    file: &std::path::Path,
    sig_out: Option<&std::path::Path>,
    out: Output,
) -> Result<(), CliError> {
    let document = std::fs::read_to_string(file).map_err(CliError::io("read", file))?;
    let policy = twokey_consent::Policy::parse(&document).map_err(|e| {
        CliError::Input(format!(
            "{} is not a policy document twokey accepts: {e}",
            file.display()
        ))
    })?;
    let signer = SshSigner::from_settings(settings)?;
    let signature = signer.sign_policy(policy.trust_domain(), &document)?;
    let report = OfflineSignature {
        version: policy.version(),
        namespace: twokey_consent::policy_namespace(policy.trust_domain()),
        fingerprint: signer.fingerprint(),
        signature: String::from_utf8_lossy(&signature).into_owned(),
    };
    match sig_out {
        Some(path) => {
            std::fs::write(path, &signature).map_err(CliError::io("write", path))?;
            out.answer(&report, || {
                format!(
                    "signed policy version {} of {} with {} under {}; the signature is in {}",
                    report.version,
                    file.display(),
                    report.fingerprint,
                    report.namespace,
                    path.display()
                )
            })
        }
        None => out.answer(&report, || report.signature.clone()),
    }
}

fn find_proposal(all: &GetPolicyResponse, version: u64) -> Result<&PolicyDocument, CliError> {
    all.proposals
        .iter()
        .find(|p| p.version == version)
        .ok_or_else(|| {
            let open: Vec<String> = all.proposals.iter().map(|p| p.version.to_string()).collect();
            CliError::Input(format!(
                "no open proposal of policy version {version} (open: {}); propose one with `twokey policy propose FILE`",
                if open.is_empty() {
                    "none".to_owned()
                } else {
                    open.join(", ")
                }
            ))
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn signers(p: &PolicyDocument) -> String {
    if p.signed_by.is_empty() {
        "nobody yet".to_owned()
    } else {
        p.signed_by.join(", ")
    }
}

fn show(all: &GetPolicyResponse) -> String {
    let mut s = String::new();
    match all.applied.first() {
        None => s.push_str(
            "no signed policy is in force: an admin proposes one with `twokey policy propose FILE`\n",
        ),
        Some(active) => {
            s.push_str(&format!(
                "policy version {} is in force\n  sha256     {}\n  signed by  {}\n  applied    {}\n",
                active.version,
                hex(&active.digest),
                signers(active),
                time(active.at.as_ref())
            ));
            match all.applied.get(1) {
                Some(before) => {
                    s.push_str(&format!(
                        "\nchanges from version {} to {}:\n",
                        before.version, active.version
                    ));
                    s.push_str(&line_diff(&before.document, &active.document));
                }
                None => {
                    s.push_str("\nthe first version; its document:\n");
                    for line in active.document.lines() {
                        s.push_str(&format!("  {line}\n"));
                    }
                }
            }
        }
    }
    for p in &all.proposals {
        s.push_str(&format!(
            "\nproposal: version {} by {}, signed by {} (`twokey policy show --proposal {}`)\n",
            p.version,
            p.proposed_by,
            signers(p),
            p.version
        ));
    }
    s
}

fn show_proposal(p: &PolicyDocument, active: Option<&PolicyDocument>) -> String {
    let mut s = format!(
        "proposed policy version {}\n  sha256       {}\n  proposed by  {} at {}\n  signed by    {}\n",
        p.version,
        hex(&p.digest),
        p.proposed_by,
        time(p.at.as_ref()),
        signers(p)
    );
    match active {
        Some(a) => {
            s.push_str(&format!("\nchanges from version {} in force:\n", a.version));
            s.push_str(&line_diff(&a.document, &p.document));
        }
        None => {
            s.push_str("\nits document:\n");
            for line in p.document.lines() {
                s.push_str(&format!("  {line}\n"));
            }
        }
    }
    s
}

/// Lines of context shown around a change.
const CONTEXT: usize = 2;

/// A line diff of `old` to `new` (longest common subsequence): removed lines
/// `- `, added lines `+ `, up to [`CONTEXT`] unchanged lines around each
/// change, `  …` where unchanged lines are left out.
pub fn line_diff(old: &str, new: &str) -> String {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    // lcs[i][j]: length of the LCS of a[i..] and b[j..].
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut ops: Vec<(char, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            ops.push((' ', a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            ops.push(('-', a[i]));
            i += 1;
        } else {
            ops.push(('+', b[j]));
            j += 1;
        }
    }
    if ops.iter().all(|(op, _)| *op == ' ') {
        return "  (no changes)\n".to_owned();
    }
    let near_change = |k: usize| {
        let lo = k.saturating_sub(CONTEXT);
        let hi = (k + CONTEXT).min(ops.len() - 1);
        ops[lo..=hi].iter().any(|(op, _)| *op != ' ')
    };
    let mut s = String::new();
    let mut skipped = false;
    for (k, (op, line)) in ops.iter().enumerate() {
        if near_change(k) {
            if skipped {
                s.push_str("  …\n");
                skipped = false;
            }
            s.push_str(&format!("{op} {line}\n"));
        } else {
            skipped = true;
        }
    }
    if skipped {
        s.push_str("  …\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_diff_shows_changed_lines_with_context() {
        let old = "version = 1\na\nb\nc\nd\ne\nf\ng = 5\nh\n";
        let new = "version = 2\na\nb\nc\nd\ne\nf\ng = 50\nh\ni\n";
        assert_eq!(
            line_diff(old, new),
            "- version = 1\n+ version = 2\n  a\n  b\n  …\n  e\n  f\n- g = 5\n+ g = 50\n  h\n+ i\n"
        );
    }

    #[test]
    fn an_unchanged_document_says_so() {
        assert_eq!(line_diff("a\nb\n", "a\nb\n"), "  (no changes)\n");
    }

    #[test]
    fn a_removed_line_is_shown() {
        assert_eq!(line_diff("a\nb\nc\n", "a\nc\n"), "  a\n- b\n  c\n");
    }
}
