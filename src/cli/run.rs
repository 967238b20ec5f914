//! `agentsync run`: the worker process. Settings come from flags and `--config FILE` (TOML with
//! the flags' names as keys; flags win). Then: Starting -> CatchingUp -> Connecting (the agent
//! server at `--agent-url`, or spawned and supervised with `--spawn-agent`; the backend) ->
//! Observing -> Ready -> Draining (on SIGTERM or SIGINT) -> Stopped, exit 0.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, watch};

use super::{CliError, Out, RunArgs};
use crate::agent::process::LaunchConfig;
use crate::agent::supervisor::{supervise, RestartPolicy};
use crate::agent::{OpencodeClient, OpencodeConfig, OpencodeLauncher};
use crate::backend::local::{open_inbox, InboxLimits};
use crate::backend::{ConvexClient, ConvexConfig, LocalBackend};
use crate::clock::{Clock, Millis, SteadyClock, SystemClock};
use crate::events::{
    AgentIdentity, BackendIdentity, Event, Identity, IdentityAdopted, Lifecycle, ModelRef, NewEvent,
};
use crate::log::{
    store_identity, ArchiveOptions, EventLog, IdentityStatus, LogOptions, COMPACT_AFTER_ARCHIVED,
};
use crate::ports::{AgentServer, Backend};
use crate::reconcile::retention;
use crate::secret::Secret;
use crate::worker::archiver::ArchiveSchedule;
use crate::worker::{http, Observation, StuckPolicy, Worker, WorkerConfig};

/// The default retention horizon of the live views, in days.
const RETENTION_DAYS: u64 = 7;
/// The longest retention horizon `--retention-days` takes (ten years).
const MAX_RETENTION_DAYS: u64 = 3650;

/// Which backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum BackendKind {
    /// The embedded local backend, in the worker's own database, with a loopback inbox.
    Local,
    /// A Convex deployment (`--convex-url`).
    Convex,
}

/// `--config FILE`: the flags' names as keys.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    worker_id: Option<String>,
    agent_url: Option<String>,
    spawn_agent: Option<bool>,
    agent_dir: Option<PathBuf>,
    agent_password_env: Option<String>,
    agent_env: Option<Vec<String>>,
    opencode_bin: Option<PathBuf>,
    backend: Option<BackendKind>,
    convex_url: Option<String>,
    convex_key_env: Option<String>,
    convex_module: Option<String>,
    model: Option<String>,
    concurrency: Option<usize>,
    metrics_addr: Option<String>,
    metrics_public: Option<bool>,
    drain_grace_secs: Option<u64>,
    listing_limit: Option<u32>,
    message_deadline_mins: Option<u64>,
    archive_after_days: Option<u64>,
    drop_archive_after_days: Option<u64>,
    retention_days: Option<u64>,
    max_reply_mib: Option<u64>,
    max_event_kib: Option<u64>,
    adopt: Option<bool>,
}

enum AgentSide {
    Url(String),
    Spawn { dir: PathBuf, program: PathBuf },
}

enum BackendSide {
    Local,
    Convex(ConvexConfig),
}

struct Settings {
    data_dir: PathBuf,
    worker_id: String,
    agent: AgentSide,
    agent_dir: Option<PathBuf>,
    password: Option<Secret>,
    /// Variables of the worker's environment a spawned server may see.
    agent_env: Vec<String>,
    backend: BackendSide,
    model: Option<ModelRef>,
    concurrency: usize,
    metrics_addr: SocketAddr,
    drain_grace_ms: u64,
    listing_limit: u32,
    message_deadline_ms: u64,
    archive: Option<ArchiveSchedule>,
    retention_ms: u64,
    max_reply_bytes: usize,
    max_event_bytes: usize,
    adopt: bool,
}

/// `--archive-after-days` and `--drop-archive-after-days`, checked.
fn archive_schedule(
    after: Option<u64>,
    drop: Option<u64>,
) -> Result<Option<ArchiveSchedule>, CliError> {
    const MAX_DAYS: u64 = 100 * 365;
    let after = after.unwrap_or(7);
    if after > MAX_DAYS || drop.is_some_and(|d| d > MAX_DAYS) {
        return Err(CliError::usage(format!(
            "archive-after-days and drop-archive-after-days must be at most {MAX_DAYS}"
        )));
    }
    if after == 0 {
        if drop.is_some() {
            return Err(CliError::usage(
                "drop-archive-after-days needs archiving on (archive-after-days > 0)",
            ));
        }
        return Ok(None);
    }
    if let Some(d) = drop.filter(|&d| d <= after) {
        return Err(CliError::usage(format!(
            "drop-archive-after-days ({d}) must be more than archive-after-days ({after})"
        )));
    }
    let days = |d: u64| Duration::from_secs(d * 24 * 3600);
    let options = ArchiveOptions {
        older_than: days(after),
        drop_older_than: drop.map(days),
        ..ArchiveOptions::default()
    };
    Ok(Some(ArchiveSchedule {
        options,
        ..ArchiveSchedule::default()
    }))
}

fn read_config(path: &Path) -> Result<FileConfig, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::usage(format!("cannot read --config {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start].matches('\n').count() + 1)
            .map_or(String::new(), |l| format!(" (line {l})"));
        CliError::usage(format!(
            "bad config {}{line}: {}",
            path.display(),
            e.message().replace('\n', " ")
        ))
    })
}

impl Settings {
    /// Flags over the config file, checked: every problem is a usage error naming its key.
    fn resolve(args: RunArgs) -> Result<Self, CliError> {
        let file = match &args.config {
            Some(p) => read_config(p)?,
            None => FileConfig::default(),
        };
        let data_dir = args
            .data_dir
            .or(file.data_dir)
            .ok_or_else(|| CliError::usage("data-dir is required (--data-dir DIR)"))?;
        let worker_id = args
            .worker_id
            .or(file.worker_id)
            .ok_or_else(|| CliError::usage("worker-id is required (--worker-id ID)"))?;
        if worker_id.trim().is_empty() {
            return Err(CliError::usage("worker-id must not be empty"));
        }
        let agent_url = args.agent_url.or(file.agent_url);
        let spawn = args.spawn_agent || file.spawn_agent.unwrap_or(false);
        let agent_dir = args.agent_dir.or(file.agent_dir);
        let agent_dir = match agent_dir {
            Some(d) => Some(
                std::fs::canonicalize(&d)
                    .map_err(|e| CliError::usage(format!("agent-dir {}: {e}", d.display())))?,
            ),
            None => None,
        };
        let agent = match (agent_url, spawn) {
            (Some(_), true) => {
                return Err(CliError::usage(
                    "agent-url and spawn-agent exclude each other: give one",
                ))
            }
            (Some(url), false) => {
                if !url.starts_with("http://") && !url.starts_with("https://") {
                    return Err(CliError::usage(format!(
                        "agent-url {url:?} is not an http(s) URL"
                    )));
                }
                plain_url("agent-url", &url, "--agent-password-env VAR")?;
                AgentSide::Url(url)
            }
            (None, true) => {
                let dir = match &agent_dir {
                    Some(d) => d.clone(),
                    None => std::env::current_dir().map_err(|e| {
                        CliError::usage(format!("no agent-dir and no current directory: {e}"))
                    })?,
                };
                let program = args
                    .opencode_bin
                    .or(file.opencode_bin)
                    .or_else(|| std::env::var_os("AGENTSYNC_OPENCODE_BIN").map(PathBuf::from))
                    .unwrap_or_else(|| PathBuf::from("opencode"));
                AgentSide::Spawn { dir, program }
            }
            (None, false) => {
                return Err(CliError::usage(
                    "no agent server: give --agent-url URL or --spawn-agent",
                ))
            }
        };
        let password_var = args.agent_password_env.or(file.agent_password_env);
        let password = match &password_var {
            Some(var) => Some(
                Secret::from_env(var)
                    .map_err(|e| CliError::usage(format!("agent-password-env: {e}")))?,
            ),
            None => None,
        };
        let key_var = args.convex_key_env.clone().or(file.convex_key_env.clone());
        let agent_env = match args.agent_env.is_empty() {
            true => file.agent_env.unwrap_or_default(),
            false => args.agent_env,
        };
        for var in &agent_env {
            if var.is_empty() || var.contains('=') {
                return Err(CliError::usage(format!(
                    "agent-env {var:?} is not a variable name"
                )));
            }
            if [&password_var, &key_var].contains(&&Some(var.clone())) {
                return Err(CliError::usage(format!(
                    "agent-env {var}: a secret of the worker's is never passed to the agent server"
                )));
            }
        }
        let backend = match args.backend.or(file.backend).unwrap_or(BackendKind::Local) {
            BackendKind::Local => {
                if args.convex_url.is_some() || file.convex_url.is_some() {
                    return Err(CliError::usage(
                        "convex-url is set but backend is local: add --backend convex",
                    ));
                }
                BackendSide::Local
            }
            BackendKind::Convex => {
                let url = args.convex_url.or(file.convex_url).ok_or_else(|| {
                    CliError::usage("backend convex needs convex-url (--convex-url URL)")
                })?;
                let parsed = plain_url("convex-url", &url, "--convex-key-env VAR")?;
                if parsed.scheme() != "https" && !is_loopback_host(&parsed) {
                    return Err(CliError::usage(format!(
                        "convex-url {}: plain http to another host would send the deploy key in clear: use https",
                        public_url("convex-url", &url)?
                    )));
                }
                let mut cfg = ConvexConfig::new(url, worker_id.clone());
                if let Some(var) = args.convex_key_env.or(file.convex_key_env) {
                    cfg.deploy_key = Some(
                        Secret::from_env(&var)
                            .map_err(|e| CliError::usage(format!("convex-key-env: {e}")))?,
                    );
                }
                if let Some(m) = args.convex_module.or(file.convex_module) {
                    cfg.module = m;
                }
                BackendSide::Convex(cfg)
            }
        };
        let model = match args.model.or(file.model) {
            Some(m)
                if m.split_once('/')
                    .is_some_and(|(p, m)| !p.is_empty() && !m.is_empty()) =>
            {
                Some(ModelRef::parse(&m))
            }
            Some(m) => {
                return Err(CliError::usage(format!(
                    "model {m:?} is not PROVIDER/MODEL"
                )))
            }
            None => None,
        };
        let concurrency = args.concurrency.or(file.concurrency).unwrap_or(10);
        if concurrency == 0 {
            return Err(CliError::usage("concurrency must be at least 1"));
        }
        let addr = args
            .metrics_addr
            .or(file.metrics_addr)
            .unwrap_or_else(|| "127.0.0.1:9464".into());
        let metrics_addr: SocketAddr = addr
            .parse()
            .map_err(|e| CliError::usage(format!("metrics-addr {addr:?}: {e}")))?;
        let metrics_public = args.metrics_public || file.metrics_public.unwrap_or(false);
        if !metrics_addr.ip().is_loopback() {
            if !metrics_public {
                return Err(CliError::usage(format!(
                    "metrics-addr {metrics_addr} is not a loopback address: it would serve the worker's metrics to the network; add --metrics-public (config: metrics-public = true) if that is meant"
                )));
            }
            tracing::warn!(addr = %metrics_addr, "metrics, /healthz and /readyz are served beyond this machine, without authentication");
        }
        let drain_grace_ms = args
            .drain_grace_secs
            .or(file.drain_grace_secs)
            .unwrap_or(10)
            * 1000;
        let listing_limit = args
            .listing_limit
            .or(file.listing_limit)
            .unwrap_or(OpencodeConfig::DEFAULT_LISTING_LIMIT);
        if listing_limit == 0 {
            return Err(CliError::usage("listing-limit must be at least 1"));
        }
        let deadline_mins = args
            .message_deadline_mins
            .or(file.message_deadline_mins)
            .unwrap_or(30);
        if !(1..=7 * 24 * 60).contains(&deadline_mins) {
            return Err(CliError::usage(
                "message-deadline-mins must be between 1 and 10080 (a week)",
            ));
        }
        let retention_days = args
            .retention_days
            .or(file.retention_days)
            .unwrap_or(RETENTION_DAYS);
        if !(1..=MAX_RETENTION_DAYS).contains(&retention_days) {
            return Err(CliError::usage(format!(
                "retention-days must be between 1 and {MAX_RETENTION_DAYS}"
            )));
        }
        Ok(Settings {
            data_dir,
            worker_id,
            agent,
            agent_dir,
            password,
            agent_env,
            backend,
            model,
            concurrency,
            metrics_addr,
            drain_grace_ms,
            listing_limit,
            message_deadline_ms: deadline_mins * 60_000,
            archive: archive_schedule(
                args.archive_after_days.or(file.archive_after_days),
                args.drop_archive_after_days
                    .or(file.drop_archive_after_days),
            )?,
            retention_ms: retention_days * retention::DAY_MS,
            max_reply_bytes: size_setting(
                "max-reply-mib",
                args.max_reply_mib.or(file.max_reply_mib),
                32,
                1 << 20,
            )?,
            max_event_bytes: size_setting(
                "max-event-kib",
                args.max_event_kib.or(file.max_event_kib),
                1024,
                1 << 10,
            )?,
            adopt: args.adopt || file.adopt.unwrap_or(false),
        })
    }

    /// What this run binds its data directory to: the worker id, the agent server (the
    /// canonical agent directory when spawned, else the URL) and the backend, without secrets.
    fn identity(&self) -> Result<Identity, CliError> {
        let agent = match &self.agent {
            AgentSide::Url(url) => AgentIdentity::Url(public_url("agent-url", url)?),
            AgentSide::Spawn { dir, .. } => {
                let dir = std::fs::canonicalize(dir)
                    .map_err(|e| CliError::usage(format!("agent-dir {}: {e}", dir.display())))?;
                AgentIdentity::Dir(dir.display().to_string())
            }
        };
        let backend = match &self.backend {
            BackendSide::Local => BackendIdentity::Local,
            BackendSide::Convex(c) => BackendIdentity::Convex(public_url("convex-url", &c.url)?),
        };
        Ok(Identity {
            worker_id: self.worker_id.clone(),
            agent,
            backend,
        })
    }
}

/// A size limit given in units of `unit` bytes (default `default`), from 1 unit up to 1 GiB.
fn size_setting(key: &str, given: Option<u64>, default: u64, unit: u64) -> Result<usize, CliError> {
    let n = given.unwrap_or(default);
    let bytes = n.saturating_mul(unit);
    if n == 0 || bytes > 1 << 30 {
        return Err(CliError::usage(format!(
            "{key} must be at least 1 and at most 1 GiB"
        )));
    }
    Ok(bytes as usize)
}

/// `url` parsed, refused when it carries credentials, a query or a fragment: a secret in a URL
/// ends up in logs and events; the named variable (`secret_flag`) is where it belongs.
fn plain_url(key: &str, url: &str, secret_flag: &str) -> Result<reqwest::Url, CliError> {
    let u = reqwest::Url::parse(url)
        .map_err(|e| CliError::usage(format!("{key} is not a valid URL: {e}")))?;
    let shown = || public_url(key, url).unwrap_or_else(|_| "(unparsable)".into());
    if !u.username().is_empty() || u.password().is_some() {
        return Err(CliError::usage(format!(
            "{key} {} carries credentials: give them with {secret_flag}, never in the URL",
            shown()
        )));
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err(CliError::usage(format!(
            "{key} {} has a query or fragment: give the server's base URL only",
            shown()
        )));
    }
    Ok(u)
}

/// Whether `url` names this machine (a loopback address, or `localhost`).
fn is_loopback_host(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `url` without what may be a secret (user, password, query, fragment), normalized.
fn public_url(key: &str, url: &str) -> Result<String, CliError> {
    let bad = |e: String| CliError::usage(format!("{key} {url:?}: {e}"));
    let mut u = reqwest::Url::parse(url).map_err(|e| bad(e.to_string()))?;
    if u.set_username("").is_err() || u.set_password(None).is_err() {
        return Err(bad("cannot be a base URL".into()));
    }
    u.set_query(None);
    u.set_fragment(None);
    Ok(u.to_string())
}

/// Records the identity checked by `EventLog::open`: a new directory's, one an older agentsync
/// left without, or an adopted one. An adoption is an event first and the file second, so the
/// log never lacks the move (a crash in between asks for `--adopt` again).
fn record_identity(log: &EventLog, identity: &Identity, now: Millis) -> Result<(), CliError> {
    match log.identity_status() {
        None | Some(IdentityStatus::Same) => return Ok(()),
        Some(IdentityStatus::New) => tracing::info!(%identity, "data directory identity recorded"),
        Some(IdentityStatus::Unrecorded) => tracing::info!(
            %identity,
            "data directory has a log but no identity (written by an older agentsync): recording this one"
        ),
        Some(IdentityStatus::Adopting(previous)) => {
            tracing::warn!(%previous, current = %identity, "data directory adopted by another identity (--adopt)");
            let adopted = IdentityAdopted {
                previous: previous.clone(),
                current: identity.clone(),
            };
            log.append(vec![NewEvent::new(Event::IdentityAdopted(adopted), now)])?;
        }
    }
    Ok(store_identity(log.dir(), identity)?)
}

pub(super) fn run(args: RunArgs, _out: &mut Out) -> Result<(), CliError> {
    let settings = Settings::resolve(args)?;
    let identity = settings.identity()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::runtime(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(run_worker(settings, identity))
}

/// Resolves when SIGTERM or SIGINT arrives, with its name.
async fn termination() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without handlers the default action (exit) applies; wait forever here.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

async fn serve(listener: tokio::net::TcpListener, app: axum::Router) {
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "HTTP server stopped");
    }
}

async fn run_worker(s: Settings, identity: Identity) -> Result<(), CliError> {
    // Event times follow the monotonic clock: a wall-clock step while running moves nothing.
    let clock: Arc<dyn Clock> = Arc::new(SteadyClock::new());
    let log = {
        let dir = s.data_dir.clone();
        let opts = LogOptions {
            create: true,
            identity: Some(identity.clone()),
            adopt: s.adopt,
            read_ahead: true,
            ..LogOptions::default()
        };
        let now = clock.now_ms();
        let identity = identity.clone();
        // The identity is checked inside `open`, before anything in the directory is touched.
        tokio::task::spawn_blocking(move || {
            // A start is the one moment no worker holds the log: compact it if it is due.
            let log = EventLog::open_compacted(&dir, &opts, COMPACT_AFTER_ARCHIVED)?;
            record_identity(&log, &identity, now)?;
            Ok::<_, CliError>(log)
        })
        .await
        .map_err(|e| CliError::runtime(e.to_string()))??
    };
    let log = Arc::new(log);

    // Bind first: a taken port is the user's to fix, before anything is started.
    let metrics = tokio::net::TcpListener::bind(s.metrics_addr)
        .await
        .map_err(|e| CliError::usage(format!("metrics-addr {}: {e}", s.metrics_addr)))?;

    let mut agent_config = OpencodeConfig::new(match &s.agent {
        AgentSide::Url(url) => url.clone(),
        AgentSide::Spawn { .. } => "http://127.0.0.1:9".into(),
    });
    // A spawned server always has a password (a random one unless the user named one), so no
    // other local process can drive it; the worker is the only one told.
    let password = match (&s.agent, &s.password) {
        (AgentSide::Spawn { .. }, None) => Some(Secret::random()),
        (_, given) => given.clone(),
    };
    agent_config.password = password.clone();
    agent_config.listing_limit = s.listing_limit;
    agent_config.max_reply_bytes = s.max_reply_bytes;
    agent_config.max_event_bytes = s.max_event_bytes;
    agent_config.directory = s.agent_dir.as_ref().map(|d| d.display().to_string());
    let client = Arc::new(OpencodeClient::new(agent_config).map_err(runtime)?);

    let (backend, inbox) = match &s.backend {
        BackendSide::Local => {
            let log2 = log.clone();
            let (worker_id, clock2) = (s.worker_id.clone(), clock.clone());
            let local =
                tokio::task::spawn_blocking(move || LocalBackend::open(&log2, &worker_id, clock2))
                    .await
                    .map_err(|e| CliError::runtime(e.to_string()))??;
            let store = local.store();
            // Applied command ids outlive the retention horizon by a day (see APPLIED_WINDOW_MS).
            store.set_applied_window(s.retention_ms.saturating_add(retention::DAY_MS));
            (Arc::new(local) as Arc<dyn Backend>, Some(store))
        }
        BackendSide::Convex(cfg) => (
            Arc::new(
                ConvexClient::new(ConvexConfig {
                    max_reply_bytes: s.max_reply_bytes,
                    ..cfg.clone()
                })
                .map_err(runtime)?,
            ) as Arc<dyn Backend>,
            None,
        ),
    };

    let mut wcfg = WorkerConfig {
        worker_id: s.worker_id.clone(),
        drain_grace_ms: s.drain_grace_ms,
        // The report's views are not used here: the settled pairs stay on disk.
        report_every_row: false,
        ..WorkerConfig::default()
    };
    wcfg.dispatch.concurrency = s.concurrency;
    wcfg.policy.default_model = s.model.clone();
    wcfg.policy.message_deadline_ms = s.message_deadline_ms;
    wcfg.archive = s.archive.clone();
    wcfg.retention.horizon_ms = s.retention_ms;
    // Retries stay within the backend's window for applied ids: the local backend's follows
    // the retention (it keeps ids a day longer), the Convex module's is fixed.
    wcfg.dispatch.retry_horizon_ms = match &s.backend {
        BackendSide::Local => s.retention_ms,
        BackendSide::Convex(_) => {
            let cap = crate::backend::convex::MODULE_APPLIED_WINDOW_MS - retention::DAY_MS;
            if s.retention_ms > cap {
                tracing::warn!(
                    retry_days = cap / retention::DAY_MS,
                    "commands are not retried past the Convex module's window for applied ids, whatever --retention-days says"
                );
            }
            s.retention_ms.min(cap)
        }
    };
    let agent: Arc<dyn AgentServer> = client.clone();
    let mut worker = Worker::open(log.clone(), agent, backend, clock.clone(), wcfg)
        .await
        .map_err(runtime)?;
    let status = worker.status();
    let metrics_task = tokio::spawn(serve(
        metrics,
        http::router(status, clock.clone(), StuckPolicy::default()),
    ));

    let backend_desc = match &s.backend {
        BackendSide::Local => "local".to_owned(),
        BackendSide::Convex(c) => format!("convex at {}", c.url),
    };
    let agent_desc = match &s.agent {
        // Not the URL as given: it may carry a password, and this line is an event.
        AgentSide::Url(_) => format!("agent server at {}", identity.agent),
        AgentSide::Spawn { dir, .. } => format!("spawning opencode in {}", dir.display()),
    };
    worker
        .enter(
            Lifecycle::Connecting,
            Some(format!("{agent_desc}; backend {backend_desc}")),
        )
        .await
        .map_err(runtime)?;

    // The agent server: supervised when spawned, its lifecycle events into the log.
    let inlet = worker.inlet();
    let (stop_agent, agent_stop_rx) = watch::channel(false);
    let mut supervisor = None;
    match &s.agent {
        AgentSide::Spawn { dir, program } => {
            let launch = LaunchConfig {
                password: password.clone(),
                pass_env: s.agent_env.clone(),
                ..LaunchConfig::new(program.clone(), dir.clone())
            };
            let launcher = OpencodeLauncher::new(launch, client.clone());
            let (events_tx, mut events_rx) = mpsc::channel::<Event>(16);
            supervisor = Some(tokio::spawn(async move {
                supervise(
                    &launcher,
                    RestartPolicy::default(),
                    &SystemClock,
                    1,
                    events_tx,
                    agent_stop_rx,
                )
                .await
            }));
            let (first_tx, first_rx) = oneshot::channel::<Result<String, String>>();
            let forward = inlet.clone();
            tokio::spawn(async move {
                let mut first = Some(first_tx);
                while let Some(event) = events_rx.recv().await {
                    let outcome = match &event {
                        Event::AgentServerStarted(e) => Some(Ok(e.url.clone())),
                        Event::AgentServerGaveUp(e) => Some(Err(e.error.clone())),
                        _ => None,
                    };
                    if let (Some(o), Some(tx)) = (outcome, first.take()) {
                        let _ = tx.send(o);
                    }
                    if forward.send(Observation::Lifecycle(event)).await.is_err() {
                        break;
                    }
                }
            });
            match first_rx.await {
                Ok(Ok(url)) => tracing::info!(url, "agent server up"),
                Ok(Err(e)) => {
                    return Err(CliError::runtime(format!(
                        "the agent server did not start: {e}"
                    )))
                }
                Err(_) => return Err(CliError::runtime("the agent supervisor stopped")),
            }
        }
        AgentSide::Url(_) => {
            if let Err(e) = client.health().await {
                // Not fatal: the observers keep trying, and a failed observation never prunes.
                tracing::warn!(url = %identity.agent, error = %e, "agent server not answering yet");
            }
        }
    }
    // Its event stream, with the periodic full listing as the safety net.
    let stream_task = {
        let events = client.events();
        let inlet = inlet.clone();
        tokio::spawn(async move {
            tokio::pin!(events);
            while let Some(obs) = events.next().await {
                if inlet.send(Observation::AgentStream(obs)).await.is_err() {
                    return;
                }
            }
        })
    };

    // The local inbox, on its own loopback port; its address and this run's token in
    // DIR/INBOX (0600). The token is never logged.
    let inbox_task = match inbox {
        Some(store) => {
            let inbox = open_inbox(store, &s.worker_id, &s.data_dir, InboxLimits::default())
                .await
                .map_err(runtime)?;
            tracing::info!(url = %inbox.url, "local inbox listening");
            Some((
                tokio::spawn(serve(inbox.listener, inbox.router)),
                inbox.file,
            ))
        }
        None => None,
    };
    tracing::info!(addr = %s.metrics_addr, "metrics, /healthz and /readyz listening");

    let report = worker
        .run(async {
            let signal = termination().await;
            tracing::info!(signal, "stopping");
        })
        .await;

    stream_task.abort();
    if let Some((t, file)) = inbox_task {
        t.abort();
        let _ = std::fs::remove_file(&file);
    }
    let _ = stop_agent.send(true);
    if let Some(sup) = supervisor {
        if tokio::time::timeout(Duration::from_secs(15), sup)
            .await
            .is_err()
        {
            tracing::warn!("the agent server did not stop in time");
        }
    }
    metrics_task.abort();
    let report = report.map_err(runtime)?;
    tracing::info!(
        stopped = %report.stopped,
        model_fetches = report.dispatch.model_fetches,
        attempts = report.dispatch.attempts,
        dead_letters = report.dispatch.dead_letters,
        "stopped"
    );
    Ok(())
}

fn runtime(e: impl std::fmt::Display) -> CliError {
    CliError::runtime(e.to_string())
}
