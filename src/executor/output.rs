//! A run's output while it runs and after: what is kept of each stream (a head and a tail,
//! with the bytes between counted, never buffered), and the chunks handed to whoever stores
//! them as the run goes on (see `queue::logs`), with the progress the run reports.
//!
//! Pure and in memory: no I/O, no database. Memory per stream is bounded by its limit
//! whatever the run prints (1 GB of output costs the same as 1 MB).

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Which stream a chunk of output came from: stdout, stderr, or progress (a progress report,
/// its data the JSON of a [`Progress`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
    Progress,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
            Stream::Progress => "progress",
        }
    }

    pub fn parse(s: &str) -> Option<Stream> {
        match s {
            "stdout" => Some(Stream::Stdout),
            "stderr" => Some(Stream::Stderr),
            "progress" => Some(Stream::Progress),
            _ => None,
        }
    }
}

/// The marker that stands for the bytes dropped between a stream's head and its tail.
pub fn skipped_marker(bytes: u64) -> String {
    format!("\n[… {bytes} bytes skipped …]\n")
}

/// What is kept of one stream: its first `limit / 2` bytes and its last `limit / 2`.
#[derive(Debug)]
pub struct HeadTail {
    head: Vec<u8>,
    tail: VecDeque<u8>,
    head_limit: usize,
    tail_limit: usize,
    skipped: u64,
}

impl HeadTail {
    pub fn new(limit: usize) -> HeadTail {
        HeadTail {
            head: Vec::new(),
            tail: VecDeque::new(),
            head_limit: limit / 2,
            tail_limit: limit - limit / 2,
            skipped: 0,
        }
    }

    pub fn push(&mut self, mut bytes: &[u8]) {
        let room = self.head_limit - self.head.len();
        let take = room.min(bytes.len());
        self.head.extend_from_slice(&bytes[..take]);
        bytes = &bytes[take..];
        if bytes.len() >= self.tail_limit {
            self.skipped += (self.tail.len() + bytes.len() - self.tail_limit) as u64;
            self.tail.clear();
            self.tail.extend(&bytes[bytes.len() - self.tail_limit..]);
            return;
        }
        let over = (self.tail.len() + bytes.len()).saturating_sub(self.tail_limit);
        self.tail.drain(..over);
        self.skipped += over as u64;
        self.tail.extend(bytes);
    }

    /// The kept text: head, the skipped marker when bytes were dropped, tail. Invalid UTF-8
    /// (and a character cut at either edge) shows as U+FFFD.
    pub fn text(&self) -> String {
        let mut s = String::from_utf8_lossy(&self.head).into_owned();
        if self.skipped > 0 {
            s.push_str(&skipped_marker(self.skipped));
        }
        let (a, b) = self.tail.as_slices();
        s.push_str(&String::from_utf8_lossy(&[a, b].concat()));
        s
    }
}

/// What a run reports of its progress: a fraction done (0 to 1) and/or a message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Progress {
    #[serde(default)]
    pub fraction: Option<f64>,
    #[serde(default)]
    pub message: Option<String>,
}

/// The largest progress report read, and the longest message kept.
pub const MAX_PROGRESS_BYTES: usize = 4096;
const MAX_PROGRESS_MESSAGE: usize = 1000;

impl Progress {
    /// A report as a run writes it (`{"fraction": 0.4, "message": "…"}`), checked: the
    /// fraction within 0 to 1, the message cut to its bound.
    pub fn parse(text: &str) -> Result<Progress, String> {
        let mut p: Progress = serde_json::from_str(text.trim())
            .map_err(|e| format!("a progress report is JSON {{\"fraction\", \"message\"}}: {e}"))?;
        if let Some(f) = p.fraction
            && !(0.0..=1.0).contains(&f)
        {
            return Err(format!("progress fraction {f} is not between 0 and 1"));
        }
        if let Some(m) = &mut p.message
            && m.len() > MAX_PROGRESS_MESSAGE
        {
            let mut cut = MAX_PROGRESS_MESSAGE;
            while !m.is_char_boundary(cut) {
                cut -= 1;
            }
            m.truncate(cut);
        }
        if p.fraction.is_none() && p.message.is_none() {
            return Err("a progress report needs a fraction or a message".into());
        }
        Ok(p)
    }
}

/// A piece of a run's output to store: its stream, the bytes of that stream dropped just
/// before it (between head and tail), and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub stream: Stream,
    pub skipped: u64,
    pub data: Vec<u8>,
}

/// A run's output as it is produced, shared by the executor (which pushes) and the writer
/// that stores it (which takes). Each stream keeps its first `limit / 2` bytes whole; past
/// them, what waits to be taken is bounded to the last `limit / 2` bytes (the rest counted
/// as skipped), so a slow writer costs bytes in the middle, never memory.
#[derive(Debug)]
pub struct RunOutput {
    limit: usize,
    state: Mutex<Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    /// Bytes of each stream (stdout, stderr) that went to its head so far.
    head_used: [usize; 2],
    /// Waiting to be taken, in arrival order.
    chunks: VecDeque<Waiting>,
    /// Bytes of each stream waiting in `chunks` past its head.
    tail_waiting: [usize; 2],
    /// Dropped bytes of each stream not yet reported on a chunk.
    skipped: [u64; 2],
    progress: Option<Progress>,
    /// The last report set, so that one read twice is stored once.
    last_progress: Option<Progress>,
}

#[derive(Debug)]
struct Waiting {
    chunk: Chunk,
    /// Past the stream's head: may be dropped to make room.
    tail: bool,
}

fn index(stream: Stream) -> usize {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr | Stream::Progress => 1,
    }
}

impl Pending {
    fn append(&mut self, stream: Stream, bytes: &[u8], tail: bool) {
        let i = index(stream);
        let skipped = std::mem::take(&mut self.skipped[i]);
        match self.chunks.back_mut() {
            Some(last) if last.chunk.stream == stream && last.tail == tail && skipped == 0 => {
                last.chunk.data.extend_from_slice(bytes);
            }
            _ => self.chunks.push_back(Waiting {
                chunk: Chunk {
                    stream,
                    skipped,
                    data: bytes.to_vec(),
                },
                tail,
            }),
        }
        if tail {
            self.tail_waiting[i] += bytes.len();
        }
    }

    /// Drops the oldest `n` waiting tail bytes of `stream`; each drop is reported on the
    /// chunk where the stream resumes.
    fn drop_oldest_tail(&mut self, stream: Stream, mut n: usize) {
        let i = index(stream);
        let mut k = 0;
        while n > 0 && k < self.chunks.len() {
            let w = &mut self.chunks[k];
            if !(w.tail && w.chunk.stream == stream) {
                k += 1;
                continue;
            }
            let cut = n.min(w.chunk.data.len());
            w.chunk.data.drain(..cut);
            w.chunk.skipped += cut as u64;
            self.tail_waiting[i] -= cut;
            n -= cut;
            if !w.chunk.data.is_empty() {
                k += 1;
                continue;
            }
            let carried = w.chunk.skipped;
            self.chunks.remove(k);
            match self
                .chunks
                .iter_mut()
                .skip(k)
                .find(|w| w.chunk.stream == stream)
            {
                Some(next) => next.chunk.skipped += carried,
                None => self.skipped[i] += carried,
            }
        }
    }
}

impl RunOutput {
    /// `limit`: the bytes kept of each stream (head and tail together).
    pub fn new(limit: usize) -> RunOutput {
        RunOutput {
            limit,
            state: Mutex::new(Pending::default()),
        }
    }

    pub fn push(&self, stream: Stream, bytes: &[u8]) {
        let head_limit = self.limit / 2;
        let tail_limit = self.limit - head_limit;
        let i = index(stream);
        let mut p = self.state.lock().expect("output lock");
        let take = (head_limit - p.head_used[i]).min(bytes.len());
        if take > 0 {
            p.head_used[i] += take;
            p.append(stream, &bytes[..take], false);
        }
        let mut rest = &bytes[take..];
        if rest.is_empty() {
            return;
        }
        if rest.len() > tail_limit {
            p.skipped[i] += (rest.len() - tail_limit) as u64;
            rest = &rest[rest.len() - tail_limit..];
        }
        let over = (p.tail_waiting[i] + rest.len()).saturating_sub(tail_limit);
        p.drop_oldest_tail(stream, over);
        p.append(stream, rest, true);
    }

    /// Records the run's latest progress (taken with the next chunks).
    pub fn set_progress(&self, progress: Progress) {
        let mut p = self.state.lock().expect("output lock");
        if p.last_progress.as_ref() != Some(&progress) {
            p.last_progress = Some(progress.clone());
            p.progress = Some(progress);
        }
    }

    /// Everything waiting, in arrival order; a new progress report last.
    pub fn take(&self) -> Vec<Chunk> {
        let mut p = self.state.lock().expect("output lock");
        p.tail_waiting = [0, 0];
        let mut out: Vec<Chunk> = p.chunks.drain(..).map(|w| w.chunk).collect();
        if let Some(progress) = p.progress.take() {
            out.push(Chunk {
                stream: Stream::Progress,
                skipped: 0,
                data: serde_json::to_vec(&progress).expect("progress serialises"),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_and_tail_are_kept_and_the_middle_is_counted() {
        let mut h = HeadTail::new(10);
        h.push(b"abc");
        assert_eq!(h.text(), "abc");
        h.push(b"defghijklmnopqrstuvwxyz");
        assert_eq!(h.text(), format!("abcde{}vwxyz", skipped_marker(16)));
        h.push(b"01");
        assert_eq!(h.text(), format!("abcde{}xyz01", skipped_marker(18)));
    }

    #[test]
    fn a_stream_within_its_limit_is_whole() {
        let mut h = HeadTail::new(10);
        h.push(b"0123456789");
        assert_eq!(h.text(), "0123456789");
    }

    fn stored(chunks: &[Chunk], stream: Stream) -> (Vec<u8>, u64) {
        let mut data = Vec::new();
        let mut skipped = 0;
        for c in chunks.iter().filter(|c| c.stream == stream) {
            skipped += c.skipped;
            data.extend_from_slice(&c.data);
        }
        (data, skipped)
    }

    #[test]
    fn taken_chunks_keep_arrival_order_across_streams() {
        let o = RunOutput::new(100);
        o.push(Stream::Stdout, b"a");
        o.push(Stream::Stderr, b"b");
        o.push(Stream::Stdout, b"c");
        let streams: Vec<(Stream, Vec<u8>)> =
            o.take().into_iter().map(|c| (c.stream, c.data)).collect();
        assert_eq!(
            streams,
            vec![
                (Stream::Stdout, b"a".to_vec()),
                (Stream::Stderr, b"b".to_vec()),
                (Stream::Stdout, b"c".to_vec())
            ]
        );
        assert!(o.take().is_empty());
    }

    #[test]
    fn waiting_output_is_bounded_and_every_dropped_byte_is_counted() {
        // 10 bytes per stream: 5 of head, at most 5 of tail waiting.
        let o = RunOutput::new(10);
        let mut total = 0u64;
        for i in 0..1000u32 {
            let line = format!("{i}\n");
            total += line.len() as u64;
            o.push(Stream::Stdout, line.as_bytes());
        }
        let chunks = o.take();
        let (data, skipped) = stored(&chunks, Stream::Stdout);
        assert!(data.len() <= 10, "{}", data.len());
        assert_eq!(data.len() as u64 + skipped, total);
        assert!(data.starts_with(b"0\n1\n2"), "the head is kept");
        assert!(data.ends_with(b"999\n"), "the tail is kept");
        // After a take, the tail budget starts again; the head stays spent.
        o.push(Stream::Stdout, b"next");
        assert_eq!(
            o.take(),
            vec![Chunk {
                stream: Stream::Stdout,
                skipped: 0,
                data: b"next".to_vec()
            }]
        );
    }

    #[test]
    fn a_huge_write_keeps_its_end() {
        let o = RunOutput::new(8);
        o.push(Stream::Stderr, &[b'x'; 1_000_000]);
        o.push(Stream::Stderr, b"end");
        let (data, skipped) = stored(&o.take(), Stream::Stderr);
        assert_eq!(data.len() as u64 + skipped, 1_000_003);
        assert!(data.ends_with(b"end"));
        assert!(data.len() <= 8);
    }

    #[test]
    fn progress_reports_are_checked() {
        let p = Progress::parse(r#"{"fraction": 0.4, "message": "fetched 40 pages"}"#).unwrap();
        assert_eq!(p.fraction, Some(0.4));
        assert!(
            Progress::parse(r#"{"fraction": 1.5}"#)
                .unwrap_err()
                .contains("between 0 and 1")
        );
        assert!(Progress::parse("{}").is_err());
        assert!(Progress::parse("40%").is_err());
        let long = format!(r#"{{"message": "{}"}}"#, "é".repeat(2000));
        assert!(Progress::parse(&long).unwrap().message.unwrap().len() <= 1000);
    }
}
