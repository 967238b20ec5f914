//! The agent-server side: supervision of a spawned server (the OpenCode HTTP adapter joins it).

pub mod supervisor;
