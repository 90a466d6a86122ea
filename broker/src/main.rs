//! `twokey-broker`: see `twokey_broker::cli`.
#![forbid(unsafe_code)]

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args =
        twokey_runtime::cli::parse::<twokey_broker::cli::Args>(twokey_broker::config::ENV_PREFIX);
    twokey_broker::cli::run(args)?;
    Ok(())
}
