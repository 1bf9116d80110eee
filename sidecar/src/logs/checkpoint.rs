//! The durable "how far did the collector get" record: one entry per file being read, written
//! atomically after each acknowledged batch.
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::{error, warn};

const VERSION: u32 = 1;

/// One file's position: identity (device, inode, fingerprint) and the offset after the last line
/// the collector acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Where the file was last seen (informational: files are found by identity).
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
    /// How many leading bytes the fingerprint covers (up to 256; fewer for a shorter file).
    pub fingerprint_len: u64,
    /// FNV-1a 64 of those bytes, hex.
    pub fingerprint: String,
    pub offset: u64,
}

/// The checkpoint file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub version: u32,
    /// The configured log path this checkpoint is for.
    pub source: PathBuf,
    /// Files in reading order: rotated ones still being drained first, the current one last.
    pub files: Vec<Entry>,
}

impl Checkpoint {
    pub fn new(source: PathBuf, files: Vec<Entry>) -> Self {
        Checkpoint {
            version: VERSION,
            source,
            files,
        }
    }
}

/// FNV-1a 64: stable across builds and platforms (std's hasher is not), and enough to tell two
/// files' first bytes apart.
pub(crate) fn fnv1a(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Reads the checkpoint for `source`. Missing: `None`. Unreadable or corrupt: moved aside to
/// `<path>.corrupt` (kept for a post-mortem) and `None`, so the forwarder starts over and sends
/// duplicates rather than refusing to start forever. For another source: ignored.
pub(crate) fn load_or_quarantine(path: &Path, source: &Path) -> Option<Checkpoint> {
    let text = match fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            error!(checkpoint = %path.display(), error = %e, "cannot read the checkpoint; starting from the beginning of the log");
            return None;
        }
    };
    match serde_json::from_slice::<Checkpoint>(&text) {
        Ok(c) if c.version == VERSION && c.source == source => Some(c),
        Ok(c) if c.version == VERSION => {
            warn!(
                checkpoint = %path.display(),
                checkpoint_for = %c.source.display(),
                file = %source.display(),
                "the checkpoint belongs to another log file; ignoring it"
            );
            None
        }
        parsed => {
            let aside = path.with_extension("corrupt");
            let moved = fs::rename(path, &aside);
            error!(
                checkpoint = %path.display(),
                moved_to = %aside.display(),
                moved = moved.is_ok(),
                problem = ?parsed.err().map(|e| e.to_string()),
                "the checkpoint is unreadable or of another version; starting from the beginning of the log (lines may be sent twice)"
            );
            None
        }
    }
}

/// Writes `checkpoint` to `path` so that a crash at any point leaves either the old or the new
/// content: temp file, fsync, rename over, fsync of the directory (so the rename itself survives).
pub(crate) fn store(path: &Path, checkpoint: &Checkpoint) -> io::Result<()> {
    let text = serde_json::to_vec(checkpoint).map_err(io::Error::other)?;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::tests::TempDir;

    fn sample(source: &Path) -> Checkpoint {
        Checkpoint::new(
            source.to_path_buf(),
            vec![Entry {
                path: source.to_path_buf(),
                dev: 1,
                ino: 2,
                fingerprint_len: 3,
                fingerprint: fnv1a(b"abc"),
                offset: 42,
            }],
        )
    }

    #[test]
    fn store_then_load_round_trips_and_leaves_no_temp_file() {
        let dir = TempDir::new("ckpt-roundtrip");
        let source = dir.path().join("app.log");
        let path = dir.path().join("ckpt");
        let c = sample(&source);
        assert!(store(&path, &c).is_ok());
        assert_eq!(load_or_quarantine(&path, &source), Some(c));
        assert!(!dir.path().join("ckpt.tmp").exists());
    }

    #[test]
    fn corrupt_checkpoints_are_moved_aside() {
        let dir = TempDir::new("ckpt-corrupt");
        let source = dir.path().join("app.log");
        let path = dir.path().join("ckpt");
        assert!(fs::write(&path, b"{\"version\":1,\"sour").is_ok());
        assert_eq!(load_or_quarantine(&path, &source), None);
        assert!(!path.exists());
        assert!(dir.path().join("ckpt.corrupt").exists());
    }

    #[test]
    fn checkpoints_of_another_file_are_ignored_and_kept() {
        let dir = TempDir::new("ckpt-other");
        let path = dir.path().join("ckpt");
        assert!(store(&path, &sample(&dir.path().join("other.log"))).is_ok());
        assert_eq!(load_or_quarantine(&path, &dir.path().join("app.log")), None);
        assert!(path.exists());
    }

    #[test]
    fn fingerprints_are_stable() {
        // FNV-1a 64 test vectors.
        assert_eq!(fnv1a(b""), "cbf29ce484222325");
        assert_eq!(fnv1a(b"a"), "af63dc4c8601ec8c");
    }
}
