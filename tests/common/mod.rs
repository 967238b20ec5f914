//! Shared helpers: generated logs on disk and the `agentsync` binary run as a process.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

use agentsync::events::{Envelope, NewEvent};
use agentsync::log::{EventLog, LogOptions};
use agentsync::testkit::{History, Step};

/// A writer's options: creates the directory.
pub fn create() -> LogOptions {
    LogOptions {
        create: true,
        ..LogOptions::default()
    }
}

/// Writes `events` to a new log in `dir` in batches of `batch`, and returns them as stored.
pub fn write_log(dir: &Path, events: Vec<NewEvent>, batch: usize) -> Vec<Envelope> {
    let log = EventLog::open(dir, &create()).expect("open log");
    let mut stored = Vec::new();
    let mut events = events.into_iter().peekable();
    while events.peek().is_some() {
        let chunk: Vec<NewEvent> = events.by_ref().take(batch).collect();
        stored.extend(log.append(chunk).expect("append"));
    }
    stored
}

/// A log of `n` random steps from `seed`.
pub fn random_log(dir: &Path, seed: u64, n: usize) -> Vec<Envelope> {
    write_log(
        dir,
        History::of(&History::random_steps(seed, n), 1_763_700_000_000),
        64,
    )
}

/// A small log that tells a whole story: sessions, an answered message, a failed one.
pub fn story(dir: &Path) -> Vec<Envelope> {
    use agentsync::testkit::PromptOutcome::*;
    let steps = [
        Step::Lifecycle,
        Step::Models,
        Step::NewAgentSession,
        Step::NewAgentSession,
        Step::Listing(agentsync::events::Source::Agent, true),
        Step::UserMessage(0),
        Step::UserMessage(1),
        Step::Prompt(Answered),
        Step::Prompt(Terminal),
        Step::Rename(1),
    ];
    write_log(dir, History::of(&steps, 1_763_700_000_000), 4)
}

/// Runs the binary.
pub fn agentsync(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agentsync"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run agentsync")
}

/// Runs the binary with `--data-dir DIR` after the subcommand.
pub fn agentsync_in(dir: &Path, sub: &str, rest: &[&str]) -> Output {
    let d = dir.to_str().unwrap();
    let mut args = vec![sub, "--data-dir", d];
    args.extend_from_slice(rest);
    agentsync(&args)
}

/// stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub mod hostile;
pub mod opencode;
pub mod proxy;
