//! The embedded event log: segment files of CRC-checked records in a directory, with group
//! commit (every append waiting at the time shares one fsync) on a dedicated writer thread.
//!
//! On disk: `<dir>/<base offset, 20 digits>.log`, each a run of records
//! `[payload length: u32 LE][crc32 of payload: u32 LE][payload]`. A segment's record count is
//! the next segment's base, so only the last segment is scanned on open; a torn or corrupt tail
//! there (a crash mid-write) is cut off. Everything that was acknowledged was fsync'd first, so
//! the cut only removes records no caller was told about.
//!
//! A failed write or fsync poisons the log: the page cache may have dropped the data, so no
//! later append is trusted (as fjall and redb do). The process must restart, which re-reads the
//! disk.

use postback_core::seams::{BoxFuture, EventLog, Record, SeamError};
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use tokio::sync::{oneshot, watch};

const HEADER: usize = 8;
/// Larger records are refused: the front end's own limits are far below this.
const MAX_RECORD: usize = 16 << 20;

#[derive(Debug, Clone)]
pub struct LogOptions {
    /// A segment is closed and a new one started once it is this large.
    pub segment_bytes: u64,
    /// fsync after each group of appends. Off only for benchmarks that measure its cost.
    pub fsync: bool,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            fsync: true,
        }
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
    poisoned: AtomicBool,
    /// The last read position, so that sequential reads do not rescan a segment.
    cursor: Mutex<Option<(u64, usize, u64)>>,
    end_tx: watch::Sender<u64>,
}

struct AppendRequest {
    records: Vec<Vec<u8>>,
    reply: oneshot::Sender<Result<Vec<u64>, SeamError>>,
}

/// The embedded implementation of [`EventLog`].
pub struct EmbeddedEventLog {
    shared: Arc<Shared>,
    requests: Mutex<Option<mpsc::Sender<AppendRequest>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    end_rx: watch::Receiver<u64>,
}

fn io_err(context: &str, e: std::io::Error) -> SeamError {
    SeamError::Unavailable(format!("{context}: {e}"))
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

impl EmbeddedEventLog {
    /// Opens (or creates) the log in `dir`, recovering from a torn tail.
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
            poisoned: AtomicBool::new(false),
            cursor: Mutex::new(None),
            end_tx,
        });
        let file = OpenOptions::new()
            .append(true)
            .open(&last.path)
            .map_err(|e| io_err("open segment", e))?;
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            shared: shared.clone(),
            options,
            file: BufWriter::with_capacity(1 << 20, file),
            segment_bytes: valid_bytes,
            next: end,
        };
        let handle = std::thread::Builder::new()
            .name("event-log-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| io_err("start log writer", e))?;
        Ok(Self {
            shared,
            requests: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(handle)),
            end_rx,
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
    fn read(&self, from: u64, max: usize) -> Result<Vec<Record>, SeamError> {
        let end = self.durable_end.load(Ordering::Acquire);
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
            while at < seg_end && out.len() < max {
                let payload = read_record(&mut reader)?
                    .ok_or_else(|| SeamError::Fatal(format!("segment {} ends early", seg.base)))?;
                pos += (HEADER + payload.len()) as u64;
                if at >= offset {
                    out.push((at, payload));
                }
                at += 1;
            }
            offset = at;
            *self.cursor.lock().map_err(|_| poisoned())? = Some((at, idx, pos));
            if at == seg_end && seg_end < end {
                continue;
            }
            break;
        }
        Ok(out)
    }
}

impl Drop for EmbeddedEventLog {
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
    if crc32fast::hash(&payload) != crc {
        return Ok(Some(Err("checksum mismatch".into())));
    }
    Ok(Some(Ok(payload)))
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

struct Writer {
    shared: Arc<Shared>,
    options: LogOptions,
    file: BufWriter<File>,
    segment_bytes: u64,
    next: u64,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<AppendRequest>) {
        while let Ok(first) = rx.recv() {
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
            let result = self.write_group(&group);
            metrics::counter!("postbackd_log_fsyncs_total").increment(1);
            metrics::histogram!("postbackd_log_group_records").record(n as f64);
            match result {
                Ok(firsts) => {
                    for (req, first) in group.into_iter().zip(firsts) {
                        let offsets = (first..first + req.records.len() as u64).collect();
                        let _ = req.reply.send(Ok(offsets));
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    for req in group {
                        let _ = req.reply.send(Err(SeamError::Unavailable(msg.clone())));
                    }
                }
            }
        }
        let _ = self.file.flush();
        let _ = self.file.get_ref().sync_data();
    }

    fn write_group(&mut self, group: &[AppendRequest]) -> Result<Vec<u64>, SeamError> {
        if self.shared.poisoned.load(Ordering::Acquire) {
            return Err(SeamError::Fatal(
                "the event log is poisoned by an earlier IO error".into(),
            ));
        }
        let result = self.try_write_group(group);
        if result.is_err() {
            self.shared.poisoned.store(true, Ordering::Release);
        }
        result
    }

    fn try_write_group(&mut self, group: &[AppendRequest]) -> Result<Vec<u64>, SeamError> {
        let mut firsts = Vec::with_capacity(group.len());
        for req in group {
            firsts.push(self.next);
            for record in &req.records {
                if record.len() > MAX_RECORD {
                    return Err(SeamError::Fatal("record too large".into()));
                }
                if self.segment_bytes >= self.options.segment_bytes {
                    self.roll()?;
                }
                let len = u32::try_from(record.len())
                    .map_err(|_| SeamError::Fatal("record too large".into()))?;
                self.file
                    .write_all(&len.to_le_bytes())
                    .map_err(|e| io_err("write", e))?;
                self.file
                    .write_all(&crc32fast::hash(record).to_le_bytes())
                    .map_err(|e| io_err("write", e))?;
                self.file
                    .write_all(record)
                    .map_err(|e| io_err("write", e))?;
                self.segment_bytes += (HEADER + record.len()) as u64;
                self.next += 1;
            }
        }
        self.file.flush().map_err(|e| io_err("write", e))?;
        if self.options.fsync {
            self.file
                .get_ref()
                .sync_data()
                .map_err(|e| io_err("fsync", e))?;
        }
        self.shared.durable_end.store(self.next, Ordering::Release);
        self.shared.end_tx.send_replace(self.next);
        Ok(firsts)
    }

    /// Seals the current segment and starts the next at the current end.
    fn roll(&mut self) -> Result<(), SeamError> {
        self.file.flush().map_err(|e| io_err("write", e))?;
        self.file
            .get_ref()
            .sync_data()
            .map_err(|e| io_err("fsync", e))?;
        let path = segment_path(&self.shared.dir, self.next);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_err("create segment", e))?;
        sync_dir(&self.shared.dir)?;
        self.file = BufWriter::with_capacity(1 << 20, file);
        self.segment_bytes = 0;
        self.shared
            .segments
            .lock()
            .map_err(|_| poisoned())?
            .push(Segment {
                base: self.next,
                path,
            });
        Ok(())
    }
}

impl EventLog for EmbeddedEventLog {
    fn append(&self, records: Vec<Vec<u8>>) -> BoxFuture<'_, Result<Vec<u64>, SeamError>> {
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            let sent = self.requests.lock().ok().and_then(|r| {
                r.as_ref()
                    .map(|tx| tx.send(AppendRequest { records, reply }))
            });
            match sent {
                Some(Ok(())) => rx
                    .await
                    .unwrap_or_else(|_| Err(SeamError::Unavailable("log writer stopped".into()))),
                _ => Err(SeamError::Unavailable("the event log is closed".into())),
            }
        })
    }

    fn read(&self, from: u64, max: usize) -> BoxFuture<'_, Result<Vec<Record>, SeamError>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || shared.read(from, max))
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
            // A segment can go when the next one starts at or before `offset`; the last stays.
            while segments.len() > 1 && segments[1].base <= offset {
                let seg = segments.remove(0);
                fs::remove_file(&seg.path).map_err(|e| io_err("remove segment", e))?;
            }
            *self.shared.cursor.lock().map_err(|_| poisoned())? = None;
            Ok(segments.first().map_or(0, |s| s.base))
        })
    }

    fn close(&self) {
        self.stop_writer();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postback_core::seams::conformance;

    fn open(dir: &Path) -> EmbeddedEventLog {
        EmbeddedEventLog::open(dir, LogOptions::default()).expect("opens")
    }

    fn small_segments(dir: &Path) -> EmbeddedEventLog {
        EmbeddedEventLog::open(
            dir,
            LogOptions {
                segment_bytes: 100,
                fsync: true,
            },
        )
        .expect("opens")
    }

    #[tokio::test]
    async fn conforms() {
        for check in 0..5 {
            let dir = tempfile::tempdir().expect("tempdir");
            // Small segments, so that truncation and reads cross segment boundaries.
            let log = small_segments(dir.path());
            match check {
                0 => conformance::append_then_read(&log).await,
                1 => conformance::records_are_kept_exactly(&log).await,
                2 => conformance::wait_for_wakes_on_append(&log).await,
                3 => conformance::truncate_keeps_the_rest(&log).await,
                _ => conformance::concurrent_appends_are_all_kept(&log).await,
            }
        }
    }

    async fn append_n(log: &EmbeddedEventLog, from: usize, n: usize) {
        let records = (from..from + n)
            .map(|i| format!("record-{i}").into_bytes())
            .collect();
        log.append(records).await.expect("append");
    }

    async fn read_all(log: &EmbeddedEventLog) -> Vec<Record> {
        log.read(0, usize::MAX).await.expect("read")
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
        // A crash in the middle of writing record 10: its header and half its payload.
        let seg = last_segment(dir.path());
        let mut f = OpenOptions::new().append(true).open(&seg).expect("open");
        let payload = b"record-10";
        f.write_all(&(payload.len() as u32).to_le_bytes())
            .expect("write");
        f.write_all(&crc32fast::hash(payload).to_le_bytes())
            .expect("write");
        f.write_all(&payload[..4]).expect("write");
        drop(f);
        let log = open(dir.path());
        assert_eq!(log.end(), 10);
        append_n(&log, 10, 1).await;
        let all = read_all(&log).await;
        assert_eq!(all.len(), 11);
        assert_eq!(all[10].1, b"record-10".to_vec());
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
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff; // flip the last payload byte of record 2
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
        let full = fs::read(&seg).expect("read");
        let mut boundaries = vec![0usize];
        for n in &sizes {
            boundaries.push(boundaries.last().copied().unwrap_or(0) + HEADER + n);
        }
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
        let mid = log.read(95, 10).await.expect("read");
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
        let rest = log.read(0, 1000).await.expect("read");
        assert_eq!(rest.first().map(|(o, _)| *o), Some(start));
        assert_eq!(rest.len() as u64, 200 - start);
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
