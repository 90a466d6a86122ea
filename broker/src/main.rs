//! `twokey-broker`: see `twokey_broker::cli`.
#![forbid(unsafe_code)]

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    twokey_broker::cli::run(twokey_broker::cli::Args::parse())?;
    Ok(())
}
