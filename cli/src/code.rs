//! `twokey code release`: one code of a verified request, printed large,
//! then a live countdown: to the start of its window when the vault gave
//! the next step's code (`usable in 4 s, then for 30 s`), then until it
//! stops being valid. Once a signed policy is in force the operator signs a
//! release statement with their ssh_key: it binds the request statement,
//! exactly the approvals the request holds, and a grant id and a
//! single-use release id the operator picks. A requester releasing their
//! own code (delivery "requester") signs nothing: the operator's statements
//! from `pin verify` are used.

use clap::Subcommand;
use twokey_consent::{SignedStatement, new_id, release_binding};
use twokey_proto::{
    Timestamp,
    broker::v1::{Delivery, ReleaseCodeRequest, ReleaseCodeResponse, Request},
    types::v1::Code,
};

use crate::{
    error::CliError,
    output::{self, Output, big_digits, seconds_until, time, usable_in_frame},
    profile::Settings,
    sign::{Signing, SshSigner, fetch_request, request_statement},
    with_runtime,
};

/// Code commands.
#[derive(Debug, Subcommand)]
pub enum CodeCommand {
    /// Release one code of a verified request (operator, or the requester
    /// when the account's policy delivers to the requester). The operator
    /// signs the release with their ssh_key. On a terminal the code stays on
    /// screen with a countdown until it expires.
    Release(crate::request::IdArg),
}

/// Runs a code command.
pub fn run(cmd: CodeCommand, settings: Settings, out: Output) -> Result<(), CliError> {
    let CodeCommand::Release(a) = cmd;
    let answer = with_runtime(async move {
        let (mut broker, target) = settings.broker()?;
        let signing = Signing::ask(&mut broker, &target).await?;
        let mut statement = None;
        if signing.required() {
            let request = fetch_request(&mut broker, &target, &a.id).await?;
            let own_delivery = request.delivery == Delivery::Requester as i32
                && request.requester == signing.identity;
            if !own_delivery {
                let signer = SshSigner::from_settings(&settings)?;
                statement = Some(sign_release(&signer, &signing, &request)?);
            }
        }
        broker
            .release_code(ReleaseCodeRequest {
                request_id: a.id,
                statement,
            })
            .await
            .map_err(|s| target.error(s))
            .map(tonic::Response::into_inner)
    })?;
    if out.json {
        return output::json_line(&answer);
    }
    let live = answer
        .code
        .as_ref()
        .and_then(|c| c.valid_until.as_ref().map(|until| (c, until)))
        .filter(|_| output::stdout_is_terminal());
    let Some((code, until)) = live else {
        return output::print(&human(&answer, true));
    };
    // On a terminal the countdown line is the window: no frozen line above
    // it; once the code expires, it is erased from the screen.
    let shown = human(&answer, false);
    output::print(&shown)?;
    output::live_countdown(code.valid_from.as_ref(), until, code.period)?;
    output::print(&erase_expired(lines_printed(&shown)))
}

/// Lines `text` takes once printed with [`output::print`] (which ends it
/// with a newline when it has none).
fn lines_printed(text: &str) -> usize {
    text.matches('\n').count() + usize::from(!text.ends_with('\n'))
}

/// What replaces an expired code on a terminal: the cursor back up over the
/// `lines` the code took and the countdown line, everything below erased,
/// and a line saying so.
fn erase_expired(lines: usize) -> String {
    format!("\r\x1b[{lines}A\x1b[J(code expired and removed from the screen)")
}

/// The operator's release statement for one code of `request`: its request
/// statement, exactly the approvals it holds, a fresh grant id and release
/// id.
pub fn sign_release(
    signer: &SshSigner,
    signing: &Signing,
    request: &Request,
) -> Result<SignedStatement, CliError> {
    let approvals = request
        .consent
        .as_ref()
        .map(|c| c.approvals.as_slice())
        .unwrap_or_default();
    let binding = release_binding(request_statement(request)?, approvals, &new_id(), &new_id())
        .map_err(|e| {
            CliError::Input(format!(
                "the request statement of {} cannot be released: {e}",
                request.request_id
            ))
        })?;
    signing.sign(signer, binding)
}

/// The release as text: the code large, then (with `with_window`) when it
/// can be typed; on a terminal the live countdown says that instead.
fn human(a: &ReleaseCodeResponse, with_window: bool) -> String {
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
    if with_window {
        s.push_str(&window(code, seconds_until));
    }
    s
}

/// When the code can be typed: `usable in 4 s, then for 30 s (…)` when its
/// window is still ahead, else `valid until … (17 s left)`. `until` gives
/// the seconds from now to a timestamp.
fn window(code: &Code, until: impl Fn(&Timestamp) -> f64) -> String {
    let ahead = code.valid_from.as_ref().map_or(0.0, &until);
    if ahead > 0.0 {
        let length = match (&code.valid_from, &code.valid_until) {
            (Some(from), Some(to)) => (to.seconds - from.seconds).max(0).unsigned_abs(),
            _ => u64::from(code.period),
        };
        return format!(
            "{} (from {} until {})",
            usable_in_frame(ahead.ceil() as u64, length),
            time(code.valid_from.as_ref()),
            time(code.valid_until.as_ref())
        );
    }
    let left = code.valid_until.as_ref().map_or(0.0, &until).max(0.0);
    format!(
        "valid until {} ({:.0} s left)",
        time(code.valid_until.as_ref()),
        left.floor()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(from: i64, until: i64) -> Code {
        let ts = |seconds| Timestamp { seconds, nanos: 0 };
        Code {
            code: "123456".into(),
            step: 1,
            period: 30,
            valid_from: Some(ts(from)),
            valid_until: Some(ts(until)),
        }
    }

    #[test]
    fn a_code_of_the_next_step_says_when_it_becomes_usable() {
        // Now is 1_795_859_186: the window starts in 4 s.
        let until = |t: &Timestamp| (t.seconds - 1_795_859_186) as f64;
        let text = window(&code(1_795_859_190, 1_795_859_220), until);
        assert_eq!(
            text,
            "usable in 4 s, then for 30 s (from 2026-11-28 09:46:30Z until 2026-11-28 09:47:00Z)"
        );
    }

    #[test]
    fn on_a_terminal_no_frozen_window_line_and_the_expired_code_is_erased() {
        let answer = ReleaseCodeResponse {
            code: Some(code(1_795_859_190, 1_795_859_220)),
            request: None,
        };
        let live = human(&answer, false);
        assert!(
            !live.contains("valid until") && !live.contains("usable in"),
            "{live}"
        );
        assert!(live.contains("123456"));
        let piped = human(&answer, true);
        assert!(piped.contains("valid until"), "{piped}");
        // The block ends with a blank line; print adds none, so the
        // countdown starts right below: erase that many lines up.
        let lines = lines_printed(&live);
        assert!(live.ends_with("\n\n"));
        assert_eq!(lines, live.matches('\n').count());
        assert_eq!(
            erase_expired(lines),
            format!("\r\x1b[{lines}A\x1b[J(code expired and removed from the screen)")
        );
    }

    #[test]
    fn a_code_in_its_window_says_how_long_it_is_left() {
        let until = |t: &Timestamp| (t.seconds - 1_795_859_203) as f64;
        let text = window(&code(1_795_859_190, 1_795_859_220), until);
        assert_eq!(text, "valid until 2026-11-28 09:47:00Z (17 s left)");
    }
}
