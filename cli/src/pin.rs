//! `twokey pin …`: the requester sees their live PIN (`show`, through their
//! own certificate) or asks for a new one (`resend`); the operator verifies
//! the PIN the requester reads out (asked without echo, or read from stdin).
//! A PIN that is not all digits, or not the request's length, is refused
//! here before it reaches the broker, so a typo spends no attempt. When the
//! requester releases the codes themselves (delivery "requester") and a
//! signed policy is in force, the operator signs one release statement per
//! code still allowed with the verification.

use std::io::{IsTerminal, Read};

use clap::{Args, Subcommand};
use twokey_proto::broker::v1::{
    Delivery, Request, ResendPinRequest, ShowPinRequest, VerifyPinRequest,
};
use zeroize::Zeroizing;

use crate::{
    code::sign_release,
    error::CliError,
    output::{Output, time},
    profile::Settings,
    request::detail,
    sign::{Signing, SshSigner, fetch_request},
};

/// PIN commands.
#[derive(Debug, Subcommand)]
pub enum PinCommand {
    /// Submit the PIN the requester read out (operator). Asks without echo.
    /// When the requester releases the codes, signs their release
    /// statements with your ssh_key.
    Verify(VerifyArgs),
    /// Void the PIN and have a new one sent to you (requester).
    Resend(crate::request::IdArg),
    /// Show the request's PIN, while it is live, to its requester (you);
    /// read it out to the operator on the call. Each view is audited.
    Show(crate::request::IdArg),
}

/// `pin verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The request's id.
    #[arg(value_name = "ID")]
    pub id: String,
    /// Read the PIN from the first line of stdin instead of asking.
    #[arg(long)]
    pub pin_stdin: bool,
}

/// Runs a PIN command.
pub async fn run(cmd: PinCommand, settings: Settings, out: Output) -> Result<(), CliError> {
    match cmd {
        PinCommand::Verify(a) => {
            let pin = if a.pin_stdin {
                read_pin_stdin()?
            } else {
                ask_pin()?
            };
            let (mut broker, target) = settings.broker()?;
            let signing = Signing::ask(&mut broker, &target).await?;
            // The request, to check the PIN's length before it can spend an
            // attempt. One we may not see is the broker's to refuse (and
            // record); it checks the length again.
            let request = fetch_request(&mut broker, &target, &a.id).await;
            if let Ok(request) = &request {
                check_length(&pin, request)?;
            }
            let mut releases = Vec::new();
            if signing.required() {
                let request = request?;
                if request.delivery == Delivery::Requester as i32 {
                    let signer = SshSigner::from_settings(&settings)?;
                    let left = request.codes_allowed.saturating_sub(request.codes_released);
                    for _ in 0..left {
                        releases.push(sign_release(&signer, &signing, &request)?);
                    }
                }
            }
            let answer = broker
                .verify_pin(VerifyPinRequest {
                    request_id: a.id,
                    pin: pin.to_string(),
                    releases,
                })
                .await
                .map_err(|s| target.error(s))?
                .into_inner();
            out.answer(&answer, || {
                format!("PIN verified\n{}", detail(answer.request.as_ref()))
            })
        }
        PinCommand::Show(a) => {
            let (mut broker, target) = settings.broker()?;
            let answer = broker
                .show_pin(ShowPinRequest { request_id: a.id })
                .await
                .map_err(|s| target.error(s))?
                .into_inner();
            out.answer(&answer, || {
                format!(
                    "PIN {}\nread it out only to the operator on the call; it works until {} \
                     unless verified\n{}",
                    answer.pin,
                    time(answer.expires_at.as_ref()),
                    detail(answer.request.as_ref())
                )
            })
        }
        PinCommand::Resend(a) => {
            let (mut broker, target) = settings.broker()?;
            let answer = broker
                .resend_pin(ResendPinRequest { request_id: a.id })
                .await
                .map_err(|s| target.error(s))?
                .into_inner();
            out.answer(&answer, || {
                format!(
                    "a new PIN is on its way to the requester; the old one no longer works\n{}",
                    detail(answer.request.as_ref())
                )
            })
        }
    }
}

/// Checks a PIN's shape: digits only, after dropping whitespace. The PIN is
/// never echoed in the error.
pub fn clean_pin(raw: &str) -> Result<Zeroizing<String>, CliError> {
    let pin: Zeroizing<String> =
        Zeroizing::new(raw.chars().filter(|c| !c.is_whitespace()).collect());
    if pin.is_empty() {
        return Err(CliError::Input(
            "no PIN given: type the PIN the requester reads out".into(),
        ));
    }
    if !pin.chars().all(|c| c.is_ascii_digit()) || pin.len() > 64 {
        return Err(CliError::Input(
            "a PIN is digits and nothing else: type only the digits the requester reads out \
             (nothing was sent, no attempt was counted)"
                .into(),
        ));
    }
    Ok(pin)
}

/// Checks the PIN's length against the request's (a broker that does not
/// say it, 0, is left to check it).
fn check_length(pin: &str, request: &Request) -> Result<(), CliError> {
    let want = request.pin_length as usize;
    if want != 0 && pin.len() != want {
        return Err(CliError::Input(format!(
            "the PIN of request {} is {want} digits, {} were typed: check what the requester \
             reads out and type it again (nothing was sent, no attempt was counted)",
            request.request_id,
            pin.len()
        )));
    }
    Ok(())
}

fn read_pin_stdin() -> Result<Zeroizing<String>, CliError> {
    let mut raw = Zeroizing::new(String::new());
    std::io::stdin()
        .take(1024)
        .read_to_string(&mut raw)
        .map_err(CliError::io("read", "stdin".as_ref()))?;
    let first = raw.lines().next().unwrap_or_default();
    clean_pin(first)
}

fn ask_pin() -> Result<Zeroizing<String>, CliError> {
    if !std::io::stdin().is_terminal() && std::fs::File::open("/dev/tty").is_err() {
        return Err(CliError::Usage(
            "no terminal to ask for the PIN on: pipe it in with --pin-stdin".into(),
        ));
    }
    let raw = Zeroizing::new(
        rpassword::prompt_password("PIN (the requester reads it out): ").map_err(|e| {
            CliError::Input(format!(
                "cannot read the PIN from the terminal ({e}); pipe it in with --pin-stdin"
            ))
        })?,
    );
    clean_pin(&raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_trimmed_and_checked() {
        assert_eq!(clean_pin(" 123 456\n").unwrap().as_str(), "123456");
        assert!(clean_pin("  ").is_err());
        assert!(clean_pin("12;34").is_err());
    }

    #[test]
    fn a_pin_that_is_not_all_digits_is_refused_as_input() {
        for typo in [
            "abc",
            "12a456",
            "１２３４５６",
            "12-34",
            "0x1234",
            &"1".repeat(65),
        ] {
            let err = clean_pin(typo).unwrap_err();
            assert!(matches!(err, CliError::Input(_)), "{typo}: {err:?}");
            let line = err.one_line();
            assert!(line.contains("no attempt was counted"), "{line}");
            assert!(!line.contains(typo), "{line}");
        }
    }

    #[test]
    fn a_pin_of_the_wrong_length_is_refused_as_input() {
        let request = Request {
            request_id: "r1".into(),
            pin_length: 6,
            ..Default::default()
        };
        for typo in ["12345", "1234567"] {
            let err = check_length(typo, &request).unwrap_err();
            assert!(matches!(err, CliError::Input(_)), "{typo}: {err:?}");
            let line = err.one_line();
            assert!(line.contains("is 6 digits"), "{line}");
            assert!(!line.contains(typo), "{line}");
        }
        check_length("123456", &request).unwrap();
        // A broker that does not say the length leaves the check to itself.
        check_length("12345", &Request::default()).unwrap();
    }

    #[test]
    fn a_bad_pin_is_not_echoed_in_the_error() {
        let err = clean_pin("98-76").unwrap_err().one_line();
        assert!(!err.contains("98-76"), "{err}");
    }
}
