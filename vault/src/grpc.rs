//! The vault's thin gRPC layer: only the broker's SPIFFE ID may call; each
//! method converts its request ([`convert`](crate::convert)), makes one
//! domain call, and [`VaultError`] maps to a status here.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use twokey_proto::{
    types::v1::Account,
    vault::v1::{
        EnrollRequest, EnrollResponse, GenerateCodeRequest, GenerateCodeResponse,
        ListAccountsRequest, ListAccountsResponse, RemoveAccountRequest, RemoveAccountResponse,
        StatusRequest, StatusResponse, vault_service_server::VaultService,
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

#[tonic::async_trait]
impl<S: VaultStore> VaultService for VaultGrpc<S> {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        self.authorize(&request)?;
        let request = request.get_ref();
        twokey_runtime::trace::record_ids("", &request.account_id);
        // The grant first: without a valid one, the seed is not looked at.
        let grant = self.vault.verify_enroll_grant(request.grant.as_ref())?;
        let enrollment = Enrollment::try_from(request)?;
        let enrolled = self.vault.enroll(grant, enrollment).await?;
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
        self.authorize(&request)?;
        let released = self
            .vault
            .generate_code(request.get_ref().grant.as_ref())
            .await;
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
        self.authorize(&request)?;
        let account_id = self.vault.remove(request.get_ref().grant.as_ref()).await?;
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
        request: Request<twokey_proto::vault::v1::ApplyPolicyRequest>,
    ) -> Result<Response<twokey_proto::vault::v1::ApplyPolicyResponse>, Status> {
        self.authorize(&request)?;
        Err(Status::unimplemented("signed policies are not served yet"))
    }

    async fn get_policy(
        &self,
        request: Request<twokey_proto::vault::v1::GetPolicyRequest>,
    ) -> Result<Response<twokey_proto::vault::v1::GetPolicyResponse>, Status> {
        self.authorize(&request)?;
        Err(Status::unimplemented("signed policies are not served yet"))
    }

    async fn set_account_enabled(
        &self,
        request: Request<twokey_proto::vault::v1::SetAccountEnabledRequest>,
    ) -> Result<Response<twokey_proto::vault::v1::SetAccountEnabledResponse>, Status> {
        self.authorize(&request)?;
        Err(Status::unimplemented("disabling accounts is not served yet"))
    }

    async fn restore_account(
        &self,
        request: Request<twokey_proto::vault::v1::RestoreAccountRequest>,
    ) -> Result<Response<twokey_proto::vault::v1::RestoreAccountResponse>, Status> {
        self.authorize(&request)?;
        Err(Status::unimplemented("restoring accounts is not served yet"))
    }
}
