//! `twokey request …`: file, list, show, watch, approve, deny and cancel
//! requests for codes. Once a signed policy is in force, filing and
//! approving are signed with the caller's own OpenSSH key: the requester
//! signs a request statement with a request id (a UUID) and creation time
//! of their own choosing; an approver signs an approval bound to exactly
//! that statement.

use std::time::SystemTime;

use clap::{Args, Subcommand, builder::TypedValueParser};
use futures::StreamExt;
use twokey_proto::broker::v1::{
    ApproveRequestRequest, CancelRequestRequest, CreateRequestRequest, Delivery,
    DenyRequestRequest, GetRequestRequest, ListRequestsRequest, ListRequestsResponse, Request,
    RequestState, WatchRequestsRequest,
};

use twokey_consent::{approval_binding, new_id, request_binding};

use crate::{
    error::{CliError, Target},
    output::{self, Output, enum_name, short_id, table, time},
    profile::{BrokerClient, Settings},
    sign::{Signing, SshSigner, fetch_request, request_statement},
};

/// Request commands.
#[derive(Debug, Subcommand)]
pub enum RequestCommand {
    /// File a request for a code (requester, or an intake service). Signed
    /// with your ssh_key once a signed policy is in force.
    Create(CreateArgs),
    /// List requests you may see, newest first.
    List(ListArgs),
    /// Show one request with its approvals and history.
    Show(IdArg),
    /// Stream changes to requests as they happen (Ctrl-C to stop).
    Watch(WatchArgs),
    /// Approve a pending request (approver; never your own). Signs an
    /// approval of exactly the requester's signed statement with your ssh_key.
    Approve(ApproveArgs),
    /// Deny a pending or approved request (approver).
    Deny(DenyArgs),
    /// Cancel your own open request.
    Cancel(CancelArgs),
}

/// A request id.
#[derive(Debug, Args)]
pub struct IdArg {
    /// The request's id.
    #[arg(value_name = "ID")]
    pub id: String,
}

/// `request create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The account a code is wanted for, e.g. aws-prod-root.
    #[arg(long, value_name = "ACCOUNT")]
    pub account: String,
    /// Why the code is needed (at most 1000 characters).
    #[arg(long)]
    pub reason: String,
    /// A ticket reference (at most 200 characters).
    #[arg(long)]
    pub ticket: Option<String>,
    /// Intake services only: the requester (SPIFFE ID or policy name) to file for.
    #[arg(long, value_name = "ID")]
    pub on_behalf_of: Option<String>,
}

/// The `--state` parser: the states the proto defines, by their short
/// lower-case names (`pending`, `approved`, …), listed in `--help` and in
/// the error for an unknown one.
fn state_parser() -> impl TypedValueParser<Value = RequestState> {
    let names: Vec<String> = (1..)
        .map_while(|n| RequestState::try_from(n).ok())
        .map(|s| state_name(s as i32))
        .collect();
    clap::builder::PossibleValuesParser::new(names).map(|name| {
        RequestState::from_str_name(&format!("REQUEST_STATE_{}", name.to_uppercase()))
            .unwrap_or_default()
    })
}

/// `request list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only requests in this state.
    #[arg(long, value_parser = state_parser())]
    pub state: Option<RequestState>,
    /// Only requests you filed or are the requester of.
    #[arg(long)]
    pub mine: bool,
    /// Only requests for this account.
    #[arg(long, value_name = "ACCOUNT")]
    pub account: Option<String>,
    /// At most this many requests, newest first (0: all of them).
    #[arg(long, value_name = "N", default_value_t = crate::audit::DEFAULT_LIMIT)]
    pub limit: u32,
    /// Continue after a previous page (the token it printed).
    #[arg(long, value_name = "TOKEN")]
    pub page_token: Option<String>,
}

/// `request watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Only this account.
    #[arg(long, value_name = "ACCOUNT")]
    pub account: Option<String>,
}

/// `request approve`.
#[derive(Debug, Args)]
pub struct ApproveArgs {
    /// The request's id.
    #[arg(value_name = "ID")]
    pub id: String,
    /// A comment for the record.
    #[arg(long)]
    pub comment: Option<String>,
}

/// `request deny`.
#[derive(Debug, Args)]
pub struct DenyArgs {
    /// The request's id.
    #[arg(value_name = "ID")]
    pub id: String,
    /// Why it is denied.
    #[arg(long)]
    pub reason: String,
}

/// `request cancel`.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The request's id.
    #[arg(value_name = "ID")]
    pub id: String,
    /// Why it is cancelled.
    #[arg(long)]
    pub reason: Option<String>,
}

/// Runs a request command.
pub async fn run(cmd: RequestCommand, settings: Settings, out: Output) -> Result<(), CliError> {
    let (mut broker, target) = settings.broker()?;
    let fail = |s| target.error(s);
    match cmd {
        RequestCommand::Create(a) => {
            let ticket = a.ticket.unwrap_or_default();
            let on_behalf_of = a.on_behalf_of.unwrap_or_default();
            let signing = Signing::ask(&mut broker, &target).await?;
            let (statement, signed_with) = if signing.required() {
                let signer = SshSigner::from_settings(&settings)?;
                let requester = if on_behalf_of.is_empty() {
                    signing.identity.clone()
                } else {
                    resolve_person(&mut broker, &target, &on_behalf_of).await?
                };
                let now = SystemTime::now();
                let binding =
                    request_binding(&new_id(), &a.account, &requester, &a.reason, &ticket, now);
                (
                    Some(signing.sign_at(&signer, now, binding)?),
                    signed_line(&signer, signing.policy_version),
                )
            } else {
                (None, String::new())
            };
            let answer = broker
                .create_request(CreateRequestRequest {
                    account_id: a.account,
                    reason: a.reason,
                    ticket,
                    on_behalf_of,
                    statement,
                })
                .await
                .map_err(fail)?
                .into_inner();
            out.answer(&answer, || {
                format!(
                    "created request{signed_with}\n{}",
                    detail(answer.request.as_ref())
                )
            })
        }
        RequestCommand::List(a) => {
            let mut all = ListRequestsResponse::default();
            let mut token = a.page_token.clone().unwrap_or_default();
            let wanted = if a.limit == 0 {
                usize::MAX
            } else {
                a.limit as usize
            };
            loop {
                let left = wanted.saturating_sub(all.requests.len());
                let page = broker
                    .list_requests(ListRequestsRequest {
                        state: a.state.map_or(0, |s| s as i32),
                        mine: a.mine,
                        account_id: a.account.clone().unwrap_or_default(),
                        page_size: u32::try_from(left.min(1000)).unwrap_or(1000),
                        page_token: token.clone(),
                    })
                    .await
                    .map_err(fail)?
                    .into_inner();
                all.requests.extend(page.requests);
                let done = page.next_page_token.is_empty() || page.next_page_token == token;
                token = page.next_page_token;
                if done || all.requests.len() >= wanted {
                    break;
                }
            }
            all.requests.truncate(wanted);
            all.next_page_token = token;
            if !out.json && !all.next_page_token.is_empty() {
                eprintln!(
                    "{}",
                    crate::audit::more_hint("requests", &all.next_page_token)
                );
            }
            out.answer(&all, || list_table(&all.requests))
        }
        RequestCommand::Show(a) => {
            let answer = broker
                .get_request(GetRequestRequest { request_id: a.id })
                .await
                .map_err(fail)?
                .into_inner();
            out.answer(&answer, || detail(answer.request.as_ref()))
        }
        RequestCommand::Watch(a) => {
            let mut stream = broker
                .watch_requests(WatchRequestsRequest {
                    account_id: a.account.unwrap_or_default(),
                })
                .await
                .map_err(fail)?
                .into_inner();
            if !out.json {
                eprintln!("watching requests on {} (Ctrl-C to stop)", target.address);
            }
            while let Some(change) = stream.next().await {
                let change = change.map_err(fail)?;
                out.answer(&change, || {
                    let r = change.request.clone().unwrap_or_default();
                    format!(
                        "{}  {:<18} {}  {:<16} {:<9} {}",
                        time(r.updated_at.as_ref()),
                        change.action,
                        r.request_id,
                        r.account_id,
                        state_name(r.state),
                        short_id(&r.requester)
                    )
                })?;
            }
            Err(CliError::Rpc {
                target: target.clone(),
                status: Box::new(tonic::Status::unavailable("the broker ended the watch")),
            })
        }
        RequestCommand::Approve(a) => {
            let signing = Signing::ask(&mut broker, &target).await?;
            let (statement, signed_with) = if signing.required() {
                let signer = SshSigner::from_settings(&settings)?;
                let request = fetch_request(&mut broker, &target, &a.id).await?;
                let binding = approval_binding(request_statement(&request)?).map_err(|e| {
                    CliError::Input(format!(
                        "the request statement of {} cannot be approved: {e}",
                        a.id
                    ))
                })?;
                (
                    Some(signing.sign(&signer, binding)?),
                    signed_line(&signer, signing.policy_version),
                )
            } else {
                (None, String::new())
            };
            let answer = broker
                .approve_request(ApproveRequestRequest {
                    request_id: a.id,
                    comment: a.comment.unwrap_or_default(),
                    statement,
                })
                .await
                .map_err(fail)?
                .into_inner();
            out.answer(&answer, || {
                format!("approved{signed_with}\n{}", detail(answer.request.as_ref()))
            })
        }
        RequestCommand::Deny(a) => {
            let answer = broker
                .deny_request(DenyRequestRequest {
                    request_id: a.id,
                    reason: a.reason,
                })
                .await
                .map_err(fail)?
                .into_inner();
            out.answer(&answer, || {
                format!("denied\n{}", detail(answer.request.as_ref()))
            })
        }
        RequestCommand::Cancel(a) => {
            let answer = broker
                .cancel_request(CancelRequestRequest {
                    request_id: a.id,
                    reason: a.reason.unwrap_or_default(),
                })
                .await
                .map_err(fail)?
                .into_inner();
            out.answer(&answer, || {
                format!("cancelled\n{}", detail(answer.request.as_ref()))
            })
        }
    }
}

/// ` (signed with SHA256:… through the agent, policy version N)`.
pub fn signed_line(signer: &SshSigner, policy_version: u64) -> String {
    format!(
        " (signed with {}{}, policy version {policy_version})",
        signer.fingerprint(),
        if signer.via_agent() {
            " through the agent"
        } else {
            ""
        }
    )
}

/// The SPIFFE ID a request is filed for: `on_behalf_of` itself when it is
/// one, else the person of that name in the active signed policy.
async fn resolve_person(
    broker: &mut BrokerClient,
    target: &Target,
    on_behalf_of: &str,
) -> Result<String, CliError> {
    if on_behalf_of.starts_with("spiffe://") {
        return Ok(on_behalf_of.to_owned());
    }
    let policy = target.answer(
        broker
            .get_policy(twokey_proto::broker::v1::GetPolicyRequest {})
            .await,
    )?;
    let person = policy
        .applied
        .first()
        .and_then(|active| twokey_consent::Policy::parse(&active.document).ok())
        .and_then(|p| {
            p.people()
                .iter()
                .find(|person| person.name() == on_behalf_of)
                .and_then(|person| person.ids().first().cloned())
        });
    person.ok_or_else(|| {
        CliError::Usage(format!(
            "--on-behalf-of {on_behalf_of:?} is no person of the active signed policy: give the requester's SPIFFE ID (spiffe://…)"
        ))
    })
}

/// A state's lower-case name (`pending`).
pub fn state_name(state: i32) -> String {
    RequestState::try_from(state).map_or_else(
        |_| format!("state {state}"),
        |s| enum_name(s.as_str_name(), "REQUEST_STATE_"),
    )
}

fn delivery_name(d: i32) -> &'static str {
    match Delivery::try_from(d) {
        Ok(Delivery::Requester) => "requester releases the code",
        _ => "operator releases the code",
    }
}

/// What the next step on a request is, for human output.
pub fn next_step(r: &Request) -> &'static str {
    match RequestState::try_from(r.state) {
        Ok(RequestState::Pending) => "waiting for approval: `twokey request approve ID`",
        Ok(RequestState::Approved) => {
            "the PIN went to the requester; the operator runs `twokey pin verify ID`"
        }
        Ok(RequestState::Verified) => "PIN verified: `twokey code release ID`",
        Ok(RequestState::Locked) => "locked after too many wrong PINs; file a new request",
        _ => "finished",
    }
}

/// A multi-line description of a request.
pub fn detail(r: Option<&Request>) -> String {
    let Some(r) = r else {
        return "(the broker sent no request)".to_owned();
    };
    let mut s = String::new();
    let mut field = |k: &str, v: String| {
        if !v.is_empty() {
            s.push_str(&format!("  {k:<10} {v}\n"));
        }
    };
    field("id", r.request_id.clone());
    field("account", r.account_id.clone());
    field("state", state_name(r.state));
    field("requester", r.requester.clone());
    if r.filed_by != r.requester {
        field("filed by", r.filed_by.clone());
    }
    field("reason", r.reason.clone());
    field("ticket", r.ticket.clone());
    field(
        "approvals",
        format!("{}/{}", r.approvals.len(), r.approvals_required),
    );
    for a in &r.approvals {
        let comment = if a.comment.is_empty() {
            String::new()
        } else {
            format!(": {}", a.comment)
        };
        field(
            "",
            format!(
                "{} at {}{comment}",
                a.approver,
                time(a.approved_at.as_ref())
            ),
        );
    }
    if let Some(c) = r.consent.as_ref().filter(|c| c.request.is_some()) {
        field(
            "signed",
            format!(
                "request and {} approval(s), under policy version {}",
                c.approvals.len(),
                c.policy_version
            ),
        );
    }
    field("operator", r.operator.clone());
    if r.pin_attempts > 0 {
        field(
            "wrong PINs",
            format!("{}/{}", r.pin_attempts, r.pin_max_attempts),
        );
    }
    field(
        "codes",
        format!(
            "{}/{} released; {}",
            r.codes_released,
            r.codes_allowed,
            delivery_name(r.delivery)
        ),
    );
    field("created", time(r.created_at.as_ref()));
    field("expires", time(r.expires_at.as_ref()));
    field(
        "next",
        next_step(r).replace("ID", &r.request_id).to_string(),
    );
    if !r.history.is_empty() {
        s.push_str("  history\n");
        for h in &r.history {
            let comment = if h.comment.is_empty() {
                String::new()
            } else {
                format!("  {}", h.comment)
            };
            s.push_str(&format!(
                "    {}  {:<18} {:<9} {}{comment}\n",
                time(h.at.as_ref()),
                h.action,
                state_name(h.state),
                short_id(&h.actor)
            ));
        }
    }
    s
}

fn list_table(requests: &[Request]) -> String {
    if requests.is_empty() {
        return "no requests".to_owned();
    }
    let rows: Vec<Vec<String>> = requests
        .iter()
        .map(|r| {
            vec![
                r.request_id.clone(),
                r.account_id.clone(),
                state_name(r.state),
                short_id(&r.requester).to_owned(),
                format!("{}/{}", r.approvals.len(), r.approvals_required),
                time(r.created_at.as_ref()),
                output::ellipsize(&r.reason, 40),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "ACCOUNT",
            "STATE",
            "REQUESTER",
            "APPROVALS",
            "CREATED",
            "REASON",
        ],
        &rows,
    )
}
