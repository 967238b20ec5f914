//! The `opencode serve` process: started on a free loopback port in the agent directory, its
//! address read from what it prints, healthy before it is handed over, and stopped with
//! SIGTERM, then SIGKILL after a grace period.
//!
//! No orphan is left behind: the server runs in its own process group, which is signalled as a
//! whole (it may start helpers); it is killed if its handle is dropped; and on Linux the kernel
//! kills it if the worker itself dies (`PR_SET_DEATHSIG`), even by SIGKILL.
//!
//! Measured on 1.18.33: `--port 0` first tries 4096 and takes a random port only when 4096 is
//! busy. So the port is chosen here, a random free one from the kernel: a server that restarts
//! does not come back on the port another server (another worker's, another test's) just left,
//! where a client still pointed at the old address would talk to the wrong server and list its
//! sessions as ours. The address is still read from the output, never assumed.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_core::future::BoxFuture;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

use super::opencode::{OpencodeClient, Secret};
use super::supervisor::{ExitStatus, Launcher, RunningServer};
use crate::ports::AgentServer;

/// The variables every spawned server gets from the worker's environment (when set): what a
/// shell and its tools need to run, and nothing secret. `LC_*` and `XDG_*` pass too.
pub const BASE_ENV: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "TMPDIR", "TZ", "LANG", "LANGUAGE",
];

/// Whether the variable `name` passes to a spawned server.
fn passes(name: &str, extra: &[String]) -> bool {
    BASE_ENV.contains(&name)
        || name.starts_with("LC_")
        || name.starts_with("XDG_")
        || extra.iter().any(|e| e == name)
}

/// What OpenCode prints once it listens; the URL follows.
const LISTENING: &str = "opencode server listening on ";

/// How to start the server.
#[derive(Debug, Clone)]
pub struct LaunchConfig {
    /// The `opencode` executable.
    pub program: PathBuf,
    /// The agent directory: the server's working directory (its `opencode.json` applies).
    pub dir: PathBuf,
    /// Extra environment for the server (tests give it its own data directories).
    pub env: Vec<(String, String)>,
    /// Variables passed on from the worker's own environment, besides [`BASE_ENV`]: the
    /// model provider's (`OPENAI_API_KEY`, ...), as the user names them. Nothing else of the
    /// worker's environment reaches the server, whose tools run shell commands for the model:
    /// not the deploy key, not the variable holding the agent password.
    pub pass_env: Vec<String>,
    /// The server's password (`OPENCODE_SERVER_PASSWORD`). When `None` the variable is
    /// removed from the child's environment, so the server never wants a password the client
    /// does not have.
    pub password: Option<Secret>,
    /// How long it may take to print its address and answer the health check.
    pub start_timeout: Duration,
    /// How long SIGTERM may take before SIGKILL.
    pub stop_grace: Duration,
}

impl LaunchConfig {
    /// Defaults: 30 s to start, 5 s to stop.
    pub fn new(program: impl Into<PathBuf>, dir: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            dir: dir.into(),
            env: Vec::new(),
            pass_env: Vec::new(),
            password: None,
            start_timeout: Duration::from_secs(30),
            stop_grace: Duration::from_secs(5),
        }
    }
}

/// A loopback port the kernel just handed out as free (random, not 4096 first). Another
/// process may take it before the server binds it; the server then fails to start and the
/// supervisor's restart picks another.
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}

/// Starts `opencode serve` processes and points a client at each new one.
pub struct OpencodeLauncher {
    config: LaunchConfig,
    client: Arc<OpencodeClient>,
}

impl OpencodeLauncher {
    /// A launcher that re-points `client` at every server it starts.
    pub fn new(config: LaunchConfig, client: Arc<OpencodeClient>) -> Self {
        Self { config, client }
    }

    /// Starts one server and waits until it is healthy.
    pub async fn start(&self) -> Result<OpencodeProcess, String> {
        let c = &self.config;
        let port = free_port().map_err(|e| format!("cannot find a free loopback port: {e}"))?;
        let mut cmd = Command::new(&c.program);
        cmd.args([
            "serve",
            "--hostname",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ])
        .current_dir(&c.dir)
        .env_clear()
        .envs(
            std::env::vars_os().filter(|(k, _)| k.to_str().is_some_and(|k| passes(k, &c.pass_env))),
        )
        .envs(c.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
        match &c.password {
            Some(pw) => cmd.env("OPENCODE_SERVER_PASSWORD", pw.expose()),
            None => cmd.env_remove("OPENCODE_SERVER_PASSWORD"),
        };
        // The user's own file-creation mask: agentsync runs with 0o077 so its data directory is
        // private, but the files the agent writes in the project must come out as usual.
        let umask = crate::cli::user_umask();
        #[cfg(target_os = "linux")]
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (umask, prctl).
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::stat::umask(umask);
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", c.program.display()))?;
        let pid = child.id();
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(err) = child.stderr.take() {
            tokio::spawn(drain(err, "stderr", Some(stderr_tail.clone())));
        }
        let stdout = child.stdout.take().expect("stdout is piped");
        let deadline = Instant::now() + c.start_timeout;
        let url = match tokio::time::timeout(c.start_timeout, read_url(stdout)).await {
            Ok(Some((url, rest))) => {
                tokio::spawn(drain(rest, "stdout", None));
                url
            }
            Ok(None) => {
                let status = child.wait().await.map(exit_status).unwrap_or_default();
                return Err(format!(
                    "opencode exited before listening (code {:?}, signal {:?}){}",
                    status.code,
                    status.signal,
                    tail_of(&stderr_tail)
                ));
            }
            Err(_) => {
                let mut process = OpencodeProcess::new(child, String::new(), c.stop_grace);
                process.shutdown().await;
                return Err(format!(
                    "opencode printed no address within {} ms{}",
                    c.start_timeout.as_millis(),
                    tail_of(&stderr_tail)
                ));
            }
        };
        self.client.set_base_url(&url);
        let mut process = OpencodeProcess::new(child, url, c.stop_grace);
        loop {
            if self.client.health().await.is_ok() {
                tracing::debug!(url = %process.url, ?pid, "opencode is healthy");
                return Ok(process);
            }
            if let Ok(Some(status)) = process.child.try_wait() {
                let status = exit_status(status);
                return Err(format!(
                    "opencode exited before it was healthy (code {:?}, signal {:?}){}",
                    status.code,
                    status.signal,
                    tail_of(&stderr_tail)
                ));
            }
            if Instant::now() >= deadline {
                process.shutdown().await;
                return Err(format!(
                    "opencode at {} not healthy within {} ms",
                    process.url,
                    c.start_timeout.as_millis()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Launcher for OpencodeLauncher {
    fn launch(&self) -> BoxFuture<'_, Result<Box<dyn RunningServer>, String>> {
        Box::pin(async move {
            let process = self.start().await?;
            Ok(Box::new(process) as Box<dyn RunningServer>)
        })
    }
}

/// A running `opencode serve`.
#[derive(Debug)]
pub struct OpencodeProcess {
    child: Child,
    url: String,
    pid: Option<u32>,
    grace: Duration,
    exited: Option<ExitStatus>,
}

impl OpencodeProcess {
    fn new(child: Child, url: String, grace: Duration) -> Self {
        let pid = child.id();
        Self {
            child,
            url,
            pid,
            grace,
            exited: None,
        }
    }

    /// SIGTERM to the process group, SIGKILL after the grace period; waits for the exit.
    pub async fn shutdown(&mut self) -> ExitStatus {
        if let Some(status) = self.exited {
            return status;
        }
        self.signal(Signal::SIGTERM);
        let status = match tokio::time::timeout(self.grace, self.child.wait()).await {
            Ok(status) => status.map(exit_status).unwrap_or_default(),
            Err(_) => {
                tracing::warn!(
                    pid = ?self.pid,
                    grace_ms = self.grace.as_millis() as u64,
                    "opencode ignored SIGTERM: killing it"
                );
                self.signal(Signal::SIGKILL);
                self.child.wait().await.map(exit_status).unwrap_or_default()
            }
        };
        // Helpers it started stay in its group; make sure none outlives it.
        self.signal(Signal::SIGKILL);
        self.exited = Some(status);
        status
    }

    fn signal(&self, signal: Signal) {
        if let Some(pid) = self.pid {
            // ESRCH (already gone) is the normal case after an exit.
            let _ = killpg(Pid::from_raw(pid as i32), signal);
        }
    }
}

impl RunningServer for OpencodeProcess {
    fn url(&self) -> &str {
        &self.url
    }

    fn pid(&self) -> Option<u32> {
        self.pid
    }

    fn wait(&mut self) -> BoxFuture<'_, ExitStatus> {
        Box::pin(async move {
            if let Some(status) = self.exited {
                return status;
            }
            let status = self.child.wait().await.map(exit_status).unwrap_or_default();
            self.signal(Signal::SIGKILL);
            self.exited = Some(status);
            status
        })
    }

    fn stop(&mut self) -> BoxFuture<'_, ExitStatus> {
        Box::pin(self.shutdown())
    }
}

impl Drop for OpencodeProcess {
    fn drop(&mut self) {
        if self.exited.is_none() {
            self.signal(Signal::SIGKILL);
        }
    }
}

fn exit_status(s: std::process::ExitStatus) -> ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    ExitStatus {
        code: s.code(),
        signal: s.signal(),
    }
}

/// Reads lines until the address; returns it with the rest of the output.
async fn read_url<R>(out: R) -> Option<(String, BufReader<R>)>
where
    R: AsyncRead + Unpin,
{
    let mut lines = BufReader::new(out);
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        tracing::debug!(line = line.trim_end(), "opencode stdout");
        if let Some(rest) = line.trim().strip_prefix(LISTENING) {
            let url = rest.split_whitespace().next()?.to_owned();
            return Some((url, lines));
        }
    }
}

/// Copies a pipe into the log (so it never fills and blocks the server), keeping the last
/// lines when asked, for the error message of a failed start.
async fn drain<R>(out: R, stream: &'static str, tail: Option<Arc<Mutex<VecDeque<String>>>>)
where
    R: AsyncRead + Unpin,
{
    let mut lines = BufReader::new(out).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::debug!(stream, line = %line, "opencode output");
        if let Some(tail) = &tail {
            let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
            if t.len() == 5 {
                t.pop_front();
            }
            t.push_back(line);
        }
    }
}

fn tail_of(tail: &Mutex<VecDeque<String>>) -> String {
    let t = tail.lock().unwrap_or_else(|e| e.into_inner());
    if t.is_empty() {
        String::new()
    } else {
        let joined: Vec<&str> = t.iter().map(String::as_str).collect();
        format!(
            "; it said: {}",
            crate::transport::one_line(&joined.join(" | "))
        )
    }
}
