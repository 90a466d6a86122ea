//! The thin gRPC layer: authenticates the caller from the mTLS certificate,
//! calls the domain ([`Broker`]), and maps [`BrokerError`] to a gRPC status in
//! one place. Also the tonic client that is the broker's [`Vault`].

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::{Stream, StreamExt, future::BoxFuture};
use tonic::{Code, Request, Response, Status, transport::Channel};
use tracing::Instrument;
use twokey_proto::{
    broker::v1::{self as pb, broker_service_server::BrokerService},
    types::v1::{Account, Code as TotpCode},
    vault::v1::{self as vpb, vault_service_client::VaultServiceClient},
};
use twokey_runtime::{
    Authenticator,
    error::{ErrorKind, to_status},
    serve::MAX_MESSAGE_BYTES,
};

use crate::{
    error::BrokerError,
    service::Broker,
    vault::{Vault, VaultError},
};

/// The status of a domain error: its kind's code (`to_status`), except that
/// a vault call that timed out answers DEADLINE_EXCEEDED, as the vault
/// client saw it.
impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Self {
        if e.timed_out() {
            return Status::deadline_exceeded(e.to_string());
        }
        to_status(&e)
    }
}

/// A vault status as the broker keeps it: its kind (out-of-range counts as
/// an invalid argument, aborted as a failed precondition, as the vault never
/// answers either), or a timeout.
impl From<Status> for VaultError {
    fn from(s: Status) -> Self {
        let timed_out = matches!(s.code(), Code::DeadlineExceeded | Code::Cancelled);
        let kind = match s.code() {
            Code::OutOfRange => ErrorKind::InvalidArgument,
            Code::Aborted => ErrorKind::FailedPrecondition,
            code => ErrorKind::of_code(code),
        };
        let message = if s.message().is_empty() {
            format!("{}", s.code())
        } else {
            s.message().to_owned()
        };
        VaultError {
            kind,
            timed_out,
            message,
        }
    }
}

/// How long one vault call may take.
const VAULT_DEADLINE: Duration = Duration::from_secs(15);

/// The vault over gRPC and mTLS.
#[derive(Debug, Clone)]
pub struct GrpcVault {
    client: VaultServiceClient<Channel>,
}

impl GrpcVault {
    /// A vault client on `channel`.
    pub fn new(channel: Channel) -> Self {
        Self {
            client: VaultServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        }
    }
}

/// The client span of a call of the vault's `method`.
fn client_span(method: &str) -> tracing::Span {
    twokey_runtime::trace::client_span(&format!("twokey.vault.v1.VaultService/{method}"))
}

fn with_deadline<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(VAULT_DEADLINE);
    // Carry this call's span to the vault, so its spans and events join the trace.
    twokey_runtime::trace::inject(request.metadata_mut());
    request
}

impl Vault for GrpcVault {
    fn enroll(
        &self,
        request: vpb::EnrollRequest,
    ) -> BoxFuture<'_, Result<vpb::EnrollResponse, VaultError>> {
        let mut client = self.client.clone();
        Box::pin(
            async move { Ok(client.enroll(with_deadline(request)).await?.into_inner()) }
                .instrument(client_span("Enroll")),
        )
    }

    fn generate_code(
        &self,
        grant: vpb::SignedGrant,
    ) -> BoxFuture<'_, Result<TotpCode, VaultError>> {
        let mut client = self.client.clone();
        Box::pin(
            async move {
                client
                    .generate_code(with_deadline(vpb::GenerateCodeRequest {
                        grant: Some(grant),
                    }))
                    .await?
                    .into_inner()
                    .code
                    .ok_or_else(|| {
                        VaultError::new(ErrorKind::Internal, "the vault answered without a code")
                    })
            }
            .instrument(client_span("GenerateCode")),
        )
    }

    fn list_accounts(&self) -> BoxFuture<'_, Result<Vec<Account>, VaultError>> {
        let mut client = self.client.clone();
        Box::pin(
            async move {
                Ok(client
                    .list_accounts(with_deadline(vpb::ListAccountsRequest {}))
                    .await?
                    .into_inner()
                    .accounts)
            }
            .instrument(client_span("ListAccounts")),
        )
    }

    fn remove_account(&self, grant: vpb::SignedGrant) -> BoxFuture<'_, Result<String, VaultError>> {
        let mut client = self.client.clone();
        Box::pin(
            async move {
                Ok(client
                    .remove_account(with_deadline(vpb::RemoveAccountRequest {
                        grant: Some(grant),
                    }))
                    .await?
                    .into_inner()
                    .account_id)
            }
            .instrument(client_span("RemoveAccount")),
        )
    }
}

/// The `BrokerService` implementation.
#[derive(Debug, Clone)]
pub struct BrokerGrpc {
    broker: Arc<Broker>,
    auth: Authenticator,
}

impl BrokerGrpc {
    /// Serves `broker`, authenticating callers of `auth`'s trust domain.
    pub fn new(broker: Arc<Broker>, auth: Authenticator) -> Self {
        Self { broker, auth }
    }
}

macro_rules! rpc {
    ($self:ident, $request:ident, $name:literal, |$caller:ident, $msg:ident| $call:expr) => {{
        let $caller = $self.auth.authenticate(&$request)?;
        let (request_id, account_id) = CallIds::ids($request.get_ref());
        twokey_runtime::trace::record_ids(request_id, account_id);
        let $msg = $request.into_inner();
        let result = async { $call }.await;
        match result {
            Ok(response) => Ok(Response::new(response)),
            Err(e) => {
                let status = Status::from(e);
                tracing::info!(method = $name, code = ?status.code(), "refused: {}", status.message());
                Err(status)
            }
        }
    }};
}

/// The request and account a call names, recorded on its server span.
trait CallIds {
    fn ids(&self) -> (&str, &str) {
        ("", "")
    }
}

macro_rules! call_ids {
    (request: $($r:ty),*; account: $($a:ty),*; neither: $($n:ty),*) => {
        $(impl CallIds for $r {
            fn ids(&self) -> (&str, &str) {
                (&self.request_id, "")
            }
        })*
        $(impl CallIds for $a {
            fn ids(&self) -> (&str, &str) {
                ("", &self.account_id)
            }
        })*
        $(impl CallIds for $n {})*
    };
}

call_ids!(
    request: pb::GetRequestRequest, pb::ApproveRequestRequest, pb::DenyRequestRequest,
        pb::CancelRequestRequest, pb::VerifyPinRequest, pb::ResendPinRequest,
        pb::ReleaseCodeRequest;
    account: pb::CreateRequestRequest, pb::ListRequestsRequest, pb::WatchRequestsRequest,
        pb::EnrollAccountRequest, pb::RemoveAccountRequest;
    neither: pb::WhoAmIRequest, pb::ListAccountsRequest
);

/// The stream type of `WatchRequests`.
pub type WatchStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchRequestsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl BrokerService for BrokerGrpc {
    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        rpc!(self, request, "WhoAmI", |caller, _m| Ok::<_, BrokerError>(
            self.broker.who_am_i(&caller)
        ))
    }

    async fn create_request(
        &self,
        request: Request<pb::CreateRequestRequest>,
    ) -> Result<Response<pb::CreateRequestResponse>, Status> {
        rpc!(self, request, "CreateRequest", |caller, m| self
            .broker
            .create_request(&caller, m)
            .await)
    }

    async fn get_request(
        &self,
        request: Request<pb::GetRequestRequest>,
    ) -> Result<Response<pb::GetRequestResponse>, Status> {
        rpc!(self, request, "GetRequest", |caller, m| self
            .broker
            .get_request(&caller, m)
            .await)
    }

    async fn list_requests(
        &self,
        request: Request<pb::ListRequestsRequest>,
    ) -> Result<Response<pb::ListRequestsResponse>, Status> {
        rpc!(self, request, "ListRequests", |caller, m| self
            .broker
            .list_requests(&caller, m))
    }

    type WatchRequestsStream = WatchStream;

    async fn watch_requests(
        &self,
        request: Request<pb::WatchRequestsRequest>,
    ) -> Result<Response<Self::WatchRequestsStream>, Status> {
        rpc!(self, request, "WatchRequests", |caller, m| self
            .broker
            .watch_requests(&caller, m)
            .map(|s| Box::pin(s.map(Ok)) as WatchStream))
    }

    async fn approve_request(
        &self,
        request: Request<pb::ApproveRequestRequest>,
    ) -> Result<Response<pb::ApproveRequestResponse>, Status> {
        rpc!(self, request, "ApproveRequest", |caller, m| self
            .broker
            .approve_request(&caller, m)
            .await)
    }

    async fn deny_request(
        &self,
        request: Request<pb::DenyRequestRequest>,
    ) -> Result<Response<pb::DenyRequestResponse>, Status> {
        rpc!(self, request, "DenyRequest", |caller, m| self
            .broker
            .deny_request(&caller, m)
            .await)
    }

    async fn cancel_request(
        &self,
        request: Request<pb::CancelRequestRequest>,
    ) -> Result<Response<pb::CancelRequestResponse>, Status> {
        rpc!(self, request, "CancelRequest", |caller, m| self
            .broker
            .cancel_request(&caller, m)
            .await)
    }

    async fn verify_pin(
        &self,
        request: Request<pb::VerifyPinRequest>,
    ) -> Result<Response<pb::VerifyPinResponse>, Status> {
        rpc!(self, request, "VerifyPin", |caller, m| self
            .broker
            .verify_pin(&caller, m)
            .await)
    }

    async fn resend_pin(
        &self,
        request: Request<pb::ResendPinRequest>,
    ) -> Result<Response<pb::ResendPinResponse>, Status> {
        rpc!(self, request, "ResendPin", |caller, m| self
            .broker
            .resend_pin(&caller, m)
            .await)
    }

    async fn release_code(
        &self,
        request: Request<pb::ReleaseCodeRequest>,
    ) -> Result<Response<pb::ReleaseCodeResponse>, Status> {
        rpc!(self, request, "ReleaseCode", |caller, m| self
            .broker
            .release_code(&caller, m)
            .await)
    }

    async fn enroll_account(
        &self,
        request: Request<pb::EnrollAccountRequest>,
    ) -> Result<Response<pb::EnrollAccountResponse>, Status> {
        rpc!(self, request, "EnrollAccount", |caller, m| self
            .broker
            .enroll_account(&caller, m)
            .await)
    }

    async fn list_accounts(
        &self,
        request: Request<pb::ListAccountsRequest>,
    ) -> Result<Response<pb::ListAccountsResponse>, Status> {
        rpc!(self, request, "ListAccounts", |caller, m| self
            .broker
            .list_accounts(&caller, m)
            .await)
    }

    async fn remove_account(
        &self,
        request: Request<pb::RemoveAccountRequest>,
    ) -> Result<Response<pb::RemoveAccountResponse>, Status> {
        rpc!(self, request, "RemoveAccount", |caller, m| self
            .broker
            .remove_account(&caller, m)
            .await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_decide_codes_and_a_vault_timeout_stays_deadline_exceeded() {
        let store = Status::from(BrokerError::Store("disk full".into()));
        assert_eq!(store.code(), Code::Unavailable);
        assert_eq!(store.message(), "storage failure: disk full");
        let refused: VaultError = Status::permission_denied("bad grant").into();
        assert!(refused.surely_refused());
        assert_eq!(
            Status::from(BrokerError::from(refused)).code(),
            Code::PermissionDenied
        );
        let late: VaultError = Status::deadline_exceeded("").into();
        assert!(!late.surely_refused());
        assert_eq!(
            late.message,
            "Deadline expired before operation could complete"
        );
        assert_eq!(
            Status::from(BrokerError::from(late)).code(),
            Code::DeadlineExceeded
        );
    }
}
