//! agentsync: an event-sourced reconciliation engine for AI-agent workers.
//!
//! The parts, in the direction their dependencies point:
//!
//! - [`clock`], [`events`], [`projections`]: the pure core. Events and their versions, and the
//!   folds that turn them into views. No I/O, no tasks, no system clock.
//! - [`log`]: the append-only event log on sled, checkpoints, and catch-up.
//! - [`cli`]: the `agentsync` command line (`replay`, `why`, `rebuild`, `stats`, `export`).
//!
//! See `docs/architecture.md` for the whole picture.
#![warn(missing_docs)]

pub mod agent;
pub mod backend;
pub mod cli;
pub mod clock;
pub mod dispatch;
pub mod events;
pub mod log;
pub mod observe;
pub mod ports;
pub mod projections;
pub mod reconcile;
pub mod secret;
pub mod sim;
pub mod testkit;
pub mod text;
pub mod transport;
pub mod worker;
