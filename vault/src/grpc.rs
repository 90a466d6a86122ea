//! The vault's thin gRPC layer: only the broker's SPIFFE ID may call; each
//! method converts its request ([`convert`](crate::convert)), makes one
//! domain call (naming the verified caller, which refusal events record),
//! and [`VaultError`] maps to a status here.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;
use tonic::{Request, Response, Status};
use twokey_proto::{
    consent::v1::SignedStatement,
    types::v1::Account,
    vault::v1::{
        AdminConsent, ApplyPolicyRequest, ApplyPolicyResponse, EnrollRequest, EnrollResponse,
        GenerateCodeRequest, GenerateCodeResponse, GetPolicyRequest, GetPolicyResponse,
        ListAccountsRequest, ListAccountsResponse, PolicyVersion, RemoveAccountRequest,
        RemoveAccountResponse, RestoreAccountRequest, RestoreAccountResponse,
        SetAccountEnabledRequest, SetAccountEnabledResponse, StatusRequest, StatusResponse,
        vault_service_server::VaultService,
    },
};
use twokey_runtime::{Authenticator, SpiffeId, error::to_status, time::to_timestamp};

use crate::{
    service::{Enrollment, Vault, VaultError},
    store::VaultStore,
};

impl From<VaultError> for Status {
    fn from(error: VaultError) -> Self {
        let status = to_status(&error);
        if error.is_private() {
            Status::new(status.code(), "vault storage failure; see the vault's log")
        } else {
            status
        }
    }
}

/// The gRPC service.
#[derive(Debug)]
pub struct VaultGrpc<S> {
    vault: Arc<Vault<S>>,
    auth: Authenticator,
    broker: SpiffeId,
}

impl<S> VaultGrpc<S> {
    /// Serves `vault` to the one caller `broker`.
    pub fn new(vault: Arc<Vault<S>>, auth: Authenticator, broker: SpiffeId) -> Self {
        Self {
            vault,
            auth,
            broker,
        }
    }

    fn authorize<T>(&self, request: &Request<T>) -> Result<SpiffeId, Status> {
        self.auth
            .authorize(request, "the broker, the vault's only client", |id| {
                *id == self.broker
            })
    }
}

/// When the caller's deadline (its `grpc-timeout`, at most 8 digits and a
/// unit: H, M, S, m, u, n) runs out, counted from now.
fn deadline_of<T>(request: &Request<T>) -> Option<Instant> {
    let text = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Instant::now().checked_add(timeout)
}

#[tonic::async_trait]
impl<S: VaultStore> VaultService for VaultGrpc<S> {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let caller = self.authorize(&request)?;
        let request = request.get_ref();
        twokey_runtime::trace::record_ids("", &request.account_id);
        // The grant first: without a valid one, the seed is not looked at.
        let grant = self.vault.verify_enroll_grant(request.grant.as_ref())?;
        let enrollment = Enrollment::try_from(request)?;
        let enrolled = self
            .vault
            .enroll(caller.as_str(), grant, enrollment)
            .await?;
        Ok(Response::new(EnrollResponse {
            account: Some((&enrolled.account).into()),
            current: Some((&enrolled.current).into()),
            next: Some((&enrolled.next).into()),
            warnings: enrolled.warnings,
        }))
    }

    async fn generate_code(
        &self,
        request: Request<GenerateCodeRequest>,
    ) -> Result<Response<GenerateCodeResponse>, Status> {
        let caller = self.authorize(&request)?;
        let deadline = deadline_of(&request);
        let request = request.into_inner();
        // On a task of its own: a caller that gives up does not cut the
        // release off between `code.released` and `code.withheld`.
        let vault = self.vault.clone();
        let work = twokey_runtime::trace::spawn_in_call(async move {
            vault
                .generate_code(
                    caller.as_str(),
                    request.grant.as_ref(),
                    request.evidence.as_ref(),
                    deadline,
                )
                .await
        });
        let released = match work.await {
            Ok(released) => released,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => return Err(Status::unavailable("the vault is stopping; try again")),
        };
        let (code, grant_id) = match released {
            Ok(ok) => {
                crate::metrics::code_released();
                ok
            }
            Err(e) => {
                crate::metrics::grant_rejected(&e);
                return Err(e.into());
            }
        };
        Ok(Response::new(GenerateCodeResponse {
            code: Some((&code).into()),
            grant_id,
        }))
    }

    async fn list_accounts(
        &self,
        request: Request<ListAccountsRequest>,
    ) -> Result<Response<ListAccountsResponse>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(ListAccountsResponse {
            accounts: self.vault.list()?.iter().map(Account::from).collect(),
        }))
    }

    async fn remove_account(
        &self,
        request: Request<RemoveAccountRequest>,
    ) -> Result<Response<RemoveAccountResponse>, Status> {
        let caller = self.authorize(&request)?;
        let request = request.get_ref();
        let account_id = self
            .vault
            .remove(
                caller.as_str(),
                request.grant.as_ref(),
                statements(request.consent.as_ref()),
            )
            .await?;
        Ok(Response::new(RemoveAccountResponse { account_id }))
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            account_count: self.vault.count() as u64,
            server_time: Some(to_timestamp(self.vault.clock().now())),
        }))
    }

    async fn apply_policy(
        &self,
        request: Request<ApplyPolicyRequest>,
    ) -> Result<Response<ApplyPolicyResponse>, Status> {
        let caller = self.authorize(&request)?;
        let request = request.get_ref();
        let applied = self
            .vault
            .apply_policy(caller.as_str(), &request.document, &request.signatures)
            .await?;
        Ok(Response::new(ApplyPolicyResponse {
            policy: Some((&applied).into()),
        }))
    }

    async fn get_policy(
        &self,
        request: Request<GetPolicyRequest>,
    ) -> Result<Response<GetPolicyResponse>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(GetPolicyResponse {
            versions: self
                .vault
                .policies()?
                .iter()
                .map(PolicyVersion::from)
                .collect(),
        }))
    }

    async fn set_account_enabled(
        &self,
        request: Request<SetAccountEnabledRequest>,
    ) -> Result<Response<SetAccountEnabledResponse>, Status> {
        let caller = self.authorize(&request)?;
        let request = request.get_ref();
        let account = self
            .vault
            .set_enabled(
                caller.as_str(),
                request.grant.as_ref(),
                request.enabled,
                statements(request.consent.as_ref()),
            )
            .await?;
        Ok(Response::new(SetAccountEnabledResponse {
            account: Some((&account).into()),
        }))
    }

    async fn restore_account(
        &self,
        request: Request<RestoreAccountRequest>,
    ) -> Result<Response<RestoreAccountResponse>, Status> {
        let caller = self.authorize(&request)?;
        let request = request.get_ref();
        let (account, _) = self
            .vault
            .restore(
                caller.as_str(),
                request.grant.as_ref(),
                statements(request.consent.as_ref()),
            )
            .await?;
        Ok(Response::new(RestoreAccountResponse {
            account: Some((&account).into()),
        }))
    }
}

/// The admins' statements of a request (none without `consent`).
fn statements(consent: Option<&AdminConsent>) -> &[SignedStatement] {
    consent.map_or(&[], |c| c.statements.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_timeout(value: &str) -> Request<()> {
        let mut request = Request::new(());
        request
            .metadata_mut()
            .insert("grpc-timeout", value.parse().unwrap());
        request
    }

    #[test]
    fn the_callers_deadline_is_read_from_grpc_timeout() {
        let before = Instant::now();
        let left = |value: &str| {
            deadline_of(&with_timeout(value)).map(|d| d.saturating_duration_since(before))
        };
        for (value, at_least) in [
            ("3500m", Duration::from_millis(3500)),
            ("3S", Duration::from_secs(3)),
            ("2M", Duration::from_secs(120)),
            ("1H", Duration::from_secs(3600)),
            ("3500000u", Duration::from_millis(3500)),
            ("35000000n", Duration::from_millis(35)),
        ] {
            let left = left(value).unwrap_or_else(|| panic!("{value} not read"));
            assert!(
                left >= at_least && left < at_least + Duration::from_secs(1),
                "{value}: {left:?}"
            );
        }
        for bad in ["", "m", "5", "5x", "123456789m", "-5m", "1.5S"] {
            assert_eq!(left(bad), None, "{bad:?}");
        }
        assert_eq!(deadline_of(&Request::new(())), None);
    }
}
