//! The console's pages as HTML (maud escapes every value it interpolates). Each takes what
//! its handler read and renders it; no I/O here.

use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};

use crate::config::Scope;
use crate::fleet::ReplicaRow;
use crate::fleet::quarantines::Quarantine;
use crate::queue::{Status, Task};

use super::session::Session;

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
    pub depth: &'a [(Status, i64)],
    pub replicas: &'a [ReplicaRow],
    pub quarantines: &'a [Quarantine],
    pub escalations: &'a [(DateTime<Utc>, String, String)],
}

pub fn overview(session: &Session, o: &Overview<'_>) -> Markup {
    let count = |s: Status| o.depth.iter().find(|(x, _)| *x == s).map_or(0, |(_, n)| *n);
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
                            div.n { (count(s)) }
                            div.l { (s.as_str()) }
                        }
                    }
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
                @if !o.quarantines.is_empty() {
                    h2 { "Quarantined" }
                    ul {
                        @for q in o.quarantines {
                            li {
                                (q.what())
                                " — "
                                @if q.held { "until a person lifts it" } @else { "until " (time(Some(q.until))) }
                                ": " span.muted { (q.reason) }
                            }
                        }
                    }
                }
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

/// The filters of the task list, as given.
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct TaskQuery {
    pub status: Option<String>,
    pub kind: Option<String>,
    pub agent: Option<String>,
    /// Keyset pagination: tasks with a smaller id.
    pub before: Option<i64>,
}

impl TaskQuery {
    /// The query string of this filter with `before`.
    fn with_before(&self, before: i64) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("status", &self.status),
            ("kind", &self.kind),
            ("agent", &self.agent),
        ] {
            if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
                q.append_pair(k, v);
            }
        }
        q.append_pair("before", &before.to_string());
        q.finish()
    }
}

pub const PAGE: i64 = 50;

pub fn tasks(
    session: &Session,
    q: &TaskQuery,
    tasks: &[Task],
    names: &std::collections::HashMap<i64, String>,
    error: Option<&str>,
) -> Markup {
    layout(
        "Tasks",
        Some(session),
        html! {
            h1 { "Tasks" }
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
                button type="submit" { "Filter" }
            }
            @if let Some(e) = error { p.error role="alert" { (e) } }
            section id="task-list" data-live[q.before.is_none()] {
                @if tasks.is_empty() {
                    p.muted { "No tasks match." }
                } @else {
                    div.scroll { table {
                        thead { tr { th { "ID" } th { "Kind" } th { "Agent" } th { "Status" } th { "Attempt" } th { "Created" } th { "Ended" } th { "Error" } } }
                        tbody {
                            @for t in tasks {
                                tr {
                                    td { a href=(format!("/tasks/{}", t.id)) { (t.id) } }
                                    td { (t.kind) }
                                    td { (t.agent_id.map_or("-".to_string(), |a| names.get(&a).cloned().unwrap_or_else(|| format!("#{a}")))) }
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
            div.pager {
                @if q.before.is_some() { a href="/tasks" { "Newest" } }
                @if tasks.len() as i64 == PAGE {
                    @if let Some(last) = tasks.last() {
                        a rel="next" href=(format!("/tasks?{}", q.with_before(last.id))) { "Older →" }
                    }
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
                        thead { tr { th { "#" } th { "Ended" } th { "Replica" } th { "Started" } th { "Ended at" } th { "Why" } } }
                        tbody {
                            @for a in &t.attempts {
                                tr {
                                    td { (a.attempt) }
                                    td { (a.status.as_str()) }
                                    td { (a.replica.as_deref().unwrap_or("?")) }
                                    td { (time(a.started_at)) }
                                    td { (time(Some(a.ended_at))) }
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

/// One agent's line in the list.
pub struct AgentLine<'a> {
    pub agent: &'a crate::agents::Agent,
    pub last_run: Option<(Status, Option<DateTime<Utc>>)>,
    pub quarantine: Option<&'a Quarantine>,
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
                        thead { tr { th { "Name" } th { "State" } th { "Runtime" } th { "Schedule" } th { "Next run" } th { "Last run" } } }
                        tbody {
                            @for l in lines {
                                tr {
                                    td { a href=(format!("/agents/{}", l.agent.name)) { (l.agent.name) } }
                                    td { (agent_state(l.agent, l.quarantine)) }
                                    td.wrap { (runtime(l.agent)) }
                                    td { (l.agent.settings.schedule.as_deref().unwrap_or("-")) @if let Some(tz) = &l.agent.settings.timezone { " " span.muted { (tz) } } }
                                    td { (time(l.agent.next_fire())) }
                                    td {
                                        @if let Some((s, at)) = l.last_run { (badge(s)) " " (time(at)) } @else { "-" }
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
    pub quarantine: Option<&'a Quarantine>,
    pub runs: &'a [Task],
    pub handoffs: &'a [crate::handoff::HandoffArtifact],
    pub error: Option<&'a str>,
}

pub fn agent(session: &Session, p: &AgentPage<'_>) -> Markup {
    let a = p.agent;
    let admin = session.scope == Scope::Admin;
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
            }
            section id="agent-fields" data-live {
                dl.fields {
                    dt { "State" } dd id="agent-state" { (agent_state(a, p.quarantine)) }
                    dt { "Schedule" } dd { (a.settings.schedule.as_deref().unwrap_or("-")) " " (a.settings.timezone.as_deref().unwrap_or("")) }
                    dt { "Next run" } dd { (time(a.next_fire())) }
                    dt { "Timeout" } dd { (a.settings.timeout) " s" }
                    dt { "Memory" } dd { (a.settings.memory_mb) " MB" }
                    dt { "CPU" } dd { (a.settings.cpu_percent) " %" }
                    dt { "Retries" } dd { (a.settings.max_retries) }
                    dt { "Network" } dd { (format!("{:?}", a.settings.network).to_lowercase()) }
                }
                h2 { "Runs" }
                @if p.runs.is_empty() { p.muted { "No runs yet." } } @else {
                    div.scroll { table {
                        thead { tr { th { "Task" } th { "Status" } th { "Started" } th { "Ended" } th { "Error" } } }
                        tbody {
                            @for t in p.runs {
                                tr {
                                    td { a href=(format!("/tasks/{}", t.id)) { (t.id) } }
                                    td { (badge(t.status)) }
                                    td { (time(t.started_at)) }
                                    td { (time(t.completed_at)) }
                                    td.wrap { (t.error.as_deref().map(last_line).unwrap_or_default()) }
                                }
                            }
                        }
                    } }
                }
                h2 { "Handoffs" }
                @if p.handoffs.is_empty() { p.muted { "No state handed on yet (a run hands its state on when it completes)." } } @else {
                    ol.handoffs id="handoffs" {
                        @for h in p.handoffs {
                            li {
                                strong { "run #" (h.run_number) } " " span.muted { (time(Some(h.created_at))) }
                                @if let Some(s) = &h.summary { " — " (s) }
                                @if h.compressed { " " span.muted { "(compressed to fit)" } }
                                pre { (pretty(&h.state)) }
                            }
                        }
                    }
                }
            }
            h2 { "Config" }
            pre id="config" { (pretty(&serde_json::Value::Object(a.config.clone()))) }
            h2 { "Settings" }
            pre id="settings" { (pretty(&p.settings)) }
            @if let crate::executor::Runtime::Python { code } = &a.runtime {
                h2 { "Code" }
                pre id="code" { (code) }
            }
        },
    )
}

pub fn fleet(
    session: &Session,
    replicas: &[ReplicaRow],
    quarantines: &[Quarantine],
    events: &[crate::fleet::health::EventLine],
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
                    @if admin { (button(session, "/fleet/lift-quarantines", "Lift every quarantine", "")) }
                }
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
