//! The `twokey-vault` binary.
#![forbid(unsafe_code)]

use twokey_vault::cli;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    cli::run(twokey_runtime::cli::parse::<cli::Cli>(cli::ENV_PREFIX)).await
}
