//! The `harness` binary: parses the command line and hands over to `harness::cli`.

use clap::Parser;

mod cli;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    cli::run(args)
}
