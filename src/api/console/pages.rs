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
                                (q.agent.clone().map_or_else(|| format!("kind {}", q.kind), |a| format!("agent {a}")))
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

pub fn not_found(session: &Session, what: &str) -> Markup {
    layout(
        "Not found",
        Some(session),
        html! { h1 { "Not found" } p { (what) } p { a href="/" { "Overview" } } },
    )
}
