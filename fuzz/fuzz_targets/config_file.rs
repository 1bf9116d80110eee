//! The policy file (TOML): never panics; a rejected file names every problem with a key and says
//! what is wrong; an accepted one has no two rules with the same match.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sidecar::policy::config_file;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match config_file::from_str("fuzz.toml", text, &[]) {
        Ok(config) => {
            for (i, a) in config.destinations.iter().enumerate() {
                for b in &config.destinations[i + 1..] {
                    assert_ne!(a.matcher, b.matcher, "two rules with one match accepted");
                }
            }
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "rejected without a reason");
            for e in errors {
                assert!(!e.key.is_empty() && !e.problem.is_empty(), "{e:?}");
            }
        }
    }
});
