//! `twokey-audit`: the audit service binary.
#![forbid(unsafe_code)]

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    twokey_audit::cli::run(twokey_audit::cli::Args::parse()).await
}
