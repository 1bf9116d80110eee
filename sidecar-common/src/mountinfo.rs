//! `/proc/<pid>/mountinfo`, parsed once for every crate of the workspace (the sidecar's cgroup2
//! discovery, the xtask's host checks, the test harness's fixtures).
extern crate std;

use std::borrow::ToOwned;
use std::fs;
use std::io;
use std::path::PathBuf;
use std::string::String;
use std::vec::Vec;

/// One line of mountinfo: where, what, and which part of the filesystem is mounted there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The mount point, unescaped.
    pub mount_point: PathBuf,
    /// The root of the mount within its filesystem ("/" for a whole filesystem, a subtree for a
    /// bind mount or a cgroup namespace's view), unescaped.
    pub root: String,
    pub fs_type: String,
}

/// Every mount of this process's mount namespace.
pub fn read() -> io::Result<Vec<Mount>> {
    Ok(parse(&fs::read_to_string("/proc/self/mountinfo")?))
}

/// The mounts of `fs_type` of this process's mount namespace (none if mountinfo is unreadable).
pub fn of_type(fs_type: &str) -> Vec<Mount> {
    read()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.fs_type == fs_type)
        .collect()
}

/// Parses mountinfo text; lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines().filter_map(parse_line).collect()
}

/// "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw": the optional fields vary
/// in number, so the fs type is the word after the lone "-".
pub fn parse_line(line: &str) -> Option<Mount> {
    let (left, right) = line.split_once(" - ")?;
    let mut fields = left.split(' ');
    let root = fields.nth(3)?;
    let mount_point = fields.next()?;
    let fs_type = right.split(' ').next()?;
    // The kernel always writes an absolute mount point and a type; anything else is not a
    // mountinfo line (found by fuzzing: a garbled line gave an empty mount point).
    if !mount_point.starts_with('/') || fs_type.is_empty() {
        return None;
    }
    Some(Mount {
        mount_point: PathBuf::from(unescape(mount_point)),
        root: unescape(root),
        fs_type: fs_type.to_owned(),
    })
}

/// mountinfo writes space, tab, newline and backslash as `\040`, `\011`, `\012`, `\134`.
pub fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            let value = bytes
                .get(i + 1..i + 4)
                .filter(|o| o.iter().all(|b| (b'0'..=b'7').contains(b)))
                .map(|o| o.iter().fold(0u16, |acc, b| acc * 8 + u16::from(b - b'0')));
            if let Some(Ok(v)) = value.map(u8::try_from) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse() {
        let m =
            parse_line("36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 shared:2 - ext3 /dev/root rw")
                .unwrap();
        assert_eq!(m.mount_point, PathBuf::from("/mnt2"));
        assert_eq!(m.root, "/mnt1");
        assert_eq!(m.fs_type, "ext3");
        let m = parse_line(r"28 1 0:26 / /mnt/with\040space rw - cgroup2 none rw").unwrap();
        assert_eq!(m.mount_point, PathBuf::from("/mnt/with space"));
        assert!(parse_line("garbage").is_none());
        // Found by fuzzing: a garbled line is not a mount with an empty mount point.
        assert!(parse_line("   -``  -    ").is_none());
        assert!(parse_line("28 1 0:26 / relative rw - ext4 x rw").is_none());
    }

    #[test]
    fn escapes() {
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape(r"/mnt/trailing\"), r"/mnt/trailing\");
        assert_eq!(unescape(r"/x\04"), r"/x\04");
        assert_eq!(unescape(r"/x\999"), r"/x\999");
        assert_eq!(unescape(r"a\134b"), r"a\b");
    }
}
