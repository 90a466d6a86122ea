//! OpenSSH `allowed_signers` lines (`ssh-keygen(1)`, section ALLOWED
//! SIGNERS): `principals [options] key`, with the principals being SPIFFE
//! IDs. Parsed for the vault's pinned admin set, and written from a policy so
//! that an auditor can check any statement with stock `ssh-keygen -Y verify`.

use ssh_key::PublicKey;

use crate::sshsig::supported_algorithm;

/// One `allowed_signers` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedSigner {
    /// The principals (exact SPIFFE IDs; no wildcards).
    pub principals: Vec<String>,
    /// The `namespaces="..."` option, if given.
    pub namespaces: Option<Vec<String>>,
    /// The public key.
    pub key: PublicKey,
}

/// Parses `allowed_signers` text: one entry per line, blank lines and `#`
/// comments skipped. Only the `namespaces` option is understood; any other
/// (`cert-authority`, `valid-after`, `valid-before`) is refused, as are
/// wildcard principals and key types other than `ssh-ed25519` and
/// `sk-ssh-ed25519@openssh.com`.
pub fn parse_allowed_signers(text: &str) -> Result<Vec<AllowedSigner>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(parse_line(line).map_err(|e| format!("allowed_signers line {}: {e}", n + 1))?);
    }
    Ok(out)
}

fn parse_line(line: &str) -> Result<AllowedSigner, String> {
    let (principals, rest) = take_field(line)?;
    let principals: Vec<String> = principals
        .replace('"', "")
        .split(',')
        .map(str::to_string)
        .collect::<Vec<_>>();
    for p in &principals {
        if p.is_empty() || p.contains(['*', '?', '!']) {
            return Err(format!(
                "principal {p:?} is not an exact SPIFFE ID (patterns are not supported)"
            ));
        }
    }
    let mut rest = rest.trim_start();
    let mut namespaces = None;
    // Options come before the key; a key starts with its algorithm name.
    if !rest.starts_with("ssh-") && !rest.starts_with("sk-") {
        let (options, after) = take_field(rest)?;
        for option in split_options(options)? {
            match option.split_once('=') {
                Some((name, value)) if name.eq_ignore_ascii_case("namespaces") => {
                    let value = value
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .unwrap_or(value);
                    namespaces = Some(value.split(',').map(str::to_string).collect());
                }
                _ => return Err(format!("option {option:?} is not supported")),
            }
        }
        rest = after.trim_start();
    }
    let key = PublicKey::from_openssh(rest).map_err(|e| format!("key does not parse: {e}"))?;
    if !supported_algorithm(&key.algorithm()) {
        return Err(format!("key type {} is not supported", key.algorithm()));
    }
    Ok(AllowedSigner {
        principals,
        namespaces,
        key,
    })
}

/// The first whitespace-separated field (double quotes may enclose
/// whitespace and are kept) and the rest of the line.
fn take_field(s: &str) -> Result<(&str, &str), String> {
    let mut in_quotes = false;
    for (i, c) in s.char_indices() {
        match c {
            '"' => in_quotes = !in_quotes,
            c if c.is_whitespace() && !in_quotes => return Ok((&s[..i], &s[i..])),
            _ => {}
        }
    }
    if in_quotes {
        return Err("unbalanced quotes".into());
    }
    Err("a line needs principals and a key".into())
}

/// Splits `a,b="x,y",c` at commas outside quotes.
fn split_options(options: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    for c in options.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                cur.push(c);
            }
            ',' if !in_quotes => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    if in_quotes {
        return Err("unbalanced quotes in options".into());
    }
    out.push(cur);
    Ok(out)
}

/// Writes one `allowed_signers` line.
pub fn format_allowed_signer(
    principals: &[String],
    namespaces: &[String],
    key: &PublicKey,
) -> String {
    let key = key.to_openssh().unwrap_or_default();
    // Drop the comment, if any: the line ends with the key.
    let key = key.split(' ').take(2).collect::<Vec<_>>().join(" ");
    format!(
        "{} namespaces=\"{}\" {key}",
        principals.join(","),
        namespaces.join(",")
    )
}
