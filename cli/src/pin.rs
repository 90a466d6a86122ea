//! `twokey pin …`: the operator verifies the PIN the requester reads out
//! (asked without echo, or read from stdin), and the requester asks for a
//! new one. When the requester releases the codes themselves (delivery
//! "requester") and a signed policy is in force, the operator signs one
//! release statement per code still allowed with the verification.

use std::io::{IsTerminal, Read};

use clap::{Args, Subcommand};
use twokey_proto::broker::v1::{Delivery, ResendPinRequest, VerifyPinRequest};
use zeroize::Zeroizing;

use crate::{
    code::sign_release,
    error::CliError,
    output::Output,
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
            let mut releases = Vec::new();
            if signing.required() {
                let request = fetch_request(&mut broker, &target, &a.id).await?;
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

/// Checks a PIN's shape: digits only, after trimming whitespace.
pub fn clean_pin(raw: &str) -> Result<Zeroizing<String>, CliError> {
    let pin: Zeroizing<String> =
        Zeroizing::new(raw.chars().filter(|c| !c.is_whitespace()).collect());
    if pin.is_empty() {
        return Err(CliError::Input(
            "no PIN given: type the PIN the requester reads out".into(),
        ));
    }
    if !pin.chars().all(|c| c.is_ascii_alphanumeric()) || pin.len() > 64 {
        return Err(CliError::Input(
            "the PIN holds characters a PIN never has: type only its digits".into(),
        ));
    }
    Ok(pin)
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
    fn a_bad_pin_is_not_echoed_in_the_error() {
        let err = clean_pin("98-76").unwrap_err().one_line();
        assert!(!err.contains("98-76"), "{err}");
    }
}
