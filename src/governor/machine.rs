//! The governor's state machine: pure, driven by samples, failure counts and a clock that the
//! caller passes in (so tests use synthetic samples and a fake clock).
//!
//! ```text
//!            avg cpu/mem > high (one step per window)          healthy windows restore a step
//! normal ───────────────────────────────────────▶ throttled ─────────────────────────▶ normal
//!    │  failures ≥ threshold within the window        │
//!    └──────────────▶ paused (duration) ◀─────────────┘ ──(duration over)──▶ normal/throttled
//!                        │ N pauses within the escalation window
//!                        ▼
//!                     holding (escalated) ──(a person resumes it)──▶ normal/throttled
//! ```
//!
//! A burst concentrated in one agent or kind (at least `quarantine_share` of its failures)
//! quarantines that target for `duration` instead — fleet-wide, while this replica and its
//! other work go on; a target quarantined `review_after_pauses` times within the escalation
//! window is escalated and stays quarantined until a person lifts it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::worker::Target;

/// The governor's view of a replica's health (stored in the `replicas` table as is).
pub use crate::fleet::GovernorState as State;

/// Thresholds, from `governance.*`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_capacity: usize,
    pub cpu_high_pct: f64,
    pub mem_high_pct: f64,
    pub window: Duration,
    pub burst_threshold: u32,
    pub pause_duration: Duration,
    pub review_after_pauses: u32,
    /// The share of a burst's failures one target must have to be quarantined instead of
    /// the replica pausing (0: never).
    pub quarantine_share: f64,
}

impl Settings {
    pub fn from_config(cfg: &crate::config::Config) -> Settings {
        let g = &cfg.governance;
        Settings {
            max_capacity: cfg.slots(),
            cpu_high_pct: g.cpu_high_pct,
            mem_high_pct: g.mem_high_pct,
            window: Duration::from_secs(g.window_s),
            burst_threshold: g.pause_after_error_burst.threshold,
            pause_duration: Duration::from_secs(g.pause_after_error_burst.duration_s),
            review_after_pauses: g.human_review_after_pause_bursts,
            quarantine_share: g.pause_after_error_burst.quarantine_share,
        }
    }

    /// Capacity moves by a quarter of the maximum (at least one task) per step.
    pub fn step(&self) -> usize {
        self.max_capacity.div_ceil(4).max(1)
    }

    /// Pauses this close together escalate: one pause plus one window per pause counted, so
    /// back-to-back bursts escalate even though each pause outlasts the window.
    pub fn escalation_window(&self) -> Duration {
        (self.pause_duration + self.window) * self.review_after_pauses
    }
}

/// What changed, for the events table, the logs and the escalation.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    StateChanged {
        from: State,
        to: State,
        reason: String,
    },
    CapacityChanged {
        from: usize,
        to: usize,
        reason: String,
    },
    Escalated {
        reason: String,
        /// The agent or kind escalated (none: the replica).
        target: Option<Target>,
    },
    /// No task of `target` starts anywhere in the fleet for `seconds` (none: until a
    /// person lifts it).
    Quarantined {
        target: Target,
        seconds: Option<u64>,
        reason: String,
    },
}

impl Event {
    /// What the events table calls it.
    pub fn kind(&self) -> crate::fleet::EventKind {
        use crate::fleet::EventKind;
        match self {
            Event::StateChanged { .. } => EventKind::StateChanged,
            Event::CapacityChanged { .. } => EventKind::CapacityChanged,
            Event::Escalated { .. } => EventKind::Escalated,
            Event::Quarantined { .. } => EventKind::Quarantined,
        }
    }
}

#[derive(Debug)]
pub struct Machine {
    s: Settings,
    state: State,
    /// The throttle level: what may run when not paused.
    level: usize,
    samples: VecDeque<(Instant, f64, f64)>,
    /// Failures within the window, with the agent or kind they came from when known.
    failures: VecDeque<(Instant, Option<Target>)>,
    pauses: VecDeque<Instant>,
    /// Quarantines per target within the escalation window.
    quarantines: std::collections::HashMap<Target, VecDeque<Instant>>,
    last_step: Instant,
    paused_until: Option<Instant>,
}

impl Machine {
    pub fn new(s: Settings, now: Instant) -> Machine {
        Machine {
            level: s.max_capacity.max(1),
            s,
            state: State::Normal,
            samples: VecDeque::new(),
            failures: VecDeque::new(),
            pauses: VecDeque::new(),
            quarantines: std::collections::HashMap::new(),
            last_step: now,
            paused_until: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// What the pool may run now: nothing while paused or holding.
    pub fn granted(&self) -> usize {
        match self.state {
            State::Paused | State::Holding => 0,
            _ => self.level,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.s
    }

    pub fn observe_sample(&mut self, now: Instant, cpu_pct: f64, mem_pct: f64) {
        self.samples.push_back((now, cpu_pct, mem_pct));
    }

    /// `n` failures whose agent or kind is not known.
    pub fn observe_failures(&mut self, now: Instant, n: u64) {
        for _ in 0..n.min(100_000) {
            self.failures.push_back((now, None));
        }
    }

    /// `n` failures of `target`.
    pub fn observe_failures_of(&mut self, now: Instant, target: &Target, n: u64) {
        for _ in 0..n.min(100_000) {
            self.failures.push_back((now, Some(target.clone())));
        }
    }

    /// Averages of the samples within the window.
    pub fn averages(&self) -> Option<(f64, f64)> {
        let n = self.samples.len();
        (n > 0).then(|| {
            let (c, m) = self
                .samples
                .iter()
                .fold((0.0, 0.0), |(c, m), s| (c + s.1, m + s.2));
            (c / n as f64, m / n as f64)
        })
    }

    fn not_paused_state(&self) -> State {
        if self.level < self.s.max_capacity {
            State::Throttled
        } else {
            State::Normal
        }
    }

    fn set_state(&mut self, to: State, reason: String, events: &mut Vec<Event>) {
        if self.state != to {
            events.push(Event::StateChanged {
                from: self.state,
                to,
                reason,
            });
            self.state = to;
        }
    }

    /// Applies the rules at `now`; returns what changed. In order: forget what left its
    /// window; a hold waits for a person and a pause for its end; an error burst pauses (or
    /// holds, after enough pauses); otherwise a window of load steps the capacity.
    pub fn evaluate(&mut self, now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        self.forget_before(now);
        match self.state {
            State::Holding => return events,
            State::Paused => {
                if self.paused_until.is_some_and(|u| now >= u) {
                    self.paused_until = None;
                    self.failures.clear();
                    let to = self.not_paused_state();
                    self.set_state(to, "pause over".into(), &mut events);
                }
                return events;
            }
            _ => {}
        }
        if self.failures.len() >= self.s.burst_threshold as usize
            && let Some(target) = self.concentrated()
        {
            self.quarantine(now, target, &mut events);
        }
        if self.failures.len() >= self.s.burst_threshold as usize {
            self.on_error_burst(now, &mut events);
        } else if now.duration_since(self.last_step) >= self.s.window {
            self.step_capacity(now, &mut events);
        }
        events
    }

    /// Drops samples and failures older than the window, and pauses older than the
    /// escalation window.
    fn forget_before(&mut self, now: Instant) {
        let (window, esc) = (self.s.window, self.s.escalation_window());
        let old = |t: Instant, span: Duration| now.duration_since(t) > span;
        while self.samples.front().is_some_and(|s| old(s.0, window)) {
            self.samples.pop_front();
        }
        while self.failures.front().is_some_and(|t| old(t.0, window)) {
            self.failures.pop_front();
        }
        while self.pauses.front().is_some_and(|t| old(*t, esc)) {
            self.pauses.pop_front();
        }
        self.quarantines.retain(|_, times| {
            while times.front().is_some_and(|t| old(*t, esc)) {
                times.pop_front();
            }
            !times.is_empty()
        });
    }

    /// The target with at least `quarantine_share` of the failures in the window, if any.
    fn concentrated(&self) -> Option<Target> {
        if self.s.quarantine_share <= 0.0 {
            return None;
        }
        let mut per: std::collections::HashMap<&Target, usize> = Default::default();
        for t in self.failures.iter().filter_map(|(_, t)| t.as_ref()) {
            *per.entry(t).or_default() += 1;
        }
        let (target, n) = per
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0)))?;
        (n as f64 >= self.s.quarantine_share * self.failures.len() as f64).then(|| target.clone())
    }

    /// Quarantines `target` (its failures leave the window), or escalates it when this is
    /// its `review_after_pauses`-th quarantine within the escalation window.
    fn quarantine(&mut self, now: Instant, target: Target, events: &mut Vec<Event>) {
        let (window, esc) = (self.s.window, self.s.escalation_window());
        let before = self.failures.len();
        self.failures.retain(|(_, t)| t.as_ref() != Some(&target));
        let n = before - self.failures.len();
        let times = self.quarantines.entry(target.clone()).or_default();
        times.push_back(now);
        if times.len() >= self.s.review_after_pauses as usize {
            let reason = format!(
                "{target}: {} error bursts within {}s (last: {n} of {before} failures within \
                 {}s); quarantined until a person lifts it",
                times.len(),
                esc.as_secs(),
                window.as_secs()
            );
            times.clear();
            // In force before anyone hears of the escalation.
            events.push(Event::Quarantined {
                target: target.clone(),
                seconds: None,
                reason: reason.clone(),
            });
            events.push(Event::Escalated {
                reason,
                target: Some(target),
            });
        } else {
            let reason = format!(
                "{target}: {n} of {before} failures within {}s; quarantined fleet-wide for {}s \
                 while other work goes on",
                window.as_secs(),
                self.s.pause_duration.as_secs()
            );
            events.push(Event::Quarantined {
                target,
                seconds: Some(self.s.pause_duration.as_secs()),
                reason,
            });
        }
    }

    /// A burst of failures: a pause, or a hold when the pauses within the escalation window
    /// reach `review_after_pauses`.
    fn on_error_burst(&mut self, now: Instant, events: &mut Vec<Event>) {
        let (window, esc) = (self.s.window, self.s.escalation_window());
        let n = self.failures.len();
        self.failures.clear();
        self.pauses.push_back(now);
        if self.pauses.len() >= self.s.review_after_pauses as usize {
            let reason = format!(
                "{} error bursts within {}s (last: {n} failures within {}s); holding until a \
                 person resumes the replica",
                self.pauses.len(),
                esc.as_secs(),
                window.as_secs()
            );
            events.push(Event::Escalated {
                reason: reason.clone(),
                target: None,
            });
            self.set_state(State::Holding, reason, events);
        } else {
            self.paused_until = Some(now + self.s.pause_duration);
            let reason = format!(
                "{n} failures within {}s; pausing claims for {}s",
                window.as_secs(),
                self.s.pause_duration.as_secs()
            );
            self.set_state(State::Paused, reason, events);
        }
    }

    /// One step down when the window's averages are hot (never below 1), one step up when
    /// they are healthy (never above the maximum).
    fn step_capacity(&mut self, now: Instant, events: &mut Vec<Event>) {
        let Some((cpu, mem)) = self.averages() else {
            return;
        };
        let window = self.s.window;
        let hot = cpu > self.s.cpu_high_pct || mem > self.s.mem_high_pct;
        let from = self.level;
        if hot && self.level > 1 {
            self.level = self.level.saturating_sub(self.s.step()).max(1);
            events.push(Event::CapacityChanged {
                from,
                to: self.level,
                reason: format!(
                    "average cpu {cpu:.0}% / memory {mem:.0}% over {}s above {}% / {}%",
                    window.as_secs(),
                    self.s.cpu_high_pct,
                    self.s.mem_high_pct
                ),
            });
            self.last_step = now;
        } else if !hot && self.level < self.s.max_capacity {
            self.level = (self.level + self.s.step()).min(self.s.max_capacity);
            events.push(Event::CapacityChanged {
                from,
                to: self.level,
                reason: format!("a healthy window (cpu {cpu:.0}%, memory {mem:.0}%)"),
            });
            self.last_step = now;
        }
        let to = self.not_paused_state();
        self.set_state(to, "capacity changed".into(), events);
    }

    /// A person resumed the replica: lifts a hold or a pause.
    pub fn resume(&mut self, _now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        if matches!(self.state, State::Holding | State::Paused) {
            self.pauses.clear();
            self.failures.clear();
            self.paused_until = None;
            let to = self.not_paused_state();
            self.set_state(to, "resumed by a person".into(), &mut events);
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            max_capacity: 8,
            cpu_high_pct: 85.0,
            mem_high_pct: 85.0,
            window: Duration::from_secs(30),
            burst_threshold: 10,
            pause_duration: Duration::from_secs(60),
            review_after_pauses: 3,
            quarantine_share: 0.8,
        }
    }

    /// Feeds one sample every 2 s for `secs` seconds from `*t`, evaluating each time.
    fn run(m: &mut Machine, t: &mut Instant, secs: u64, cpu: f64, mem: f64) -> Vec<Event> {
        let mut all = Vec::new();
        for _ in 0..secs / 2 {
            *t += Duration::from_secs(2);
            m.observe_sample(*t, cpu, mem);
            all.extend(m.evaluate(*t));
        }
        all
    }

    #[test]
    fn throttles_one_step_per_window_never_below_one_and_recovers() {
        let t0 = Instant::now();
        let mut t = t0;
        let mut m = Machine::new(settings(), t0);
        run(&mut m, &mut t, 20, 95.0, 40.0);
        assert_eq!(m.granted(), 8, "no step before a full window");
        run(&mut m, &mut t, 10, 95.0, 40.0);
        assert_eq!((m.granted(), m.state()), (6, State::Throttled));
        run(&mut m, &mut t, 30, 95.0, 40.0);
        assert_eq!(m.granted(), 4, "one step per window");
        run(&mut m, &mut t, 300, 95.0, 40.0);
        assert_eq!(m.granted(), 1, "never below one");
        // Memory alone is enough to keep it down.
        run(&mut m, &mut t, 60, 10.0, 90.0);
        assert_eq!(m.granted(), 1);
        // Healthy windows restore a step each (the window's average must drop first).
        run(&mut m, &mut t, 30, 10.0, 20.0);
        let after_one = m.granted();
        assert!(after_one == 3, "one step up: {after_one}");
        run(&mut m, &mut t, 120, 10.0, 20.0);
        assert_eq!((m.granted(), m.state()), (8, State::Normal));
    }

    #[test]
    fn an_error_burst_pauses_then_lifts_after_the_duration() {
        let t0 = Instant::now();
        let mut m = Machine::new(settings(), t0);
        m.observe_failures(t0, 9);
        assert!(m.evaluate(t0).is_empty(), "below the threshold");
        let t1 = t0 + Duration::from_secs(1);
        m.observe_failures(t1, 1);
        let ev = m.evaluate(t1);
        assert!(
            matches!(
                ev[0],
                Event::StateChanged {
                    to: State::Paused,
                    ..
                }
            ),
            "{ev:?}"
        );
        assert_eq!(m.granted(), 0);
        assert!(m.evaluate(t1 + Duration::from_secs(59)).is_empty());
        assert_eq!(m.state(), State::Paused);
        let ev = m.evaluate(t1 + Duration::from_secs(60));
        assert!(matches!(
            ev[0],
            Event::StateChanged {
                from: State::Paused,
                to: State::Normal,
                ..
            }
        ));
        assert_eq!(m.granted(), 8);
    }

    #[test]
    fn failures_spread_wider_than_the_window_do_not_pause() {
        let t0 = Instant::now();
        let mut m = Machine::new(settings(), t0);
        for i in 0..30 {
            let t = t0 + Duration::from_secs(i * 4);
            m.observe_failures(t, 1);
            m.evaluate(t);
        }
        assert_eq!(m.state(), State::Normal);
    }

    fn agent(id: i64) -> Target {
        Target::of("agent", Some(id))
    }

    #[test]
    fn a_burst_of_one_agent_quarantines_it_and_the_replica_goes_on() {
        let t0 = Instant::now();
        let mut m = Machine::new(settings(), t0);
        m.observe_failures_of(t0, &agent(7), 9);
        m.observe_failures_of(t0, &Target::of("echo", None), 1);
        let ev = m.evaluate(t0);
        assert_eq!(
            ev,
            vec![Event::Quarantined {
                target: agent(7),
                seconds: Some(60),
                reason: "agent #7: 9 of 10 failures within 30s; quarantined fleet-wide for 60s \
                         while other work goes on"
                    .into()
            }]
        );
        assert_eq!((m.state(), m.granted()), (State::Normal, 8));
    }

    #[test]
    fn a_burst_spread_over_agents_and_kinds_pauses_the_replica() {
        let t0 = Instant::now();
        let mut m = Machine::new(settings(), t0);
        for id in 0..5 {
            m.observe_failures_of(t0, &agent(id), 2);
        }
        let ev = m.evaluate(t0);
        assert!(
            ev.iter().all(|e| !matches!(e, Event::Quarantined { .. })),
            "{ev:?}"
        );
        assert_eq!(m.state(), State::Paused);
    }

    #[test]
    fn a_share_of_zero_never_quarantines() {
        let t0 = Instant::now();
        let mut m = Machine::new(
            Settings {
                quarantine_share: 0.0,
                ..settings()
            },
            t0,
        );
        m.observe_failures_of(t0, &agent(1), 10);
        m.evaluate(t0);
        assert_eq!(m.state(), State::Paused);
    }

    #[test]
    fn an_agent_quarantined_again_and_again_is_escalated_and_held() {
        let t0 = Instant::now();
        let mut m = Machine::new(settings(), t0);
        let mut t = t0;
        for round in 1..=3 {
            m.observe_failures_of(t, &agent(7), 10);
            let ev = m.evaluate(t);
            if round < 3 {
                assert!(
                    matches!(
                        &ev[..],
                        [Event::Quarantined {
                            seconds: Some(60),
                            ..
                        }]
                    ),
                    "{ev:?}"
                );
            } else {
                assert!(
                    matches!(
                        &ev[..],
                        [
                            Event::Quarantined { seconds: None, .. },
                            Event::Escalated {
                                target: Some(_),
                                ..
                            }
                        ]
                    ),
                    "{ev:?}"
                );
            }
            t += Duration::from_secs(61);
        }
        assert_eq!(m.state(), State::Normal, "the replica never paused");
    }

    #[test]
    fn repeated_bursts_escalate_and_hold_until_resumed() {
        let t0 = Instant::now();
        let mut m = Machine::new(settings(), t0);
        let mut t = t0;
        let mut escalations = 0;
        for burst in 0..3 {
            m.observe_failures(t, 10);
            for e in m.evaluate(t) {
                if matches!(e, Event::Escalated { .. }) {
                    escalations += 1;
                }
            }
            if burst < 2 {
                assert_eq!(m.state(), State::Paused);
                t += Duration::from_secs(61);
                m.evaluate(t);
                assert_eq!(m.state(), State::Normal);
            }
        }
        assert_eq!((m.state(), escalations), (State::Holding, 1));
        // Holding does not lift by itself.
        assert!(m.evaluate(t + Duration::from_secs(3600)).is_empty());
        assert_eq!(m.granted(), 0);
        let ev = m.resume(t + Duration::from_secs(3600));
        assert!(matches!(
            ev[0],
            Event::StateChanged {
                from: State::Holding,
                to: State::Normal,
                ..
            }
        ));
        assert_eq!(m.granted(), 8);
    }

    #[test]
    fn pauses_far_apart_do_not_escalate() {
        let t0 = Instant::now();
        let mut m = Machine::new(settings(), t0);
        let mut t = t0;
        for _ in 0..5 {
            m.observe_failures(t, 10);
            m.evaluate(t);
            t += settings().escalation_window();
            m.evaluate(t);
        }
        assert_ne!(m.state(), State::Holding);
    }
}
