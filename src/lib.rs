//! Agent Harness runs user agents and background jobs 24/7 on a fleet of identical replicas
//! coordinated only through PostgreSQL. See `docs/ARCHITECTURE.md` for how the modules fit.

pub mod agents;
pub mod api;
pub mod bounds;
pub mod config;
pub mod cron;
pub mod db;
pub mod executor;
pub mod fleet;
pub mod governor;
pub mod handoff;
pub mod queue;
pub mod replica;
pub mod scheduler;
pub mod telemetry;
pub mod ticks;
pub mod worker;

pub use config::Config;
pub use replica::Harness;
/// The worker module under its former name.
pub use worker as pool;
pub use worker::{Handler, HandlerError, TaskContext};
