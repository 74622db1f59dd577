-- Agent Harness schema, version 3: how long the attempts that ended in a metrics interval
-- waited to be picked up, so the console can chart pick-up latency over the last hour from the
-- metrics table (metrics_recorded_idx) instead of reading tasks. Only additions: a replica of
-- version 2 keeps working (its rows say 0 attempts timed).

-- Attempts that ended in the interval and were timed, and the sum of their waits
-- (started_at − scheduled_at) in milliseconds: a mean over several replicas is
-- sum(pickup_ms_total) / sum(timed).
ALTER TABLE metrics ADD COLUMN timed bigint NOT NULL DEFAULT 0;
ALTER TABLE metrics ADD COLUMN pickup_ms_total double precision NOT NULL DEFAULT 0;
