//! The `agentsync` binary: see [`agentsync::cli`].

fn main() -> std::process::ExitCode {
    agentsync::cli::main()
}
