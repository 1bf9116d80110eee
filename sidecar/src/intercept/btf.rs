//! The few kernel structure offsets the in-pod redirect's bound needs (`--msg-redirect`), read
//! from the running kernel's BTF (/sys/kernel/btf/vmlinux). aya does not expose member offsets,
//! and the format is simple: a header, then the types, then the strings
//! (the kernel's Documentation/bpf/btf.rst).
use std::path::Path;

use super::error::InitError;

/// Where the kernel describes itself.
pub(crate) const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// The members the in-pod redirect reads with `bpf_probe_read_kernel`, in the order of the
/// `MSG_OFFSETS` global: the peer's redirect queue and receive buffer (the bound), and the app
/// socket's file flags (only non-blocking sockets join).
pub(crate) const MSG_MEMBERS: [(&str, &str); 6] = [
    ("sock", "sk_user_data"),
    ("sk_psock", "msg_tot_len"),
    ("sock", "sk_rcvbuf"),
    ("sock", "sk_socket"),
    ("socket", "file"),
    ("file", "f_flags"),
];

/// The offsets of [`MSG_MEMBERS`] in the kernel described by `path`.
pub(crate) fn msg_offsets(path: &Path) -> Result<[u32; 6], InitError> {
    let fix = "--msg-redirect needs a kernel built with BTF (CONFIG_DEBUG_INFO_BTF) and sockmap support (CONFIG_BPF_STREAM_PARSER); drop the flag on this node";
    let btf = std::fs::read(path).map_err(|e| InitError::Kernel {
        what: format!("read the kernel's BTF ({})", path.display()),
        detail: e.to_string(),
        fix: fix.into(),
    })?;
    let mut out = [0; 6];
    for (slot, (strukt, member)) in out.iter_mut().zip(MSG_MEMBERS) {
        *slot = member_offset(&btf, strukt, member).ok_or_else(|| InitError::Kernel {
            what: format!("find {strukt}.{member} in the kernel's BTF"),
            detail: "not there (or not a whole-byte member)".into(),
            fix: fix.into(),
        })?;
    }
    Ok(out)
}

/// Whether this node can run `--msg-redirect`, for `sidecar doctor`: the offsets from BTF, and a
/// lockdown mode that lets BPF programs read kernel memory. `Ok` says what was found; `Err` says
/// what is missing.
pub(crate) fn msg_redirect_support() -> Result<String, String> {
    let offsets = msg_offsets(Path::new(VMLINUX)).map_err(|e| e.to_string())?;
    // "none [integrity] confidentiality": the bracketed one is in force.
    let lockdown = std::fs::read_to_string("/sys/kernel/security/lockdown").unwrap_or_default();
    if lockdown.contains("[confidentiality]") {
        return Err("kernel lockdown is `confidentiality`: BPF programs may not read kernel memory (bpf_probe_read_kernel), which the redirect's bound needs".into());
    }
    Ok(format!(
        "kernel offsets from BTF: {}",
        MSG_MEMBERS
            .iter()
            .zip(offsets)
            .map(|((s, m), o)| format!("{s}.{m} {o}"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// The byte offset of `member` in the first struct named `strukt` of a raw, little-endian BTF
/// blob. `None` when either is missing, the blob is malformed, or the member is a bitfield.
pub(crate) fn member_offset(btf: &[u8], strukt: &str, member: &str) -> Option<u32> {
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(
            btf.get(at..at.checked_add(4)?)?.try_into().ok()?,
        ))
    };
    if btf.get(0..2)? != [0x9f, 0xeb] {
        return None; // not little-endian BTF
    }
    let hdr_len = u32_at(4)? as usize;
    let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
    let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
    let str_start = hdr_len.checked_add(str_off)?;
    let strings = btf.get(str_start..str_start.checked_add(str_len)?)?;
    let name = |off: u32| -> Option<&[u8]> {
        let rest = strings.get(off as usize..)?;
        Some(&rest[..rest.iter().position(|b| *b == 0)?])
    };
    let mut at = hdr_len.checked_add(type_off)?;
    let end = at.checked_add(type_len)?.min(btf.len());
    while at + 12 <= end {
        let (name_off, info) = (u32_at(at)?, u32_at(at + 4)?);
        let (kind, vlen, kind_flag) = ((info >> 24) & 0x1f, (info & 0xffff) as usize, info >> 31);
        // What follows each kind's 12-byte common part.
        let extra = match kind {
            1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
            3 => 12,                      // ARRAY
            4 | 5 | 15 | 19 => vlen * 12, // STRUCT, UNION, DATASEC, ENUM64
            6 | 13 => vlen * 8,           // ENUM, FUNC_PROTO
            _ => 0,                       // PTR, FWD, TYPEDEF, modifiers, FUNC, FLOAT, TYPE_TAG
        };
        if kind == 4 && name(name_off)? == strukt.as_bytes() {
            for m in 0..vlen {
                let base = at + 12 + m * 12;
                if name(u32_at(base)?)? == member.as_bytes() {
                    let offset = u32_at(base + 8)?;
                    // With kind_flag, the offset's top byte is the bitfield size.
                    let (bits, bitfield) = if kind_flag == 1 {
                        (offset & 0xff_ffff, offset >> 24)
                    } else {
                        (offset, 0)
                    };
                    return (bitfield == 0 && bits % 8 == 0).then_some(bits / 8);
                }
            }
            return None;
        }
        at += 12 + extra;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: an INT, then `struct sock { int a; int b:3; int sk_rcvbuf; }` with the
    /// given kind_flag, then `struct other`.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0sock\0a\0b\0sk_rcvbuf\0other\0".to_vec();
        let s = |n: &str| {
            let needle = format!("\0{n}\0");
            (strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap()
                + 1) as u32
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        // [1] INT "int", size 4, encoding word.
        push(&[s("int"), 1 << 24, 4, 32]);
        // [2] STRUCT "sock", kind_flag, 3 members, size 12.
        push(&[s("sock"), (1 << 31) | (4 << 24) | 3, 12]);
        push(&[s("a"), 1, 0]);
        push(&[s("b"), 1, (3 << 24) | 32]);
        push(&[s("sk_rcvbuf"), 1, 64]);
        // [3] STRUCT "other", 0 members.
        push(&[s("other"), 4 << 24, 0]);
        let mut out = vec![0x9f, 0xeb, 1, 0];
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn finds_whole_byte_members_and_refuses_the_rest() {
        let b = blob();
        assert_eq!(member_offset(&b, "sock", "a"), Some(0));
        assert_eq!(member_offset(&b, "sock", "sk_rcvbuf"), Some(8));
        assert_eq!(member_offset(&b, "sock", "b"), None, "a bitfield");
        assert_eq!(member_offset(&b, "sock", "nope"), None);
        assert_eq!(member_offset(&b, "other", "a"), None);
        assert_eq!(member_offset(&b, "missing", "a"), None);
    }

    #[test]
    fn a_truncated_or_foreign_blob_is_refused_not_misread() {
        let b = blob();
        for len in 0..b.len() {
            // Never a wrong answer: either the right offset (the struct is complete) or none.
            let found = member_offset(&b[..len], "sock", "sk_rcvbuf");
            assert!(found.is_none() || found == Some(8), "at {len}: {found:?}");
        }
        let mut big_endian = b.clone();
        big_endian[0..2].copy_from_slice(&[0xeb, 0x9f]);
        assert_eq!(member_offset(&big_endian, "sock", "a"), None);
    }

    #[test]
    fn a_missing_btf_file_says_what_to_do() {
        let e = msg_offsets(Path::new("/nonexistent/vmlinux")).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("--msg-redirect"), "{text}");
    }
}
