//! One-line errors: what went wrong and what to do next, mapped from gRPC
//! status codes, file problems and bad input. Never a `Debug` dump, never a
//! secret.

use std::path::{Path, PathBuf};

use tonic::Code;

/// Exit code of a failed command.
pub const EXIT_FAILURE: i32 = 1;
/// Exit code of a usage error (the same one clap uses).
pub const EXIT_USAGE: i32 = 2;

/// Which service a call went to, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `broker` or `audit`.
    pub service: &'static str,
    /// The address the CLI dialled.
    pub address: String,
    /// How long the CLI waited, for messages about a silent service.
    pub timeouts: crate::profile::Timeouts,
}

impl Target {
    /// The message of a call to this target, or its error.
    pub fn answer<T>(
        &self,
        result: Result<tonic::Response<T>, tonic::Status>,
    ) -> Result<T, CliError> {
        result
            .map(tonic::Response::into_inner)
            .map_err(|s| self.error(s))
    }

    /// The error for a failed call to this target.
    pub fn error(&self, status: tonic::Status) -> CliError {
        CliError::Rpc {
            target: self.clone(),
            status: Box::new(status),
        }
    }
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line or the profile is incomplete or contradictory (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The profile config could not be used.
    #[error("{0}")]
    Config(String),
    /// A file could not be read or written.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// `read`, `write`, `create`…
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Input (stdin, a file's content) is unusable.
    #[error("{0}")]
    Input(String),
    /// A gRPC call failed.
    #[error("{}", describe_status(target, status))]
    Rpc {
        /// Where the call went.
        target: Target,
        /// What the server (or the transport) said.
        status: Box<tonic::Status>,
    },
    /// Offline verification found a problem.
    #[error("verification failed: {0}")]
    Verify(String),
    /// TLS material could not be used.
    #[error("{0}")]
    Tls(#[from] twokey_runtime::tls::TlsError),
    /// Certificates could not be made.
    #[error("{0}")]
    Pki(twokey_testkit::pki::PkiError),
    /// The reader of stdout went away (`twokey … | head`); exit quietly.
    #[error("stdout closed")]
    BrokenPipe,
}

impl From<twokey_testkit::pki::PkiError> for CliError {
    fn from(e: twokey_testkit::pki::PkiError) -> Self {
        use twokey_testkit::pki::PkiError;
        match e {
            PkiError::Usage(m) => Self::Usage(m),
            PkiError::Directory(m) => Self::Input(m),
            other => Self::Pki(other),
        }
    }
}

impl From<twokey_testkit::local::LocalError> for CliError {
    fn from(e: twokey_testkit::local::LocalError) -> Self {
        Self::Input(e.to_string())
    }
}

impl CliError {
    /// The error's kind for `--json` errors: the gRPC code's name in
    /// lower case for a failed call (`unavailable`, `permission_denied`;
    /// `deadline_exceeded` when the CLI's own timeout ran out), else
    /// `usage`, `config`, `io`, `input`, `verify`, `tls` or `pki`.
    pub fn code(&self) -> String {
        match self {
            CliError::Usage(_) => "usage".into(),
            CliError::Config(_) => "config".into(),
            CliError::Io { .. } => "io".into(),
            CliError::Input(_) => "input".into(),
            CliError::Rpc { status, .. }
                if is_call_timeout(status) || is_connect_timeout(status, &status_text(status)) =>
            {
                "deadline_exceeded".into()
            }
            CliError::Rpc { status, .. } => {
                enum_name(&format!("{:?}", status.code())).to_ascii_lowercase()
            }
            CliError::Verify(_) => "verify".into(),
            CliError::Tls(_) => "tls".into(),
            CliError::Pki(_) => "pki".into(),
            CliError::BrokenPipe => "broken_pipe".into(),
        }
    }

    /// The error as one JSON object: `{"code": …, "message": …, "exit": …}`.
    pub fn json(&self) -> String {
        serde_json::json!({
            "code": self.code(),
            "message": self.one_line(),
            "exit": self.exit_code(),
        })
        .to_string()
    }

    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            _ => EXIT_FAILURE,
        }
    }

    /// The message as exactly one line.
    pub fn one_line(&self) -> String {
        one_line(&self.to_string())
    }

    /// An I/O error on `path`.
    pub fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CliError {
        let path = path.to_owned();
        move |source| CliError::Io {
            action,
            path,
            source,
        }
    }
}

/// `DeadlineExceeded` as `Deadline_Exceeded`: a snake-case split of a
/// CamelCase name.
fn enum_name(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c);
    }
    out
}

/// Joins lines and squeezes whitespace so that a message is one line.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The status message with the transport's error chain (tonic hides the
/// cause of a connection failure in `source()`).
fn status_text(status: &tonic::Status) -> String {
    let mut parts: Vec<String> = Vec::new();
    let msg = status.message().trim();
    if !msg.is_empty() {
        parts.push(msg.to_owned());
    }
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        let text = err.to_string();
        if !text.is_empty() && text != "transport error" && !parts.iter().any(|p| p.contains(&text))
        {
            parts.push(text);
        }
        source = err.source();
    }
    let text = one_line(&parts.join(": "));
    if text.is_empty() {
        "no details".to_owned()
    } else {
        text
    }
}

/// True when the status was made by the client's transport (nothing
/// answered) rather than sent by the server.
fn is_transport_failure(status: &tonic::Status, text: &str) -> bool {
    std::error::Error::source(status).is_some()
        || [
            "transport error",
            "connect",
            "connection refused",
            "dns error",
            "tcp",
            "handshake",
            "certificate",
        ]
        .iter()
        .any(|needle| text.to_ascii_lowercase().contains(needle))
}

/// `prefix: text`, unless the server's text already starts with the prefix.
fn prefixed(prefix: &str, text: &str) -> String {
    if text.to_ascii_lowercase().starts_with(prefix) {
        text.to_owned()
    } else {
        format!("{prefix}: {text}")
    }
}

/// True when the CLI's own deadline for the call ran out (tonic reports
/// its client-side timeout as CANCELLED "Timeout expired").
fn is_call_timeout(status: &tonic::Status) -> bool {
    status.code() == Code::Cancelled && status.message().contains("Timeout expired")
}

/// True when connecting (TCP or the TLS handshake) ran out of time.
fn is_connect_timeout(status: &tonic::Status, text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    status.code() == Code::Unavailable
        && is_transport_failure(status, &text)
        && (text.contains("timed out") || text.contains("timeout"))
}

/// What the CLI says for a failed call.
pub fn describe_status(target: &Target, status: &tonic::Status) -> String {
    let text = status_text(status);
    let Target {
        service,
        address,
        timeouts,
    } = target;
    if is_call_timeout(status) {
        let within = crate::profile::show_duration(timeouts.call);
        return format!(
            "the {service} at {address} did not answer within {within}; is it running? raise --timeout (now {within}) if it is only slow"
        );
    }
    if is_connect_timeout(status, &text) {
        let within = crate::profile::show_duration(timeouts.connect);
        return format!(
            "the {service} at {address} did not answer within {within} while connecting ({}); is it running, and is --{service} its address? raise --connect-timeout (now {within}) if the network is slow",
            text.trim_end_matches('.')
        );
    }
    match status.code() {
        Code::Unavailable if is_transport_failure(status, &text) => {
            format!(
                "cannot reach the {service} at {address}: {text} — is it running, and are --{service}, --cert, --key and --ca right?"
            )
        }
        // The server answered, so it is up: what is missing is behind it
        // (audit, the vault, its storage), and the text says which.
        Code::Unavailable => {
            format!("the {service} is up but cannot serve this now: {text} — try again shortly")
        }
        Code::PermissionDenied => prefixed("permission denied", &text),
        Code::Unauthenticated => format!(
            "the {service} at {address} did not accept your certificate: {text} — check --cert/--key and that they come from the service's CA"
        ),
        Code::NotFound => prefixed("not found", &text),
        Code::InvalidArgument => prefixed("invalid argument", &text),
        Code::AlreadyExists => prefixed("already exists", &text),
        Code::FailedPrecondition => prefixed("not possible now", &text),
        Code::ResourceExhausted => prefixed("too many tries", &text),
        Code::DeadlineExceeded => {
            format!("the {service} at {address} did not answer in time: {text} — try again")
        }
        Code::Unimplemented => format!(
            "the {service} at {address} does not offer this call ({text}) — is it a twokey {service} of the same version?"
        ),
        Code::Cancelled => format!("the call to the {service} was cancelled: {text}"),
        Code::Aborted => format!("the {service} aborted the call: {text} — try again"),
        Code::OutOfRange => prefixed("out of range", &text),
        _ => format!("the {service} at {address} failed: {text} — see its logs"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker() -> Target {
        Target {
            service: "broker",
            address: "https://127.0.0.1:7400".into(),
            timeouts: crate::profile::Timeouts::default(),
        }
    }

    #[test]
    fn permission_denied_passes_the_servers_message_through() {
        let err = broker().error(tonic::Status::permission_denied(
            "requester-1 is not an approver for aws-prod-root",
        ));
        assert_eq!(
            err.one_line(),
            "permission denied: requester-1 is not an approver for aws-prod-root"
        );
        assert_eq!(err.exit_code(), EXIT_FAILURE);
    }

    #[test]
    fn unavailable_transport_failure_says_cannot_reach_and_asks_if_running() {
        let err = broker().error(tonic::Status::unavailable(
            "tcp connect error: Connection refused (os error 111)",
        ));
        let line = err.one_line();
        assert!(line.starts_with("cannot reach the broker at https://127.0.0.1:7400"));
        assert!(line.contains("is it running"));
    }

    #[test]
    fn unavailable_from_the_server_is_not_reported_as_unreachable() {
        let err = broker().error(tonic::Status::unavailable("audit log unavailable"));
        let line = err.one_line();
        assert!(
            line.starts_with("the broker is up but cannot serve this now: audit log unavailable"),
            "{line}"
        );
        // The broker answered: it is audit that is down, not the broker.
        assert!(!line.contains("broker is unavailable"), "{line}");
    }

    #[test]
    fn a_server_message_that_already_names_the_code_is_not_prefixed_twice() {
        let err = broker().error(tonic::Status::invalid_argument(
            "invalid argument: wrong PIN for request r-1; 4 tries left",
        ));
        assert_eq!(
            err.one_line(),
            "invalid argument: wrong PIN for request r-1; 4 tries left"
        );
    }

    #[test]
    fn multi_line_messages_become_one_line() {
        let err = broker().error(tonic::Status::invalid_argument("bad\nreason\n\tfield"));
        assert_eq!(err.one_line(), "invalid argument: bad reason field");
    }

    #[test]
    fn the_clients_own_timeout_names_the_service_address_and_flag() {
        let err = broker().error(tonic::Status::cancelled("Timeout expired"));
        assert_eq!(
            err.one_line(),
            "the broker at https://127.0.0.1:7400 did not answer within 30s; is it running? raise --timeout (now 30s) if it is only slow"
        );
        assert_eq!(err.code(), "deadline_exceeded");
        assert_eq!(err.exit_code(), EXIT_FAILURE);
    }

    #[test]
    fn json_errors_carry_code_message_and_exit() {
        let err = broker().error(tonic::Status::permission_denied("no"));
        let v: serde_json::Value = serde_json::from_str(&err.json()).unwrap();
        assert_eq!(v["code"], "permission_denied");
        assert_eq!(v["message"], "permission denied: no");
        assert_eq!(v["exit"], 1);
        let v: serde_json::Value =
            serde_json::from_str(&CliError::Usage("bad".into()).json()).unwrap();
        assert_eq!(
            (v["code"].as_str(), v["exit"].as_i64()),
            (Some("usage"), Some(2))
        );
    }

    #[test]
    fn usage_errors_exit_2() {
        assert_eq!(CliError::Usage("x".into()).exit_code(), EXIT_USAGE);
    }
}
