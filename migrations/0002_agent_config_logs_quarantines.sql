-- Agent Harness schema, version 2: an agent's own config, the output and progress of runs,
-- and quarantines of agents and kinds. Only additions: a replica of version 1 keeps working
-- against this schema during a rolling upgrade.

-- What `Agent(config)` receives on every run (scheduled, manual, retried). `agents.config`
-- keeps the agent's settings (schedule, limits): a rename would break replicas of version 1.
ALTER TABLE agents ADD COLUMN agent_config jsonb NOT NULL DEFAULT '{}'::jsonb
    CHECK (jsonb_typeof(agent_config) = 'object');

-- The output of runs, in chunks written while a run goes on (any replica's API serves them,
-- `harness logs --follow` reads them), and the progress a run reports. `seq` orders the
-- chunks of one attempt across streams. A chunk whose `skipped` is not zero follows bytes
-- of its stream that were dropped (a run's output is kept as a head and a tail).
-- No foreign key to tasks: it would add a trigger check to every update of the hot tasks
-- table; the code that deletes tasks (pruning, `tasks rm`) deletes their chunks with them.
CREATE TABLE task_logs (
    task_id  bigint      NOT NULL,
    attempt  integer     NOT NULL,
    seq      integer     NOT NULL,
    stream   text        NOT NULL CHECK (stream IN ('stdout', 'stderr', 'progress')),
    skipped  bigint      NOT NULL DEFAULT 0 CHECK (skipped >= 0),
    at       timestamptz NOT NULL DEFAULT now(),
    data     bytea       NOT NULL,
    -- Reading a task's output (or what came after a follower's last chunk), its latest
    -- progress (backwards), and deleting it with the task: all walk this key.
    PRIMARY KEY (task_id, attempt, seq)
);

-- An agent (kind 'agent' with its id) or a kind (agent_id NULL) that failed in a burst of
-- its own: no replica starts its tasks until `until` (or, held, until a person lifts it);
-- other work keeps flowing. Every replica reads the few rows in force at each sample.
CREATE TABLE quarantines (
    id          bigserial   PRIMARY KEY,
    kind        text        NOT NULL,
    agent_id    bigint      REFERENCES agents (id) ON DELETE CASCADE,
    until       timestamptz NOT NULL,
    -- Escalated: in force until a person lifts it, whatever `until` says.
    held        boolean     NOT NULL DEFAULT false,
    reason      text        NOT NULL,
    replica_id  text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- One quarantine per target; a new burst extends it (ON CONFLICT).
CREATE UNIQUE INDEX quarantines_target_idx ON quarantines (kind, COALESCE(agent_id, 0));
