//! Tailing: which files to read (the one at the path, rotated ones still being drained, a
//! copytruncate copy), complete lines only, and positions that say exactly which lines have been
//! handed to a batch. File I/O is blocking (`pread` on files we hold open) and runs in tokio's
//! blocking pool; [`Filler`] is the async loop around it.
//!
//! Size: over 600 lines because the tailer is one state machine (open file, rotation by rename,
//! copytruncate, the recovery of a rotation missed while stopped) whose transitions read together;
//! its tests are in `tail/tests.rs`.
use std::ffi::OsString;
use std::fs::{self, File, Metadata};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::checkpoint::{fnv1a, Checkpoint, Entry};
use super::metrics::metrics;
use super::record::{encode_line, encode_truncated, is_blank, Batch, BatchLimits, Sealed};
use super::settings::ReadFrom;

/// Bytes read per `pread`.
const CHUNK: usize = 64 * 1024;
/// The fingerprint covers this many leading bytes (fewer while the file is shorter): enough to
/// include the first line or two, which carry a timestamp in practice, so a file truncated and
/// rewritten, or a new file on a reused inode, looks different.
pub(crate) const FP_MAX: usize = 256;

#[derive(Debug, Clone)]
pub(crate) struct TailConfig {
    pub path: PathBuf,
    pub max_line_bytes: usize,
    pub rotate_wait: Duration,
    pub read_from: ReadFrom,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(m: &Metadata) -> Self {
        FileId {
            dev: m.dev(),
            ino: m.ino(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The file at the configured path.
    Current,
    /// Renamed away or deleted; read until it has been quiet for `rotate_wait` (the app may
    /// still be writing to it until it reopens its log).
    Rotated { quiet_since: Instant },
    /// The copy a copytruncate left behind: read from our offset to its end, then dropped.
    Copy,
}

/// A line longer than the limit, being skipped: its first bytes and its length so far.
struct LongLine {
    kept: Vec<u8>,
    len: u64,
}

struct Tracked {
    file: File,
    id: FileId,
    path: PathBuf,
    role: Role,
    /// The file's first bytes (up to `FP_MAX`), as read.
    fp: Vec<u8>,
    /// Offset just after the last line handed to a batch: the checkpoint offset.
    line_end: u64,
    /// Bytes read and not yet turned into records; `buf[..start]` is consumed.
    buf: Vec<u8>,
    start: usize,
    /// File offset of `buf[0]`.
    buf_pos: u64,
    long: Option<LongLine>,
    /// Size at the last look.
    size: u64,
    /// Where reading began, counted as acknowledged for the lag until a batch is.
    initial: u64,
}

/// What the next bytes of a file give.
enum Taken {
    /// An encoded record in the scratch buffer; `consume_to` is its end in `buf`.
    Record {
        consume_to: usize,
        truncated: bool,
    },
    /// A blank line: nothing to send, but it is passed.
    Blank {
        consume_to: usize,
    },
    NeedMore,
}

impl Tracked {
    fn open_at(
        file: File,
        id: FileId,
        path: PathBuf,
        role: Role,
        fp: Vec<u8>,
        offset: u64,
        size: u64,
    ) -> Self {
        Tracked {
            file,
            id,
            path,
            role,
            fp,
            line_end: offset,
            buf: Vec::new(),
            start: 0,
            buf_pos: offset,
            long: None,
            size,
            initial: offset,
        }
    }

    fn read_pos(&self) -> u64 {
        self.buf_pos + self.buf.len() as u64
    }

    /// Start over at offset 0 (the file was truncated).
    fn reset(&mut self) {
        self.fp.clear();
        self.line_end = 0;
        self.buf.clear();
        self.start = 0;
        self.buf_pos = 0;
        self.long = None;
        self.size = 0;
        self.initial = 0;
    }

    fn entry(&self) -> Entry {
        Entry {
            path: self.path.clone(),
            dev: self.id.dev,
            ino: self.id.ino,
            fingerprint_len: self.fp.len() as u64,
            fingerprint: fnv1a(&self.fp),
            offset: self.line_end,
        }
    }

    /// Reads the next chunk; 0 at the end of the file.
    fn read_more(&mut self) -> io::Result<usize> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.buf_pos += self.start as u64;
            self.start = 0;
        }
        let off = self.read_pos();
        let old_len = self.buf.len();
        self.buf.resize(old_len + CHUNK, 0);
        let n = match self.file.read_at(&mut self.buf[old_len..], off) {
            Ok(n) => n,
            Err(e) => {
                self.buf.truncate(old_len);
                return Err(e);
            }
        };
        self.buf.truncate(old_len + n);
        // Fingerprint: the leading bytes, captured as they go by.
        let fp_len = self.fp.len() as u64;
        if fp_len < FP_MAX as u64 && off <= fp_len && off + n as u64 > fp_len {
            let from = old_len + (fp_len - off) as usize;
            let to = old_len + n.min(FP_MAX - off as usize);
            self.fp.extend_from_slice(&self.buf[from..to]);
        }
        Ok(n)
    }

    /// The next complete line, encoded into `scratch`. Lines longer than `max` are cut; while one
    /// is being skipped only its first `max` bytes are held, so memory stays bounded whatever the
    /// writer does.
    fn take_line(&mut self, max: usize, scratch: &mut Vec<u8>) -> Taken {
        scratch.clear();
        let rest = &self.buf[self.start..];
        let newline = memchr(rest);
        if let Some(long) = &mut self.long {
            return match newline {
                Some(i) => {
                    encode_truncated(&long.kept, long.len + i as u64, scratch);
                    Taken::Record {
                        consume_to: self.start + i + 1,
                        truncated: true,
                    }
                }
                None => {
                    long.len += rest.len() as u64;
                    self.start = self.buf.len();
                    Taken::NeedMore
                }
            };
        }
        match newline {
            Some(i) => {
                let line = &rest[..i];
                let consume_to = self.start + i + 1;
                if line.len() > max {
                    encode_truncated(&line[..max], line.len() as u64, scratch);
                    Taken::Record {
                        consume_to,
                        truncated: true,
                    }
                } else if is_blank(line) {
                    Taken::Blank { consume_to }
                } else {
                    encode_line(line, scratch);
                    Taken::Record {
                        consume_to,
                        truncated: false,
                    }
                }
            }
            None if rest.len() > max => {
                self.long = Some(LongLine {
                    kept: rest[..max].to_vec(),
                    len: rest.len() as u64,
                });
                self.start = self.buf.len();
                Taken::NeedMore
            }
            None => Taken::NeedMore,
        }
    }

    /// The unfinished last line of a file nobody will write to any more, as a record.
    fn take_partial(&mut self, max: usize, scratch: &mut Vec<u8>) -> Taken {
        scratch.clear();
        let rest = &self.buf[self.start..];
        let consume_to = self.buf.len();
        if let Some(long) = &self.long {
            encode_truncated(&long.kept, long.len + rest.len() as u64, scratch);
            return Taken::Record {
                consume_to,
                truncated: true,
            };
        }
        if rest.len() > max {
            encode_truncated(&rest[..max], rest.len() as u64, scratch);
            Taken::Record {
                consume_to,
                truncated: true,
            }
        } else if is_blank(rest) {
            Taken::Blank { consume_to }
        } else {
            encode_line(rest, scratch);
            Taken::Record {
                consume_to,
                truncated: false,
            }
        }
    }

    fn consume(&mut self, to: usize) {
        self.start = to;
        self.line_end = self.buf_pos + to as u64;
        self.long = None;
    }
}

fn memchr(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == b'\n')
}

/// What one [`Tailer::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Nothing new anywhere.
    Idle,
    /// Read or passed something; the batch has room for more.
    Progress,
    /// The batch cannot take the next record.
    Full,
}

/// The set of files being read for one configured path.
pub(crate) struct Tailer {
    cfg: TailConfig,
    dir: PathBuf,
    name: OsString,
    /// Reading order: rotated and copy files first (oldest first), the current file last.
    files: Vec<Tracked>,
    /// `--read-from end` applies only to the very first file, and only without a checkpoint.
    skip_existing: bool,
    waiting_logged: bool,
    scratch: Vec<u8>,
}

impl Tailer {
    /// Opens the files a checkpoint names (the current one at its offset, a rotated or copied one
    /// found in the same directory), then the file at the path.
    pub(crate) fn new(cfg: TailConfig, checkpoint: Option<Checkpoint>) -> Self {
        let dir = match cfg.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = cfg.path.file_name().unwrap_or_default().to_owned();
        let mut t = Tailer {
            skip_existing: checkpoint.is_none() && cfg.read_from == ReadFrom::End,
            cfg,
            dir,
            name,
            files: Vec::new(),
            waiting_logged: false,
            scratch: Vec::new(),
        };
        for entry in checkpoint.map(|c| c.files).unwrap_or_default() {
            t.resume(&entry);
        }
        // The current file must come last.
        t.files.sort_by_key(|f| f.role == Role::Current);
        t.discover(Instant::now());
        t
    }

    fn resume(&mut self, entry: &Entry) {
        let want = FileId {
            dev: entry.dev,
            ino: entry.ino,
        };
        if self.files.iter().any(|f| f.id == want) {
            return;
        }
        let now = Instant::now();
        let path_id = fs::metadata(&self.cfg.path).ok().map(|m| FileId::of(&m));
        // Same inode, same first bytes, not shorter: the file we were reading (at the path, or
        // renamed in this directory).
        let mut candidates = vec![self.cfg.path.clone()];
        candidates.extend(self.siblings(false));
        for path in candidates {
            let Some((file, meta)) = open_regular(&path) else {
                continue;
            };
            if FileId::of(&meta) != want || meta.len() < entry.offset {
                continue;
            }
            let Some(fp) = fingerprint_matches(&file, entry) else {
                continue;
            };
            let role = if Some(want) == path_id {
                Role::Current
            } else {
                info!(file = %path.display(), offset = entry.offset, "finishing a file rotated while the forwarder was stopped");
                Role::Rotated { quiet_since: now }
            };
            let size = meta.len();
            self.files.push(Tracked::open_at(
                file,
                want,
                path,
                role,
                fp,
                entry.offset,
                size,
            ));
            return;
        }
        // Another inode with the same first bytes and at least our offset: the copy a
        // copytruncate made (the original is now shorter or rewritten).
        if entry.fingerprint_len > 0 {
            let mut best: Option<(SystemTime, PathBuf, File, Metadata, Vec<u8>)> = None;
            for path in self.siblings(true) {
                let Some((file, meta)) = open_regular(&path) else {
                    continue;
                };
                let id = FileId::of(&meta);
                if Some(id) == path_id
                    || self.files.iter().any(|f| f.id == id)
                    || meta.len() < entry.offset
                {
                    continue;
                }
                let Some(fp) = fingerprint_matches(&file, entry) else {
                    continue;
                };
                let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                if best.as_ref().is_none_or(|b| mtime > b.0) {
                    best = Some((mtime, path, file, meta, fp));
                }
            }
            if let Some((_, path, file, meta, fp)) = best {
                info!(copy = %path.display(), offset = entry.offset, "the log was truncated (copytruncate) while the forwarder was stopped; finishing it from the copy");
                self.files.push(Tracked::open_at(
                    file,
                    FileId::of(&meta),
                    path,
                    Role::Copy,
                    fp,
                    entry.offset,
                    meta.len(),
                ));
                return;
            }
        }
        if entry.offset > 0 || entry.fingerprint_len > 0 {
            warn!(
                file = %entry.path.display(),
                inode = entry.ino,
                offset = entry.offset,
                "a file named in the checkpoint is gone (rotated more than once, or deleted, while the forwarder was stopped); lines written to it after that offset are lost"
            );
        }
    }

    /// Regular files in the log's directory other than the log itself; with `prefixed`, only
    /// those whose name starts with the log's name (`app.log.1`, `app.log-20240501`).
    fn siblings(&self, prefixed: bool) -> Vec<PathBuf> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let name = self.name.as_encoded_bytes();
        entries
            .flatten()
            .filter(|e| {
                let n = e.file_name();
                let n = n.as_encoded_bytes();
                n != name && (!prefixed || n.starts_with(name))
            })
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.path())
            .collect()
    }

    fn current(&self) -> Option<usize> {
        self.files.iter().position(|f| f.role == Role::Current)
    }

    /// Looks at the path: rotation (another inode there, or none), truncation (same inode,
    /// shorter or different first bytes), or a file appearing.
    fn discover(&mut self, now: Instant) {
        let meta = match fs::metadata(&self.cfg.path) {
            Ok(m) if m.is_file() => Some(m),
            Ok(_) => None,
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                debug!(file = %self.cfg.path.display(), error = %e, "cannot stat the log file");
                return;
            }
        };
        let current = self.current();
        let Some(meta) = meta else {
            if let Some(i) = current {
                info!(file = %self.cfg.path.display(), "the log file was moved away or deleted; reading the rest of it");
                self.files[i].role = Role::Rotated { quiet_since: now };
            } else if !self.waiting_logged {
                info!(file = %self.cfg.path.display(), "waiting for the log file to appear");
                self.waiting_logged = true;
            }
            return;
        };
        let id = FileId::of(&meta);
        if let Some(i) = current {
            if self.files[i].id == id {
                self.check_truncation(i, meta.len());
                return;
            }
        }
        // A different file at the path. Open it first: the path may change again in between,
        // and the descriptor is what we will read.
        let Some((file, meta)) = open_regular(&self.cfg.path) else {
            return;
        };
        let id = FileId::of(&meta);
        if let Some(i) = current {
            if self.files[i].id == id {
                return;
            }
            info!(file = %self.cfg.path.display(), "the log file was rotated; finishing the old one first");
            self.files[i].role = Role::Rotated { quiet_since: now };
        }
        if let Some(j) = self.files.iter().position(|f| f.id == id) {
            // A file we are draining came back under the path (renamed back).
            self.files[j].role = Role::Current;
            let f = self.files.remove(j);
            self.files.push(f);
            return;
        }
        let start = if std::mem::take(&mut self.skip_existing) {
            meta.len()
        } else {
            0
        };
        // Read from 0, the fingerprint is captured as the bytes go by; from the end, now.
        let fp = if start == 0 {
            Vec::new()
        } else {
            read_prefix(&file, FP_MAX).unwrap_or_default()
        };
        debug!(file = %self.cfg.path.display(), inode = id.ino, start, "reading a new log file");
        self.waiting_logged = false;
        self.files.push(Tracked::open_at(
            file,
            id,
            self.cfg.path.clone(),
            Role::Current,
            fp,
            start,
            meta.len(),
        ));
    }

    fn check_truncation(&mut self, i: usize, size: u64) {
        let f = &self.files[i];
        let shrunk = size < f.read_pos();
        // Checked on every look, not only when the size moved: a file truncated and rewritten
        // to the very same size (equal-length lines) is otherwise invisible. One small pread.
        let rewritten = !shrunk
            && !f.fp.is_empty()
            && read_prefix(&f.file, f.fp.len()).is_ok_and(|p| p != f.fp);
        if !shrunk && !rewritten {
            self.files[i].size = size;
            return;
        }
        let (line_end, old_size, fp, id) =
            (f.line_end, f.size.max(f.read_pos()), f.fp.clone(), f.id);
        let copy = if line_end > 0 && !fp.is_empty() {
            self.find_copy(&fp, id, line_end)
        } else {
            None
        };
        match copy {
            Some((path, file, meta)) => {
                info!(file = %self.cfg.path.display(), copy = %path.display(), offset = line_end, "the log file was truncated (copytruncate); reading the rest from the copy first");
                let copy = Tracked::open_at(
                    file,
                    FileId::of(&meta),
                    path,
                    Role::Copy,
                    fp,
                    line_end,
                    meta.len(),
                );
                self.files.insert(i, copy);
            }
            None if old_size > line_end => warn!(
                file = %self.cfg.path.display(),
                possibly_lost_bytes = old_size - line_end,
                "the log file was truncated before it was read to the end and no copy of it was found next to it; those lines are lost"
            ),
            None => {
                info!(file = %self.cfg.path.display(), "the log file was truncated; reading it from the start");
            }
        }
        let f = self.files.iter_mut().find(|f| f.role == Role::Current);
        if let Some(f) = f {
            f.reset();
            f.size = size;
        }
    }

    /// The newest sibling `<name>*` (another inode) whose first bytes are `fp` and that has at
    /// least `min_len` bytes.
    fn find_copy(&self, fp: &[u8], not: FileId, min_len: u64) -> Option<(PathBuf, File, Metadata)> {
        let mut best: Option<(SystemTime, PathBuf, File, Metadata)> = None;
        for path in self.siblings(true) {
            let Some((file, meta)) = open_regular(&path) else {
                continue;
            };
            let id = FileId::of(&meta);
            if id == not || meta.len() < min_len || self.files.iter().any(|f| f.id == id) {
                continue;
            }
            if read_prefix(&file, fp.len()).ok().as_deref() != Some(fp) {
                continue;
            }
            let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            if best.as_ref().is_none_or(|b| mtime > b.0) {
                best = Some((mtime, path, file, meta));
            }
        }
        best.map(|(_, p, f, m)| (p, f, m))
    }

    /// Moves complete lines into `batch` from every tracked file in order (each rotated file to
    /// its end before the next), until the batch is full or nothing is left to read.
    pub(crate) fn step(&mut self, batch: &mut Batch, now: Instant) -> Step {
        self.discover(now);
        let max = self.cfg.max_line_bytes;
        let m = metrics();
        let mut progressed = false;
        let mut i = 0;
        while i < self.files.len() {
            let f = &mut self.files[i];
            let mut read_any = false;
            loop {
                match f.take_line(max, &mut self.scratch) {
                    Taken::Record {
                        consume_to,
                        truncated,
                    } => {
                        if !batch.try_push(&self.scratch, now) {
                            return Step::Full;
                        }
                        f.consume(consume_to);
                        m.lines_read.inc();
                        if truncated {
                            m.lines_truncated.inc();
                        }
                        progressed = true;
                        if batch.is_full() {
                            return Step::Full;
                        }
                    }
                    Taken::Blank { consume_to } => {
                        f.consume(consume_to);
                        progressed = true;
                    }
                    Taken::NeedMore => match f.read_more() {
                        Ok(0) => break,
                        Ok(_) => read_any = true,
                        Err(e) => {
                            warn!(file = %f.path.display(), error = %e, "cannot read the log file; will try again");
                            break;
                        }
                    },
                }
            }
            progressed |= read_any;
            let done = match f.role {
                Role::Current => false,
                Role::Copy => true,
                Role::Rotated { quiet_since } => {
                    if read_any {
                        f.role = Role::Rotated { quiet_since: now };
                        false
                    } else {
                        now.saturating_duration_since(quiet_since) >= self.cfg.rotate_wait
                    }
                }
            };
            if done {
                // Nobody will finish its last line now: send it as it is.
                match f.take_partial(max, &mut self.scratch) {
                    Taken::Record {
                        consume_to,
                        truncated,
                    } => {
                        if !batch.try_push(&self.scratch, now) {
                            return Step::Full;
                        }
                        f.consume(consume_to);
                        m.lines_read.inc();
                        if truncated {
                            m.lines_truncated.inc();
                        }
                    }
                    Taken::Blank { consume_to } => f.consume(consume_to),
                    Taken::NeedMore => {}
                }
                debug!(file = %f.path.display(), "finished a rotated log file");
                self.files.remove(i);
                progressed = true;
                continue;
            }
            i += 1;
        }
        if progressed {
            Step::Progress
        } else {
            Step::Idle
        }
    }

    /// Where every tracked file stands: what the checkpoint will say once the batch filled so
    /// far is acknowledged.
    pub(crate) fn positions(&self) -> Vec<Entry> {
        self.files.iter().map(Tracked::entry).collect()
    }

    /// Bytes in the tracked files beyond what the collector acknowledged.
    pub(crate) fn lag(&self, acked: &[Entry]) -> u64 {
        self.files
            .iter()
            .map(|f| {
                let size = f.file.metadata().map(|m| m.len()).unwrap_or(f.size);
                let done = acked
                    .iter()
                    .find(|e| e.dev == f.id.dev && e.ino == f.id.ino)
                    .map_or(f.initial, |e| e.offset);
                size.saturating_sub(done)
            })
            .sum()
    }

    pub(crate) fn update_lag(&self, acked: &Mutex<Vec<Entry>>) {
        let acked = acked.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let lag = self.lag(&acked);
        metrics()
            .lag_bytes
            .set(i64::try_from(lag).unwrap_or(i64::MAX));
    }
}

fn open_regular(path: &Path) -> Option<(File, Metadata)> {
    let file = File::open(path).ok()?;
    let meta = file.metadata().ok()?;
    meta.is_file().then_some((file, meta))
}

/// The first `len` bytes (fewer if the file is shorter).
fn read_prefix(file: &File, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; len];
    let mut got = 0;
    while got < len {
        match file.read_at(&mut buf[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// If the file's first `entry.fingerprint_len` bytes hash to `entry.fingerprint`, its first
/// `FP_MAX` bytes (the fingerprint to carry on with).
fn fingerprint_matches(file: &File, entry: &Entry) -> Option<Vec<u8>> {
    let len = usize::try_from(entry.fingerprint_len).ok()?;
    let prefix = read_prefix(file, FP_MAX.max(len)).ok()?;
    (prefix.len() >= len && fnv1a(&prefix[..len]) == entry.fingerprint).then(|| {
        let mut fp = prefix;
        fp.truncate(FP_MAX);
        fp
    })
}

/// The async side of reading: reserve room for a batch, fill it (blocking steps in the blocking
/// pool, a poll-interval pause when there is nothing new), seal it, hand it over.
pub(crate) struct Filler {
    pub tailer: Tailer,
    pub limits: BatchLimits,
    pub service: String,
    pub gzip: bool,
    pub poll_interval: Duration,
    pub acked: Arc<Mutex<Vec<Entry>>>,
}

impl Filler {
    pub(crate) async fn run(
        self,
        tx: mpsc::Sender<Sealed>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let Filler {
            mut tailer,
            limits,
            service,
            gzip,
            poll_interval,
            acked,
        } = self;
        let service = Arc::new(service);
        loop {
            // Room first: while the shipper still holds a batch in flight and one waiting, we do
            // not read (the file is the buffer). The lag keeps being measured meanwhile.
            let permit = loop {
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return Ok(()),
                    p = tx.reserve() => match p {
                        Ok(p) => break p,
                        Err(_) => return Ok(()),
                    },
                    () = tokio::time::sleep(poll_interval) => {
                        let acked = acked.clone();
                        tailer = tokio::task::spawn_blocking(move || {
                            tailer.update_lag(&acked);
                            tailer
                        })
                        .await
                        .context("lag task")?;
                    }
                }
            };

            let mut batch = Batch::new(limits, &service);
            loop {
                // Once stopping, one last step takes what the file already holds (up to the
                // batch's limits), so lines written before SIGTERM go out with this batch.
                let stopping = shutdown.is_cancelled();
                let now = Instant::now();
                let acked = acked.clone();
                let (t, b, step) = tokio::task::spawn_blocking(move || {
                    let step = tailer.step(&mut batch, now);
                    tailer.update_lag(&acked);
                    (tailer, batch, step)
                })
                .await
                .context("tail task")?;
                (tailer, batch) = (t, b);
                if step == Step::Full || batch.is_due(Instant::now()) || stopping {
                    break;
                }
                if step == Step::Progress || shutdown.is_cancelled() {
                    continue;
                }
                let mut wake = tokio::time::Instant::now() + poll_interval;
                if let Some(due) = batch.due_at() {
                    let left = due.saturating_duration_since(Instant::now());
                    wake = wake.min(tokio::time::Instant::now() + left);
                }
                tokio::select! {
                    () = tokio::time::sleep_until(wake) => {}
                    () = shutdown.cancelled() => {}
                }
            }

            if !batch.is_empty() {
                let positions = tailer.positions();
                let service = service.clone();
                let sealed = tokio::task::spawn_blocking(move || {
                    batch.seal(&service, SystemTime::now(), gzip, positions)
                })
                .await
                .context("seal task")?;
                permit.send(sealed);
            }
            if shutdown.is_cancelled() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
