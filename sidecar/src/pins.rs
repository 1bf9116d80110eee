//! The names of everything `sidecar init` pins in a pod's pin directory
//! (`<pin root>/<pod id>/`), in one place: `link_<program>` for each attached program,
//! `map_<map>` for each of our maps, `map_rodata` for the frozen configuration. Removal deletes
//! only these names; readiness checks the links the outbound path needs; `status` and the
//! kernel-counter metrics open the maps. Imports nothing from the crate.
use std::path::{Path, PathBuf};

use sidecar_common::{maps, progs};

const LINK_PREFIX: &str = "link_";
const MAP_PREFIX: &str = "map_";
/// `.rodata` is pinned under this map name (bpffs refuses '.' in names).
pub const RODATA: &str = "rodata";

/// Link pins that must exist for outbound interception to be in place.
pub const REQUIRED_LINKS: [&str; 4] = [
    progs::CONNECT4,
    progs::CONNECT6,
    progs::SOCKOPS,
    progs::GETSOCKOPT,
];

/// `<dir>/link_<program>`.
pub fn link(dir: &Path, program: &str) -> PathBuf {
    dir.join(format!("{LINK_PREFIX}{program}"))
}

/// `<dir>/map_<map>` (`map` as named in the object, or [`RODATA`]).
pub fn map(dir: &Path, map: &str) -> PathBuf {
    dir.join(format!("{MAP_PREFIX}{map}"))
}

/// The program of a link pin's file name, if it is one of ours.
pub fn program_of(file_name: &str) -> Option<&str> {
    file_name
        .strip_prefix(LINK_PREFIX)
        .filter(|p| p.starts_with(progs::PROG_PREFIX))
}

/// The map of a map pin's file name, if it is one of ours.
pub fn map_of(file_name: &str) -> Option<&str> {
    file_name
        .strip_prefix(MAP_PREFIX)
        .filter(|m| maps::ALL.contains(m) || *m == RODATA)
}

/// True for a link pin's file name, ours or not.
pub fn is_link(file_name: &str) -> bool {
    file_name.starts_with(LINK_PREFIX)
}

/// Where this pod's pins live: `<pin root>/<pod id>`, the pod id defaulting to "cg<cgroup id>".
pub fn pod_dir(pin_root: &Path, pod_id: Option<&str>, cgroup_id: u64) -> PathBuf {
    match pod_id {
        Some(id) => pin_root.join(id),
        None => pin_root.join(format!("cg{cgroup_id}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let dir = Path::new("/sys/fs/bpf/sidecar/cg1");
        let l = link(dir, progs::CONNECT4);
        let name = l.file_name().unwrap().to_str().unwrap();
        assert_eq!(program_of(name), Some(progs::CONNECT4));
        assert!(is_link(name));
        let m = map(dir, maps::STATS);
        assert_eq!(
            map_of(m.file_name().unwrap().to_str().unwrap()),
            Some(maps::STATS)
        );
        assert_eq!(map_of("map_rodata"), Some(RODATA));
        assert_eq!(program_of("link_someone_else"), None, "not ours");
        assert_eq!(map_of("map_other"), None, "not ours");
    }
}
