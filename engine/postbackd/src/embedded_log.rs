//! The embedded event log: segment files of CRC-checked records in a directory, with group
//! commit (every append waiting at the time shares one write and one fsync) on a dedicated
//! writer thread.
//!
//! On disk: `<dir>/<base offset, 20 digits>.log`, each a run of records
//! `[payload length: u32 LE][crc32 of length and payload: u32 LE][payload]` (segments written
//! before the length was covered hold the crc32 of the payload alone, and are read as well).
//! A segment's record count is the next segment's base, so only the last segment is scanned on
//! open; a torn or corrupt tail there (a crash mid-write) is cut off. Everything that was
//! acknowledged was fsync'd first, so the cut only removes records no caller was told about.
//!
//! The writer keeps a few MiB of zeros written ahead of its records in the last segment, so
//! that a group's fsync flushes data only: an fsync that also grows the file must commit the
//! file system's journal too, which took a third longer here. Eight zero bytes, which no record
//! can be (the crc of a length of zero is not zero), are where the records end.
//!
//! Failures heal without a restart. A failed write or fsync (disk full, I/O error) fails the
//! group that hit it, and the log refuses appends while it is failed (`health` says why). The
//! writer then recovers by itself, as soon as the disk lets it: it removes what it wrote after
//! the last durable record (the page cache may have dropped or kept any of it, so none of it is
//! trusted), fsyncs, and resumes. So a record whose append failed never appears later.
//!
//! Appends have a deadline. A caller whose deadline passes before its group was made durable
//! abandons its records and is answered with an error; a group that turns out to hold an
//! abandoned record when its fsync returns is cut off again, whole, and every caller in it gets
//! an error. A stalled disk therefore answers 503 in bounded time and never stores afterwards
//! what it refused. The same holds for an append future that is dropped.

use postback_core::keys::{partition_of, Partition};
use postback_core::log::{EventLog, Keyed, LocalGroups, Position, Record, Sleeper, Subscription};
use postback_core::seams::{BoxFuture, SeamError};
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{oneshot, watch};

const HEADER: usize = 8;

/// A record of one partition with its offset.
type Entry = (u64, Vec<u8>);
/// Larger records are refused: the front end's own limits are far below this.
pub const MAX_RECORD: usize = 16 << 20;
/// How far the writer keeps zeros written ahead of its records (see the module's comment).
const ZEROED_AHEAD: u64 = 4 << 20;

/// How often a failed log tries to recover when nothing else wakes it.
const RECOVERY_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
pub struct LogOptions {
    /// A segment is closed and a new one started once it is this large.
    pub segment_bytes: u64,
    /// fsync after each group of appends. Off only for benchmarks that measure its cost.
    pub fsync: bool,
    /// How long an append may take before it is abandoned and answered with an error.
    pub append_timeout: Duration,
    /// Failures to inject, for tests of the recovery (a real disk cannot fail on demand).
    pub faults: Option<Arc<Faults>>,
    /// Sealed segments last written longer ago than this are removed (`None`: kept forever).
    pub retention: Option<Duration>,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            fsync: true,
            append_timeout: Duration::from_secs(5),
            faults: None,
            retention: None,
        }
    }
}

/// Failures a test can switch on and off while the log runs.
#[derive(Debug, Default)]
pub struct Faults {
    /// Writes stop halfway and fail with "no space left on device".
    pub fail_writes: AtomicBool,
    /// fsyncs fail with an I/O error (after the data reached the page cache).
    pub fail_syncs: AtomicBool,
    /// fsyncs take this long first (milliseconds).
    pub stall_syncs_ms: AtomicU64,
    /// True while an fsync is being stalled.
    pub stalling: AtomicBool,
}

impl Faults {
    fn write_at(&self, file: &File, bytes: &[u8], at: u64) -> std::io::Result<()> {
        if self.fail_writes.load(Ordering::Acquire) {
            file.write_all_at(&bytes[..bytes.len() / 2], at)?;
            return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
        }
        file.write_all_at(bytes, at)
    }

    fn sync(&self, file: &File) -> std::io::Result<()> {
        let stall = self.stall_syncs_ms.load(Ordering::Acquire);
        if stall > 0 {
            self.stalling.store(true, Ordering::Release);
            std::thread::sleep(Duration::from_millis(stall));
            self.stalling.store(false, Ordering::Release);
        }
        if self.fail_syncs.load(Ordering::Acquire) {
            return Err(std::io::Error::from_raw_os_error(5)); // EIO
        }
        file.sync_data()
    }
}

#[derive(Debug, Clone)]
struct Segment {
    base: u64,
    path: PathBuf,
}

/// What the writer and readers share.
struct Shared {
    dir: PathBuf,
    segments: Mutex<Vec<Segment>>,
    /// One past the last durable record.
    durable_end: AtomicU64,
    /// Why appends are refused, while the log is failed.
    failure: Mutex<Option<String>>,
    /// The last read position, so that sequential reads do not rescan a segment.
    cursor: Mutex<Option<(u64, usize, u64)>>,
    end_tx: watch::Sender<u64>,
}

/// An append's state, shared by its caller and the writer: the caller may abandon it until
/// the writer has claimed it (after its fsync); from then on the writer's answer is final.
const PENDING: u8 = 0;
const CLAIMED: u8 = 1;
const ABANDONED: u8 = 2;

struct AppendRequest {
    records: Vec<Vec<u8>>,
    state: Arc<AtomicU8>,
    /// The offset of the request's first record (the rest follow it).
    reply: oneshot::Sender<Result<u64, SeamError>>,
}

impl AppendRequest {
    fn abandoned(&self) -> bool {
        self.state.load(Ordering::Acquire) == ABANDONED
    }
    fn claim(&self) -> bool {
        self.state
            .compare_exchange(PENDING, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// Abandons an append whose caller stopped waiting (deadline, or the future was dropped).
struct Abandon(Arc<AtomicU8>);

impl Abandon {
    /// True if the append was still pending and is now abandoned.
    fn now(&self) -> bool {
        self.0
            .compare_exchange(PENDING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

impl Drop for Abandon {
    fn drop(&mut self) {
        self.now();
    }
}

/// One partition of the embedded log: a directory of segments with its own writer thread.
struct PartitionLog {
    shared: Arc<Shared>,
    requests: Mutex<Option<mpsc::Sender<AppendRequest>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    end_rx: watch::Receiver<u64>,
    append_timeout: Duration,
}

fn io_err(context: &str, e: std::io::Error) -> SeamError {
    SeamError::Unavailable(format!("{context}: {e}"))
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

impl PartitionLog {
    /// Opens (or creates) the partition in `dir`, recovering from a torn tail.
    pub fn open(dir: &Path, options: LogOptions) -> Result<Self, SeamError> {
        fs::create_dir_all(dir).map_err(|e| io_err("create log dir", e))?;
        let mut segments: Vec<Segment> = fs::read_dir(dir)
            .map_err(|e| io_err("list log dir", e))?
            .filter_map(|entry| {
                let path = entry.ok()?.path();
                let base = path
                    .file_name()?
                    .to_str()?
                    .strip_suffix(".log")?
                    .parse::<u64>()
                    .ok()?;
                Some(Segment { base, path })
            })
            .collect();
        segments.sort_by_key(|s| s.base);
        if segments.is_empty() {
            let path = segment_path(dir, 0);
            File::create(&path).map_err(|e| io_err("create segment", e))?;
            sync_dir(dir)?;
            segments.push(Segment { base: 0, path });
        }
        let last = segments
            .last()
            .cloned()
            .ok_or_else(|| SeamError::Fatal("no segment".into()))?;
        let (count, valid_bytes) = recover_segment(&last.path)?;
        let end = last.base + count;
        let (end_tx, end_rx) = watch::channel(end);
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            segments: Mutex::new(segments),
            durable_end: AtomicU64::new(end),
            failure: Mutex::new(None),
            cursor: Mutex::new(None),
            end_tx,
        });
        let file = OpenOptions::new()
            .write(true)
            .open(&last.path)
            .map_err(|e| io_err("open segment", e))?;
        let (tx, rx) = mpsc::channel();
        let append_timeout = options.append_timeout;
        let mark = Mark {
            segment: last,
            bytes: valid_bytes,
            next: end,
        };
        let writer = Writer {
            shared: shared.clone(),
            options,
            file: Some(file),
            buf: Vec::with_capacity(1 << 20),
            zeroed: mark.bytes,
            head: mark.clone(),
            durable: mark,
            failed: None,
        };
        let handle = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| io_err("start log writer", e))?;
        Ok(Self {
            shared,
            requests: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(handle)),
            end_rx,
            append_timeout,
        })
    }

    /// Stops the writer after the appends already queued, so every acknowledged record is on
    /// disk when this returns.
    fn stop_writer(&self) {
        if let Ok(mut r) = self.requests.lock() {
            r.take();
        }
        let handle = self.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Shared {
    fn read(&self, from: u64, max: usize, max_bytes: usize) -> Result<Vec<Entry>, SeamError> {
        let end = self.durable_end.load(Ordering::Acquire);
        let mut bytes = 0usize;
        let segments = self.segments.lock().map_err(|_| poisoned())?.clone();
        let Some(first) = segments.first() else {
            return Ok(Vec::new());
        };
        let mut offset = from.max(first.base);
        let mut out = Vec::new();
        while offset < end && out.len() < max {
            let idx = segments.partition_point(|s| s.base <= offset) - 1;
            let seg = &segments[idx];
            let seg_end = segments.get(idx + 1).map_or(end, |n| n.base.min(end));
            let start_pos = match *self.cursor.lock().map_err(|_| poisoned())? {
                Some((o, i, pos)) if o == offset && i == idx => pos,
                _ => 0,
            };
            let file = File::open(&seg.path).map_err(|e| io_err("open segment", e))?;
            let mut reader = BufReader::with_capacity(256 << 10, file);
            reader
                .seek(SeekFrom::Start(start_pos))
                .map_err(|e| io_err("seek", e))?;
            let mut at = if start_pos == 0 { seg.base } else { offset };
            let mut pos = start_pos;
            let mut full = false;
            while at < seg_end && out.len() < max {
                let payload = read_record(&mut reader)?
                    .ok_or_else(|| SeamError::Fatal(format!("segment {} ends early", seg.base)))?;
                let len = payload.len();
                if at >= offset {
                    bytes = bytes.saturating_add(len);
                    if bytes > max_bytes && !out.is_empty() {
                        // Not taken: the cursor stays before it.
                        full = true;
                        break;
                    }
                    out.push((at, payload));
                }
                pos += (HEADER + len) as u64;
                at += 1;
            }
            offset = at;
            *self.cursor.lock().map_err(|_| poisoned())? = Some((at, idx, pos));
            if full {
                break;
            }
            if at == seg_end && seg_end < end {
                continue;
            }
            break;
        }
        Ok(out)
    }

    fn set_failure(&self, failure: Option<String>) {
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = failure;
    }
}

impl Drop for PartitionLog {
    fn drop(&mut self) {
        self.stop_writer();
    }
}

fn poisoned() -> SeamError {
    SeamError::Fatal("log state lock poisoned".into())
}

fn sync_dir(dir: &Path) -> Result<(), SeamError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("fsync log dir", e))
}

/// Reads one record; `None` at a clean end. A torn or corrupt record is an error.
fn read_record(r: &mut impl Read) -> Result<Option<Vec<u8>>, SeamError> {
    match read_record_checked(r) {
        Ok(Some(Ok(payload))) => Ok(Some(payload)),
        Ok(Some(Err(why))) => Err(SeamError::Fatal(why)),
        Ok(None) => Ok(None),
        Err(e) => Err(io_err("read segment", e)),
    }
}

/// `Ok(None)`: clean end. `Ok(Some(Err))`: a torn or corrupt record.
fn read_record_checked(r: &mut impl Read) -> std::io::Result<Option<Result<Vec<u8>, String>>> {
    let mut header = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        let n = r.read(&mut header[got..])?;
        if n == 0 {
            return Ok(if got == 0 {
                None
            } else {
                Some(Err("torn header".into()))
            });
        }
        got += n;
    }
    if header == [0; HEADER] {
        return Ok(None); // the zeros written ahead of the records
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_RECORD {
        return Ok(Some(Err(format!("record length {len} too large"))));
    }
    let mut payload = vec![0u8; len];
    if let Err(e) = r.read_exact(&mut payload) {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            return Ok(Some(Err("torn record".into())));
        }
        return Err(e);
    }
    // The crc of an older segment's record covers its payload alone.
    if crc != record_crc(len as u32, &payload) && crc != crc32fast::hash(&payload) {
        return Ok(Some(Err("checksum mismatch".into())));
    }
    Ok(Some(Ok(payload)))
}

/// A record's checksum: its length and payload, so that no record's header is all zeros.
fn record_crc(len: u32, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Counts the valid records of a segment and cuts off whatever follows the last one.
fn recover_segment(path: &Path) -> Result<(u64, u64), SeamError> {
    let file = File::open(path).map_err(|e| io_err("open segment", e))?;
    let total = file
        .metadata()
        .map_err(|e| io_err("stat segment", e))?
        .len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let (mut count, mut valid) = (0u64, 0u64);
    loop {
        match read_record_checked(&mut reader).map_err(|e| io_err("read segment", e))? {
            Some(Ok(payload)) => {
                count += 1;
                valid += (HEADER + payload.len()) as u64;
            }
            Some(Err(why)) => {
                tracing::warn!(segment = %path.display(), at = valid, dropped = total - valid, %why,
                    "cutting the log's unacknowledged tail");
                break;
            }
            None => break,
        }
    }
    if valid < total {
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| io_err("open segment", e))?;
        f.set_len(valid)
            .map_err(|e| io_err("truncate segment", e))?;
        f.sync_all().map_err(|e| io_err("fsync segment", e))?;
    }
    Ok((count, valid))
}

/// A place in the log: the segment being written, its length, and the next offset.
#[derive(Debug, Clone)]
struct Mark {
    segment: Segment,
    bytes: u64,
    next: u64,
}

struct Writer {
    shared: Arc<Shared>,
    options: LogOptions,
    /// The open last segment; `None` while the log is failed.
    file: Option<File>,
    /// A group's records, written with one call.
    buf: Vec<u8>,
    /// Where the next record goes.
    head: Mark,
    /// The end of what the last segment holds, records and zeros ahead of them.
    zeroed: u64,
    /// The end of what is durable and acknowledged.
    durable: Mark,
    /// Why the log is failed, and when it last tried to recover.
    failed: Option<(String, Instant)>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<AppendRequest>) {
        loop {
            let first = if self.failed.is_some() {
                match rx.recv_timeout(RECOVERY_INTERVAL) {
                    Ok(r) => Some(r),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(r) => Some(r),
                    Err(_) => break,
                }
            };
            if self.failed.is_some() {
                self.try_recover();
            }
            let Some(first) = first else { continue };
            // Group commit: take every request already waiting, then one write and one fsync.
            let mut group = vec![first];
            let mut n = group[0].records.len();
            while n < 65_536 {
                match rx.try_recv() {
                    Ok(r) => {
                        n += r.records.len();
                        group.push(r);
                    }
                    Err(_) => break,
                }
            }
            group.retain(|r| !r.abandoned());
            if group.is_empty() {
                continue;
            }
            if let Some((why, _)) = &self.failed {
                let msg = format!("the event log is recovering from an I/O error: {why}");
                answer_all(group, &msg);
                continue;
            }
            metrics::counter!("postbackd_log_fsyncs_total").increment(1);
            metrics::histogram!("postbackd_log_group_records").record(n as f64);
            match self.write_group(&group) {
                Ok(firsts) => {
                    // Claim every request; one its caller abandoned meanwhile undoes the group
                    // (and every caller in it, claimed or not, is answered with an error).
                    let claimed = group.iter().all(AppendRequest::claim);
                    if claimed {
                        self.durable = self.head.clone();
                        self.shared
                            .durable_end
                            .store(self.head.next, Ordering::Release);
                        self.shared.end_tx.send_replace(self.head.next);
                        for (req, first) in group.into_iter().zip(firsts) {
                            let _ = req.reply.send(Ok(first));
                        }
                    } else {
                        metrics::counter!("postbackd_log_groups_undone_total").increment(1);
                        if let Err(e) = self.rewind() {
                            self.fail(e.to_string());
                        }
                        answer_all(group, "the append timed out");
                    }
                }
                Err(e) => {
                    self.fail(e.to_string());
                    answer_all(group, &e.to_string());
                }
            }
        }
    }

    fn faults(&self) -> Option<&Faults> {
        self.options.faults.as_deref()
    }

    fn fail(&mut self, why: String) {
        tracing::error!(error = %why, "event log write failed; appends are refused until it recovers");
        metrics::counter!("postbackd_log_failures_total").increment(1);
        self.file = None;
        self.shared.set_failure(Some(why.clone()));
        self.failed = Some((why, Instant::now() - RECOVERY_INTERVAL));
    }

    /// Tries to recover (at most once per `RECOVERY_INTERVAL`): cuts the log back to its last
    /// durable record and reopens it.
    fn try_recover(&mut self) {
        let Some((_, last_try)) = &mut self.failed else {
            return;
        };
        if last_try.elapsed() < RECOVERY_INTERVAL {
            return;
        }
        *last_try = Instant::now();
        match self.rewind() {
            Ok(()) => {
                tracing::info!(next = self.head.next, "event log recovered");
                self.failed = None;
                self.shared.set_failure(None);
            }
            Err(e) => tracing::debug!(error = %e, "event log not recovered yet"),
        }
    }

    /// Cuts everything after the durable mark (segments started since, bytes written since),
    /// makes the cut durable, and reopens the segment for appends at the mark.
    fn rewind(&mut self) -> Result<(), SeamError> {
        self.file = None;
        let keep = self.durable.clone();
        {
            let mut segments = self.shared.segments.lock().map_err(|_| poisoned())?;
            while segments.last().is_some_and(|s| s.base > keep.segment.base) {
                if let Some(seg) = segments.pop() {
                    match fs::remove_file(&seg.path) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            segments.push(seg);
                            return Err(io_err("remove segment", e));
                        }
                        _ => {}
                    }
                }
            }
        }
        sync_dir(&self.shared.dir)?;
        let file = OpenOptions::new()
            .write(true)
            .open(&keep.segment.path)
            .map_err(|e| io_err("open segment", e))?;
        file.set_len(keep.bytes)
            .map_err(|e| io_err("truncate segment", e))?;
        self.zeroed = keep.bytes;
        match self.faults() {
            Some(f) => f.sync(&file),
            None => file.sync_data(),
        }
        .map_err(|e| io_err("fsync", e))?;
        *self.shared.cursor.lock().map_err(|_| poisoned())? = None;
        self.file = Some(file);
        self.head = keep;
        Ok(())
    }

    /// Writes and fsyncs a group; returns the first offset of each request.
    fn write_group(&mut self, group: &[AppendRequest]) -> Result<Vec<u64>, SeamError> {
        let mut firsts = Vec::with_capacity(group.len());
        self.buf.clear();
        for req in group {
            firsts.push(self.head.next);
            for record in &req.records {
                if self.head.bytes + self.buf.len() as u64 >= self.options.segment_bytes {
                    self.flush()?;
                    self.roll()?;
                }
                let len = u32::try_from(record.len())
                    .map_err(|_| SeamError::Rejected("record too large".into()))?;
                self.buf.extend_from_slice(&len.to_le_bytes());
                self.buf
                    .extend_from_slice(&record_crc(len, record).to_le_bytes());
                self.buf.extend_from_slice(record);
                self.head.next += 1;
            }
        }
        self.flush()?;
        self.zero_ahead()?;
        if self.options.fsync {
            self.sync()?;
        }
        Ok(firsts)
    }

    /// Writes the buffer to the segment.
    fn flush(&mut self) -> Result<(), SeamError> {
        let file = self
            .file
            .as_ref()
            .ok_or_else(|| SeamError::Unavailable("the log is not open".into()))?;
        match self.options.faults.as_deref() {
            Some(f) => f.write_at(file, &self.buf, self.head.bytes),
            None => file.write_all_at(&self.buf, self.head.bytes),
        }
        .map_err(|e| io_err("write", e))?;
        self.head.bytes += self.buf.len() as u64;
        self.zeroed = self.zeroed.max(self.head.bytes);
        self.buf.clear();
        Ok(())
    }

    /// Writes zeros ahead of the head once fewer than half of `ZEROED_AHEAD` are left (up to
    /// the segment's size), to be made durable by the group's fsync.
    fn zero_ahead(&mut self) -> Result<(), SeamError> {
        let end = (self.head.bytes + ZEROED_AHEAD).min(self.options.segment_bytes);
        if !self.options.fsync || self.zeroed >= end.saturating_sub(ZEROED_AHEAD / 2) {
            return Ok(());
        }
        let file = self
            .file
            .as_ref()
            .ok_or_else(|| SeamError::Unavailable("the log is not open".into()))?;
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let mut at = self.zeroed.max(self.head.bytes);
        while at < end {
            let n = (end - at).min(ZEROS.len() as u64) as usize;
            match self.options.faults.as_deref() {
                Some(f) => f.write_at(file, &ZEROS[..n], at),
                None => file.write_all_at(&ZEROS[..n], at),
            }
            .map_err(|e| io_err("write", e))?;
            at += n as u64;
        }
        self.zeroed = end;
        Ok(())
    }

    fn sync(&self) -> Result<(), SeamError> {
        let file = self
            .file
            .as_ref()
            .ok_or_else(|| SeamError::Unavailable("the log is not open".into()))?;
        match self.faults() {
            Some(f) => f.sync(file),
            None => file.sync_data(),
        }
        .map_err(|e| io_err("fsync", e))
    }

    /// Seals the current segment and starts the next at the head.
    fn roll(&mut self) -> Result<(), SeamError> {
        self.sync()?;
        let path = segment_path(&self.shared.dir, self.head.next);
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .map_err(|e| io_err("create segment", e))?;
        let segment = Segment {
            base: self.head.next,
            path,
        };
        self.shared
            .segments
            .lock()
            .map_err(|_| poisoned())?
            .push(segment.clone());
        sync_dir(&self.shared.dir)?;
        self.file = Some(file);
        self.head.segment = segment;
        self.head.bytes = 0;
        self.zeroed = 0;
        Ok(())
    }
}

fn answer_all(group: Vec<AppendRequest>, why: &str) {
    for req in group {
        let _ = req.reply.send(Err(SeamError::Unavailable(why.to_string())));
    }
}

impl PartitionLog {
    /// Appends the records together; answers the first one's offset once they are durable.
    fn append(&self, records: Vec<Vec<u8>>) -> BoxFuture<'_, Result<u64, SeamError>> {
        Box::pin(async move {
            if let Some(big) = records.iter().find(|r| r.len() > MAX_RECORD) {
                return Err(SeamError::Rejected(format!(
                    "a record of {} bytes is over the log's limit of {MAX_RECORD}",
                    big.len()
                )));
            }
            let (reply, mut rx) = oneshot::channel();
            let state = Arc::new(AtomicU8::new(PENDING));
            let abandon = Abandon(state.clone());
            let request = AppendRequest {
                records,
                state,
                reply,
            };
            let sent = self
                .requests
                .lock()
                .ok()
                .and_then(|r| r.as_ref().map(|tx| tx.send(request)));
            if !matches!(sent, Some(Ok(()))) {
                return Err(SeamError::Unavailable("the event log is closed".into()));
            }
            let closed = || SeamError::Unavailable("log writer stopped".into());
            match tokio::time::timeout(self.append_timeout, &mut rx).await {
                Ok(answer) => answer.unwrap_or_else(|_| Err(closed())),
                Err(_) if abandon.now() => Err(SeamError::Unavailable(format!(
                    "the append took longer than {:?}",
                    self.append_timeout
                ))),
                // Claimed: the writer's answer is on its way.
                Err(_) => rx.await.unwrap_or_else(|_| Err(closed())),
            }
        })
    }

    fn read(
        &self,
        from: u64,
        max: usize,
        max_bytes: usize,
    ) -> BoxFuture<'_, Result<Vec<Entry>, SeamError>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || shared.read(from, max, max_bytes))
                .await
                .map_err(|e| SeamError::Fatal(format!("log reader panicked: {e}")))?
        })
    }

    fn wait_for(&self, from: u64) -> BoxFuture<'_, ()> {
        let mut rx = self.end_rx.clone();
        Box::pin(async move {
            let _ = rx.wait_for(|end| *end > from).await;
        })
    }

    fn end(&self) -> u64 {
        self.shared.durable_end.load(Ordering::Acquire)
    }

    fn start(&self) -> u64 {
        self.shared
            .segments
            .lock()
            .ok()
            .and_then(|s| s.first().map(|s| s.base))
            .unwrap_or(0)
    }

    fn truncate_before(&self, offset: u64) -> BoxFuture<'_, Result<u64, SeamError>> {
        Box::pin(async move {
            let mut segments = self.shared.segments.lock().map_err(|_| poisoned())?;
            // A segment can go when the next one starts at or before `offset` and holds a
            // durable record (one started by a group that then failed may still be cut, and
            // the writer rewinds into the one before it).
            let end = self.shared.durable_end.load(Ordering::Acquire);
            while segments.len() > 1 && segments[1].base <= offset && segments[1].base < end {
                let seg = segments.remove(0);
                fs::remove_file(&seg.path).map_err(|e| io_err("remove segment", e))?;
            }
            *self.shared.cursor.lock().map_err(|_| poisoned())? = None;
            Ok(segments.first().map_or(0, |s| s.base))
        })
    }

    fn health(&self) -> Option<String> {
        self.shared
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn close(&self) {
        self.stop_writer();
    }

    /// Removes the oldest sealed segments last written before `cutoff` (never the last one):
    /// retention by age, a segment at a time, as Kafka does.
    fn expire(&self, cutoff: SystemTime) -> Result<u64, SeamError> {
        let keep_from = {
            let segments = self.shared.segments.lock().map_err(|_| poisoned())?;
            let mut keep_from = segments.first().map_or(0, |s| s.base);
            for pair in segments.windows(2) {
                let written = fs::metadata(&pair[0].path)
                    .and_then(|m| m.modified())
                    .map_err(|e| io_err("stat segment", e))?;
                if written >= cutoff {
                    break;
                }
                keep_from = pair[1].base;
            }
            keep_from
        };
        if keep_from > self.start() {
            block_on_ready(self.truncate_before(keep_from))?;
        }
        Ok(self.start())
    }
}

/// Runs a future that never waits (the segment list is behind a plain mutex).
fn block_on_ready<T>(f: BoxFuture<'_, T>) -> T {
    let mut f = f;
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

/// The embedded implementation of [`EventLog`]: a directory with one [`PartitionLog`] per
/// partition (`p0`, `p1`, ...; the count is kept in the file `partitions` and never changes),
/// consumer groups within this process, and retention by segment age on its own thread.
pub struct EmbeddedEventLog {
    partitions: Arc<Vec<PartitionLog>>,
    groups: LocalGroups,
    housekeeper: Mutex<Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>>,
}

/// How often retention looks for expired segments.
const RETENTION_INTERVAL: Duration = Duration::from_secs(600);

impl EmbeddedEventLog {
    /// Opens (or creates) the log in `dir` with `partitions` partitions. A log written before
    /// partitions existed (segments directly in `dir`) becomes partition 0 of one.
    pub fn open(dir: &Path, partitions: Partition, options: LogOptions) -> Result<Self, SeamError> {
        fs::create_dir_all(dir).map_err(|e| io_err("create log dir", e))?;
        let count = partition_count(dir, partitions.max(1))?;
        let parts = (0..count)
            .map(|p| PartitionLog::open(&dir.join(format!("p{p}")), options.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let partitions = Arc::new(parts);
        let housekeeper = match options.retention {
            Some(retention) => {
                let (tx, rx) = mpsc::channel::<()>();
                let parts = partitions.clone();
                let handle = std::thread::Builder::new()
                    .name("log-retention".into())
                    .spawn(move || loop {
                        if let Some(cutoff) = SystemTime::now().checked_sub(retention) {
                            for (p, log) in parts.iter().enumerate() {
                                match log.expire(cutoff) {
                                    Ok(start) => tracing::debug!(partition = p, start, "retention pass"),
                                    Err(e) => tracing::warn!(partition = p, error = %e, "retention pass failed"),
                                }
                            }
                        }
                        match rx.recv_timeout(RETENTION_INTERVAL) {
                            Err(mpsc::RecvTimeoutError::Timeout) => {}
                            _ => return,
                        }
                    })
                    .map_err(|e| io_err("start log retention", e))?;
                Some((tx, handle))
            }
            None => None,
        };
        let sleep: Sleeper = Arc::new(|d| Box::pin(tokio::time::sleep(d)));
        Ok(Self {
            partitions,
            groups: LocalGroups::new(sleep),
            housekeeper: Mutex::new(housekeeper),
        })
    }

    fn partition(&self, partition: Partition) -> Result<&PartitionLog, SeamError> {
        self.partitions
            .get(partition as usize)
            .ok_or_else(|| SeamError::Rejected(format!("no partition {partition}")))
    }

    /// Removes the sealed segments of every partition last written before `cutoff` (retention
    /// does this by itself when the log was opened with one; tests call it directly).
    pub fn expire(&self, cutoff: SystemTime) -> Result<(), SeamError> {
        for p in self.partitions.iter() {
            p.expire(cutoff)?;
        }
        Ok(())
    }
}

/// The partition count of the log in `dir`, written there when the log is created.
fn partition_count(dir: &Path, wanted: Partition) -> Result<Partition, SeamError> {
    let file = dir.join("partitions");
    if let Ok(text) = fs::read_to_string(&file) {
        let count: Partition = text
            .trim()
            .parse()
            .map_err(|_| SeamError::Fatal(format!("{} is not a number", file.display())))?;
        if count != wanted {
            return Err(SeamError::Fatal(format!(
                "the log in {} has {count} partitions and cannot change to {wanted} \
                 (records are placed by key modulo the count)",
                dir.display()
            )));
        }
        return Ok(count);
    }
    // Segments directly in `dir`: a log from before partitions, which is partition 0 of one.
    let old: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| io_err("list log dir", e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    let count = if old.is_empty() { wanted } else { 1 };
    if !old.is_empty() {
        if wanted != 1 {
            return Err(SeamError::Fatal(format!(
                "the log in {} has one partition and cannot change to {wanted}",
                dir.display()
            )));
        }
        let p0 = dir.join("p0");
        fs::create_dir_all(&p0).map_err(|e| io_err("create partition dir", e))?;
        for path in old {
            if let Some(name) = path.file_name() {
                fs::rename(&path, p0.join(name)).map_err(|e| io_err("move segment", e))?;
            }
        }
        sync_dir(&p0)?;
    }
    let tmp = dir.join("partitions.tmp");
    fs::write(&tmp, count.to_string()).map_err(|e| io_err("write partitions", e))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err("fsync partitions", e))?;
    fs::rename(&tmp, &file).map_err(|e| io_err("write partitions", e))?;
    sync_dir(dir)?;
    Ok(count)
}

impl Drop for EmbeddedEventLog {
    fn drop(&mut self) {
        self.close();
    }
}

impl EventLog for EmbeddedEventLog {
    fn partitions(&self) -> Partition {
        self.partitions.len() as Partition
    }

    fn append(&self, records: Vec<Keyed>) -> BoxFuture<'_, Result<Vec<Position>, SeamError>> {
        Box::pin(async move {
            let n = self.partitions();
            let position = |partition, offset| Position { partition, offset };
            // The front end appends one record a request: straight to its partition's writer.
            if let [one] = &records[..] {
                let partition = partition_of(&one.key, n);
                let payload = records.into_iter().map(|r| r.payload).collect();
                let first = self.partitions[partition as usize].append(payload).await?;
                return Ok(vec![position(partition, first)]);
            }
            // Each partition's records go to its writer in one request (one group commit).
            let mut by_partition: Vec<Vec<(usize, Vec<u8>)>> = vec![Vec::new(); n as usize];
            let count = records.len();
            for (i, r) in records.into_iter().enumerate() {
                by_partition[partition_of(&r.key, n) as usize].push((i, r.payload));
            }
            let mut out = vec![position(0, 0); count];
            let appends = by_partition
                .into_iter()
                .enumerate()
                .filter(|(_, rs)| !rs.is_empty())
                .map(|(p, rs)| {
                    let (index, payloads): (Vec<usize>, Vec<Vec<u8>>) = rs.into_iter().unzip();
                    let log = &self.partitions[p];
                    async move { (p as Partition, index, log.append(payloads).await) }
                });
            for (partition, index, result) in postback_core::log::join_all(appends).await {
                let first = result?;
                for (i, offset) in index.into_iter().zip(first..) {
                    out[i] = position(partition, offset);
                }
            }
            Ok(out)
        })
    }

    fn read(
        &self,
        partition: Partition,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> BoxFuture<'_, Result<Vec<Record>, SeamError>> {
        Box::pin(async move {
            let entries = self
                .partition(partition)?
                .read(from, max_records, max_bytes)
                .await?;
            Ok(entries
                .into_iter()
                .map(|(offset, payload)| Record {
                    partition,
                    offset,
                    payload,
                })
                .collect())
        })
    }

    fn bounds(&self, partition: Partition) -> BoxFuture<'_, Result<(u64, u64), SeamError>> {
        let bounds = self.partition(partition).map(|p| (p.start(), p.end()));
        Box::pin(std::future::ready(bounds))
    }

    fn wait_for(&self, partition: Partition, from: u64) -> BoxFuture<'_, ()> {
        match self.partitions.get(partition as usize) {
            Some(p) => p.wait_for(from),
            None => Box::pin(std::future::pending()),
        }
    }

    fn subscribe(
        self: Arc<Self>,
        group: &str,
    ) -> BoxFuture<'static, Result<Box<dyn Subscription>, SeamError>> {
        let subscription = self.groups.clone().subscribe(self, group);
        Box::pin(std::future::ready(Ok(subscription)))
    }

    fn health(&self) -> Option<String> {
        self.partitions
            .iter()
            .enumerate()
            .find_map(|(i, p)| p.health().map(|why| format!("partition {i}: {why}")))
    }

    fn close(&self) {
        for p in self.partitions.iter() {
            p.close();
        }
        let housekeeper = self
            .housekeeper
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((tx, handle)) = housekeeper {
            drop(tx);
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postback_core::log::conformance;

    fn open(dir: &Path) -> PartitionLog {
        PartitionLog::open(dir, LogOptions::default()).expect("opens")
    }

    fn small_segments(dir: &Path) -> PartitionLog {
        PartitionLog::open(
            dir,
            LogOptions {
                segment_bytes: 100,
                ..LogOptions::default()
            },
        )
        .expect("opens")
    }

    /// A partitioned log with small segments, so that reads cross segment boundaries.
    fn partitioned(dir: &Path, partitions: Partition) -> Arc<dyn EventLog> {
        let options = LogOptions {
            segment_bytes: 100,
            ..LogOptions::default()
        };
        Arc::new(EmbeddedEventLog::open(dir, partitions, options).expect("opens"))
    }

    #[tokio::test]
    async fn conforms() {
        let wait = Duration::from_millis(50);
        let dir = |_: ()| tempfile::tempdir().expect("tempdir");
        let d = dir(());
        conformance::append_then_read(partitioned(d.path(), 3)).await;
        let d = dir(());
        conformance::records_are_kept_exactly(partitioned(d.path(), 1)).await;
        let d = dir(());
        conformance::reads_stop_at_the_byte_limit(partitioned(d.path(), 1)).await;
        let d = dir(());
        conformance::wait_for_wakes_on_append(partitioned(d.path(), 1)).await;
        let d = dir(());
        conformance::concurrent_appends_are_all_kept(partitioned(d.path(), 1)).await;
        let d = dir(());
        conformance::reads_follow_a_growing_log(partitioned(d.path(), 1)).await;
        let d = dir(());
        conformance::a_member_reads_every_partition_once(partitioned(d.path(), 3), wait).await;
        let d = dir(());
        conformance::a_group_shares_and_hands_over_partitions(partitioned(d.path(), 4), wait).await;
    }

    #[tokio::test]
    async fn partitions_keep_their_records_and_their_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let log = partitioned(dir.path(), 4);
            let records = (0..40)
                .map(|i| Keyed::new(format!("{i:024x}"), format!("r{i}").into_bytes()))
                .collect();
            log.append(records).await.expect("append");
            log.close();
        }
        let log = partitioned(dir.path(), 4);
        let mut total = 0;
        for p in 0..4 {
            let got = log.read(p, 0, 100, usize::MAX).await.expect("read");
            for r in &got {
                let i: usize = std::str::from_utf8(&r.payload[1..])
                    .expect("utf8")
                    .parse()
                    .expect("n");
                assert_eq!(
                    partition_of(&format!("{i:024x}"), 4),
                    p,
                    "kept in its partition"
                );
            }
            total += got.len();
        }
        assert_eq!(total, 40);
        log.close();
        let other = EmbeddedEventLog::open(dir.path(), 8, LogOptions::default());
        assert!(
            matches!(other, Err(SeamError::Fatal(ref m)) if m.contains("cannot change")),
            "the count is fixed"
        );
    }

    #[tokio::test]
    async fn a_log_from_before_partitions_becomes_partition_zero() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let old = open(dir.path());
            append_n(&old, 0, 5).await;
            old.close();
        }
        let log = partitioned(dir.path(), 1);
        let got = log.read(0, 0, 100, usize::MAX).await.expect("read");
        assert_eq!(got.len(), 5);
        assert_eq!(got[4].payload, b"record-4".to_vec());
        assert!(dir.path().join("p0").is_dir());
    }

    #[tokio::test]
    async fn retention_removes_old_segments_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = EmbeddedEventLog::open(
            dir.path(),
            1,
            LogOptions {
                segment_bytes: 100,
                ..LogOptions::default()
            },
        )
        .expect("opens");
        for i in 0..20 {
            let records = (0..5)
                .map(|j| Keyed::new("k", format!("record-{}", i * 5 + j).into_bytes()))
                .collect();
            log.append(records).await.expect("append");
        }
        let p0 = dir.path().join("p0");
        let mut segments: Vec<PathBuf> = fs::read_dir(&p0)
            .expect("list")
            .map(|e| e.expect("entry").path())
            .collect();
        segments.sort();
        assert!(segments.len() > 4);
        // The first half of the segments were last written two days ago.
        let old = SystemTime::now() - Duration::from_secs(2 * 86_400);
        let half = segments.len() / 2;
        for path in &segments[..half] {
            File::options()
                .write(true)
                .open(path)
                .and_then(|f| f.set_modified(old))
                .expect("set mtime");
        }
        log.expire(SystemTime::now() - Duration::from_secs(86_400))
            .expect("expire");
        let left = fs::read_dir(&p0).expect("list").count();
        assert_eq!(left, segments.len() - half, "the old segments went");
        let (start, end) = log.bounds(0).await.expect("bounds");
        assert_eq!(end, 100);
        let rest = log.read(0, 0, 1000, usize::MAX).await.expect("read");
        assert_eq!(rest.first().map(|r| r.offset), Some(start));
        assert_eq!(rest.len() as u64, 100 - start, "the rest is whole");
        log.close();
    }

    async fn append_n(log: &PartitionLog, from: usize, n: usize) {
        let records = (from..from + n)
            .map(|i| format!("record-{i}").into_bytes())
            .collect();
        log.append(records).await.expect("append");
    }

    async fn read_all(log: &PartitionLog) -> Vec<Entry> {
        log.read(0, usize::MAX, usize::MAX).await.expect("read")
    }

    #[tokio::test]
    async fn reopening_keeps_everything_acknowledged() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let log = small_segments(dir.path());
            append_n(&log, 0, 50).await;
            log.close();
        }
        let log = small_segments(dir.path());
        assert_eq!(log.end(), 50);
        append_n(&log, 50, 5).await;
        let all = read_all(&log).await;
        assert_eq!(all.len(), 55);
        for (i, (offset, payload)) in all.iter().enumerate() {
            assert_eq!(*offset, i as u64);
            assert_eq!(payload, &format!("record-{i}").into_bytes());
        }
    }

    fn last_segment(dir: &Path) -> PathBuf {
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").path())
            .collect();
        files.sort();
        files.pop().expect("a segment")
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_and_appends_continue() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let log = open(dir.path());
            append_n(&log, 0, 10).await;
            log.close();
        }
        // A crash in the middle of writing record 10 over the zeros ahead: its header and half
        // its payload.
        let seg = last_segment(dir.path());
        let f = OpenOptions::new().write(true).open(&seg).expect("open");
        let end: usize = (0..10).map(|i| HEADER + format!("record-{i}").len()).sum();
        let payload = b"record-10";
        let mut torn = (payload.len() as u32).to_le_bytes().to_vec();
        torn.extend_from_slice(&record_crc(payload.len() as u32, payload).to_le_bytes());
        torn.extend_from_slice(&payload[..4]);
        f.write_all_at(&torn, end as u64).expect("write");
        drop(f);
        let log = open(dir.path());
        assert_eq!(log.end(), 10);
        append_n(&log, 10, 1).await;
        let all = read_all(&log).await;
        assert_eq!(all.len(), 11);
        assert_eq!(all[10].1, b"record-10".to_vec());
    }

    #[tokio::test]
    async fn zeros_ahead_end_the_log_and_appends_write_over_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let log = open(dir.path());
            append_n(&log, 0, 10).await;
            log.close();
        }
        let seg = last_segment(dir.path());
        assert!(fs::metadata(&seg).expect("stat").len() >= ZEROED_AHEAD);
        for round in 1..=3 {
            let log = open(dir.path());
            assert_eq!(log.end(), 10 * round);
            append_n(&log, 10 * round as usize, 10).await;
            log.close();
        }
        let log = open(dir.path());
        let all = read_all(&log).await;
        assert_eq!(all.len(), 40);
        for (i, (offset, payload)) in all.iter().enumerate() {
            assert_eq!(
                (*offset, payload.clone()),
                (i as u64, format!("record-{i}").into_bytes())
            );
        }
    }

    #[tokio::test]
    async fn a_segment_from_before_the_length_was_checksummed_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut old = Vec::new();
        for i in 0..3 {
            let payload = format!("record-{i}").into_bytes();
            old.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            old.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            old.extend_from_slice(&payload);
        }
        fs::write(segment_path(dir.path(), 0), &old).expect("write");
        let log = open(dir.path());
        assert_eq!(log.end(), 3);
        append_n(&log, 3, 1).await;
        let all = read_all(&log).await;
        assert_eq!(all.len(), 4);
        assert_eq!(all[0].1, b"record-0".to_vec());
        assert_eq!(all[3].1, b"record-3".to_vec());
    }

    #[tokio::test]
    async fn a_corrupt_record_ends_the_log_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let log = open(dir.path());
            append_n(&log, 0, 3).await;
            log.close();
        }
        let seg = last_segment(dir.path());
        let mut bytes = fs::read(&seg).expect("read");
        let last: usize = (0..3)
            .map(|i| HEADER + format!("record-{i}").len())
            .sum::<usize>()
            - 1;
        bytes[last] ^= 0xff; // flip the last payload byte of record 2 (zeros follow it)
        fs::write(&seg, &bytes).expect("write");
        let log = open(dir.path());
        assert_eq!(log.end(), 2);
        assert_eq!(read_all(&log).await.len(), 2);
    }

    /// Cuts the log file at every kind of place a crash can leave it and checks that reopening
    /// gives exactly the records wholly before the cut.
    #[tokio::test]
    async fn any_cut_leaves_a_clean_prefix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sizes: Vec<usize> = (0..40).map(|i| (i * 37) % 300).collect();
        {
            let log = open(dir.path());
            let records = sizes.iter().map(|n| vec![0xab; *n]).collect();
            log.append(records).await.expect("append");
            log.close();
        }
        let seg = last_segment(dir.path());
        let mut boundaries = vec![0usize];
        for n in &sizes {
            boundaries.push(boundaries.last().copied().unwrap_or(0) + HEADER + n);
        }
        // The records, then the zeros written ahead of them; the cuts fall among the records.
        let mut full = fs::read(&seg).expect("read");
        let data_end = *boundaries.last().expect("an end");
        assert!(full.len() as u64 >= ZEROED_AHEAD, "{} bytes", full.len());
        assert!(full[data_end..].iter().all(|b| *b == 0));
        full.truncate(data_end);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..60 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let cut = (seed % (full.len() as u64 + 1)) as usize;
            fs::write(&seg, &full[..cut]).expect("cut");
            let expected = boundaries.iter().filter(|b| **b <= cut).count() as u64 - 1;
            let log = open(dir.path());
            assert_eq!(log.end(), expected, "cut at byte {cut}");
            let got = read_all(&log).await;
            assert_eq!(got.len() as u64, expected);
            for (i, (_, payload)) in got.iter().enumerate() {
                assert_eq!(payload.len(), sizes[i]);
            }
            log.close();
            fs::write(&seg, &full).expect("restore");
        }
    }

    #[tokio::test]
    async fn reads_cross_segments_and_truncation_removes_whole_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = small_segments(dir.path());
        for i in 0..20 {
            append_n(&log, i * 10, 10).await;
        }
        let files = fs::read_dir(dir.path()).expect("list").count();
        assert!(files > 10, "small segments roll often ({files})");
        let mid = log.read(95, 10, usize::MAX).await.expect("read");
        assert_eq!(
            mid.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
            (95..105).collect::<Vec<_>>()
        );
        assert_eq!(mid[0].1, b"record-95".to_vec());
        let start = log.truncate_before(150).await.expect("truncate");
        assert!(start <= 150 && start > 100, "start {start}");
        assert!(fs::read_dir(dir.path()).expect("list").count() < files);
        log.close();
        let log = small_segments(dir.path());
        assert_eq!(log.start(), start);
        assert_eq!(log.end(), 200);
        let rest = log.read(0, 1000, usize::MAX).await.expect("read");
        assert_eq!(rest.first().map(|(o, _)| *o), Some(start));
        assert_eq!(rest.len() as u64, 200 - start);
    }

    fn with_faults(dir: &Path, segment_bytes: u64, timeout_ms: u64) -> (PartitionLog, Arc<Faults>) {
        let faults = Arc::new(Faults::default());
        let log = PartitionLog::open(
            dir,
            LogOptions {
                segment_bytes,
                append_timeout: Duration::from_millis(timeout_ms),
                faults: Some(faults.clone()),
                ..LogOptions::default()
            },
        )
        .expect("opens");
        (log, faults)
    }

    /// Waits (bounded) until the log reports itself healthy again.
    async fn recovered(log: &PartitionLog) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while log.health().is_some() {
            assert!(
                Instant::now() < deadline,
                "never recovered: {:?}",
                log.health()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What an append that failed wrote must never be read, now or after a reopen; the log
    /// heals by itself once the disk does, and offsets stay dense.
    async fn heals_after(fault: impl Fn(&Faults, bool), segment_bytes: u64) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, faults) = with_faults(dir.path(), segment_bytes, 5_000);
        append_n(&log, 0, 5).await;
        fault(&faults, true);
        for i in 0..3 {
            let err = log
                .append(vec![format!("lost-{i}").into_bytes(); 4])
                .await
                .expect_err("the disk fails");
            assert!(matches!(err, SeamError::Unavailable(_)), "{err:?}");
            assert!(log.health().is_some(), "failed while it lasts");
        }
        assert_eq!(log.end(), 5);
        fault(&faults, false);
        recovered(&log).await;
        append_n(&log, 5, 3).await;
        let check = |all: Vec<Entry>| {
            assert_eq!(all.len(), 8);
            for (i, (offset, payload)) in all.iter().enumerate() {
                assert_eq!(*offset, i as u64);
                assert_eq!(payload, &format!("record-{i}").into_bytes());
            }
        };
        check(read_all(&log).await);
        log.close();
        check(read_all(&small_or(dir.path(), segment_bytes)).await);
    }

    fn small_or(dir: &Path, segment_bytes: u64) -> PartitionLog {
        PartitionLog::open(
            dir,
            LogOptions {
                segment_bytes,
                ..LogOptions::default()
            },
        )
        .expect("opens")
    }

    #[tokio::test]
    async fn a_failed_fsync_heals_and_what_it_wrote_is_gone() {
        heals_after(|f, on| f.fail_syncs.store(on, Ordering::Release), 64 << 20).await;
        // With small segments the failed groups also start new segments, which must go too.
        heals_after(|f, on| f.fail_syncs.store(on, Ordering::Release), 60).await;
    }

    #[tokio::test]
    async fn a_full_disk_heals_and_a_half_written_group_is_gone() {
        heals_after(|f, on| f.fail_writes.store(on, Ordering::Release), 64 << 20).await;
        heals_after(|f, on| f.fail_writes.store(on, Ordering::Release), 60).await;
    }

    #[tokio::test]
    async fn a_stalled_disk_answers_within_the_deadline_and_stores_nothing_it_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, faults) = with_faults(dir.path(), 64 << 20, 200);
        append_n(&log, 0, 2).await;
        faults.stall_syncs_ms.store(3_000, Ordering::Release);
        let stalled = log.append(vec![b"stalled".to_vec()]).await;
        assert!(
            matches!(stalled, Err(SeamError::Unavailable(_))),
            "{stalled:?}"
        );
        assert!(
            faults.stalling.load(Ordering::Acquire),
            "answered while the disk is still stalled"
        );
        // Appends queued behind the stalled one time out too.
        let queued = log.append(vec![b"queued".to_vec()]).await;
        assert!(queued.is_err());
        faults.stall_syncs_ms.store(0, Ordering::Release);
        // Once the fsync returns, the group it made durable is cut again.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match log.append(vec![b"record-2".to_vec()]).await {
                Ok(first) => {
                    assert_eq!(first, 2, "the refused records took no offset");
                    break;
                }
                Err(_) => assert!(Instant::now() < deadline, "never recovered"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let all = read_all(&log).await;
        assert_eq!(
            all.iter().map(|(_, p)| p.clone()).collect::<Vec<_>>(),
            vec![
                b"record-0".to_vec(),
                b"record-1".to_vec(),
                b"record-2".to_vec()
            ]
        );
        log.close();
        assert_eq!(
            read_all(&open(dir.path())).await.len(),
            3,
            "nor after a reopen"
        );
    }

    #[tokio::test]
    async fn an_oversized_record_is_rejected_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path());
        let err = log
            .append(vec![vec![0; MAX_RECORD + 1]])
            .await
            .expect_err("too large");
        assert!(matches!(err, SeamError::Rejected(_)), "{err:?}");
        assert!(log.health().is_none());
        append_n(&log, 0, 1).await;
        assert_eq!(read_all(&log).await.len(), 1);
    }

    #[tokio::test]
    async fn appends_after_close_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path());
        append_n(&log, 0, 1).await;
        log.close();
        let err = log.append(vec![b"x".to_vec()]).await;
        assert!(matches!(err, Err(SeamError::Unavailable(_))), "{err:?}");
    }
}
