//! The real OpenCode server for tests: the pinned binary (installed by `.ci/install-opencode`
//! when the test command did not already), a temporary project whose `opencode.json` points at
//! the mock model server, and private data directories so tests never see each other's sessions.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, OnceLock};

use agentsync::agent::process::LaunchConfig;
use agentsync::agent::{OpencodeClient, OpencodeConfig, OpencodeLauncher, OpencodeProcess, Secret};
use agentsync::events::ModelRef;

use agentsync::sim::model::MockModel;

/// The pinned version.
pub const VERSION: &str = "1.18.33";

/// The `opencode` executable: `$AGENTSYNC_OPENCODE_BIN`, or installed now with npm. A machine
/// without npm fails here with the installer's reason: these tests are never skipped.
pub fn opencode_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("AGENTSYNC_OPENCODE_BIN") {
            return PathBuf::from(bin);
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/install-opencode");
        let out = Command::new(script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
        assert!(
            out.status.success(),
            "cannot install opencode-ai@{VERSION}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

/// The mock's model, as prompts name it.
pub fn mock_model() -> ModelRef {
    ModelRef {
        provider_id: "mock".into(),
        model_id: "echo".into(),
    }
}

/// A project directory with its own OpenCode data.
pub struct Project {
    /// Holds everything; removed on drop.
    pub root: tempfile::TempDir,
    /// The agent directory (the server's working directory).
    pub dir: PathBuf,
}

impl Project {
    /// A project whose only model is the mock's.
    pub fn new(model: &MockModel) -> Self {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("project");
        std::fs::create_dir_all(&dir).unwrap();
        let config = model.opencode_config();
        std::fs::write(dir.join("opencode.json"), config.to_string()).unwrap();
        Self { root, dir }
    }

    /// How to start a server for this project.
    pub fn launch_config(&self, password: Option<&str>) -> LaunchConfig {
        let home = self.root.path().join("home");
        let env = [
            ("HOME", home.clone()),
            ("XDG_DATA_HOME", home.join("data")),
            ("XDG_CONFIG_HOME", home.join("config")),
            ("XDG_STATE_HOME", home.join("state")),
            ("XDG_CACHE_HOME", home.join("cache")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.display().to_string()))
        .collect();
        LaunchConfig {
            env,
            password: password.map(Secret::new),
            ..LaunchConfig::new(opencode_bin(), &self.dir)
        }
    }

    /// A client (not yet pointed anywhere) and a launcher that points it at each server.
    pub fn launcher(&self, password: Option<&str>) -> (Arc<OpencodeClient>, OpencodeLauncher) {
        let client = Arc::new(
            OpencodeClient::new(OpencodeConfig {
                password: password.map(Secret::new),
                ..OpencodeConfig::new("http://127.0.0.1:9")
            })
            .unwrap(),
        );
        let launcher = OpencodeLauncher::new(self.launch_config(password), client.clone());
        (client, launcher)
    }

    /// Starts a healthy server and returns it with a client pointed at it.
    pub async fn start(&self, password: Option<&str>) -> (OpencodeProcess, Arc<OpencodeClient>) {
        let (client, launcher) = self.launcher(password);
        let process = launcher.start().await.expect("start opencode");
        (process, client)
    }
}
