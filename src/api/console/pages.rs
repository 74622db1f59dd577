//! The console's pages as HTML (maud escapes every value it interpolates). Each takes what
//! its handler read and renders it; no I/O here.

use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};

use crate::config::Scope;
use crate::fleet::ReplicaRow;
use crate::fleet::quarantines::Quarantine;
use crate::queue::{Status, Task};

use super::session::Session;
use super::view;

fn time(t: Option<DateTime<Utc>>) -> String {
    t.map_or("-".to_string(), |t| {
        t.format("%Y-%m-%d %H:%M:%S").to_string()
    })
}

fn badge(s: Status) -> Markup {
    html! { span class=(format!("badge s-{}", s.as_str())) { (s.as_str()) } }
}

/// The last non-empty line of an error: what a table shows of it.
fn last_line(e: &str) -> String {
    let line = e.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    line.chars().take(100).collect()
}

/// Every page: the header (pages, who is signed in) around `body`.
pub fn layout(title: &str, session: Option<&Session>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Agent Harness" }
                link rel="stylesheet" href="/assets/console.css";
                link rel="icon" href="data:,";
                script src="/assets/console.js" defer {}
            }
            body {
                header {
                    a.brand href="/" { "Agent Harness" }
                    @if session.is_some() {
                        nav aria-label="pages" {
                            a href="/" { "Overview" }
                            a href="/tasks" { "Tasks" }
                            a href="/agents" { "Agents" }
                            a href="/fleet" { "Fleet" }
                        }
                    }
                    @if let Some(s) = session {
                        div.who {
                            span { (match s.scope { Scope::Admin => "admin", Scope::Read => "read only" }) }
                            form.inline method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(s.csrf);
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

pub fn login(error: Option<&str>, next: &str) -> Markup {
    layout(
        "Sign in",
        None,
        html! {
            div.login {
                h1 { "Sign in" }
                p.muted { "Give an API token (api.tokens): a read token shows everything with secrets redacted; an admin token may also change things." }
                @if let Some(e) = error { p.error role="alert" { (e) } }
                form method="post" action="/login" {
                    label { "Token" input type="password" name="token" autocomplete="current-password" required autofocus; }
                    input type="hidden" name="next" value=(next);
                    button type="submit" { "Sign in" }
                }
            }
        },
    )
}

/// What the overview shows.
pub struct Overview<'a> {
    /// Tasks per status (but completed), each counted up to [`COUNT_CAP`].
    pub counts: &'a [(Status, i64)],
    /// The planner's estimate of all tasks.
    pub total_estimate: i64,
    pub minutes: &'a [crate::fleet::health::Minute],
    pub failing: &'a [(String, crate::queue::RunStats)],
    pub replicas: &'a [ReplicaRow],
    pub quarantines: &'a [Quarantine],
    pub escalations: &'a [(DateTime<Utc>, String, String)],
}

/// Counts stop here ("100,000+"): bounded work per page however large the table.
pub const COUNT_CAP: i64 = 100_000;

/// 12345 as "12,345".
pub fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn capped(n: i64) -> String {
    if n >= COUNT_CAP {
        format!("{}+", thousands(COUNT_CAP))
    } else {
        thousands(n)
    }
}

/// The last hour's minutes as chart slots: 0 is the oldest minute, 59 the current one.
fn minute_bars(
    now: DateTime<Utc>,
    minutes: &[crate::fleet::health::Minute],
    value: impl Fn(&crate::fleet::health::Minute) -> Option<f64>,
    unit: &str,
) -> Vec<view::Bar> {
    let this_minute = now.timestamp() / 60;
    minutes
        .iter()
        .filter_map(|m| {
            let ago = this_minute - m.at.timestamp() / 60;
            let v = value(m)?;
            (0..60).contains(&ago).then(|| view::Bar {
                slot: (59 - ago) as usize,
                value: v,
                label: format!("{} UTC: {} {unit}", m.at.format("%H:%M"), view::short(v)),
            })
        })
        .collect()
}

pub fn overview(session: &Session, o: &Overview<'_>, now: DateTime<Utc>) -> Markup {
    let count = |s: Status| {
        o.counts
            .iter()
            .find(|(x, _)| *x == s)
            .map_or(0, |(_, n)| *n)
    };
    let done = minute_bars(now, o.minutes, |m| Some(m.completed as f64), "completed");
    let failed = minute_bars(
        now,
        o.minutes,
        |m| Some(m.failed as f64),
        "failed or timed out",
    );
    let pickup = minute_bars(now, o.minutes, |m| m.pickup_ms(), "ms mean pick-up");
    layout(
        "Overview",
        Some(session),
        html! {
            h1 { "Overview" }
            section id="counts" data-live {
                h2 { "Tasks now" }
                div.cards {
                    @for s in [Status::Pending, Status::Running, Status::RetryScheduled, Status::Failed, Status::Timeout, Status::Cancelled] {
                        a.card href=(format!("/tasks?status={}", s.as_str())) {
                            div.n { (capped(count(s))) }
                            div.l { (s.as_str()) }
                        }
                    }
                }
                p.muted {
                    "Queue depth " (capped(count(Status::Pending) + count(Status::RetryScheduled)))
                    @if o.total_estimate > 0 { " · about " (thousands(o.total_estimate)) " tasks in all (the planner's estimate)" }
                }
            }
            section id="charts" data-live {
                h2 { "Last hour" }
                div.charts {
                    (view::bars("chart-completed", "Completed per minute", "/min", 60, &done, "ok"))
                    (view::bars("chart-failed", "Failed or timed out per minute", "/min", 60, &failed, "bad"))
                    (view::bars("chart-pickup", "Mean pick-up latency", "ms", 60, &pickup, "info"))
                }
                p.muted { "From the replicas' metrics rows (one per replica every telemetry.log_interval_s)." }
            }
            section id="failing" data-live {
                h2 { "Agents failing most" }
                @if o.failing.is_empty() {
                    p.muted { "No agent run failed in the last hour." }
                } @else {
                    div.scroll { table {
                        thead { tr { th { "Agent" } th { "Failed in the last hour" } th { "Success rate" } th { "Last run" } } }
                        tbody {
                            @for (name, st) in o.failing {
                                tr {
                                    td { a href=(format!("/agents/{name}")) { (name) } }
                                    td { (st.failed_last_hour) }
                                    td { (rate(st)) }
                                    td { @if let Some(s) = st.last_status { (badge(s)) " " } (time(st.last_ended_at)) }
                                }
                            }
                        }
                    } }
                }
            }
            section id="replicas" data-live {
                h2 { "Replicas" }
                @if o.replicas.is_empty() {
                    p.muted { "No live replica: tasks wait until one runs (harness serve)." }
                } @else {
                    div.scroll { table {
                        thead { tr { th { "Replica" } th { "State" } th { "Running / capacity" } th { "Heartbeat" } th { "Leader" } th { "CPU" } th { "Memory" } } }
                        tbody {
                            @for r in o.replicas {
                                tr {
                                    td { (r.id) }
                                    td { (r.governor_state.as_str()) }
                                    td { (r.running) " / " (r.capacity) }
                                    td { (format!("{:.1} s ago", r.heartbeat_age_s)) }
                                    td { @if r.is_leader { "leader" } @else { "" } }
                                    td { (r.cpu_percent.map_or("-".to_string(), |v| format!("{v:.0}%"))) }
                                    td { (r.memory_percent.map_or("-".to_string(), |v| format!("{v:.0}%"))) }
                                }
                            }
                        }
                    } }
                }
                (quarantine_list(o.quarantines))
                @if !o.escalations.is_empty() {
                    h2 { "Escalations" }
                    ul {
                        @for (at, replica, reason) in o.escalations {
                            li { (time(Some(*at))) " " (replica) ": " (reason) }
                        }
                    }
                }
            }
        },
    )
}

/// The agents and kinds quarantined now, and until when.
fn quarantine_list(quarantines: &[Quarantine]) -> Markup {
    html! {
        @if !quarantines.is_empty() {
            h2 { "Quarantined" }
            ul {
                @for q in quarantines {
                    li {
                        (q.what())
                        " — " @if q.held { "until a person lifts it" } @else { "until " (time(Some(q.until))) }
                        ": " span.muted { (q.reason) }
                    }
                }
            }
        }
    }
}

/// An agent's success rate over its recent finished runs, with how many.
fn rate(st: &crate::queue::RunStats) -> String {
    st.success_rate().map_or("-".to_string(), |r| {
        format!("{:.0}% of {}", r * 100.0, st.finished)
    })
}

/// The filters of the task list, as given.
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct TaskQuery {
    pub status: Option<String>,
    pub kind: Option<String>,
    pub agent: Option<String>,
    /// Created at or after / before (UTC; `2026-12-01T09:30` or RFC 3339).
    pub since: Option<String>,
    pub until: Option<String>,
    /// Keyset pagination: tasks with a smaller id.
    pub before: Option<i64>,
    /// A task id or idempotency key to go to.
    pub q: Option<String>,
    /// What the last bulk action did (set by its redirect).
    pub bulk: Option<String>,
    pub done: Option<u32>,
    pub skipped: Option<u32>,
}

impl TaskQuery {
    /// The filters (not the page) as query pairs.
    fn filters(&self) -> Vec<(&'static str, &str)> {
        [
            ("status", &self.status),
            ("kind", &self.kind),
            ("agent", &self.agent),
            ("since", &self.since),
            ("until", &self.until),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().filter(|v| !v.is_empty()).map(|v| (k, v)))
        .collect()
    }

    /// The query string of these filters with `before`.
    pub fn with_before(&self, before: Option<i64>) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in self.filters() {
            q.append_pair(k, v);
        }
        if let Some(b) = before {
            q.append_pair("before", &b.to_string());
        }
        q.finish()
    }
}

pub const PAGE: i64 = 50;

/// One page of the task list as the handler found it.
#[derive(Default)]
pub struct TaskListing {
    pub tasks: Vec<Task>,
    pub names: std::collections::HashMap<i64, String>,
    /// Where the next page starts (`before`), if there may be older matches.
    pub older: Option<i64>,
    /// Set when the page was cut short by the bounded window of ids it searched: the lowest
    /// id looked at.
    pub searched_to: Option<i64>,
}

pub fn tasks(session: &Session, q: &TaskQuery, l: &TaskListing, error: Option<&str>) -> Markup {
    let admin = session.scope == Scope::Admin;
    let back = format!("/tasks?{}", q.with_before(q.before));
    layout(
        "Tasks",
        Some(session),
        html! {
            h1 { "Tasks" }
            form.filters method="get" action="/tasks" role="search" {
                label { "Go to id or idempotency key" input type="search" name="q" value=(q.q.clone().unwrap_or_default()) placeholder="1234 or a key"; }
                button type="submit" { "Go" }
            }
            form.filters method="get" action="/tasks" {
                label { "Status"
                    select name="status" {
                        option value="" { "any" }
                        @for s in Status::ALL {
                            option value=(s.as_str()) selected[q.status.as_deref() == Some(s.as_str())] { (s.as_str()) }
                        }
                    }
                }
                label { "Kind" input type="text" name="kind" value=(q.kind.clone().unwrap_or_default()); }
                label { "Agent" input type="text" name="agent" value=(q.agent.clone().unwrap_or_default()); }
                label { "Created since (UTC)" input type="datetime-local" name="since" value=(q.since.clone().unwrap_or_default()); }
                label { "Created before (UTC)" input type="datetime-local" name="until" value=(q.until.clone().unwrap_or_default()); }
                button type="submit" { "Filter" }
                @if !q.filters().is_empty() { a href="/tasks" { "Clear" } }
            }
            @if let Some(e) = error { p.error role="alert" { (e) } }
            @if let (Some(action), Some(done)) = (q.bulk.as_deref(), q.done) {
                p.notice role="status" {
                    (match action { "retry" => "Retried", "cancel" => "Cancelled", "delete" => "Deleted", _ => "Done:" })
                    " " (done) " task" @if done != 1 { "s" }
                    @if let Some(n) = q.skipped.filter(|n| *n > 0) { "; " (n) " skipped (not in a state that allows it, or gone)" }
                    "."
                }
            }
            form id="bulk" method="post" action="/tasks/bulk" {
                @if admin {
                    input type="hidden" name="csrf" value=(session.csrf);
                    input type="hidden" name="back" value=(back);
                    div.actions.bulk {
                        span.muted { "Selected:" }
                        button type="submit" name="action" value="retry" { "Retry" }
                        button type="submit" name="action" value="cancel" class="danger" { "Cancel" }
                        button type="submit" name="action" value="delete" class="danger" data-confirm="Delete the selected tasks and their output for good?" { "Delete" }
                    }
                }
                section id="task-list" data-live[q.before.is_none()] {
                    @if l.tasks.is_empty() {
                        p.muted { "No tasks match." }
                    } @else {
                        div.scroll { table {
                            thead { tr {
                                @if admin { th { input type="checkbox" data-select-all="id" aria-label="select every task on this page"; } }
                                th { "ID" } th { "Kind" } th { "Agent" } th { "Status" } th { "Attempt" } th { "Created" } th { "Ended" } th { "Error" }
                            } }
                            tbody {
                                @for t in &l.tasks {
                                    tr {
                                        @if admin { td { input type="checkbox" name="id" value=(t.id) aria-label=(format!("select task {}", t.id)); } }
                                        td { a href=(format!("/tasks/{}", t.id)) { (t.id) } }
                                        td { (t.kind) }
                                        td { (t.agent_id.map_or("-".to_string(), |a| l.names.get(&a).cloned().unwrap_or_else(|| format!("#{a}")))) }
                                        td { (badge(t.status)) }
                                        td { (t.attempt) "/" (t.max_retries + 1) }
                                        td { (time(Some(t.created_at))) }
                                        td { (time(t.completed_at)) }
                                        td.wrap { (t.error.as_deref().map(last_line).unwrap_or_default()) }
                                    }
                                }
                            }
                        } }
                    }
                }
            }
            div.pager {
                @if q.before.is_some() { a href=(format!("/tasks?{}", q.with_before(None))) { "Newest" } }
                @if let Some(to) = l.searched_to {
                    span.muted { "Searched down to task " (to) "." }
                }
                @if let Some(older) = l.older {
                    a rel="next" href=(format!("/tasks?{}", q.with_before(Some(older)))) { "Older →" }
                }
            }
        },
    )
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

pub fn task(session: &Session, t: &Task, agent: Option<&str>) -> Markup {
    let admin = session.scope == Scope::Admin;
    let action = |name: &str, label: &str, class: &str| {
        html! {
            form.inline method="post" action=(format!("/tasks/{}/{name}", t.id)) {
                input type="hidden" name="csrf" value=(session.csrf);
                button type="submit" class=(class) { (label) }
            }
        }
    };
    layout(
        &format!("Task {}", t.id),
        Some(session),
        html! {
            h1 { "Task " (t.id) " " span.muted { (t.kind) } }
            @if admin {
                div.actions {
                    @if matches!(t.status, Status::Failed | Status::Timeout) { (action("retry", "Retry", "")) }
                    @if matches!(t.status, Status::Pending | Status::Running | Status::RetryScheduled) { (action("cancel", "Cancel", "danger")) }
                    @if t.status != Status::Running { (action("delete", "Delete", "danger")) }
                }
            }
            section id="task-fields" data-live {
                dl.fields {
                    dt { "Status" } dd { (badge(t.status)) }
                    dt { "Agent" } dd { (agent.unwrap_or("-")) }
                    dt { "Attempt" } dd { (t.attempt) " (retries " (t.retry_count) " of " (t.max_retries) ")" }
                    dt { "Priority" } dd { (t.priority) }
                    dt { "Created" } dd { (time(Some(t.created_at))) }
                    dt { "Scheduled" } dd { (time(Some(t.scheduled_at))) }
                    dt { "Started" } dd { (time(t.started_at)) }
                    dt { "Ended" } dd { (time(t.completed_at)) }
                    dt { "Replica" } dd { (t.replica.as_deref().unwrap_or("-")) }
                    @if let Some(k) = &t.idempotency_key { dt { "Idempotency key" } dd { (k) } }
                    @if let Some(tp) = &t.traceparent { dt { "Trace" } dd { (tp.split('-').nth(1).unwrap_or(tp)) } }
                    dt { "Progress" } dd id="progress" {
                        @if let Some(p) = &t.progress {
                            (p.progress.fraction.map_or(String::new(), |f| format!("{:.0}% ", f * 100.0)))
                            (p.progress.message.clone().unwrap_or_default())
                        } @else { "-" }
                    }
                }
                @if let Some(e) = &t.error {
                    h2 { "Error" }
                    pre.error id="error" { (e) }
                }
                @if let Some(r) = &t.result {
                    h2 { "Result" }
                    pre id="result" { (pretty(r)) }
                }
                @if !t.attempts.is_empty() {
                    h2 { "Attempts" }
                    div.scroll { table {
                        thead { tr { th { "#" } th { "Ended" } th { "Replica" } th { "Started" } th { "Took" } th { "Why" } } }
                        tbody {
                            @for a in &t.attempts {
                                tr {
                                    td { (a.attempt) }
                                    td { (a.status.as_str()) }
                                    td { (a.replica.as_deref().unwrap_or("?")) }
                                    td { (time(a.started_at)) }
                                    td { (duration(a.started_at.map(|s| (a.ended_at - s).num_milliseconds() as f64 / 1000.0))) }
                                    td.wrap { (a.error.as_deref().map(last_line).unwrap_or_default()) }
                                }
                            }
                        }
                    } }
                }
            }
            h2 { "Output" }
            pre id="logs" data-events=(format!("/tasks/{}/events", t.id)) { span.muted { "No output yet." } }
            h2 { "Payload" }
            pre id="payload" { (pretty(&t.payload)) }
        },
    )
}

/// A small form that posts `action` with the session's CSRF token.
fn button(session: &Session, action: &str, label: &str, class: &str) -> Markup {
    html! {
        form.inline method="post" action=(action) {
            input type="hidden" name="csrf" value=(session.csrf);
            button type="submit" class=(class) { (label) }
        }
    }
}

/// A [`button`] whose action comes back to the page `back` (a path of this console).
fn button_back(session: &Session, action: &str, label: &str, back: &str) -> Markup {
    html! {
        form.inline method="post" action=(action) {
            input type="hidden" name="csrf" value=(session.csrf);
            input type="hidden" name="back" value=(back);
            button type="submit" { (label) }
        }
    }
}

/// One agent's line in the list.
pub struct AgentLine<'a> {
    pub agent: &'a crate::agents::Agent,
    /// Its last runs, summed (none: it has not run).
    pub stats: Option<&'a crate::queue::RunStats>,
    pub quarantine: Option<&'a Quarantine>,
}

/// Runs an agent's list and overview sum up: its last this many.
pub const RECENT_RUNS: i64 = 20;

/// An agent's schedule: in words when it can be said simply, with the expression.
fn schedule(a: &crate::agents::Agent) -> Markup {
    match a.settings.schedule.as_deref() {
        None => html! { span.muted { "manual only" } },
        Some(expr) => html! {
            @if let Some(words) = crate::cron::describe(expr) { (words) " " }
            code.muted { (expr) }
            @if let Some(tz) = &a.settings.timezone { " " span.muted { (tz) } }
        },
    }
}

fn duration(s: Option<f64>) -> String {
    match s {
        None => "-".to_string(),
        Some(s) if s < 1.0 => format!("{:.0} ms", s * 1000.0),
        Some(s) if s < 120.0 => format!("{s:.1} s"),
        Some(s) => format!("{:.0} min", s / 60.0),
    }
}

fn agent_state(a: &crate::agents::Agent, q: Option<&Quarantine>) -> String {
    match (a.active, q) {
        (_, Some(q)) if q.held => "quarantined (held)".to_string(),
        (_, Some(q)) => format!("quarantined until {}", time(Some(q.until))),
        (true, None) => "active".to_string(),
        (false, None) => "paused".to_string(),
    }
}

fn runtime(a: &crate::agents::Agent) -> String {
    match &a.runtime {
        crate::executor::Runtime::Python { .. } => "python".to_string(),
        crate::executor::Runtime::Command { argv } => format!("command {}", argv.join(" ")),
    }
}

pub fn agents(session: &Session, lines: &[AgentLine<'_>]) -> Markup {
    let admin = session.scope == Scope::Admin;
    layout(
        "Agents",
        Some(session),
        html! {
            h1 { "Agents" }
            section id="agent-list" data-live {
                @if lines.is_empty() {
                    p.muted { "No agents yet: harness agents add <name> --file agent.py" }
                } @else {
                    div.scroll { table {
                        thead { tr { th { "Name" } th { "State" } th { "Runtime" } th { "Schedule" } th { "Next run" } th { "Last run" } th { "Took" } th { (format!("Success (last {RECENT_RUNS})")) } @if admin { th {} } } }
                        tbody {
                            @for l in lines {
                                tr {
                                    td { a href=(format!("/agents/{}", l.agent.name)) { (l.agent.name) } }
                                    td { (agent_state(l.agent, l.quarantine)) }
                                    td.wrap { (runtime(l.agent)) }
                                    td.wrap { (schedule(l.agent)) }
                                    td { (time(l.agent.next_fire())) }
                                    td {
                                        @match l.stats.and_then(|s| s.last_status.map(|st| (st, s.last_ended_at))) {
                                            Some((st, at)) => { (badge(st)) " " (time(at)) }
                                            None => "-",
                                        }
                                    }
                                    td { (duration(l.stats.and_then(|s| s.last_duration_s))) }
                                    td { (l.stats.map_or("-".to_string(), rate)) }
                                    @if admin {
                                        td.row-actions {
                                            (button(session, &format!("/agents/{}/run", l.agent.name), "Run now", ""))
                                            @if l.agent.active && l.quarantine.is_none() {
                                                (button_back(session, &format!("/agents/{}/pause", l.agent.name), "Pause", "/agents"))
                                            } @else {
                                                (button_back(session, &format!("/agents/{}/resume", l.agent.name), "Resume", "/agents"))
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    } }
                }
            }
        },
    )
}

/// What an agent's page shows.
pub struct AgentPage<'a> {
    pub agent: &'a crate::agents::Agent,
    /// Its settings as JSON, `env` values redacted for readers.
    pub settings: serde_json::Value,
    /// Its own config, secret-looking values redacted for readers.
    pub config: serde_json::Value,
    pub quarantine: Option<&'a Quarantine>,
    pub stats: Option<&'a crate::queue::RunStats>,
    pub runs: &'a [Task],
    /// Newest first.
    pub handoffs: &'a [crate::handoff::HandoffArtifact],
    pub error: Option<&'a str>,
    /// What the edit form showed when it was refused (so nothing typed is lost).
    pub edit: Option<&'a AgentEdit>,
}

/// The agent edit form's fields, as typed.
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct AgentEdit {
    pub csrf: String,
    pub schedule: String,
    pub timezone: String,
    pub timeout: String,
    pub max_retries: String,
    pub memory_mb: String,
    pub cpu_percent: String,
    pub config: String,
}

impl AgentEdit {
    /// The form filled with what the agent has now.
    pub fn of(a: &crate::agents::Agent) -> AgentEdit {
        let st = &a.settings;
        AgentEdit {
            csrf: String::new(),
            schedule: st.schedule.clone().unwrap_or_default(),
            timezone: st.timezone.clone().unwrap_or_default(),
            timeout: st.timeout.to_string(),
            max_retries: st.max_retries.to_string(),
            memory_mb: st.memory_mb.to_string(),
            cpu_percent: st.cpu_percent.to_string(),
            config: pretty(&serde_json::Value::Object(a.config.clone())),
        }
    }
}

fn edit_form(session: &Session, a: &crate::agents::Agent, f: &AgentEdit) -> Markup {
    html! {
        details.edit open[!f.csrf.is_empty()] {
            summary { "Edit schedule, limits and config" }
            form.edit method="post" action=(format!("/agents/{}/edit", a.name)) {
                input type="hidden" name="csrf" value=(session.csrf);
                label { "Schedule (cron, empty: manual only)" input type="text" name="schedule" value=(f.schedule) placeholder="*/15 * * * *"; }
                label { "Time zone (IANA, empty: UTC)" input type="text" name="timezone" value=(f.timezone) placeholder="Europe/Paris"; }
                label { "Timeout (s)" input type="number" name="timeout" value=(f.timeout) min="1"; }
                label { "Retries" input type="number" name="max_retries" value=(f.max_retries) min="0"; }
                label { "Memory (MB)" input type="number" name="memory_mb" value=(f.memory_mb) min="1"; }
                label { "CPU (% of a core)" input type="number" name="cpu_percent" value=(f.cpu_percent) min="1"; }
                label.wide { "Config (a JSON object, what Agent(config) receives)" textarea name="config" rows="8" spellcheck="false" { (f.config) } }
                button type="submit" { "Save" }
            }
        }
    }
}

pub fn agent(session: &Session, p: &AgentPage<'_>) -> Markup {
    let a = p.agent;
    let admin = session.scope == Scope::Admin;
    let current = AgentEdit::of(a);
    layout(
        &format!("Agent {}", a.name),
        Some(session),
        html! {
            h1 { "Agent " (a.name) " " span.muted { (runtime(a)) } }
            @if let Some(e) = p.error { p.error role="alert" { (e) } }
            @if admin {
                div.actions {
                    form.inline method="post" action=(format!("/agents/{}/run", a.name)) {
                        input type="hidden" name="csrf" value=(session.csrf);
                        label { "Input (JSON)" input type="text" name="input" placeholder="{}"; }
                        button type="submit" { "Run now" }
                    }
                    @if a.active && p.quarantine.is_none() {
                        (button(session, &format!("/agents/{}/pause", a.name), "Pause", ""))
                    } @else {
                        (button(session, &format!("/agents/{}/resume", a.name), "Resume", ""))
                    }
                }
                (edit_form(session, a, p.edit.unwrap_or(&current)))
            }
            section id="agent-fields" data-live {
                dl.fields {
                    dt { "State" } dd id="agent-state" { (agent_state(a, p.quarantine)) }
                    dt { "Schedule" } dd { (schedule(a)) }
                    dt { "Next run" } dd { (time(a.next_fire())) }
                    dt { (format!("Success (last {RECENT_RUNS})")) } dd { (p.stats.map_or("-".to_string(), rate)) }
                    dt { "Limits" } dd { (a.settings.timeout) " s, " (a.settings.memory_mb) " MB, " (a.settings.cpu_percent) " % CPU, " (a.settings.max_retries) " retries" }
                    dt { "Isolation" } dd { "network " (format!("{:?}", a.settings.network).to_lowercase()) ", overlap " (format!("{:?}", a.settings.overlap).to_lowercase()) }
                }
                h2 { "Runs" }
                @if p.runs.is_empty() { p.muted { "No runs yet." } } @else {
                    div.scroll { table {
                        thead { tr { th { "Task" } th { "Status" } th { "Started" } th { "Took" } th { "Error" } } }
                        tbody {
                            @for t in p.runs {
                                tr {
                                    td { a href=(format!("/tasks/{}", t.id)) { (t.id) } }
                                    td { (badge(t.status)) }
                                    td { (time(t.started_at)) }
                                    td { (duration(t.started_at.zip(t.completed_at).map(|(s, e)| (e - s).num_milliseconds() as f64 / 1000.0))) }
                                    td.wrap { (t.error.as_deref().map(last_line).unwrap_or_default()) }
                                }
                            }
                        }
                    } }
                    p { a href=(format!("/tasks?agent={}", a.name)) { "Every run →" } }
                }
                h2 { "Handoffs" }
                @if p.handoffs.is_empty() { p.muted { "No state handed on yet (a run hands its state on when it completes)." } } @else {
                    ol.handoffs id="handoffs" {
                        @for (i, h) in p.handoffs.iter().enumerate() {
                            li {
                                strong { "run #" (h.run_number) } " " span.muted { (time(Some(h.created_at))) }
                                @if let Some(s) = &h.summary { " — " (s) }
                                @if h.compressed { " " span.muted { "(compressed to fit)" } }
                                @if let Some(before) = p.handoffs.get(i + 1) {
                                    @let (changes, more) = view::diff(&before.state, &h.state, 30);
                                    (view::diff_list(&changes, more))
                                } @else {
                                    p.muted { "The first state kept." }
                                }
                                details { summary { "Whole state" } pre { (pretty(&h.state)) } }
                            }
                        }
                    }
                }
            }
            h2 { "Config" }
            pre id="config" { (pretty(&p.config)) }
            h2 { "Settings" }
            pre id="settings" { (pretty(&p.settings)) }
            @if let crate::executor::Runtime::Python { code } = &a.runtime {
                h2 { "Code" }
                pre.code id="code" { code { (view::python(code)) } }
            }
        },
    )
}

pub fn fleet(
    session: &Session,
    replicas: &[ReplicaRow],
    queues: &[crate::fleet::serving::QueueView],
    samples: &[crate::fleet::health::Sample],
    quarantines: &[Quarantine],
    events: &[crate::fleet::health::EventLine],
    now: DateTime<Utc>,
) -> Markup {
    let admin = session.scope == Scope::Admin;
    layout(
        "Fleet",
        Some(session),
        html! {
            h1 { "Fleet" }
            section id="fleet-replicas" data-live {
                @if replicas.is_empty() { p.muted { "No live replica." } } @else {
                    div.scroll { table {
                        thead { tr { th { "Replica" } th { "Host" } th { "State" } th { "Running / capacity" } th { "Heartbeat" } th { "Leader" } th { "CPU" } th { "Memory" } th { "Isolation" } th {} } }
                        tbody {
                            @for r in replicas {
                                tr {
                                    td { (r.id) }
                                    td { (r.hostname) " " span.muted { "pid " (r.pid) } }
                                    td { (r.governor_state.as_str()) }
                                    td { (r.running) " / " (r.capacity) }
                                    td { (format!("{:.1} s ago", r.heartbeat_age_s)) }
                                    td { @if r.is_leader { "since " (time(r.leader_since)) } @else { "-" } }
                                    td { (r.cpu_percent.map_or("-".to_string(), |v| format!("{v:.0}%"))) }
                                    td { (r.memory_percent.map_or("-".to_string(), |v| format!("{v:.0}%"))) }
                                    td.wrap { (r.isolation.as_deref().unwrap_or("-")) }
                                    td {
                                        @if admin && matches!(r.governor_state, crate::fleet::GovernorState::Holding | crate::fleet::GovernorState::Paused) {
                                            (button(session, &format!("/fleet/{}/resume", r.id), "Resume", ""))
                                        }
                                    }
                                }
                            }
                        }
                    } }
                }
                @if !replicas.is_empty() {
                    h2 { "CPU and memory, last hour" }
                    div.charts {
                        @for r in replicas {
                            @let mine: Vec<_> = samples.iter().filter(|x| x.replica_id == r.id).collect();
                            @let x = |at: DateTime<Utc>| 1.0 - (now - at).num_seconds() as f64 / 3600.0;
                            (view::percent_lines(&format!("chart-{}", r.id), &r.id, &[
                                ("CPU", "info", mine.iter().map(|m| (x(m.recorded_at), m.cpu_percent as f64)).collect()),
                                ("memory", "warn", mine.iter().map(|m| (x(m.recorded_at), m.memory_percent as f64)).collect()),
                            ]))
                        }
                    }
                }
                @if !quarantines.is_empty() {
                    (quarantine_list(quarantines))
                    @if admin { (button(session, "/fleet/lift-quarantines", "Lift every quarantine", "")) }
                }
                h2 { "Queues" }
                div #fleet-queues .scroll { table {
                    thead { tr { th { "Queue" } th { "State" } th { "Runnable" } th { "Delayed" } th { "Running" } th { "Served by" } th {} } }
                    tbody {
                        @for v in queues {
                            @let q = &v.queue;
                            tr {
                                td { (q.name) }
                                td.wrap { @if q.paused { "paused" @if !q.reason.is_empty() { ": " (q.reason) } } @else { "running" } }
                                td { (q.runnable) }
                                td { (q.delayed) }
                                td { (q.running) }
                                td.wrap { @if v.served_by.is_empty() { span.muted { "no live replica" } } @else {
                                    (v.served_by.iter().map(|(r, n)| format!("{r} ({n})")).collect::<Vec<_>>().join(", "))
                                } }
                                td {
                                    @if admin {
                                        @if q.paused {
                                            (button(session, &format!("/fleet/queues/{}/resume", q.name), "Resume", ""))
                                        } @else {
                                            (button(session, &format!("/fleet/queues/{}/pause", q.name), "Pause", ""))
                                        }
                                    }
                                }
                            }
                        }
                    }
                } }
                h2 { "Governance events" }
                @if events.is_empty() { p.muted { "None yet." } } @else {
                    div.scroll { table {
                        thead { tr { th { "At" } th { "Replica" } th { "Event" } th { "From → to" } th { "Why" } } }
                        tbody {
                            @for (at, replica, event, from, to, reason) in events {
                                tr {
                                    td { (time(Some(*at))) }
                                    td { (replica) }
                                    td { (event) }
                                    td { (from.as_deref().unwrap_or("")) @if to.is_some() { " → " (to.as_deref().unwrap_or("")) } }
                                    td.wrap { (reason) }
                                }
                            }
                        }
                    } }
                }
            }
        },
    )
}

pub fn not_found(session: &Session, what: &str) -> Markup {
    layout(
        "Not found",
        Some(session),
        html! { h1 { "Not found" } p { (what) } p { a href="/" { "Overview" } } },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_at_its_cap_says_so() {
        assert_eq!(capped(0), "0");
        assert_eq!(capped(COUNT_CAP - 1), "99,999");
        assert_eq!(capped(COUNT_CAP), "100,000+");
    }

    #[test]
    fn chart_slots_are_the_minutes_of_the_last_hour_oldest_first() {
        let now = DateTime::parse_from_rfc3339("2026-12-01T10:30:20Z")
            .unwrap()
            .with_timezone(&Utc);
        let minute = |m: &str, completed: i64| crate::fleet::health::Minute {
            at: DateTime::parse_from_rfc3339(m).unwrap().with_timezone(&Utc),
            completed,
            failed: 0,
            timed: 0,
            pickup_ms_total: 0.0,
        };
        let minutes = [
            minute("2026-12-01T09:30:00Z", 1), // an hour ago: not shown
            minute("2026-12-01T09:31:00Z", 2),
            minute("2026-12-01T10:30:00Z", 3),
        ];
        let bars = minute_bars(now, &minutes, |m| Some(m.completed as f64), "done");
        let slots: Vec<(usize, f64)> = bars.iter().map(|b| (b.slot, b.value)).collect();
        assert_eq!(slots, vec![(0, 2.0), (59, 3.0)]);
        assert_eq!(bars[1].label, "10:30 UTC: 3 done");
        // A minute without timed pick-ups has no pick-up bar.
        assert!(minute_bars(now, &minutes, |m| m.pickup_ms(), "ms").is_empty());
    }
}
