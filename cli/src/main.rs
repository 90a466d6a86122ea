//! The `twokey` command: parse the command line, run it, exit with its code.
#![forbid(unsafe_code)]

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    match twokey::parse(std::env::args_os()) {
        Ok(cli) => std::process::exit(twokey::run(cli)),
        Err(code) => std::process::exit(code),
    }
}
