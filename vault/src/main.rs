//! The `twokey-vault` binary.
#![forbid(unsafe_code)]

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    twokey_vault::cli::run(twokey_vault::cli::Cli::parse()).await
}
