//! The backend side: the contract of DESIGN.md ([`contract`]), implemented once over a
//! key-value store ([`store`]); the Convex Functions HTTP client ([`convex`]); the embedded
//! local backend on the worker's own sled database and its loopback inbox ([`local`]).

pub mod contract;
pub mod convex;
pub mod local;
pub mod store;

pub use convex::{ConvexClient, ConvexConfig};
pub use local::{InboxClient, LocalBackend, StoreBackend};
