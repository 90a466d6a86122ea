//! `twokey whoami`: the caller's identity, name, groups and roles per
//! account, as the broker sees them.

use twokey_proto::broker::v1::{Role, WhoAmIRequest, WhoAmIResponse};

use crate::{
    error::CliError,
    output::{Output, enum_name, table},
    profile::Settings,
};

/// Asks the broker who the caller is.
pub async fn run(settings: Settings, out: Output) -> Result<(), CliError> {
    let (mut broker, target) = settings.broker()?;
    let answer = broker
        .who_am_i(WhoAmIRequest {})
        .await
        .map_err(|s| target.error(s))?
        .into_inner();
    out.answer(&answer, || human(&answer))
}

/// A role's lower-case name (`approver`).
pub fn role_name(role: i32) -> String {
    Role::try_from(role).map_or_else(
        |_| format!("role {role}"),
        |r| enum_name(r.as_str_name(), "ROLE_"),
    )
}

fn human(a: &WhoAmIResponse) -> String {
    let mut s = format!("identity  {}\nname      {}\n", a.identity, a.name);
    s.push_str(&format!(
        "groups    {}\n",
        if a.groups.is_empty() {
            "-".to_owned()
        } else {
            a.groups.join(", ")
        }
    ));
    if a.accounts.is_empty() {
        s.push_str("no roles on any account");
    } else {
        let rows: Vec<Vec<String>> = a
            .accounts
            .iter()
            .map(|acc| {
                let roles: Vec<String> = acc.roles.iter().map(|r| role_name(*r)).collect();
                vec![acc.account_id.clone(), roles.join(", ")]
            })
            .collect();
        s.push('\n');
        s.push_str(&table(&["ACCOUNT", "ROLES"], &rows));
    }
    s
}
