//! `twokey completions SHELL`: a shell completion script on stdout.

use clap::{Args, CommandFactory};
use clap_complete::Shell;

use crate::{Cli, error::CliError, output::stdout_error};

/// `completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    #[arg(value_enum, value_name = "SHELL")]
    pub shell: Shell,
}

/// Prints the completion script. Install it, e.g. for bash:
/// `twokey completions bash > ~/.local/share/bash-completion/completions/twokey`.
pub fn run(args: &CompletionsArgs) -> Result<(), CliError> {
    let mut cmd = Cli::command();
    let mut buf = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "twokey", &mut buf);
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(&buf)
        .and_then(|()| out.flush())
        .map_err(stdout_error)
}
