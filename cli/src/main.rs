//! The `twokey` command: parse the command line, run it, exit with its code.
#![forbid(unsafe_code)]

use clap::Parser;

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = twokey::Cli::parse();
    std::process::exit(twokey::run(cli));
}
