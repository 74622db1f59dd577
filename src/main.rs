//! The `harness` binary: parses the command line and hands over to `harness::cli`.

use clap::Parser;

mod cli;

fn main() -> std::process::ExitCode {
    // Before anything else: a fork copies only the calling thread.
    cli::init::become_init_if_pid1();
    let args = cli::Cli::parse();
    cli::run(args)
}
