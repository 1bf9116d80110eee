//! The bpf(2) commands aya 0.14 does not expose, in one place (every raw `SYS_bpf` call of the
//! crate is here): pinnable links for cgroup/getsockopt and sk_lookup programs (aya can attach
//! them, but has no `FdLink` conversion for them), link info (which cgroup or netns a link is
//! attached to), read-only opening of a pin, a lookup with a run-time value size, and
//! `BPF_PROG_QUERY` for `sidecar doctor`. Imports nothing from the crate.
use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
/// `BPF_CGROUP_GETSOCKOPT` in `enum bpf_attach_type`.
pub const BPF_CGROUP_GETSOCKOPT: u32 = 21;
/// `BPF_SK_MSG_VERDICT` in `enum bpf_attach_type` (an sk_msg program on a SOCKHASH; as a link,
/// kernels >= 6.10).
pub const BPF_SK_MSG_VERDICT: u32 = 7;

/// `union bpf_attr` is larger than any one command's fields; the kernel checks that the bytes past
/// the command's fields are zero, so a zeroed buffer of the full size is passed.
#[repr(C, align(8))]
struct Attr([u8; 144]);

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: attr is a valid, fully initialised buffer of the size passed.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut Attr, size_of::<Attr>()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// BPF_LINK_CREATE: { prog_fd, target_fd, attach_type, flags = 0 }; the target is a cgroup, a
/// netns or a SOCKHASH (cgroup links are always multi-attach; the kernel rejects flags).
pub fn link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr = Attr([0; 144]);
    let fields = [
        prog.as_raw_fd() as u32,
        cgroup.as_raw_fd() as u32,
        attach_type,
        0,
    ];
    for (i, v) in fields.iter().enumerate() {
        attr.0[4 * i..4 * i + 4].copy_from_slice(&v.to_ne_bytes());
    }
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// BPF_OBJ_PIN: { pathname (u64 pointer), bpf_fd }.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut attr = Attr([0; 144]);
    attr.0[0..8].copy_from_slice(&(c_path.as_ptr() as u64).to_ne_bytes());
    attr.0[8..12].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `BPF_SK_LOOKUP` in `enum bpf_attach_type`.
pub const BPF_SK_LOOKUP: u32 = 36;
const BPF_LINK_TYPE_CGROUP: u32 = 3;
const BPF_LINK_TYPE_NETNS: u32 = 5;
const BPF_LINK_TYPE_SOCKMAP: u32 = 14;

/// What a link is attached to, from `struct bpf_link_info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkTarget {
    /// A cgroup link; id 0 once the cgroup is gone (the kernel auto-detached it).
    Cgroup {
        cgroup_id: u64,
    },
    /// A netns link; inode 0 once the namespace is gone.
    Netns {
        netns_ino: u32,
    },
    /// An sk_msg link on a SOCKHASH (the in-pod redirect).
    Sockmap {
        map_id: u32,
    },
    Other,
}

#[derive(Debug, Clone, Copy)]
pub struct LinkInfo {
    pub id: u32,
    pub prog_id: u32,
    pub target: LinkTarget,
}

/// BPF_OBJ_GET_INFO_BY_FD on a link. aya's `LinkInfo` does not expose the cgroup or netns, which
/// is what tells a live pod from a dead one.
pub fn link_info(fd: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    // struct bpf_link_info: type, id, prog_id (u32 each), then an 8-byte aligned union at 16.
    let mut info = [0u8; 64];
    let mut attr = Attr([0; 144]);
    attr.0[0..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr.0[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes());
    attr.0[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let u32_at = |o: usize| u32::from_ne_bytes([info[o], info[o + 1], info[o + 2], info[o + 3]]);
    let target = match u32_at(0) {
        BPF_LINK_TYPE_CGROUP => LinkTarget::Cgroup {
            cgroup_id: u64::from(u32_at(16)) | (u64::from(u32_at(20)) << 32),
        },
        BPF_LINK_TYPE_NETNS => LinkTarget::Netns {
            netns_ino: u32_at(16),
        },
        BPF_LINK_TYPE_SOCKMAP => LinkTarget::Sockmap { map_id: u32_at(16) },
        _ => LinkTarget::Other,
    };
    Ok(LinkInfo {
        id: u32_at(4),
        prog_id: u32_at(8),
        target,
    })
}

const BPF_OBJ_GET: libc::c_long = 7;

/// `BPF_F_RDONLY`: open a pinned map for reading only (needs only read permission on the pin).
const BPF_F_RDONLY: u32 = 1 << 3;

/// BPF_OBJ_GET: opens a pinned object (read-only use: info queries).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    obj_get_with_flags(path, 0)
}

/// BPF_OBJ_GET with `BPF_F_RDONLY`: aya opens pins read-write, which needs write permission on
/// the pin as well; this needs only read permission (the proxy's kernel-counter export).
pub fn obj_get_rdonly(path: &Path) -> io::Result<OwnedFd> {
    obj_get_with_flags(path, BPF_F_RDONLY)
}

/// BPF_OBJ_GET: { pathname, bpf_fd = 0, file_flags }.
fn obj_get_with_flags(path: &Path, file_flags: u32) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut attr = Attr([0; 144]);
    attr.0[0..8].copy_from_slice(&(c_path.as_ptr() as u64).to_ne_bytes());
    attr.0[12..16].copy_from_slice(&file_flags.to_ne_bytes());
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;

/// BPF_MAP_LOOKUP_ELEM with a u32 key and a value whose size is only known at run time (the
/// `.rodata` map: its value is the whole section).
pub fn map_lookup_u32_key(map: BorrowedFd<'_>, key: u32, value_size: usize) -> io::Result<Vec<u8>> {
    let mut value = vec![0u8; value_size];
    let mut attr = Attr([0; 144]);
    attr.0[0..4].copy_from_slice(&(map.as_raw_fd() as u32).to_ne_bytes());
    attr.0[8..16].copy_from_slice(&(&key as *const u32 as u64).to_ne_bytes());
    attr.0[16..24].copy_from_slice(&(value.as_mut_ptr() as u64).to_ne_bytes());
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr)?;
    Ok(value)
}

const BPF_PROG_QUERY: libc::c_long = 16;

/// BPF_PROG_QUERY: the programs attached directly to `cgroup` at `attach_type`, and the attach
/// flags. { target_fd, attach_type, query_flags, attach_flags (out), prog_ids, prog_cnt (in/out) }.
pub fn prog_query(cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<(u32, Vec<u32>)> {
    let mut ids = vec![0u32; 64];
    let mut attr = Attr([0; 144]);
    attr.0[0..4].copy_from_slice(&(cgroup.as_raw_fd() as u32).to_ne_bytes());
    attr.0[4..8].copy_from_slice(&attach_type.to_ne_bytes());
    attr.0[16..24].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
    attr.0[24..28].copy_from_slice(&(ids.len() as u32).to_ne_bytes());
    bpf(BPF_PROG_QUERY, &mut attr)?;
    let u32_at =
        |o: usize| u32::from_ne_bytes([attr.0[o], attr.0[o + 1], attr.0[o + 2], attr.0[o + 3]]);
    let (attach_flags, count) = (u32_at(12), u32_at(24));
    ids.truncate(count as usize);
    Ok((attach_flags, ids))
}
