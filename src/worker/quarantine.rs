//! What a pool knows of quarantines: which agents and kinds it must not start now (the
//! governor decides and stores them, fleet-wide; see `governor` and `fleet::quarantines`),
//! and which of them its failed attempts came from (what the governor decides on).
//!
//! A task of a quarantined target is not run: it goes back to the queue until the
//! quarantine ends, its attempt not counted, so other work keeps flowing.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What a quarantine stops: the runs of one agent, or the tasks of one kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Target {
    pub kind: String,
    /// Set for the runs of one agent (kind `agent`).
    pub agent_id: Option<i64>,
}

impl Target {
    /// The target a task counts for: its agent when it is an agent's run, else its kind.
    pub fn of(kind: &str, agent_id: Option<i64>) -> Target {
        Target {
            kind: kind.to_string(),
            agent_id,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.agent_id {
            Some(id) => write!(f, "agent #{id}"),
            None => write!(f, "kind {}", self.kind),
        }
    }
}

/// A pool's view: the quarantines in force, and its failures per target since the governor
/// last looked.
#[derive(Debug, Default)]
pub(super) struct Quarantines {
    until: Mutex<HashMap<Target, DateTime<Utc>>>,
    failures: Mutex<HashMap<Target, u64>>,
}

impl Quarantines {
    /// Until when tasks of `kind` (and `agent_id`) must wait, if they must.
    pub(super) fn until(&self, kind: &str, agent_id: Option<i64>) -> Option<DateTime<Utc>> {
        let until = self.until.lock().expect("quarantine lock");
        if until.is_empty() {
            return None;
        }
        let now = Utc::now();
        let kind_wide = Target {
            kind: kind.to_string(),
            agent_id: None,
        };
        [Some(Target::of(kind, agent_id)), Some(kind_wide)]
            .into_iter()
            .flatten()
            .filter_map(|t| until.get(&t).copied())
            .filter(|u| *u > now)
            .max()
    }

    pub(super) fn set(&self, quarantines: HashMap<Target, DateTime<Utc>>) {
        *self.until.lock().expect("quarantine lock") = quarantines;
    }

    pub(super) fn add(&self, target: Target, until: DateTime<Utc>) {
        self.until
            .lock()
            .expect("quarantine lock")
            .insert(target, until);
    }

    pub(super) fn failed(&self, target: Target) {
        *self
            .failures
            .lock()
            .expect("quarantine lock")
            .entry(target)
            .or_default() += 1;
    }

    pub(super) fn take_failures(&self) -> HashMap<Target, u64> {
        std::mem::take(&mut *self.failures.lock().expect("quarantine lock"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_or_its_whole_kind_holds_its_tasks_and_an_ended_quarantine_does_not() {
        let q = Quarantines::default();
        let soon = Utc::now() + chrono::TimeDelta::seconds(60);
        q.set(HashMap::from([(Target::of("agent", Some(7)), soon)]));
        assert_eq!(q.until("agent", Some(7)), Some(soon));
        assert_eq!(q.until("agent", Some(8)), None, "another agent runs");
        assert_eq!(q.until("echo", None), None, "other kinds run");
        q.add(Target::of("echo", None), soon);
        assert_eq!(q.until("echo", None), Some(soon));
        q.add(
            Target::of("sleep", None),
            Utc::now() - chrono::TimeDelta::seconds(1),
        );
        assert_eq!(q.until("sleep", None), None, "over");
    }
}
