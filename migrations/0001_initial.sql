-- Agent Harness schema, version 1.
-- PostgreSQL is the only shared state between replicas; every table here is read and written
-- by several processes at once, so each hot query has an index that matches it (named below).

-- Registered agents: Python code or a command, with their schedule and limits in `config`.
CREATE TABLE agents (
    id            bigserial PRIMARY KEY,
    name          text        NOT NULL UNIQUE,
    runtime       text        NOT NULL CHECK (runtime IN ('python', 'command')),
    code          text,
    command       text[],
    config        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    active        boolean     NOT NULL DEFAULT true,
    -- The scheduler's bookkeeping: the last cron tick it enqueued for this agent.
    last_fire_at  timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CHECK ((runtime = 'python' AND code IS NOT NULL) OR (runtime = 'command' AND command IS NOT NULL))
);

-- Every run of an agent or of a registered job kind.
CREATE TABLE tasks (
    id               bigserial   PRIMARY KEY,
    kind             text        NOT NULL,
    agent_id         bigint      REFERENCES agents (id) ON DELETE SET NULL,
    status           text        NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'running', 'completed', 'failed', 'timeout',
                                       'retry_scheduled', 'cancelled')),
    payload          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    result           jsonb,
    error            text,
    priority         integer     NOT NULL DEFAULT 0,
    -- Attempts started so far (claims); the completion of an attempt is fenced by it.
    attempt          integer     NOT NULL DEFAULT 0,
    -- Retries scheduled so far (the predecessor's column).
    retry_count      integer     NOT NULL DEFAULT 0,
    max_retries      integer     NOT NULL DEFAULT 3 CHECK (max_retries >= 0),
    -- Per-task timeout; NULL means the kind's default.
    timeout_ms       bigint      CHECK (timeout_ms IS NULL OR timeout_ms > 0),
    idempotency_key  text,
    -- The cron tick this run was enqueued for (scheduler only).
    fire_at          timestamptz,
    -- When the task may be claimed: creation time, its delay, or its next retry.
    scheduled_at     timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    completed_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- The replica holding the task while it is running.
    locked_by        text,
    -- One entry per finished attempt: {attempt, status, error, replica, started_at, ended_at}.
    attempts         jsonb       NOT NULL DEFAULT '[]'::jsonb,
    -- A running task whose owner should abort it (see queue::cancel).
    cancel_requested boolean     NOT NULL DEFAULT false,
    -- W3C trace context of the span that enqueued the task.
    traceparent      text,
    -- Only a running task has an owner: the completion fence (owner + attempt) relies on it.
    CONSTRAINT tasks_owner_iff_running CHECK ((status = 'running') = (locked_by IS NOT NULL))
);

-- Index design. `status` changes on every transition, so no update of a task is HOT and every
-- index whose predicate matches the new row version gets a new entry. Full indexes on status,
-- agent_id and scheduled_at (the predecessor's) cost 14 index insertions per task lifecycle;
-- the partial indexes below serve the same lookups for the rows they are used for and cost 5
-- (enqueue: pkey + claim; claim: pkey + status; completion: pkey only).
-- And only tasks_claim_idx can serve the claim: with any other index matching its predicate,
-- a table without statistics yet (just bulk-loaded) gets a plan that sorts the whole backlog
-- on every claim. Measured with `harness bench`.

-- The claim: WHERE status IN ('pending','retry_scheduled') AND scheduled_at <= now()
-- ORDER BY priority DESC, scheduled_at, id. Also every lookup of waiting work.
CREATE INDEX tasks_claim_idx ON tasks (priority DESC, scheduled_at, id)
    WHERE status IN ('pending', 'retry_scheduled');

-- An agent's run history, newest first (plain job kinds have no agent).
CREATE INDEX tasks_agent_id_idx ON tasks (agent_id, id DESC) WHERE agent_id IS NOT NULL;

-- Tasks by status (and owner) once they have left the queue, but for completed ones:
-- running work per replica (rescue of a dead replica's tasks, cancel requests), failures and
-- cancellations. Waiting work is in tasks_claim_idx.
CREATE INDEX tasks_status_idx ON tasks (status, locked_by)
    WHERE status NOT IN ('pending', 'completed');

-- An idempotency key names one task for ever (until the task is pruned).
CREATE UNIQUE INDEX tasks_idempotency_key_idx ON tasks (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- One run per agent and cron tick, even with two leaders (ON CONFLICT DO NOTHING).
CREATE UNIQUE INDEX tasks_fire_key_idx ON tasks (agent_id, fire_at) WHERE fire_at IS NOT NULL;

-- State handed from one agent run to the next; the newest row per agent is current and the
-- unique run number fences two racing runs (only one can write run N+1).
CREATE TABLE handoffs (
    id          bigserial   PRIMARY KEY,
    agent_id    bigint      NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    run_number  bigint      NOT NULL CHECK (run_number > 0),
    state       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    summary     text,
    metadata    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    compressed  boolean     NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (agent_id, run_number)
);

-- One row per live replica, heartbeated by the replica itself (not per task).
CREATE TABLE replicas (
    id              text        PRIMARY KEY,
    hostname        text        NOT NULL,
    pid             integer     NOT NULL,
    version         text        NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT now(),
    heartbeat_at    timestamptz NOT NULL DEFAULT now(),
    is_leader       boolean     NOT NULL DEFAULT false,
    leader_since    timestamptz,
    governor_state  text        NOT NULL DEFAULT 'normal',
    capacity        integer     NOT NULL DEFAULT 0,
    running         integer     NOT NULL DEFAULT 0,
    isolation       text,
    -- A person's `fleet resume` for a replica that holds after an escalation.
    resume_requested_at timestamptz
);

CREATE INDEX replicas_heartbeat_idx ON replicas (heartbeat_at);

-- Periodic health samples, one row per replica and log interval.
CREATE TABLE metrics (
    id                   bigserial   PRIMARY KEY,
    replica_id           text        NOT NULL,
    recorded_at          timestamptz NOT NULL DEFAULT now(),
    cpu_percent          real        NOT NULL,
    memory_percent       real        NOT NULL,
    memory_available_mb  bigint      NOT NULL,
    capacity             integer     NOT NULL,
    running              integer     NOT NULL,
    completed            bigint      NOT NULL DEFAULT 0,
    failed               bigint      NOT NULL DEFAULT 0,
    state                text        NOT NULL
);

CREATE INDEX metrics_replica_recorded_idx ON metrics (replica_id, recorded_at DESC);
CREATE INDEX metrics_recorded_idx ON metrics (recorded_at);

-- Governor state changes and escalations.
CREATE TABLE governance_events (
    id          bigserial   PRIMARY KEY,
    replica_id  text        NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    event       text        NOT NULL,
    from_state  text,
    to_state    text,
    reason      text        NOT NULL DEFAULT '',
    detail      jsonb       NOT NULL DEFAULT '{}'::jsonb
);

CREATE INDEX governance_events_at_idx ON governance_events (at);
CREATE INDEX governance_events_replica_idx ON governance_events (replica_id, at DESC);
