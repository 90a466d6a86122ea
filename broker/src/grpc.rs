//! The thin gRPC layer: authenticates the caller from the mTLS certificate,
//! calls the domain ([`Broker`]) through [`crate::convert`], and maps [`BrokerError`] to a gRPC status in
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
    convert::{self, Named},
    error::BrokerError,
    service::Broker,
    vault::{Vault, VaultError},
};

/// The status of a domain error: its kind's code (`to_status`).
impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Self {
        to_status(&e)
    }
}

/// A vault status as the broker keeps it: its kind (out-of-range counts as
/// an invalid argument, aborted as a failed precondition, as the vault never
/// answers either; a timeout or cancellation is deadline exceeded).
impl From<Status> for VaultError {
    fn from(s: Status) -> Self {
        let kind = match s.code() {
            Code::OutOfRange => ErrorKind::InvalidArgument,
            Code::Aborted => ErrorKind::FailedPrecondition,
            code => ErrorKind::of_code(code),
        };
        let said = if s.message().is_empty() {
            format!("{}", s.code())
        } else {
            s.message().to_owned()
        };
        // Late or cut off: whether a code left the vault is unknown.
        let message = if kind == ErrorKind::DeadlineExceeded {
            format!(
                "did not answer in time ({said}); if a code was released it counts against the request"
            )
        } else {
            said
        };
        VaultError { kind, message }
    }
}

/// How long one vault call may take.
const VAULT_DEADLINE: Duration = Duration::from_secs(15);

/// How long a release's GenerateCode may take: the documented 3 s for
/// audit's acknowledgement of `code.released`, and half a second for the
/// vault's own work and its answer. The vault keeps its wait for audit
/// within this deadline (whatever its `audit_ack_timeout_ms`), so with audit
/// down it answers UNAVAILABLE, naming audit, before the deadline passes and
/// the caller hears of it in about 3 s; a vault that does not answer in time
/// is DEADLINE_EXCEEDED, and the release keeps its quota spent.
pub const RELEASE_DEADLINE: Duration = Duration::from_millis(3500);

/// The vault over gRPC and mTLS.
#[derive(Debug, Clone)]
pub struct GrpcVault {
    client: Arc<std::sync::RwLock<VaultServiceClient<Channel>>>,
    /// The vault's replicas, for a new connection after UNAVAILABLE.
    peer: Option<twokey_runtime::tls::Peer>,
    release_deadline: Duration,
}

fn vault_client(channel: Channel) -> VaultServiceClient<Channel> {
    VaultServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

impl GrpcVault {
    /// A vault client on `channel`, with [`RELEASE_DEADLINE`] for releases.
    pub fn new(channel: Channel) -> Self {
        Self {
            client: Arc::new(std::sync::RwLock::new(vault_client(channel))),
            peer: None,
            release_deadline: RELEASE_DEADLINE,
        }
    }

    /// A vault client of `peer`'s replicas: a call answered UNAVAILABLE
    /// (a replica that is sealed, or whose database is not ready, or gone)
    /// fails as it is — nothing was released — and the next call runs on a
    /// new connection that starts at the next replica.
    pub fn with_replicas(peer: twokey_runtime::tls::Peer) -> Self {
        Self {
            client: Arc::new(std::sync::RwLock::new(vault_client(peer.channel()))),
            peer: Some(peer),
            release_deadline: RELEASE_DEADLINE,
        }
    }

    fn client(&self) -> VaultServiceClient<Channel> {
        self.client
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// After an UNAVAILABLE answer: the next call on a new connection.
    fn reconnect(&self, status: &Status) {
        if status.code() != tonic::Code::Unavailable {
            return;
        }
        if let Some(peer) = &self.peer {
            *self.client.write().unwrap_or_else(|e| e.into_inner()) = vault_client(peer.channel());
        }
    }

    /// The same client with `deadline` for a release's code call (the
    /// broker's `release_deadline_ms`).
    pub fn with_release_deadline(mut self, deadline: Duration) -> Self {
        self.release_deadline = deadline;
        self
    }
}

/// The client span of a call of the vault's `method`.
fn client_span(method: &str) -> tracing::Span {
    twokey_runtime::trace::client_span(&format!("twokey.vault.v1.VaultService/{method}"))
}

fn within<T>(deadline: Duration, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(deadline);
    // Carry this call's span to the vault, so its spans and events join the trace.
    twokey_runtime::trace::inject(request.metadata_mut());
    request
}

/// One vault call: a clone of the client, the request with its deadline and
/// trace context, the answer (or its status as a [`VaultError`]) mapped by
/// `then`, inside the call's client span.
macro_rules! vault_call {
    ($self:ident, $method:ident, $name:expr, $request:expr, |$answer:ident| $then:expr) => {
        vault_call!($self, $method, $name, $request, VAULT_DEADLINE, |$answer| {
            $then
        })
    };
    ($self:ident, $method:ident, $name:expr, $request:expr, $deadline:expr, |$answer:ident| $then:expr) => {{
        let mut client = $self.client();
        let request = $request;
        Box::pin(
            async move {
                let $answer = client
                    .$method(within($deadline, request))
                    .await
                    .inspect_err(|status| $self.reconnect(status))?
                    .into_inner();
                $then
            }
            .instrument(client_span($name)),
        )
    }};
}

fn missing(what: &str) -> VaultError {
    VaultError::new(
        ErrorKind::Internal,
        format!("the vault answered without {what}"),
    )
}

impl Vault for GrpcVault {
    fn enroll(
        &self,
        request: vpb::EnrollRequest,
    ) -> BoxFuture<'_, Result<vpb::EnrollResponse, VaultError>> {
        vault_call!(self, enroll, "Enroll", request, |a| Ok(a))
    }

    fn generate_code(
        &self,
        grant: vpb::SignedGrant,
        evidence: Option<vpb::ReleaseEvidence>,
    ) -> BoxFuture<'_, Result<TotpCode, VaultError>> {
        let request = vpb::GenerateCodeRequest {
            grant: Some(grant),
            evidence,
        };
        vault_call!(
            self,
            generate_code,
            "GenerateCode",
            request,
            self.release_deadline,
            |a| a.code.ok_or_else(|| missing("a code"))
        )
    }

    fn list_accounts(&self) -> BoxFuture<'_, Result<Vec<Account>, VaultError>> {
        vault_call!(
            self,
            list_accounts,
            "ListAccounts",
            vpb::ListAccountsRequest {},
            |a| Ok(a.accounts)
        )
    }

    fn remove_account(
        &self,
        request: vpb::RemoveAccountRequest,
    ) -> BoxFuture<'_, Result<String, VaultError>> {
        vault_call!(self, remove_account, "RemoveAccount", request, |a| Ok(
            a.account_id
        ))
    }

    fn set_account_enabled(
        &self,
        request: vpb::SetAccountEnabledRequest,
    ) -> BoxFuture<'_, Result<Account, VaultError>> {
        vault_call!(
            self,
            set_account_enabled,
            "SetAccountEnabled",
            request,
            |a| a.account.ok_or_else(|| missing("the account"))
        )
    }

    fn restore_account(
        &self,
        request: vpb::RestoreAccountRequest,
    ) -> BoxFuture<'_, Result<Account, VaultError>> {
        vault_call!(self, restore_account, "RestoreAccount", request, |a| a
            .account
            .ok_or_else(|| missing("the account")))
    }

    fn apply_policy(
        &self,
        request: vpb::ApplyPolicyRequest,
    ) -> BoxFuture<'_, Result<vpb::PolicyVersion, VaultError>> {
        vault_call!(self, apply_policy, "ApplyPolicy", request, |a| a
            .policy
            .ok_or_else(|| missing("the applied version")))
    }

    fn get_policy(&self) -> BoxFuture<'_, Result<Vec<vpb::PolicyVersion>, VaultError>> {
        vault_call!(
            self,
            get_policy,
            "GetPolicy",
            vpb::GetPolicyRequest {},
            |a| Ok(a.versions)
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
    ($self:ident, $request:ident, $name:expr, |$caller:ident, $msg:ident| $call:expr) => {{
        let $caller = $self.auth.authenticate(&$request)?;
        let target = $request.get_ref().target();
        let (request_id, account_id) = target.ids();
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

/// The stream type of `WatchRequests`.
pub type WatchStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchRequestsResponse, Status>> + Send>>;

/// The service from the one RPC table ([`crate::rpc`]): every unary method
/// authenticates, records the ids its message names and calls the
/// same-named `convert` function (the message checked, the `Broker` call,
/// the answer as the response); `WatchRequests` adapts the change stream.
macro_rules! grpc_service {
    (
        unary: [$(($name:ident, $f:ident, $req:ident, $resp:ident, $ids:ident)),* $(,)?],
        streaming: [$($_s:tt)*] $(,)?
    ) => {
        #[tonic::async_trait]
        impl BrokerService for BrokerGrpc {
            $(async fn $f(
                &self,
                request: Request<pb::$req>,
            ) -> Result<Response<pb::$resp>, Status> {
                rpc!(self, request, stringify!($name), |caller, m| convert::$f(
                    &self.broker,
                    &caller,
                    m
                )
                .await)
            })*

            type WatchRequestsStream = WatchStream;

    async fn watch_requests(
            &self,
            request: Request<pb::WatchRequestsRequest>,
        ) -> Result<Response<Self::WatchRequestsStream>, Status> {
            rpc!(self, request, "WatchRequests", |caller, m| convert::watch_requests(
                &self.broker,
                &caller,
                m
            )
            .map(|s| Box::pin(s.map(Ok)) as WatchStream))
        }
        }
    };
}

crate::rpc::broker_rpcs!(grpc_service);

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
        // A cancelled call is as unknown as a late one: no quota back.
        let cut: VaultError = Status::cancelled("client went away").into();
        assert!(!cut.surely_refused());
        assert_eq!(cut.kind, ErrorKind::DeadlineExceeded);
        assert_eq!(
            late.message,
            "did not answer in time (Deadline expired before operation could complete); if a code was released it counts against the request"
        );
        assert_eq!(
            Status::from(BrokerError::from(late)).code(),
            Code::DeadlineExceeded
        );
    }
}
