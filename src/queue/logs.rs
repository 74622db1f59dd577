//! The output of task runs (`task_logs`): written in chunks while a run goes on by a
//! [`LogWriter`], read by any replica (`GET /api/tasks/{id}/logs`, `harness logs`), deleted
//! with its task (pruning, `tasks rm`).
//!
//! What is stored of each stream of an attempt: its head (the first half of
//! `executor.output_limit_kb`) whole, and a tail of at most the other half — as newer bytes
//! arrive the oldest tail bytes go (whole chunks, then the front of the next), counted in the
//! `skipped` count of the chunk where the stream resumes. A run that prints 1 GB stores the
//! limit.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::{Error, Queue, TaskId};
use crate::executor::output::{Chunk, Progress, RunOutput, Stream};

/// How often a running attempt's new output is written: a follower sees a line at most this
/// long (plus its own poll) after it was printed.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(250);

/// A task's stored output, as `GET /api/tasks/{id}/logs` answers.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct TaskLogs {
    pub task_id: TaskId,
    pub status: super::Status,
    /// The task's latest attempt.
    pub attempt: i32,
    pub progress: Option<TaskProgress>,
    /// In order: attempt, then seq.
    pub chunks: Vec<LogChunk>,
    /// More chunks follow: ask again with `after` set to this (`attempt:seq`).
    pub next: Option<String>,
}

/// One stored chunk of an attempt's output, as readers see it.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct LogChunk {
    pub attempt: i32,
    /// Orders the chunks of one attempt, across its streams.
    pub seq: i32,
    pub stream: Stream,
    /// Bytes of this stream dropped just before this chunk (between its head and its tail).
    pub skipped: i64,
    pub at: DateTime<Utc>,
    /// The chunk's bytes as text (invalid UTF-8 shows as U+FFFD).
    pub text: String,
}

type LogRow = (i32, i32, String, i64, DateTime<Utc>, Vec<u8>);

fn chunk_of(r: LogRow) -> Option<LogChunk> {
    Some(LogChunk {
        attempt: r.0,
        seq: r.1,
        stream: Stream::parse(&r.2)?,
        skipped: r.3,
        at: r.4,
        text: String::from_utf8_lossy(&r.5).into_owned(),
    })
}

/// The latest progress a run reported.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct TaskProgress {
    pub attempt: i32,
    #[serde(flatten)]
    pub progress: Progress,
    pub at: DateTime<Utc>,
}

impl Queue {
    /// A task with its latest progress (what a single task's readers see).
    pub async fn get_with_progress(&self, id: TaskId) -> Result<super::Task, Error> {
        let mut task = self.get(id).await?;
        task.progress = self.progress(id).await?;
        Ok(task)
    }

    /// A task's stored output after `(attempt, seq)` (all of it for `None`), in order, at most
    /// `limit` chunks. Walks the primary key of task_logs.
    pub async fn logs(
        &self,
        id: TaskId,
        after: Option<(i32, i32)>,
        limit: i64,
    ) -> Result<Vec<LogChunk>, Error> {
        let (attempt, seq) = after.unwrap_or((i32::MIN, i32::MIN));
        let rows: Vec<LogRow> = sqlx::query_as(
            "SELECT attempt, seq, stream, skipped, at, data FROM task_logs \
             WHERE task_id = $1 AND (attempt, seq) > ($2, $3) \
             ORDER BY attempt, seq LIMIT $4",
        )
        .bind(id)
        .bind(attempt)
        .bind(seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().filter_map(chunk_of).collect())
    }

    /// The latest progress report of a task's newest attempt that made one.
    pub async fn progress(&self, id: TaskId) -> Result<Option<TaskProgress>, Error> {
        let row: Option<(i32, Vec<u8>, DateTime<Utc>)> = sqlx::query_as(
            "SELECT attempt, data, at FROM task_logs \
             WHERE task_id = $1 AND stream = 'progress' \
             ORDER BY attempt DESC, seq DESC LIMIT 1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.and_then(|(attempt, data, at)| {
            let progress = serde_json::from_slice(&data).ok()?;
            Some(TaskProgress {
                attempt,
                progress,
                at,
            })
        }))
    }
}

/// Gives the latest attempt of each of `ids` an output as a run leaves it: two stdout chunks,
/// a progress report between them and, last, its error (or a warning) on stderr. Tasks never
/// started get none. For `harness bench --console`'s synthetic history (see
/// [`super::seed_history`]); returns how many chunks were written.
pub(super) async fn seed_output(pool: &PgPool, ids: &[TaskId]) -> Result<u64, Error> {
    Ok(sqlx::query(
        r#"INSERT INTO task_logs (task_id, attempt, seq, stream, at, data)
           SELECT t.id, t.attempt, c.seq, c.stream,
                  t.started_at + make_interval(secs => c.seq / 10.0), convert_to(c.text, 'UTF8')
           FROM tasks t CROSS JOIN LATERAL (VALUES
               (1, 'stdout', 'starting task ' || t.id || E'\nfetched 50 items\n'),
               (2, 'progress', '{"fraction":0.5,"message":"halfway"}'),
               (3, 'stdout', E'processed 50 items\n'),
               (4, 'stderr', COALESCE(t.error, 'warning: slow upstream') || E'\n'))
               AS c(seq, stream, text)
           WHERE t.id = ANY($1) AND t.attempt > 0
           ON CONFLICT DO NOTHING"#,
    )
    .bind(ids)
    .execute(pool)
    .await?
    .rows_affected())
}

/// How often a follower looks for new output and for the task's end.
pub const FOLLOW_POLL: Duration = Duration::from_millis(250);

/// What a follower sees next.
#[derive(Debug)]
pub enum FollowStep {
    /// New output (or progress), in order.
    Chunks(Vec<LogChunk>),
    /// The task ended; all of its output was seen before this.
    End(Box<super::Task>),
}

/// Follows a task's output as it is stored, on whichever replica the task runs, across its
/// attempts, until the task ends (`completed`, `failed`, `timeout`, `cancelled`).
pub struct Follower {
    queue: Queue,
    id: TaskId,
    after: Option<(i32, i32)>,
    ending: Option<super::Task>,
}

impl Follower {
    /// From the start of the task's output, or after the chunk `after` (attempt, seq).
    pub fn new(queue: Queue, id: TaskId, after: Option<(i32, i32)>) -> Follower {
        Follower {
            queue,
            id,
            after,
            ending: None,
        }
    }

    /// Waits for new output or the end. A run's writer stores all of its output before the
    /// attempt is completed, so output read after the task is seen ended is all there is.
    pub async fn next(&mut self) -> Result<FollowStep, Error> {
        loop {
            let chunks = self.queue.logs(self.id, self.after, 500).await?;
            if let Some(last) = chunks.last() {
                self.after = Some((last.attempt, last.seq));
                return Ok(FollowStep::Chunks(chunks));
            }
            if let Some(task) = self.ending.take() {
                return Ok(FollowStep::End(Box::new(task)));
            }
            // The status alone each look; the whole row once, at the end.
            if self.queue.status(self.id).await?.is_final() {
                let task = self.queue.get(self.id).await?;
                // One more look: chunks stored just before the end.
                self.ending = Some(task);
                continue;
            }
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    }
}

/// Writes an attempt's output to task_logs every [`FLUSH_INTERVAL`] while it runs, and what
/// is left when it ends ([`LogWriter::finish`], or when dropped: a cancelled run keeps its
/// output too).
pub struct LogWriter {
    stop: CancellationToken,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl LogWriter {
    /// `limit`: the bytes kept of each stream, as the executor's `output_limit`.
    pub fn spawn(
        pool: PgPool,
        task_id: TaskId,
        attempt: i32,
        output: Arc<RunOutput>,
        limit: usize,
    ) -> LogWriter {
        let stop = CancellationToken::new();
        let mut store = Store {
            pool,
            task_id,
            attempt,
            next_seq: None,
            trim: Trim::new(limit),
        };
        let stopped = stop.clone();
        let done = tokio::spawn(async move {
            loop {
                let last = tokio::select! {
                    _ = tokio::time::sleep(FLUSH_INTERVAL) => false,
                    _ = stopped.cancelled() => true,
                };
                let chunks = output.take();
                if !chunks.is_empty()
                    && let Err(e) = store.write(chunks).await
                {
                    tracing::warn!(task.id = task_id, error = %e, "could not store a run's output");
                }
                if last {
                    return;
                }
            }
        });
        LogWriter {
            stop,
            done: Some(done),
        }
    }

    /// Writes what is left and waits until it is stored (so a follower that sees the task
    /// end has seen all of its output).
    pub async fn finish(mut self) {
        self.stop.cancel();
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Store {
    pool: PgPool,
    task_id: TaskId,
    attempt: i32,
    /// Read from the table at the first write: an attempt handed back at a shutdown and run
    /// again has the same number, and its earlier chunks stay.
    next_seq: Option<i32>,
    trim: Trim,
}

impl Store {
    async fn write(&mut self, chunks: Vec<Chunk>) -> Result<(), sqlx::Error> {
        let mut seq = match self.next_seq {
            Some(s) => s,
            None => {
                sqlx::query_scalar::<_, i32>(
                    "SELECT COALESCE(max(seq) + 1, 0) FROM task_logs \
                     WHERE task_id = $1 AND attempt = $2",
                )
                .bind(self.task_id)
                .bind(self.attempt)
                .fetch_one(&self.pool)
                .await?
            }
        };
        let mut seqs = Vec::with_capacity(chunks.len());
        let mut streams = Vec::with_capacity(chunks.len());
        let mut skipped = Vec::with_capacity(chunks.len());
        let mut data = Vec::with_capacity(chunks.len());
        for c in &chunks {
            seqs.push(seq);
            streams.push(c.stream.as_str());
            skipped.push(c.skipped as i64);
            data.push(c.data.as_slice());
            seq += 1;
        }
        let inserted = sqlx::query(
            "INSERT INTO task_logs (task_id, attempt, seq, stream, skipped, data) \
             SELECT $1, $2, u.seq, u.stream, u.skipped, u.data \
             FROM unnest($3::int[], $4::text[], $5::bigint[], $6::bytea[]) \
                 AS u(seq, stream, skipped, data)",
        )
        .bind(self.task_id)
        .bind(self.attempt)
        .bind(&seqs)
        .bind(&streams)
        .bind(&skipped)
        .bind(&data)
        .execute(&self.pool)
        .await;
        if let Err(e) = inserted {
            // Read the next number again: another writer of this attempt (one handed back at
            // a shutdown) may have taken these.
            self.next_seq = None;
            return Err(e);
        }
        self.next_seq = Some(seq);
        // Only the latest progress report is kept.
        if let Some(newest) = chunks
            .iter()
            .zip(&seqs)
            .rev()
            .find(|(c, _)| c.stream == Stream::Progress)
            .map(|(_, s)| *s)
        {
            sqlx::query(
                "DELETE FROM task_logs WHERE task_id = $1 AND attempt = $2 \
                 AND stream = 'progress' AND seq < $3",
            )
            .bind(self.task_id)
            .bind(self.attempt)
            .bind(newest)
            .execute(&self.pool)
            .await?;
        }
        for (c, s) in chunks.iter().zip(&seqs) {
            if let Some(cut) = self.trim.stored(*s, c) {
                sqlx::query(
                    "WITH gone AS (DELETE FROM task_logs \
                         WHERE task_id = $1 AND attempt = $2 AND seq = ANY($3)) \
                     UPDATE task_logs SET skipped = skipped + $5, \
                         data = substring(data FROM $6::int + 1) \
                     WHERE task_id = $1 AND attempt = $2 AND seq = $4",
                )
                .bind(self.task_id)
                .bind(self.attempt)
                .bind(&cut.delete)
                .bind(cut.next)
                .bind(cut.bytes as i64)
                .bind(cut.trim as i32)
                .execute(&self.pool)
                .await?;
            }
        }
        Ok(())
    }
}

/// Which stored tail chunks to delete so that each stream's stored tail stays within its
/// half of the limit (plus its newest chunk). Pure: fed what was stored, in order.
#[derive(Debug)]
struct Trim {
    head_limit: usize,
    tail_limit: u64,
    /// Per stream (stdout, stderr): data bytes stored so far that count as head.
    head: [usize; 2],
    /// Per stream: stored tail chunks (seq, data bytes, skipped count), oldest first.
    tail: [VecDeque<(i32, u64, u64)>; 2],
    tail_bytes: [u64; 2],
}

/// Delete `delete`; cut the first `trim` bytes of chunk `next` and add `bytes` (what was
/// deleted before it, its own skipped counts, and `trim`) to its skipped count.
#[derive(Debug, PartialEq, Eq)]
struct Cut {
    delete: Vec<i32>,
    next: i32,
    trim: u64,
    bytes: u64,
}

impl Trim {
    fn new(limit: usize) -> Trim {
        Trim {
            head_limit: limit / 2,
            tail_limit: (limit - limit / 2) as u64,
            head: [0, 0],
            tail: [VecDeque::new(), VecDeque::new()],
            tail_bytes: [0, 0],
        }
    }

    /// Records chunk `seq` as stored; returns what the stored tail must lose to stay within
    /// its bound (whole chunks from the oldest, then the front of the next), if anything.
    fn stored(&mut self, seq: i32, c: &Chunk) -> Option<Cut> {
        let i = match c.stream {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
            Stream::Progress => return None,
        };
        // The executor hands out a stream's first head_limit bytes before any skip.
        if self.tail[i].is_empty()
            && c.skipped == 0
            && self.head[i] + c.data.len() <= self.head_limit
        {
            self.head[i] += c.data.len();
            return None;
        }
        let len = c.data.len() as u64;
        self.tail[i].push_back((seq, len, c.skipped));
        self.tail_bytes[i] += len;
        let mut over = self.tail_bytes[i].saturating_sub(self.tail_limit);
        if over == 0 {
            return None;
        }
        self.tail_bytes[i] -= over;
        let mut delete = Vec::new();
        let mut bytes = 0;
        while self.tail[i].len() > 1 && self.tail[i].front().is_some_and(|f| f.1 <= over) {
            let (s, len, skipped) = self.tail[i].pop_front().expect("more than one");
            delete.push(s);
            bytes += len + skipped;
            over -= len;
        }
        let next = self.tail[i].front_mut().expect("one stays");
        // The newest chunk is never over the bound by itself (the executor bounds what
        // waits of a tail), so `over` fits in it.
        let trim = over.min(next.1);
        next.1 -= trim;
        next.2 += bytes + trim;
        Some(Cut {
            delete,
            next: next.0,
            trim,
            bytes: bytes + trim,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(stream: Stream, skipped: u64, len: usize) -> Chunk {
        Chunk {
            stream,
            skipped,
            data: vec![b'x'; len],
        }
    }

    #[test]
    fn the_head_stays_and_the_tail_keeps_its_newest_bytes_with_the_rest_counted() {
        // limit 10: head 5, tail 5 per stream.
        let mut t = Trim::new(10);
        assert_eq!(t.stored(0, &chunk(Stream::Stdout, 0, 5)), None, "head");
        assert_eq!(
            t.stored(1, &chunk(Stream::Stderr, 0, 3)),
            None,
            "stderr's own head"
        );
        assert_eq!(
            t.stored(2, &chunk(Stream::Stdout, 7, 4)),
            None,
            "tail within bound"
        );
        assert_eq!(t.stored(3, &chunk(Stream::Progress, 0, 30)), None);
        // 4 + 3 > 5: chunk 2 loses its first 2 bytes (counted on it).
        assert_eq!(
            t.stored(4, &chunk(Stream::Stdout, 0, 3)),
            Some(Cut {
                delete: vec![],
                next: 2,
                trim: 2,
                bytes: 2
            })
        );
        // 2 + 3 + 5 > 5: chunks 2 and 4 go whole, their bytes and skipped counts carried
        // onto chunk 5, which is the whole tail now.
        assert_eq!(
            t.stored(5, &chunk(Stream::Stdout, 1, 5)),
            Some(Cut {
                delete: vec![2, 4],
                next: 5,
                trim: 0,
                bytes: (2 + 7 + 2) + 3
            })
        );
        assert_eq!(
            t.stored(6, &chunk(Stream::Stderr, 0, 2)),
            None,
            "stderr head"
        );
        assert_eq!(t.tail_bytes, [5, 0]);
    }
}
