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

/// What the CLI says for a failed call.
pub fn describe_status(target: &Target, status: &tonic::Status) -> String {
    let text = status_text(status);
    let Target { service, address } = target;
    match status.code() {
        Code::Unavailable if is_transport_failure(status, &text) => {
            format!(
                "cannot reach the {service} at {address}: {text} — is it running, and are --{service}, --cert, --key and --ca right?"
            )
        }
        // The server answered, so it is up: what is missing is behind it
        // (audit, the vault, its storage), and the text says which.
        Code::Unavailable => {
            format!("the {service} cannot serve this now: {text} — try again shortly")
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
            line.starts_with("the broker cannot serve this now: audit log unavailable"),
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
    fn usage_errors_exit_2() {
        assert_eq!(CliError::Usage("x".into()).exit_code(), EXIT_USAGE);
    }
}
