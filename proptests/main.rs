//! Property tests: the foundation (event histories, the log, projections) and the worker
//! (reconciler, dispatcher and simulated sides under faults and crashes).

mod foundation;
mod worker;
