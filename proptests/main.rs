//! Property tests: the foundation (event histories, the log, projections) and the worker
//! (reconciler, dispatcher and simulated sides under faults and crashes), and the adversarial
//! simulation over seeded histories.

mod adversary;
mod foundation;
mod keyed;
mod retention;
mod worker;
