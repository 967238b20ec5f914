//! The `agentsync` command line. Each subcommand lives in its own file; this one parses,
//! maps errors to exit codes (2: usage or configuration, 1: runtime) and owns stdout.

mod archive;
mod chat;
mod demo;
mod rebuild;
mod render;
mod replay;
mod run;
mod stats;
mod why;

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::events::EventKind;
use crate::log::{EventLog, LogError, LogOptions};
use crate::projections::ProjectionName;

/// agentsync: an event-sourced reconciliation engine for AI-agent workers.
#[derive(Debug, Parser)]
#[command(name = "agentsync", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the worker: observe both sides, reconcile, dispatch, until SIGTERM or SIGINT.
    Run(Box<RunArgs>),
    /// Print the log as a timeline, or the state of a view at a point of it.
    Replay(ReplayArgs),
    /// Explain an id: the observations that led to it and the outcomes that followed.
    Why(WhyArgs),
    /// Rebuild projections from the log; --verify compares with the stored checkpoints.
    Rebuild(RebuildArgs),
    /// Counts by kind, size on disk, checkpoint lag.
    Stats(StatsArgs),
    /// The log as JSON lines on stdout.
    Export(ExportArgs),
    /// Move old events, covered by every checkpoint, into compressed segments in DIR/archive.
    Archive(ArchiveArgs),
    /// The production incident, simulated: a real worker and log against simulated sides.
    Demo(DemoArgs),
    /// Post a message to a chat session of the local backend (through the running worker).
    Send(SendArgs),
    /// Talk to the worker through the local backend: each line is a message, answers print.
    Chat(ChatArgs),
}

#[derive(Debug, Args)]
struct DataDir {
    /// The worker's data directory.
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
}

#[derive(Debug, Args)]
struct ReplayArgs {
    #[command(flatten)]
    dir: DataDir,
    /// First sequence number to show.
    #[arg(long, value_name = "SEQ", conflicts_with = "at")]
    from: Option<u64>,
    /// Last sequence number to show.
    #[arg(long, value_name = "SEQ", conflicts_with = "at")]
    to: Option<u64>,
    /// Only events about this chat or agent session.
    #[arg(long, value_name = "ID", conflicts_with = "at")]
    session: Option<String>,
    /// Only events of this kind (repeatable).
    #[arg(long, value_name = "KIND", value_parser = parse_kind, conflicts_with = "at")]
    kind: Vec<EventKind>,
    /// Print the state of a view as it was after this sequence number.
    #[arg(long, value_name = "SEQ", requires = "view")]
    at: Option<u64>,
    /// The view to print with --at.
    #[arg(long, value_name = "VIEW", value_parser = parse_projection, requires = "at")]
    view: Option<ProjectionName>,
    /// JSON lines (timeline) or one JSON object (view) instead of a table.
    #[arg(long)]
    json: bool,
    /// Pass over undecodable events and damaged archive segments, reporting each on stderr,
    /// instead of stopping.
    #[arg(long, conflicts_with = "at")]
    skip_corrupt: bool,
}

#[derive(Debug, Args)]
struct WhyArgs {
    #[command(flatten)]
    dir: DataDir,
    /// A command id, message id, chat or agent session id, or event id.
    #[arg(value_name = "ID")]
    id: String,
    /// JSON lines, each with its role (cause, subject, outcome).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct RebuildArgs {
    #[command(flatten)]
    dir: DataDir,
    /// Only this projection (sessions, messages or commands).
    #[arg(long, value_name = "NAME", value_parser = parse_projection)]
    projection: Option<ProjectionName>,
    /// Rebuild up to each stored checkpoint and list every difference; write nothing.
    #[arg(long)]
    verify: bool,
}

#[derive(Debug, Args)]
struct StatsArgs {
    #[command(flatten)]
    dir: DataDir,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ExportArgs {
    #[command(flatten)]
    dir: DataDir,
    /// First sequence number to export.
    #[arg(long, value_name = "SEQ", default_value_t = 1)]
    from: u64,
}

#[derive(Debug, Args)]
struct ArchiveArgs {
    #[command(flatten)]
    dir: DataDir,
    /// Archive events at least this many days old (by the time they were appended).
    #[arg(long, value_name = "N", default_value_t = 7)]
    older_than_days: u32,
    /// Also delete archived segments whose newest event is this many days old: those events
    /// are gone for good. Off unless given; must be more than --older-than-days.
    #[arg(long, value_name = "N")]
    drop_older_than_days: Option<u32>,
    /// Then rewrite the log's database without the space sled keeps for what was removed:
    /// after a large archive, its open time and memory stay those of the most it ever held.
    #[arg(long)]
    compact: bool,
    /// Print what was done as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Where to write the log (a new or empty directory; default: a new temporary one).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Multiply the incident's size.
    #[arg(long, value_name = "N", default_value_t = 1)]
    scale: usize,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The worker's data directory (created if missing).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The worker's id (the backend's `workerId`).
    #[arg(long, value_name = "ID")]
    worker_id: Option<String>,
    /// The agent server's URL (an `opencode serve` already running).
    #[arg(long, value_name = "URL", conflicts_with = "spawn_agent")]
    agent_url: Option<String>,
    /// Start `opencode serve` in --agent-dir and supervise it.
    #[arg(long)]
    spawn_agent: bool,
    /// The agent directory: where a spawned server runs, and whose sessions are synced.
    #[arg(long, value_name = "DIR")]
    agent_dir: Option<PathBuf>,
    /// The environment variable holding the agent server's password. A spawned server gets a
    /// random password of its own when this is not given.
    #[arg(long, value_name = "VAR")]
    agent_password_env: Option<String>,
    /// A variable of the worker's environment that a spawned server may see (the model
    /// provider's key, say); repeatable. Nothing else passes but PATH, HOME, the locale and the
    /// XDG directories.
    #[arg(long = "agent-env", value_name = "VAR")]
    agent_env: Vec<String>,
    /// The `opencode` executable for --spawn-agent (default: $AGENTSYNC_OPENCODE_BIN, or
    /// `opencode` on PATH).
    #[arg(long, value_name = "PATH")]
    opencode_bin: Option<PathBuf>,
    /// The backend: local (embedded, the default) or convex.
    #[arg(long, value_name = "KIND", value_enum)]
    backend: Option<run::BackendKind>,
    /// The Convex deployment's URL (with --backend convex).
    #[arg(long, value_name = "URL")]
    convex_url: Option<String>,
    /// The environment variable holding the Convex deploy key.
    #[arg(long, value_name = "VAR")]
    convex_key_env: Option<String>,
    /// The Convex module of the functions (default: agentsync).
    #[arg(long, value_name = "NAME")]
    convex_module: Option<String>,
    /// The model of prompts whose session names none, PROVIDER/MODEL.
    #[arg(long, value_name = "PROVIDER/MODEL")]
    model: Option<String>,
    /// Calls in flight at most (default 10).
    #[arg(long, value_name = "N")]
    concurrency: Option<usize>,
    /// Where /metrics, /healthz and /readyz listen (default 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<String>,
    /// Allow --metrics-addr on a non-loopback address (it then serves the worker's metrics to
    /// the network, without authentication).
    #[arg(long)]
    metrics_public: bool,
    /// How long in-flight calls may finish after SIGTERM (default 10).
    #[arg(long, value_name = "SECS")]
    drain_grace_secs: Option<u64>,
    /// The most agent sessions one full listing asks for (default 10000). A listing that comes
    /// back full counts as incomplete (never prunes, never Ready): raise it above your count.
    #[arg(long, value_name = "N")]
    listing_limit: Option<u32>,
    /// Fail a user message still without an answer this many minutes after the worker first
    /// saw it, restart or not (default 30).
    #[arg(long, value_name = "MINUTES")]
    message_deadline_mins: Option<u64>,
    /// Move events older than this many days, once every checkpoint covers them, from the live
    /// log into compressed segments in DATA_DIR/archive, hourly (default 7; 0: never).
    #[arg(long, value_name = "DAYS")]
    archive_after_days: Option<u64>,
    /// Delete archived segments whose newest event is older than this many days (default:
    /// keep them). Must be more than --archive-after-days.
    #[arg(long, value_name = "DAYS")]
    drop_archive_after_days: Option<u64>,
    /// Keep final rows (finished commands, delivered messages, deleted or failed chat
    /// sessions) in the live views this many days after they ended (default 7, 1 to 3650);
    /// the log keeps their history. The backend must keep applied command ids at least as
    /// long (the local backend and the reference Convex module keep them 8 days).
    #[arg(long, value_name = "DAYS")]
    retention_days: Option<u64>,
    /// The largest reply body read from the agent server or the backend, in MiB (default 32);
    /// a larger one is an error naming the call and the size.
    #[arg(long, value_name = "MIB")]
    max_reply_mib: Option<u64>,
    /// The largest event read from the agent server's event stream, in KiB (default 1024).
    #[arg(long, value_name = "KIB")]
    max_event_kib: Option<u64>,
    /// Accept this worker id, agent server and backend for a data directory that recorded
    /// others (in its IDENTITY.json), and record the move in the log.
    #[arg(long)]
    adopt: bool,
    /// A TOML file with the same keys as these flags (`data-dir = "..."`); flags win.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct SendArgs {
    #[command(flatten)]
    dir: DataDir,
    /// The chat session's id, or `new` to open one.
    #[arg(value_name = "SESSION")]
    session: String,
    /// The message.
    #[arg(value_name = "TEXT")]
    text: String,
    /// The title of a `new` session.
    #[arg(long, default_value = "New chat")]
    title: String,
    /// Wait up to this many seconds for the answer and print it (exit 1 if it failed).
    #[arg(long, value_name = "SECS")]
    wait: Option<u64>,
}

#[derive(Debug, Args)]
struct ChatArgs {
    #[command(flatten)]
    dir: DataDir,
    /// The chat session to continue (default: open a new one).
    #[arg(value_name = "SESSION")]
    session: Option<String>,
    /// The title of a new session.
    #[arg(long, default_value = "New chat")]
    title: String,
    /// How long to wait for each answer, seconds.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    wait: u64,
}

fn parse_kind(s: &str) -> Result<EventKind, String> {
    EventKind::from_name(s).ok_or_else(|| {
        let known: Vec<&str> = EventKind::ALL.iter().map(|k| k.name()).collect();
        format!(
            "unknown event kind `{s}`; known kinds: {}",
            known.join(", ")
        )
    })
}

fn parse_projection(s: &str) -> Result<ProjectionName, String> {
    s.parse()
}

/// A failed command: its one-line reason and exit code.
#[derive(Debug)]
pub struct CliError {
    code: u8,
    message: String,
}

impl CliError {
    fn usage(message: impl Into<String>) -> Self {
        Self {
            code: 2,
            message: message.into(),
        }
    }

    fn runtime(message: impl Into<String>) -> Self {
        Self {
            code: 1,
            message: message.into(),
        }
    }
}

impl From<LogError> for CliError {
    fn from(e: LogError) -> Self {
        Self {
            code: if e.is_usage() { 2 } else { 1 },
            message: e.to_string(),
        }
    }
}

impl From<io::Error> for CliError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::BrokenPipe {
            // The reader (`| head`) has what it wanted: not a failure.
            return Self {
                code: 0,
                message: String::new(),
            };
        }
        Self::runtime(format!("cannot write output: {e}"))
    }
}

/// Where a command prints: buffered stdout, where a closed pipe (`| head`) ends quietly
/// (see `From<io::Error> for CliError`).
pub(crate) type Out = io::BufWriter<io::StdoutLock<'static>>;

fn open_log(dir: &DataDir) -> Result<EventLog, CliError> {
    Ok(EventLog::open(&dir.data_dir, &LogOptions::default())?)
}

/// Runs the command line and returns the process's exit code.
pub fn main() -> ExitCode {
    main_from(std::env::args_os())
}

/// The file-creation mask the process was started with, before agentsync narrowed its own to
/// 0o077 (see [`private_files`]); what the processes it spawns get back.
pub fn user_umask() -> nix::sys::stat::Mode {
    *USER_UMASK.get_or_init(|| {
        // Reading the mask means setting it: set it back at once.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
        nix::sys::stat::umask(old);
        old
    })
}

static USER_UMASK: std::sync::OnceLock<nix::sys::stat::Mode> = std::sync::OnceLock::new();

/// Makes every file and directory this process creates private to its user (mode 0600/0700,
/// whatever the umask was): the log, checkpoints and the local backend hold every message and
/// answer. Spawned servers get the user's own mask back ([`user_umask`]).
pub fn private_files() {
    let _ = user_umask();
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

/// [`main`] with the arguments given (the first is the program's name): how `agentsync-bench
/// startup` runs the very same worker in a process of its own.
pub fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    private_files();
    // The worker tells its lifecycle at info; the inspection commands speak only when wrong.
    let default_filter = match cli.command {
        Command::Run(_) => "agentsync=info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(io::stderr)
        // Escape codes only on a terminal: log files and journald get plain text.
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
        .init();
    let mut out = Out::new(io::stdout().lock());
    let result = match cli.command {
        Command::Run(a) => run::run(*a, &mut out),
        Command::Replay(a) => replay::run(a, &mut out),
        Command::Why(a) => why::run(a, &mut out),
        Command::Rebuild(a) => rebuild::run(a, &mut out),
        Command::Stats(a) => stats::run(a, &mut out),
        Command::Export(a) => replay::export(a, &mut out),
        Command::Archive(a) => archive::run(a, &mut out),
        Command::Demo(a) => demo::run(a, &mut out),
        Command::Send(a) => chat::send(a, &mut out),
        Command::Chat(a) => chat::chat(a, &mut out),
    };
    let result = result.and_then(|()| out.flush().map_err(CliError::from));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.code == 0 => ExitCode::SUCCESS,
        Err(e) => {
            let _ = out.flush();
            // Errors quote servers (an inbox's reply, a failure reason): escaped.
            eprintln!(
                "agentsync: error: {}",
                crate::text::printable_lines(&e.message)
            );
            ExitCode::from(e.code)
        }
    }
}
