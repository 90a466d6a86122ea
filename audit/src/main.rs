//! `twokey-audit`: the audit service binary.
#![forbid(unsafe_code)]

use twokey_audit::cli;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    cli::run(twokey_runtime::cli::parse::<cli::Args>(cli::ENV_PREFIX)).await
}
