//! The agent-server side: the OpenCode HTTP adapter ([`opencode`]), OpenCode's JSON
//! ([`wire`]), the cap on one event of its event stream ([`sse`]), the `opencode serve`
//! process ([`process`]) and its supervision ([`supervisor`]).

pub mod opencode;
pub mod process;
pub mod sse;
pub mod supervisor;
pub mod wire;

pub use opencode::{OpencodeClient, OpencodeConfig, Secret};
pub use process::{OpencodeLauncher, OpencodeProcess};
