//! The daemon's event log: numbers, keeps, persists, logs and announces every state change the engine reports.
//!
//! [`EventLog`] is the node's [`EventSink`]. `emit` is called from the data
//! path, so it only touches memory (sequence number, ring, rate limits) and
//! hands the slow work to two threads over bounded channels it never waits on:
//!
//! - the writer thread appends one JSON line per event to `DATA_DIR/events.jsonl`
//!   (rotated to `events.jsonl.1`) and keeps the sequence reservation in
//!   `DATA_DIR/events.seq`, so sequence numbers are never reused across restarts;
//! - the program thread runs `event_program` (as `mdadm --monitor --program`
//!   does), one event at a time, in order, killing it after a timeout.
//!
//! Followers (the API's long poll) read the in-memory ring with
//! [`EventLog::page`] and wait for newer events with [`EventLog::wait_newer`].
//! The file format and the program contract are in `docs/events.md`.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ditto_engine::{Event, EventKind, EventSink};
use serde::{Deserialize, Serialize};

/// Version of one line of `events.jsonl` (the `v` field).
pub const FORMAT_VERSION: u32 = 1;
/// The current event file in the data directory.
pub const LOG_FILE: &str = "events.jsonl";
/// The previous event file, after rotation.
pub const ROTATED_FILE: &str = "events.jsonl.1";
/// The sequence reservation: no sequence number below it was ever handed out.
pub const SEQ_FILE: &str = "events.seq";

/// Sequence numbers reserved durably ahead of use. After a crash the next
/// number may jump by up to this much; it is never reused.
const SEQ_BLOCK: u64 = 1024;
/// Bytes of a program's stdout/stderr kept for the log.
const PROGRAM_OUTPUT_MAX: usize = 4096;
const WRITER_QUEUE: usize = 4096;
const PROGRAM_QUEUE: usize = 256;

/// Tunables; [`Options::default`] is what the daemon uses, tests shorten them.
#[derive(Debug, Clone)]
pub struct Options {
    /// Events kept in memory for `ditto events` and followers.
    pub ring_capacity: usize,
    /// `events.jsonl` is rotated to `events.jsonl.1` before it grows past this.
    pub max_file_bytes: u64,
    /// At most one `*_progress` line per operation per this interval reaches the
    /// file (besides every 10 % step).
    pub progress_interval: Duration,
    /// An `event_program` still running after this is killed.
    pub program_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ring_capacity: 1000,
            max_file_bytes: 4 << 20,
            progress_interval: Duration::from_secs(10),
            program_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("event_program {}: {reason}", path.display())]
    Program { path: PathBuf, reason: String },
    #[error("cannot start the event log's {what} thread: {source}")]
    Thread {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> EventsError + '_ {
    move |source| EventsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Bytes done out of total, for `*_progress` events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

impl Progress {
    /// Whole percent, 0..=100 (an empty operation counts as complete).
    pub fn percent(&self) -> u64 {
        if self.total == 0 {
            return 100;
        }
        let p = u128::from(self.done.min(self.total)) * 100 / u128::from(self.total);
        p as u64
    }
}

/// One event as stored (one line of `events.jsonl`) and as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Line format version ([`FORMAT_VERSION`]).
    pub v: u32,
    /// Increasing, never reused (gaps are normal).
    pub seq: u64,
    pub time_unix_ms: u64,
    /// `EventKind::as_str()`; a string so records of newer kinds still read.
    pub kind: String,
    pub volume: String,
    #[serde(default)]
    pub replica: Option<String>,
    pub message: String,
    #[serde(default)]
    pub progress: Option<Progress>,
}

/// One answer of `GET /v1/events`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventsPage {
    pub events: Vec<EventRecord>,
    /// Pass as `since` to get what comes after this page.
    pub next: u64,
}

/// Unix time in milliseconds.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// `2024-05-01T12:34:56.789Z`, without a date library.
pub fn format_time_utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let sod = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60,
        unix_ms % 1000
    )
}

/// Days since 1970-01-01 to a Gregorian (year, month, day). Counts in 400-year
/// eras starting on 1 March, so the leap day falls at the end of the year.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468; // days from 0000-03-01 to 1970-01-01
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153; // 0 = March
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month as u32, day as u32)
}

fn is_progress(kind: EventKind) -> bool {
    kind.as_str().ends_with("_progress")
}

/// "rebuild" for rebuild_started/_progress/_finished: events of one operation.
fn operation(kind: &str) -> Option<(&str, &str)> {
    kind.rsplit_once('_')
}

// ---------------------------------------------------------------------------
// The log

struct Entry {
    rec: EventRecord,
    /// Sent to the file (rate-limited progress lines live only here).
    in_file: bool,
}

/// Rate-limit state of one running operation (volume, "resync"/"rebuild"/...).
struct ProgressState {
    last_file: Instant,
    file_decile: u64,
    program_quintile: u64,
}

struct Inner {
    next_seq: u64,
    /// Highest sequence number the writer was asked to reserve.
    reserve_requested: u64,
    ring: VecDeque<Entry>,
    progress: HashMap<(String, String), ProgressState>,
    closed: bool,
    dropped_writes: u64,
    dropped_programs: u64,
}

enum WriterMsg {
    Record(EventRecord),
    Reserve(u64),
    Flush(mpsc::Sender<()>),
    Close {
        next_seq: u64,
        done: mpsc::Sender<()>,
    },
}

enum ProgramMsg {
    Run(EventRecord),
    Barrier(mpsc::Sender<()>),
}

/// The daemon's event sink. Construct it with [`EventLog::open`] before the
/// node starts; `Arc<EventLog>` coerces to `ditto_engine::SharedSink`.
pub struct EventLog {
    inner: Mutex<Inner>,
    latest: tokio::sync::watch::Sender<u64>,
    writer: SyncSender<WriterMsg>,
    program: Option<SyncSender<ProgramMsg>>,
    opts: Options,
}

impl EventLog {
    /// Reload history from `data_dir`, reserve sequence numbers and start the
    /// writer (and, with a program, the program runner) thread.
    pub fn open(data_dir: &Path, program: Option<PathBuf>) -> Result<Arc<Self>, EventsError> {
        Self::open_with(data_dir, program, Options::default())
    }

    pub fn open_with(
        data_dir: &Path,
        program: Option<PathBuf>,
        opts: Options,
    ) -> Result<Arc<Self>, EventsError> {
        if let Some(p) = &program {
            check_program(p)?;
        }
        let opts = Options {
            ring_capacity: opts.ring_capacity.max(1),
            ..opts
        };
        let loaded = load(data_dir, opts.ring_capacity)?;
        if loaded.skipped > 0 {
            tracing::warn!(
                skipped = loaded.skipped,
                dir = %data_dir.display(),
                "skipped unreadable lines in the event files (a crash mid-write leaves one)"
            );
        }
        let reserved = read_seq_file(data_dir);
        let next_seq = (loaded.max_seq + 1).max(reserved).max(1);
        let reserve = next_seq + SEQ_BLOCK;
        write_seq_file(data_dir, reserve)?;
        let (file, len) = open_log_file(data_dir)?;

        let (wtx, wrx) = mpsc::sync_channel(WRITER_QUEUE);
        let writer = Writer {
            dir: data_dir.to_path_buf(),
            file: Some(file),
            len,
            max_bytes: opts.max_file_bytes,
            failing: false,
        };
        std::thread::Builder::new()
            .name("ditto-events".into())
            .spawn(move || writer.run(wrx))
            .map_err(|source| EventsError::Thread {
                what: "writer",
                source,
            })?;
        let program_tx = match program {
            Some(path) => {
                let (ptx, prx) = mpsc::sync_channel(PROGRAM_QUEUE);
                let timeout = opts.program_timeout;
                std::thread::Builder::new()
                    .name("ditto-event-program".into())
                    .spawn(move || program_thread(&path, timeout, prx))
                    .map_err(|source| EventsError::Thread {
                        what: "program",
                        source,
                    })?;
                Some(ptx)
            }
            None => None,
        };
        let last = next_seq - 1;
        let ring = loaded
            .records
            .into_iter()
            .map(|rec| Entry { rec, in_file: true })
            .collect();
        Ok(Arc::new(EventLog {
            inner: Mutex::new(Inner {
                next_seq,
                reserve_requested: reserve,
                ring,
                progress: HashMap::new(),
                closed: false,
                dropped_writes: 0,
                dropped_programs: 0,
            }),
            latest: tokio::sync::watch::Sender::new(last),
            writer: wtx,
            program: program_tx,
            opts,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves consistent data
        // (every update is a few assignments), so keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sequence number of the newest event (0 if none ever).
    #[allow(dead_code)] // for the node and tools; the daemon itself pages with `page`
    pub fn last_seq(&self) -> u64 {
        self.lock().next_seq - 1
    }

    /// Events newer than `seq`, oldest first, at most `limit`.
    #[allow(dead_code)] // for the node and tools; the daemon itself pages with `page`
    pub fn since(&self, seq: u64, limit: usize) -> Vec<EventRecord> {
        self.page(seq, limit, None).events
    }

    /// Events newer than `since` (of `volume` only, if given), oldest first, at
    /// most `limit`, and the `since` to ask with next. A `since` beyond the
    /// newest event (a data directory that was reset) counts as "now".
    pub fn page(&self, since: u64, limit: usize, volume: Option<&str>) -> EventsPage {
        let inner = self.lock();
        let last = inner.next_seq - 1;
        let since = since.min(last);
        let mut events = Vec::new();
        let mut next = last;
        for e in inner.ring.iter().filter(|e| e.rec.seq > since) {
            if events.len() >= limit {
                // Resume right after the last event returned.
                next = events.last().map_or(since, |r: &EventRecord| r.seq);
                break;
            }
            if volume.is_none_or(|v| v == e.rec.volume) {
                events.push(e.rec.clone());
            }
        }
        EventsPage { events, next }
    }

    /// Waits until an event newer than `seq` exists, or `timeout` passes.
    /// True if there is one.
    pub async fn wait_newer(&self, seq: u64, timeout: Duration) -> bool {
        let mut rx = self.latest.subscribe();
        let found = tokio::time::timeout(timeout, rx.wait_for(|&s| s > seq))
            .await
            .is_ok_and(|r| r.is_ok());
        found
    }

    /// The long poll: a page of events newer than `since`, waiting up to
    /// `wait` for one to appear (of `volume`, if given) when there is none yet.
    pub async fn poll(
        &self,
        since: u64,
        limit: usize,
        volume: Option<&str>,
        wait: Duration,
    ) -> EventsPage {
        let deadline = tokio::time::Instant::now() + wait;
        let mut page = self.page(since, limit, volume);
        while page.events.is_empty() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() || !self.wait_newer(page.next, left).await {
                break;
            }
            page = self.page(page.next, limit, volume);
        }
        page
    }

    /// Waits (up to `timeout`) until every event emitted so far is in the file.
    #[allow(dead_code)] // for tests and tools; the daemon uses `close`
    pub fn flush(&self, timeout: Duration) -> bool {
        let (tx, rx) = mpsc::channel();
        send_until(&self.writer, WriterMsg::Flush(tx), timeout) && rx.recv_timeout(timeout).is_ok()
    }

    /// Stops recording (later events are only logged), then waits up to
    /// `timeout` for the file and the queued programs. Afterwards the next
    /// start continues exactly at the next sequence number.
    pub fn close(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let next_seq = {
            let mut inner = self.lock();
            if inner.closed {
                return true;
            }
            inner.closed = true;
            inner.next_seq
        };
        let left = || deadline.saturating_duration_since(Instant::now());
        let (tx, rx) = mpsc::channel();
        let mut ok = send_until(
            &self.writer,
            WriterMsg::Close { next_seq, done: tx },
            left(),
        ) && rx.recv_timeout(left()).is_ok();
        if let Some(program) = &self.program {
            let (tx, rx) = mpsc::channel();
            let ran = send_until(program, ProgramMsg::Barrier(tx), left())
                && rx.recv_timeout(left()).is_ok();
            if !ran {
                tracing::warn!(
                    "event program still busy at shutdown; queued notifications may not run"
                );
            }
            ok &= ran;
        }
        ok
    }

    /// Decides, for a progress event, whether it goes to the file and to the program.
    fn progress_policy(&self, inner: &mut Inner, e: &Event, now: Instant) -> (bool, bool) {
        let Some((done, total)) = e.progress else {
            return (true, false);
        };
        let op = operation(e.kind.as_str()).map_or("", |(op, _)| op);
        let pct = Progress { done, total }.percent();
        let (decile, quintile) = (pct / 10, pct / 20);
        let key = (e.volume.clone(), op.to_string());
        match inner.progress.get_mut(&key) {
            // Going backwards means a new run of the operation without a
            // `*_started` in between: start over.
            Some(st) if decile >= st.file_decile => {
                let to_file = decile > st.file_decile
                    || now.duration_since(st.last_file) >= self.opts.progress_interval
                    || done >= total;
                if to_file {
                    st.last_file = now;
                    st.file_decile = decile;
                }
                // Like md's Rebuild20/40/60/80; 100 % is the `*_finished` event.
                let to_program = quintile > st.program_quintile && quintile < 5;
                if to_program {
                    st.program_quintile = quintile;
                }
                (to_file, to_program)
            }
            _ => {
                inner.progress.insert(
                    key,
                    ProgressState {
                        last_file: now,
                        file_decile: decile,
                        program_quintile: quintile,
                    },
                );
                (true, false)
            }
        }
    }
}

/// Sends on a bounded channel, retrying until `timeout` (shutdown path only).
fn send_until<T>(tx: &SyncSender<T>, mut msg: T, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match tx.try_send(msg) {
            Ok(()) => return true,
            Err(TrySendError::Disconnected(_)) => return false,
            Err(TrySendError::Full(m)) => {
                if Instant::now() >= deadline {
                    return false;
                }
                msg = m;
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

impl EventSink for EventLog {
    fn emit(&self, event: Event) {
        let time_unix_ms = now_unix_ms();
        let kind = event.kind.as_str();
        let mut inner = self.lock();
        if inner.closed {
            drop(inner);
            log_event(None, &event, true);
            return;
        }
        let progress = is_progress(event.kind);
        let (to_file, to_program) = if progress {
            self.progress_policy(&mut inner, &event, Instant::now())
        } else {
            if let Some((op, "started" | "finished")) = operation(kind) {
                inner
                    .progress
                    .remove(&(event.volume.clone(), op.to_string()));
            }
            (true, true)
        };
        let seq = inner.next_seq;
        inner.next_seq += 1;
        let rec = EventRecord {
            v: FORMAT_VERSION,
            seq,
            time_unix_ms,
            kind: kind.to_string(),
            volume: event.volume.clone(),
            replica: event.replica.clone(),
            message: event.message.clone(),
            progress: event.progress.map(|(done, total)| Progress { done, total }),
        };

        // Sent under the lock so the file and the program see seq order.
        // try_send: a full queue costs the line or the notification, never a wait.
        if to_file {
            if let Err(e) = self.writer.try_send(WriterMsg::Record(rec.clone())) {
                inner.dropped_writes += 1;
                if matches!(e, TrySendError::Full(_)) && inner.dropped_writes.is_power_of_two() {
                    tracing::error!(
                        seq,
                        dropped = inner.dropped_writes,
                        "event file writer is behind (is the data directory's disk stuck?); event not written"
                    );
                }
            }
        }
        if seq + SEQ_BLOCK / 2 >= inner.reserve_requested {
            // Unwritten progress events use numbers too: keep the durable
            // reservation ahead of them so a crash never reissues one.
            let want = seq + SEQ_BLOCK;
            if self.writer.try_send(WriterMsg::Reserve(want)).is_ok() {
                inner.reserve_requested = want;
            }
        }
        if to_program {
            if let Some(program) = &self.program {
                if program.try_send(ProgramMsg::Run(rec.clone())).is_err() {
                    inner.dropped_programs += 1;
                    if inner.dropped_programs.is_power_of_two() {
                        tracing::error!(
                            seq,
                            dropped = inner.dropped_programs,
                            "event_program queue is full (the program is slow or hangs); not running it for this event"
                        );
                    }
                }
            }
        }

        if progress {
            // Keep one in-memory-only progress record per operation, so a long
            // rebuild does not push the history out of the ring.
            if let Some(i) = inner
                .ring
                .iter()
                .rposition(|e| !e.in_file && e.rec.kind == rec.kind && e.rec.volume == rec.volume)
            {
                inner.ring.remove(i);
            }
        }
        inner.ring.push_back(Entry {
            rec,
            in_file: to_file,
        });
        while inner.ring.len() > self.opts.ring_capacity {
            inner.ring.pop_front();
        }
        self.latest.send_replace(seq);
        drop(inner);
        log_event(Some(seq), &event, to_file);
    }
}

/// Logs an event: warn for alarms, info otherwise; progress the file skips at debug.
fn log_event(seq: Option<u64>, e: &Event, in_file: bool) {
    let event = e.kind.as_str();
    let replica = e.replica.as_deref().unwrap_or("-");
    let percent = e
        .progress
        .map(|(done, total)| Progress { done, total }.percent());
    if e.kind.is_alarm() {
        tracing::warn!(seq, event, volume = %e.volume, replica, "{}", e.message);
    } else if in_file {
        tracing::info!(seq, event, volume = %e.volume, replica, percent, "{}", e.message);
    } else {
        tracing::debug!(seq, event, volume = %e.volume, replica, percent, "{}", e.message);
    }
}

// ---------------------------------------------------------------------------
// Files

struct Loaded {
    records: VecDeque<EventRecord>,
    max_seq: u64,
    skipped: usize,
}

/// Reads the rotated and the current file: the newest `cap` records, and the
/// highest sequence number on any line (even one this version cannot show).
fn load(dir: &Path, cap: usize) -> Result<Loaded, EventsError> {
    let mut out = Loaded {
        records: VecDeque::new(),
        max_seq: 0,
        skipped: 0,
    };
    for name in [ROTATED_FILE, LOG_FILE] {
        let path = dir.join(name);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&path)(e)),
        };
        for line in bytes.split(|&b| b == b'\n') {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let Ok(value) = serde_json::from_slice::<serde_json::Value>(line) else {
                out.skipped += 1;
                continue;
            };
            if let Some(seq) = value.get("seq").and_then(serde_json::Value::as_u64) {
                out.max_seq = out.max_seq.max(seq);
            }
            let current = value.get("v").and_then(serde_json::Value::as_u64)
                == Some(u64::from(FORMAT_VERSION));
            match serde_json::from_value::<EventRecord>(value) {
                Ok(rec) if current => {
                    out.records.push_back(rec);
                    if out.records.len() > cap {
                        out.records.pop_front();
                    }
                }
                _ => out.skipped += 1,
            }
        }
    }
    Ok(out)
}

/// Opens `events.jsonl` for appending. If a crash cut its last line short,
/// ends that line first so the next record starts on a line of its own.
fn open_log_file(dir: &Path) -> Result<(File, u64), EventsError> {
    let path = dir.join(LOG_FILE);
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(&path)
        .map_err(io_err(&path))?;
    let mut len = f.metadata().map_err(io_err(&path))?.len();
    if len > 0 {
        let mut last = [0u8; 1];
        f.seek(SeekFrom::End(-1))
            .and_then(|_| f.read_exact(&mut last))
            .map_err(io_err(&path))?;
        if last[0] != b'\n' {
            f.write_all(b"\n").map_err(io_err(&path))?;
            len += 1;
        }
    }
    Ok((f, len))
}

#[derive(Serialize, Deserialize)]
struct SeqFile {
    v: u32,
    next_seq: u64,
}

/// The reservation, or 0 if there is none (or it is unreadable: the event
/// files still give a floor).
fn read_seq_file(dir: &Path) -> u64 {
    let path = dir.join(SEQ_FILE);
    match std::fs::read(&path) {
        Ok(b) => match serde_json::from_slice::<SeqFile>(&b) {
            Ok(s) if s.v == 1 => s.next_seq,
            _ => {
                tracing::warn!(path = %path.display(), "ignoring unreadable event sequence file");
                0
            }
        },
        Err(_) => 0,
    }
}

/// Durably records that numbers below `next_seq` may have been handed out.
fn write_seq_file(dir: &Path, next_seq: u64) -> Result<(), EventsError> {
    let path = dir.join(SEQ_FILE);
    let tmp = dir.join(format!("{SEQ_FILE}.tmp"));
    let mut body = serde_json::to_vec(&SeqFile { v: 1, next_seq }).unwrap_or_default();
    body.push(b'\n');
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&body)
        .and_then(|_| f.sync_data())
        .map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))
}

struct Writer {
    dir: PathBuf,
    file: Option<File>,
    len: u64,
    max_bytes: u64,
    /// Set after a write error, so a broken disk logs once, not per event.
    failing: bool,
}

impl Writer {
    fn run(mut self, rx: Receiver<WriterMsg>) {
        let mut dirty = false;
        while let Ok(msg) = rx.recv() {
            // Drain what is queued so one fsync covers a burst.
            let mut batch = vec![msg];
            while batch.len() < 256 {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            for msg in batch {
                match msg {
                    WriterMsg::Record(rec) => {
                        self.append(&rec);
                        dirty = true;
                    }
                    WriterMsg::Reserve(next) => self.reserve(next),
                    WriterMsg::Flush(done) => {
                        self.sync(&mut dirty);
                        let _ = done.send(());
                    }
                    WriterMsg::Close { next_seq, done } => {
                        self.sync(&mut dirty);
                        self.reserve(next_seq);
                        let _ = done.send(());
                        return;
                    }
                }
            }
            self.sync(&mut dirty);
        }
        self.sync(&mut dirty);
    }

    fn reserve(&mut self, next: u64) {
        if let Err(e) = write_seq_file(&self.dir, next) {
            tracing::error!(error = %e, "cannot record the event sequence reservation");
        }
    }

    fn sync(&mut self, dirty: &mut bool) {
        if *dirty {
            if let Some(f) = &self.file {
                if let Err(e) = f.sync_data() {
                    self.fail(&e);
                }
            }
            *dirty = false;
        }
    }

    fn fail(&mut self, e: &dyn std::fmt::Display) {
        if !self.failing {
            tracing::error!(file = %self.dir.join(LOG_FILE).display(), error = %e, "cannot write the event file; events stay in memory only");
        }
        self.failing = true;
        self.file = None;
    }

    fn append(&mut self, rec: &EventRecord) {
        let mut line = match serde_json::to_vec(rec) {
            Ok(l) => l,
            Err(e) => return self.fail(&e),
        };
        line.push(b'\n');
        if self.file.is_some() && self.len > 0 && self.len + line.len() as u64 > self.max_bytes {
            if let Err(e) = self.rotate() {
                return self.fail(&e);
            }
        }
        if self.file.is_none() {
            match open_log_file(&self.dir) {
                Ok((f, len)) => {
                    self.file = Some(f);
                    self.len = len;
                }
                Err(e) => return self.fail(&e),
            }
        }
        let Some(f) = self.file.as_mut() else { return };
        match f.write_all(&line) {
            Ok(()) => {
                self.len += line.len() as u64;
                if self.failing {
                    tracing::info!("event file writable again");
                    self.failing = false;
                }
            }
            Err(e) => self.fail(&e),
        }
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        if let Some(f) = self.file.take() {
            f.sync_data()?;
        }
        std::fs::rename(self.dir.join(LOG_FILE), self.dir.join(ROTATED_FILE))?;
        let (f, len) = open_log_file(&self.dir).map_err(std::io::Error::other)?;
        self.file = Some(f);
        self.len = len;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The event program

fn check_program(path: &Path) -> Result<(), EventsError> {
    let bad = |reason: String| EventsError::Program {
        path: path.to_path_buf(),
        reason,
    };
    if !path.is_absolute() {
        return Err(bad("must be an absolute path".into()));
    }
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(bad("is not an executable file".into()));
    }
    Ok(())
}

fn program_thread(program: &Path, timeout: Duration, rx: Receiver<ProgramMsg>) {
    for msg in rx {
        match msg {
            ProgramMsg::Run(rec) => run_program(program, &rec, timeout),
            ProgramMsg::Barrier(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// Reads a pipe to the end (so the child never blocks on it), keeping the first bytes.
fn collect_output(pipe: Option<impl Read + Send + 'static>) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let room = PROGRAM_OUTPUT_MAX.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
            let _ = tx.send(String::from_utf8_lossy(&kept).trim_end().to_string());
        });
    }
    rx
}

/// Runs `program KIND VOLUME [REPLICA]` with the DITTO_* variables and the JSON
/// line on stdin; kills its whole process group after `timeout`.
fn run_program(program: &Path, rec: &EventRecord, timeout: Duration) {
    let line = match serde_json::to_string(rec) {
        Ok(l) => l + "\n",
        Err(e) => {
            tracing::error!(seq = rec.seq, error = %e, "cannot encode event for event_program");
            return;
        }
    };
    let mut cmd = Command::new(program);
    cmd.arg(&rec.kind).arg(&rec.volume);
    cmd.env("DITTO_EVENT", &rec.kind)
        .env("DITTO_VOLUME", &rec.volume)
        .env("DITTO_MESSAGE", &rec.message)
        .env("DITTO_SEQ", rec.seq.to_string())
        .env("DITTO_TIME", format_time_utc(rec.time_unix_ms))
        .env("DITTO_TIME_UNIX_MS", rec.time_unix_ms.to_string());
    match &rec.replica {
        Some(r) => {
            cmd.arg(r).env("DITTO_REPLICA", r);
        }
        // Never pass on a value the daemon itself inherited.
        None => {
            cmd.env_remove("DITTO_REPLICA");
        }
    }
    match rec.progress {
        Some(p) => {
            cmd.env("DITTO_PROGRESS_DONE", p.done.to_string())
                .env("DITTO_PROGRESS_TOTAL", p.total.to_string())
                .env("DITTO_PROGRESS_PERCENT", p.percent().to_string());
        }
        None => {
            for v in [
                "DITTO_PROGRESS_DONE",
                "DITTO_PROGRESS_TOTAL",
                "DITTO_PROGRESS_PERCENT",
            ] {
                cmd.env_remove(v);
            }
        }
    }
    // Its own process group, so a timeout kills what it started too.
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let started = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(program = %program.display(), seq = rec.seq, event = %rec.kind, error = %e, "cannot run event_program");
            return;
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A thread, so a program that never reads stdin cannot stall us.
        std::thread::spawn(move || {
            let _ = stdin.write_all(line.as_bytes());
        });
    }
    let stdout = collect_output(child.stdout.take());
    let stderr = collect_output(child.stderr.take());
    let status = wait_or_kill(&mut child, timeout);
    // Output of a program that left a background child holding the pipe is not waited for.
    let out = stdout
        .recv_timeout(Duration::from_millis(200))
        .unwrap_or_default();
    let err = stderr
        .recv_timeout(Duration::from_millis(200))
        .unwrap_or_default();
    let elapsed_ms = started.elapsed().as_millis() as u64;
    match status {
        Some(st) if st.success() => {
            tracing::debug!(program = %program.display(), seq = rec.seq, event = %rec.kind, elapsed_ms, stdout = %out, stderr = %err, "event_program ran");
        }
        Some(st) => {
            tracing::warn!(program = %program.display(), seq = rec.seq, event = %rec.kind, status = %st, stdout = %out, stderr = %err, "event_program failed");
        }
        None => {
            tracing::warn!(program = %program.display(), seq = rec.seq, event = %rec.kind, timeout_ms = timeout.as_millis() as u64, stdout = %out, stderr = %err, "event_program timed out; killed it");
        }
    }
}

/// The exit status, or None if it ran past `timeout` and was killed.
fn wait_or_kill(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            _ => break,
        }
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) has no memory-safety preconditions; -pid is the
        // group this child leads (process_group(0)).
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: EventKind, volume: &str) -> Event {
        Event {
            kind,
            volume: volume.into(),
            replica: Some("/pool/a.replica".into()),
            message: format!("{} happened", kind.as_str()),
            progress: None,
        }
    }

    fn progress(kind: EventKind, volume: &str, done: u64, total: u64) -> Event {
        Event {
            kind,
            volume: volume.into(),
            replica: None,
            message: "resyncing".into(),
            progress: Some((done, total)),
        }
    }

    fn file_lines(dir: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join(LOG_FILE))
            .unwrap()
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Polls until `f` holds, for at most 10 s.
    fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Processes of group `pgid` that are not zombies (an orphaned zombie
    /// waits for init to reap it, which may take a while in a container).
    fn live_in_group(pgid: i32) -> usize {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return 0;
        };
        dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("stat")).ok())
            .filter(|stat| {
                // "pid (comm) state ppid pgrp ...": comm may contain spaces.
                let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
                let f: Vec<&str> = rest.split_whitespace().collect();
                f.len() > 2 && f[0] != "Z" && f[2] == pgid.to_string()
            })
            .count()
    }

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn time_format() {
        assert_eq!(format_time_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_time_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(
            format_time_utc(1_700_000_000_123),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(
            format_time_utc(4_102_444_800_000),
            "2100-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn seq_increases_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path(), None).unwrap();
        assert_eq!(log.last_seq(), 0);
        log.emit(ev(EventKind::VolumeStarted, "a"));
        log.emit(ev(EventKind::ReplicaFailed, "a"));
        log.emit(ev(EventKind::VolumeStarted, "b"));
        let got = log.since(0, 100);
        assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(got
            .windows(2)
            .all(|w| w[0].time_unix_ms <= w[1].time_unix_ms));
        assert_eq!(log.since(1, 1)[0].seq, 2);
        assert!(log.close(Duration::from_secs(10)));
        drop(log);

        // A clean close continues exactly; the history is back.
        let log = EventLog::open(dir.path(), None).unwrap();
        assert_eq!(log.last_seq(), 3);
        let got = log.since(0, 100);
        assert_eq!(got.len(), 3);
        assert_eq!(got[1].kind, "replica_failed");
        assert_eq!(got[1].replica.as_deref(), Some("/pool/a.replica"));
        log.emit(ev(EventKind::VolumeStopped, "a"));
        assert_eq!(log.last_seq(), 4);
        assert!(log.flush(Duration::from_secs(10)));
        drop(log);

        // Without close (a crash), numbers jump ahead but never repeat.
        let log = EventLog::open(dir.path(), None).unwrap();
        assert!(log.last_seq() >= 4, "{}", log.last_seq());
        log.emit(ev(EventKind::VolumeStarted, "a"));
        assert!(log.since(4, 10)[0].seq > 4);
        assert!(log.flush(Duration::from_secs(10)));
        let lines = file_lines(dir.path());
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[0]["v"], 1);
        assert_eq!(lines[0]["kind"], "volume_started");
    }

    #[test]
    fn unwritten_progress_numbers_are_not_reissued_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path(), None).unwrap();
        for i in 0..50 {
            log.emit(progress(EventKind::ResyncProgress, "v", 1000 + i, 100_000));
        }
        let last = log.last_seq();
        assert!(log.flush(Duration::from_secs(10)));
        drop(log); // no close: as if killed
        let log = EventLog::open(dir.path(), None).unwrap();
        log.emit(ev(EventKind::VolumeStarted, "v"));
        assert!(log.last_seq() > last);
    }

    #[test]
    fn tail_reload_keeps_the_newest_and_skips_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let opts = Options {
            ring_capacity: 5,
            ..Options::default()
        };
        let log = EventLog::open_with(dir.path(), None, opts.clone()).unwrap();
        for i in 0..8 {
            log.emit(ev(EventKind::VolumeStarted, &format!("v{i}")));
        }
        assert_eq!(log.since(0, 100).len(), 5);
        assert!(log.flush(Duration::from_secs(10)));
        drop(log);
        // A crash in the middle of appending line 9, and the reservation lost.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(LOG_FILE))
            .unwrap();
        f.write_all(br#"{"v":1,"seq":9,"time_unix_ms":1,"ki"#)
            .unwrap();
        drop(f);
        std::fs::remove_file(dir.path().join(SEQ_FILE)).unwrap();

        let log = EventLog::open_with(dir.path(), None, opts).unwrap();
        let got = log.since(0, 100);
        assert_eq!(
            got.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [4, 5, 6, 7, 8]
        );
        assert_eq!(got[4].volume, "v7");
        log.emit(ev(EventKind::VolumeStopped, "v7"));
        assert_eq!(log.last_seq(), 9);
        assert!(log.flush(Duration::from_secs(10)));
        // The torn line stays on its own line; the new record is intact.
        let text = std::fs::read_to_string(dir.path().join(LOG_FILE)).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["seq"], 9);
        assert_eq!(last["kind"], "volume_stopped");
        drop(log);
        let log = EventLog::open(dir.path(), None).unwrap();
        assert_eq!(log.since(8, 10).len(), 1);
    }

    #[test]
    fn newer_versions_and_garbage_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = Vec::new();
        text.extend_from_slice(br#"{"v":1,"seq":1,"time_unix_ms":5,"kind":"volume_started","volume":"a","replica":null,"message":"m","progress":null}"#);
        text.extend_from_slice(b"\n\xff\xfe not json\n");
        text.extend_from_slice(br#"{"v":2,"seq":7,"something":"new"}"#);
        text.push(b'\n');
        std::fs::write(dir.path().join(LOG_FILE), text).unwrap();
        let log = EventLog::open(dir.path(), None).unwrap();
        let got = log.since(0, 10);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].volume, "a");
        assert_eq!(log.last_seq(), 7, "the newer line's seq still counts");
    }

    #[test]
    fn file_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let opts = Options {
            max_file_bytes: 1000,
            ..Options::default()
        };
        let log = EventLog::open_with(dir.path(), None, opts).unwrap();
        for i in 0..30 {
            log.emit(ev(EventKind::VolumeStarted, &format!("volume-{i}")));
        }
        assert!(log.close(Duration::from_secs(10)));
        let cur = std::fs::metadata(dir.path().join(LOG_FILE)).unwrap().len();
        let old = std::fs::metadata(dir.path().join(ROTATED_FILE))
            .unwrap()
            .len();
        assert!(cur <= 1000 && old <= 1000, "{cur} {old}");
        drop(log);
        let log = EventLog::open(dir.path(), None).unwrap();
        assert_eq!(log.last_seq(), 30);
        let got = log.since(0, 100);
        assert_eq!(got.last().unwrap().volume, "volume-29");
        assert!(got.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
    }

    #[test]
    fn progress_is_rate_limited_in_the_file_not_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path(), None).unwrap();
        log.emit(ev(EventKind::ResyncStarted, "v"));
        for pct in 0..=100u64 {
            log.emit(progress(EventKind::ResyncProgress, "v", pct, 100));
        }
        log.emit(ev(EventKind::ResyncFinished, "v"));
        assert!(log.flush(Duration::from_secs(10)));
        let pcts: Vec<u64> = file_lines(dir.path())
            .iter()
            .filter(|l| l["kind"] == "resync_progress")
            .map(|l| l["progress"]["done"].as_u64().unwrap())
            .collect();
        assert_eq!(pcts, [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]);
        // Memory: every event was numbered and followers saw each; the ring
        // keeps the written ones plus the newest unwritten one per operation.
        assert_eq!(log.last_seq(), 103);
        let ring = log.since(0, 1000);
        assert_eq!(ring.first().unwrap().kind, "resync_started");
        assert_eq!(ring.last().unwrap().kind, "resync_finished");
        assert_eq!(ring.len(), 1 + 11 + 1);

        // The interval lets one more through per operation and volume.
        let opts = Options {
            progress_interval: Duration::from_millis(0),
            ..Options::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open_with(dir.path(), None, opts).unwrap();
        for done in 0..5 {
            log.emit(progress(EventKind::RebuildProgress, "w", done, 1000));
        }
        assert!(log.flush(Duration::from_secs(10)));
        assert_eq!(file_lines(dir.path()).len(), 5);
    }

    #[tokio::test]
    async fn long_poll_wakes_on_a_new_event() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path(), None).unwrap();
        let t = Instant::now();
        let page = log.poll(0, 10, None, Duration::from_millis(100)).await;
        assert!(page.events.is_empty());
        assert_eq!(page.next, 0);
        assert!(t.elapsed() >= Duration::from_millis(100));

        let emitter = {
            let log = log.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                log.emit(ev(EventKind::ScrubStarted, "other"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                log.emit(ev(EventKind::ScrubMismatch, "mine"));
            })
        };
        let t = Instant::now();
        let page = log.poll(0, 10, Some("mine"), Duration::from_secs(20)).await;
        assert!(t.elapsed() < Duration::from_secs(10));
        assert_eq!(page.events.len(), 1);
        assert_eq!(page.events[0].kind, "scrub_mismatch");
        assert_eq!(page.next, 2);
        emitter.await.unwrap();

        // A `since` from a reset data directory means "from now".
        let page = log.page(500, 10, None);
        assert!(page.events.is_empty());
        assert_eq!(page.next, 2);
        // A full page resumes after its last event.
        let page = log.page(0, 1, None);
        assert_eq!((page.events.len(), page.next), (1, 1));
    }

    #[test]
    fn program_gets_args_env_and_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("calls");
        let prog = script(
            dir.path(),
            "notify.sh",
            &format!(
                r#"{{ echo "args:$#:$1:$2:$3"; echo "env:$DITTO_EVENT:$DITTO_VOLUME:${{DITTO_REPLICA-unset}}:$DITTO_SEQ:$DITTO_MESSAGE:$DITTO_TIME"; echo "pct:${{DITTO_PROGRESS_PERCENT-none}}"; echo "stdin:$(cat)"; }} >> {}"#,
                out.display()
            ),
        );
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let log = EventLog::open(&data, Some(prog)).unwrap();
        log.emit(ev(EventKind::ReplicaFailed, "vol1"));
        let mut plain = ev(EventKind::VolumeStarted, "vol2");
        plain.replica = None;
        log.emit(plain);
        wait_for("two program runs", || {
            std::fs::read_to_string(&out).is_ok_and(|t| t.matches("stdin:").count() == 2)
        });
        let text = std::fs::read_to_string(&out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "args:3:replica_failed:vol1:/pool/a.replica");
        assert!(
            lines[1]
                .starts_with("env:replica_failed:vol1:/pool/a.replica:1:replica_failed happened:"),
            "{}",
            lines[1]
        );
        assert!(lines[1].ends_with('Z'), "{}", lines[1]);
        assert_eq!(lines[2], "pct:none");
        let json: serde_json::Value =
            serde_json::from_str(lines[3].trim_start_matches("stdin:")).unwrap();
        assert_eq!(json["seq"], 1);
        assert_eq!(json["kind"], "replica_failed");
        assert_eq!(json["v"], 1);
        // In order, and no replica argument or variable when there is none.
        assert_eq!(lines[4], "args:2:volume_started:vol2:");
        assert!(
            lines[5].starts_with("env:volume_started:vol2:unset:2:"),
            "{}",
            lines[5]
        );
    }

    #[test]
    fn program_runs_for_progress_every_20_percent() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("calls");
        let prog = script(
            dir.path(),
            "notify.sh",
            &format!(
                r#"echo "$1 ${{DITTO_PROGRESS_PERCENT-}}" >> {}"#,
                out.display()
            ),
        );
        let log = EventLog::open(dir.path(), Some(prog)).unwrap();
        log.emit(ev(EventKind::RebuildStarted, "v"));
        for pct in 0..=100u64 {
            log.emit(progress(EventKind::RebuildProgress, "v", pct * 7, 700));
        }
        log.emit(ev(EventKind::RebuildFinished, "v"));
        assert!(log.close(Duration::from_secs(20)));
        let text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [
                "rebuild_started ",
                "rebuild_progress 20",
                "rebuild_progress 40",
                "rebuild_progress 60",
                "rebuild_progress 80",
                "rebuild_finished "
            ]
        );
    }

    #[test]
    fn hanging_program_is_killed_and_never_blocks_emit() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("calls");
        let prog = script(
            dir.path(),
            "hang.sh",
            &format!(
                r#"echo "start $DITTO_SEQ $$" >> {out}; if [ "$DITTO_SEQ" = 1 ]; then sleep 60; echo "not killed" >> {out}; fi; echo "end $DITTO_SEQ" >> {out}"#,
                out = out.display()
            ),
        );
        let opts = Options {
            program_timeout: Duration::from_millis(1500),
            ..Options::default()
        };
        let log = EventLog::open_with(dir.path(), Some(prog), opts).unwrap();
        let t = Instant::now();
        for _ in 0..20 {
            log.emit(ev(EventKind::ReplicaFailed, "v"));
        }
        assert!(
            t.elapsed() < Duration::from_millis(250),
            "emit waited for the program: {:?}",
            t.elapsed()
        );
        wait_for("the first run to start", || {
            std::fs::read_to_string(&out).is_ok_and(|t| t.contains("start 1 "))
        });
        let text = std::fs::read_to_string(&out).unwrap();
        let first = text.lines().next().unwrap();
        let pgid: i32 = first.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(
            live_in_group(pgid) > 0,
            "the hung program should be running"
        );
        wait_for("the second run to finish", || {
            std::fs::read_to_string(&out).is_ok_and(|t| t.contains("end 2"))
        });
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(!text.contains("end 1"), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("start 1 "), "{text}");
        assert!(lines[1].starts_with("start 2 "), "{text}");
        assert_eq!(lines[2], "end 2", "{text}");
        // The shell was killed with its whole group, sleep included.
        wait_for("the hung program's process group to die", || {
            live_in_group(pgid) == 0
        });
        assert!(log.close(Duration::from_secs(20)));
        assert!(!std::fs::read_to_string(&out)
            .unwrap()
            .contains("not killed"));
    }

    #[test]
    fn failing_or_missing_program() {
        let dir = tempfile::tempdir().unwrap();
        let prog = script(dir.path(), "fail.sh", "echo oops >&2; exit 3");
        let log = EventLog::open(dir.path(), Some(prog.clone())).unwrap();
        log.emit(ev(EventKind::SplitBrain, "v"));
        assert!(log.close(Duration::from_secs(10)));
        assert_eq!(log.since(0, 10).len(), 1);

        let err = EventLog::open(dir.path(), Some(dir.path().join("nope")))
            .err()
            .unwrap();
        assert!(err.to_string().contains("nope"), "{err}");
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = EventLog::open(dir.path(), Some(prog)).err().unwrap();
        assert!(err.to_string().contains("not an executable"), "{err}");
        let err = EventLog::open(dir.path(), Some("relative.sh".into()))
            .err()
            .unwrap();
        assert!(err.to_string().contains("absolute"), "{err}");
    }

    #[test]
    fn after_close_events_are_only_logged() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path(), None).unwrap();
        log.emit(ev(EventKind::VolumeStarted, "v"));
        assert!(log.close(Duration::from_secs(10)));
        log.emit(ev(EventKind::VolumeStopped, "v"));
        assert_eq!(log.last_seq(), 1);
        drop(log);
        let log = EventLog::open(dir.path(), None).unwrap();
        assert_eq!(log.last_seq(), 1);
    }
}
