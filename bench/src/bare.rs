//! The transport baseline: a bare tonic server with mutual TLS and nothing
//! of ours — no tracing or limits layers, no own TLS acceptor, no logging,
//! no store — answering the vault's `Status` with a constant. It uses the
//! vault's certificate and key and the same CA, requires a client
//! certificate, and runs on its own tokio runtime (2 workers, as a service
//! on this machine) in its own thread, so `Status` on the real vault beside
//! it shows what our own layers cost per call.

use std::{net::SocketAddr, thread::JoinHandle};

use anyhow::{Context, Result};
use tonic::{
    Request, Response, Status,
    transport::{Certificate, Identity, Server, ServerTlsConfig},
};
use twokey_proto::vault::v1::{
    ApplyPolicyRequest, ApplyPolicyResponse, EnrollRequest, EnrollResponse, GenerateCodeRequest,
    GenerateCodeResponse, GetPolicyRequest, GetPolicyResponse, ListAccountsRequest,
    ListAccountsResponse, RemoveAccountRequest, RemoveAccountResponse, RestoreAccountRequest,
    RestoreAccountResponse, SetAccountEnabledRequest, SetAccountEnabledResponse, StatusRequest,
    StatusResponse,
    vault_service_server::{VaultService, VaultServiceServer},
};
use twokey_runtime::tls::TlsFiles;

/// Answers `Status` with a constant, everything else UNIMPLEMENTED.
#[derive(Debug, Clone, Copy)]
struct Bare;

fn none<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented(
        "the bare transport baseline answers only Status",
    ))
}

#[tonic::async_trait]
impl VaultService for Bare {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            account_count: 0,
            ..Default::default()
        }))
    }
    async fn enroll(&self, _: Request<EnrollRequest>) -> Result<Response<EnrollResponse>, Status> {
        none()
    }
    async fn generate_code(
        &self,
        _: Request<GenerateCodeRequest>,
    ) -> Result<Response<GenerateCodeResponse>, Status> {
        none()
    }
    async fn list_accounts(
        &self,
        _: Request<ListAccountsRequest>,
    ) -> Result<Response<ListAccountsResponse>, Status> {
        none()
    }
    async fn remove_account(
        &self,
        _: Request<RemoveAccountRequest>,
    ) -> Result<Response<RemoveAccountResponse>, Status> {
        none()
    }
    async fn apply_policy(
        &self,
        _: Request<ApplyPolicyRequest>,
    ) -> Result<Response<ApplyPolicyResponse>, Status> {
        none()
    }
    async fn get_policy(
        &self,
        _: Request<GetPolicyRequest>,
    ) -> Result<Response<GetPolicyResponse>, Status> {
        none()
    }
    async fn set_account_enabled(
        &self,
        _: Request<SetAccountEnabledRequest>,
    ) -> Result<Response<SetAccountEnabledResponse>, Status> {
        none()
    }
    async fn restore_account(
        &self,
        _: Request<RestoreAccountRequest>,
    ) -> Result<Response<RestoreAccountResponse>, Status> {
        none()
    }
}

/// A running bare server; stopped when dropped.
#[derive(Debug)]
pub struct BareServer {
    /// `https://127.0.0.1:PORT`.
    pub address: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl BareServer {
    /// Starts it on `127.0.0.1:0` with `tls` (the vault's files).
    pub fn start(tls: &TlsFiles) -> Result<Self> {
        let read =
            |p: &std::path::Path| std::fs::read(p).with_context(|| format!("read {}", p.display()));
        let config = ServerTlsConfig::new()
            .identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?))
            .client_ca_root(Certificate::from_pem(read(&tls.ca)?));
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr: SocketAddr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let thread = std::thread::Builder::new()
            .name("bare-tonic".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    // Named apart from the load tool's own workers, so a
                    // profile of the bench process tells the two apart.
                    .thread_name("bare-tonic-w")
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let serve = async {
                        let listener = tokio::net::TcpListener::from_std(listener)?;
                        let incoming = tonic::transport::server::TcpIncoming::from(listener)
                            .with_nodelay(Some(true));
                        let router = Server::builder()
                            .tls_config(config)?
                            .add_service(VaultServiceServer::new(Bare));
                        let _ = ready_tx.send(Ok(()));
                        router
                            .serve_with_incoming_shutdown(incoming, async {
                                let _ = stopped.await;
                            })
                            .await?;
                        Ok::<(), anyhow::Error>(())
                    };
                    if let Err(e) = serve.await {
                        eprintln!("twokey-bench: the bare tonic server failed: {e:#}");
                    }
                });
            })?;
        ready_rx
            .recv()
            .context("the bare tonic server thread ended before serving")??;
        Ok(Self {
            address: format!("https://{addr}"),
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for BareServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
