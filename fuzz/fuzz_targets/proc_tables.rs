//! The readers of kernel tables the sidecar parses: `/proc/self/mountinfo` and `/proc/net/tcp`.
//! Never panic; every mount point read is absolute.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for mount in sidecar_common::mountinfo::parse(text) {
        assert!(mount.mount_point.is_absolute(), "{mount:?}");
    }
    let _ = sidecar::net::listening_sockets(text);
});
