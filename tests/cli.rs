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

/// A one-shot command in the wrong directory (or with a mistyped `HARNESS_HOME`) used to
/// initdb an empty 47 MB database there and report 0 tasks.
#[test]
fn one_shot_commands_on_a_home_without_a_database_fail_and_create_nothing() {
    let parent = tempfile::tempdir().unwrap();
    let home = parent.path().join("typo");
    for args in [
        &["stats"][..],
        &["fleet"],
        &["inspect", "1"],
        &["enqueue", "noop", "{}"],
        &["agents", "list"],
    ] {
        let out = harness(&home).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(&format!("there is no database under {}", home.display())),
            "{args:?}: {err}"
        );
        for fix in [
            "harness up",
            "harness migrate",
            "HARNESS_HOME",
            "DATABASE_URL",
        ] {
            assert!(err.contains(fix), "{args:?} does not suggest {fix}: {err}");
        }
        assert!(!home.exists(), "{args:?} created {}", home.display());
    }
    // An existing but empty home stays without a data directory.
    let out = harness(parent.path()).arg("stats").output().unwrap();
    assert!(!out.status.success());
    assert!(!parent.path().join("pg").exists());
}
