//! An echo model for trying `agentsync run` with no API key and no network: an
//! OpenAI-compatible server on loopback that answers `mock answer: <your text>`, and an agent
//! directory whose `opencode.json` makes it OpenCode's only model (`mock/echo`).
//!
//! ```sh
//! cargo run --release --example mock-model -- --agent-dir /tmp/agent
//! ```
//!
//! It runs until Ctrl-C. The same server answers the end-to-end tests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use agentsync::sim::model::MockModel;
use clap::Parser;

#[derive(Parser)]
#[command(name = "mock-model", about = "An echo model for OpenCode, on loopback")]
struct Args {
    /// The agent directory to write `opencode.json` into (created if missing; an existing
    /// `opencode.json` there is left alone and the command fails).
    #[arg(long, value_name = "DIR")]
    agent_dir: PathBuf,
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let config = args.agent_dir.join("opencode.json");
    if config.exists() {
        eprintln!(
            "mock-model: error: {} exists: use an empty agent directory",
            config.display()
        );
        return ExitCode::from(2);
    }
    let model = match MockModel::start_on(args.addr).await {
        Ok(m) => m,
        Err(e) => {
            eprintln!("mock-model: error: cannot listen on {}: {e}", args.addr);
            return ExitCode::from(1);
        }
    };
    let written = std::fs::create_dir_all(&args.agent_dir).and_then(|()| {
        let text = serde_json::to_string_pretty(&model.opencode_config()).expect("plain JSON");
        std::fs::write(&config, text + "\n")
    });
    if let Err(e) = written {
        eprintln!("mock-model: error: cannot write {}: {e}", config.display());
        return ExitCode::from(1);
    }
    println!("echo model at {}", model.base_url);
    println!("wrote {} (model mock/echo)", config.display());
    let _ = tokio::signal::ctrl_c().await;
    ExitCode::SUCCESS
}
