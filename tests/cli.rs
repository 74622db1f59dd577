//! The command line as a user meets it: `down`, the second Ctrl-C of `up`, one-shot commands
//! on a home without a database, `doctor`, `completions`, and `resume` that is no command.
//! Every test runs the real `harness` binary.

mod common;

use std::path::Path;
use std::process::{Command, Output};

/// A command for the harness binary with a clean harness environment and `home`.
fn harness(home: &Path) -> Command {
    let mut cmd = common::harness_command();
    cmd.env("HARNESS_HOME", home);
    cmd
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn completions_print_a_script_naming_the_subcommands_and_reject_an_unknown_shell() {
    let home = tempfile::tempdir().unwrap();
    let out = harness(home.path())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let script = stdout(&out);
    for word in ["harness", "enqueue", "agents", "fleet", "completions"] {
        assert!(script.contains(word), "{word} missing from the script");
    }
    // A hidden command is not offered.
    assert!(!script.contains("harness__resume"), "resume offered");

    let out = harness(home.path())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a clap usage error");
    assert!(
        stderr(&out).contains("invalid value 'tcsh'"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("bash"),
        "lists the shells: {}",
        stderr(&out)
    );
}

#[test]
fn completions_need_no_valid_configuration() {
    let home = tempfile::tempdir().unwrap();
    let out = harness(home.path())
        .args(["completions", "zsh"])
        .env("HARNESS_GOVERNANCE__CPU_HIGH_PCT", "250")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("harness"));
}

#[test]
fn resume_is_no_command_and_points_to_agents_and_fleet_resume() {
    let home = tempfile::tempdir().unwrap();
    let out = harness(home.path())
        .args(["resume", "counter"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("harness agents resume counter"), "{err}");
    assert!(err.contains("harness fleet resume"), "{err}");
    assert!(!err.contains("Usage: harness serve"), "{err}");
    assert!(!home.path().join("pg").exists(), "no database started");

    // `serve` no longer answers to `resume`, and help does not list it.
    let help = harness(home.path()).arg("--help").output().unwrap();
    let help = stdout(&help);
    assert!(!help.contains("alias"), "{help}");
    assert!(
        !help.lines().any(|l| l.trim_start().starts_with("resume")),
        "{help}"
    );
}
