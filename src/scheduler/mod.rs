//! Cron scheduling of agents. This module holds the schedule type and tick computation
//! (pure); leader election and the enqueue loop come with the scheduler itself.

pub mod schedule;

pub use schedule::CronSchedule;
