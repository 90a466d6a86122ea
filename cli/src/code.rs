//! `twokey code release`: one code of a verified request, printed large,
//! then a live countdown until it stops being valid.

use clap::Subcommand;
use twokey_proto::broker::v1::{ReleaseCodeRequest, ReleaseCodeResponse};

use crate::{
    error::CliError,
    output::{self, Output, big_digits, seconds_until, time},
    profile::Settings,
    with_runtime,
};

/// Code commands.
#[derive(Debug, Subcommand)]
pub enum CodeCommand {
    /// Release one code of a verified request (operator, or the requester
    /// when the account's policy delivers to the requester). On a terminal
    /// the code stays on screen with a countdown until it expires.
    Release(crate::request::IdArg),
}

/// Runs a code command.
pub fn run(cmd: CodeCommand, settings: Settings, out: Output) -> Result<(), CliError> {
    let CodeCommand::Release(a) = cmd;
    let answer = with_runtime(async move {
        let (mut broker, target) = settings.broker()?;
        broker
            .release_code(ReleaseCodeRequest { request_id: a.id })
            .await
            .map_err(|s| target.error(s))
            .map(tonic::Response::into_inner)
    })?;
    if out.json {
        return output::json_line(&answer);
    }
    output::print(&human(&answer))?;
    let Some(code) = &answer.code else {
        return Ok(());
    };
    match &code.valid_until {
        Some(until) if output::stdout_is_terminal() => output::live_countdown(until, code.period),
        _ => Ok(()),
    }
}

fn human(a: &ReleaseCodeResponse) -> String {
    let Some(code) = &a.code else {
        return "the broker sent no code".to_owned();
    };
    let mut s = String::new();
    if let Some(r) = &a.request {
        s.push_str(&format!(
            "code for {} (request {}, {}/{} released)\n\n",
            r.account_id, r.request_id, r.codes_released, r.codes_allowed
        ));
    }
    s.push_str(&big_digits(&code.code));
    s.push_str(&format!("\n\n  {}\n\n", code.code));
    let left = code
        .valid_until
        .as_ref()
        .map_or(0.0, seconds_until)
        .max(0.0);
    s.push_str(&format!(
        "valid until {} ({:.0} s left)",
        time(code.valid_until.as_ref()),
        left.floor()
    ));
    s
}
