-- Agent Harness schema, version 4: named queues. Every task is in one queue (`default` unless
-- its enqueue or its agent names another); each replica serves the queues its config lists,
-- with a capacity per queue, and a queue can be paused fleet-wide. Only additions: a replica of
-- version 3 keeps working against this schema during a rolling upgrade (it claims from every
-- queue, through tasks_claim_idx, until it is replaced).

-- A constant default: PostgreSQL 11 and later add the column without rewriting the table.
ALTER TABLE tasks ADD COLUMN queue text NOT NULL DEFAULT 'default';

-- The claim of a replica serving queues q1..qn walks, for each queue it has room for, this
-- index from (queue, highest priority) on, and no row of a queue it does not serve. Also
-- the backlog of a queue (`harness queues`, the KEDA scaler's query, the runnable gauge).
-- Built in the migration's transaction: writes to `tasks` wait while it is built. Not
-- CONCURRENTLY: that waits for every open transaction, among them the other migrators'
-- waits for sqlx's migration lock, which this migrator holds (a deadlock; tests/foundation.rs
-- runs four migrators at once).
CREATE INDEX tasks_queue_claim_idx ON tasks (queue, priority DESC, scheduled_at, id)
    WHERE status IN ('pending', 'retry_scheduled');

-- Running tasks per queue are counted through tasks_status_idx (a few per slot of the fleet):
-- an index of its own would cost an insertion on every claim.

-- Fleet-wide state of a queue: a row exists once a queue was paused or resumed (a queue with
-- no row is running). Read by every claim (`NOT EXISTS ... paused`), by primary key.
CREATE TABLE queues (
    name        text        PRIMARY KEY,
    paused      boolean     NOT NULL DEFAULT false,
    -- Who paused it and why, as given to `harness queues pause` or the API.
    reason      text        NOT NULL DEFAULT '',
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- The queues a replica serves, with its capacity for each: {"default": 8, "heavy": 1}.
ALTER TABLE replicas ADD COLUMN queues jsonb NOT NULL DEFAULT '{}'::jsonb;

-- Fleet-wide limits. A limit applies to the tasks of a queue, of a kind, of an agent (target:
-- its id), or with a concurrency key (target: the key, or '*' for each key on its own): at
-- most `concurrency` of them running at once, and at most `rate` starts per `per_ms`
-- milliseconds, smoothed by a token bucket (in limit_buckets) that holds at most 100 ms of
-- starts (at least one). Enforced in the claim transaction: a claim of limited tasks locks
-- every limit row first, so claims of limited work take turns across the fleet.
CREATE TABLE limits (
    scope        text        NOT NULL CHECK (scope IN ('queue', 'kind', 'agent', 'key')),
    target       text        NOT NULL,
    concurrency  integer     CHECK (concurrency > 0),
    rate         integer     CHECK (rate > 0),
    per_ms       bigint      CHECK (per_ms > 0),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, target),
    CHECK (concurrency IS NOT NULL OR rate IS NOT NULL),
    CHECK ((rate IS NULL) = (per_ms IS NULL))
);

-- The token bucket of a limit with a rate (per key value for a '*' key limit): `tokens` as
-- of `at`. Written only by claims that hold the limit rows' locks.
CREATE TABLE limit_buckets (
    scope   text             NOT NULL,
    target  text             NOT NULL,
    key     text             NOT NULL DEFAULT '',
    tokens  double precision NOT NULL,
    at      timestamptz      NOT NULL,
    PRIMARY KEY (scope, target, key),
    FOREIGN KEY (scope, target) REFERENCES limits (scope, target) ON DELETE CASCADE
);

-- Bumped by every change of `limits`: a replica caches the limits and each claim checks the
-- version it was made for in the same statement, so a new limit binds from its commit on.
CREATE TABLE limits_version (
    one      boolean PRIMARY KEY DEFAULT true CHECK (one),
    version  bigint  NOT NULL
);
INSERT INTO limits_version VALUES (true, 0);

-- The key a concurrency or rate limit of scope 'key' counts a task under (e.g. a customer).
ALTER TABLE tasks ADD COLUMN concurrency_key text;
