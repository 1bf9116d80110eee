//! `[[transcode]]` sections: REST/JSON callers to the app's gRPC port (see
//! [`crate::transcode`]).
//!
//! ```toml
//! [[transcode]]
//! port = 50051                              # the app's gRPC port (inbound)
//! descriptor_set = "/etc/sidecar/orders.pb" # protoc --include_imports --descriptor_set_out
//! services = ["shop.v1.Orders"]
//! unknown_fields = "reject"                 # or "ignore"
//! json_names = "lower_camel"                # or "proto" (response field names)
//! print_defaults = false
//! max_body_bytes = 1048576
//! max_message_bytes = 4194304
//! unmatched = "not_found"                   # or "pass"
//! ```
//!
//! The descriptor set is read when the file is loaded (at start and on every reload); a
//! relative path is relative to the config file's directory. A set that cannot be read or
//! compiled is an error of the load: a reload keeps the mapping in force.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use toml::{Table, Value};

use super::authz::{boolean, strings, unknown};
use super::values::{count, KeyError, Raw};
use crate::transcode::{JsonNames, Settings, Transcoder, UnknownFields, Unmatched};

const KEYS: &[&str] = &[
    "port",
    "descriptor_set",
    "services",
    "unknown_fields",
    "json_names",
    "print_defaults",
    "max_body_bytes",
    "max_message_bytes",
    "unmatched",
];

fn choice<T: Copy>(v: Raw<'_>, options: &[(&str, T)]) -> Result<T, String> {
    let text = v.text().map(str::trim);
    options
        .iter()
        .find(|(name, _)| Some(*name) == text)
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            let names: Vec<String> = options.iter().map(|(n, _)| format!("{n:?}")).collect();
            format!("expected {}", names.join(" or "))
        })
}

fn bytes(v: Raw<'_>) -> Result<usize, String> {
    count(v, 1, 64 << 20).map(|n| n as usize)
}

/// Every `[[transcode]]` section of the file at `file`, compiled; problems go to `errors`.
pub(super) fn sections(
    list: &Value,
    file: &str,
    errors: &mut Vec<KeyError>,
) -> Vec<Arc<Transcoder>> {
    let Value::Array(items) = list else {
        errors.push(KeyError {
            key: format!("{file}: transcode"),
            value: Raw::Toml(list).shown(),
            problem: "expected [[transcode]] sections (an array of tables)".to_owned(),
        });
        return Vec::new();
    };
    let base = Path::new(file).parent().unwrap_or(Path::new("."));
    let mut out: Vec<Arc<Transcoder>> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let label = format!("{file}: [[transcode]] #{}", i + 1);
        let before = errors.len();
        let Value::Table(section) = item else {
            errors.push(KeyError {
                key: label,
                value: Raw::Toml(item).shown(),
                problem: "expected a table".to_owned(),
            });
            continue;
        };
        let Some(mut settings) = required(section, &label, base, errors) else {
            continue;
        };
        for (k, v) in section {
            let raw = Raw::Toml(v);
            let result = match k.as_str() {
                "port" | "descriptor_set" | "services" => Ok(()),
                "unknown_fields" => choice(
                    raw,
                    &[
                        ("reject", UnknownFields::Reject),
                        ("ignore", UnknownFields::Ignore),
                    ],
                )
                .map(|c| settings.unknown_fields = c),
                "json_names" => choice(
                    raw,
                    &[
                        ("lower_camel", JsonNames::LowerCamel),
                        ("proto", JsonNames::Proto),
                    ],
                )
                .map(|c| settings.json_names = c),
                "print_defaults" => boolean(raw).map(|b| settings.print_defaults = b),
                "max_body_bytes" => bytes(raw).map(|n| settings.max_body_bytes = n),
                "max_message_bytes" => bytes(raw).map(|n| settings.max_message_bytes = n),
                "unmatched" => choice(
                    raw,
                    &[
                        ("not_found", Unmatched::NotFound),
                        ("pass", Unmatched::Pass),
                    ],
                )
                .map(|c| settings.unmatched = c),
                _ => Err(unknown(k, KEYS)),
            };
            if let Err(problem) = result {
                errors.push(KeyError {
                    key: format!("{label} {k}"),
                    value: raw.shown(),
                    problem,
                });
            }
        }
        if out.iter().any(|t| t.settings().port == settings.port) {
            errors.push(KeyError {
                key: format!("{label} port"),
                value: settings.port.to_string(),
                problem: "another [[transcode]] above has the same port".to_owned(),
            });
        }
        if errors.len() != before {
            continue;
        }
        let path = settings.descriptor_set.display().to_string();
        match Transcoder::load(settings) {
            Ok(t) => out.push(Arc::new(t)),
            Err(problem) => errors.push(KeyError {
                key: format!("{label} descriptor_set"),
                value: path,
                problem,
            }),
        }
    }
    out
}

/// The keys every section needs: `port`, `descriptor_set`, `services`.
fn required(
    section: &Table,
    label: &str,
    base: &Path,
    errors: &mut Vec<KeyError>,
) -> Option<Settings> {
    let missing = |key: &str, what: &str| KeyError {
        key: format!("{label} {key}"),
        value: String::new(),
        problem: format!("missing; {what}"),
    };
    let bad = |key: &str, v: &Value, problem: String| KeyError {
        key: format!("{label} {key}"),
        value: Raw::Toml(v).shown(),
        problem,
    };
    let port = match section.get("port") {
        None => {
            errors.push(missing("port", "the app's gRPC port, e.g. port = 50051"));
            None
        }
        Some(v) => match count(Raw::Toml(v), 1, 65_535) {
            Ok(p) => Some(p as u16),
            Err(problem) => {
                errors.push(bad("port", v, problem));
                None
            }
        },
    };
    let set = match section.get("descriptor_set") {
        None => {
            errors.push(missing(
                "descriptor_set",
                "a FileDescriptorSet file (protoc --include_imports --descriptor_set_out=FILE)",
            ));
            None
        }
        Some(Value::String(s)) if !s.trim().is_empty() => Some(base.join(PathBuf::from(s.trim()))),
        Some(v) => {
            errors.push(bad("descriptor_set", v, "expected a file path".to_owned()));
            None
        }
    };
    let services = match section.get("services") {
        None => {
            errors.push(missing(
                "services",
                "the gRPC services to expose, e.g. [\"shop.v1.Orders\"]",
            ));
            None
        }
        Some(v) => match strings(Raw::Toml(v)) {
            Ok(list) if !list.is_empty() => Some(list),
            Ok(_) => {
                errors.push(bad("services", v, "name at least one service".to_owned()));
                None
            }
            Err(problem) => {
                errors.push(bad("services", v, problem));
                None
            }
        },
    };
    Some(Settings::new(port?, set?, services?))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use crate::policy::config_file::from_str;
    use crate::transcode::{JsonNames, UnknownFields, Unmatched};

    /// A directory of its own under the system's temporary directory, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let dir = std::env::temp_dir().join(format!(
                "sidecar-transcode-{name}-{}-{}",
                std::process::id(),
                fastrand::u64(..)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn errors(name: &str, text: &str) -> Vec<String> {
        from_str(name, text, &[])
            .unwrap_err()
            .into_iter()
            .map(|e| format!("{} = {:?}: {}", e.key, e.value, e.problem))
            .collect()
    }

    #[test]
    fn sections_load_their_descriptor_set_relative_to_the_file() {
        let dir = Dir::new("ok");
        std::fs::write(
            dir.0.join("orders.pb"),
            crate::transcode::tests::descriptor_set("orders.proto"),
        )
        .unwrap();
        let file = dir.0.join("sidecar.toml").display().to_string();
        let config = from_str(
            &file,
            r#"
            [[transcode]]
            port = 50051
            descriptor_set = "orders.pb"
            services = ["shop.v1.Orders"]
            unknown_fields = "ignore"
            json_names = "proto"
            print_defaults = true
            max_body_bytes = 1000
            max_message_bytes = 2000
            unmatched = "pass"
            "#,
            &[],
        )
        .unwrap();
        let t = config.transcoder(50051).expect("port 50051 is transcoded");
        let s = t.settings();
        assert_eq!(s.descriptor_set, dir.0.join("orders.pb"));
        assert_eq!(s.unknown_fields, UnknownFields::Ignore);
        assert_eq!(s.json_names, JsonNames::Proto);
        assert!(s.print_defaults);
        assert_eq!((s.max_body_bytes, s.max_message_bytes), (1000, 2000));
        assert_eq!(s.unmatched, Unmatched::Pass);
        assert!(config.transcoder(8080).is_none());
        // The same text and set loaded again is the same configuration; a new set is not.
        let text = "[[transcode]]\nport = 50051\ndescriptor_set = \"orders.pb\"\nservices = [\"shop.v1.Orders\"]\n";
        let first = from_str(&file, text, &[]).unwrap();
        assert_eq!(first, from_str(&file, text, &[]).unwrap());
        std::fs::write(
            dir.0.join("orders.pb"),
            crate::transcode::tests::descriptor_set("orders_v2.proto"),
        )
        .unwrap();
        assert_ne!(first, from_str(&file, text, &[]).unwrap());
    }

    #[test]
    fn bad_sections_name_the_key_and_what_to_do() {
        let dir = Dir::new("bad");
        std::fs::write(dir.0.join("corrupt.pb"), b"\x0a\x05abc").unwrap();
        let file = dir.0.join("sidecar.toml").display().to_string();
        let got = errors(
            &file,
            r#"
            [[transcode]]
            descriptor_set = 7
            unknown_fields = "maybe"
            colour = "red"

            [[transcode]]
            port = 50051
            descriptor_set = "corrupt.pb"
            services = "shop.v1.Orders"

            [[transcode]]
            port = 50051
            descriptor_set = "missing.pb"
            services = []
            "#,
        );
        let all = got.join("\n");
        for want in [
            "[[transcode]] #1 port = \"\": missing; the app's gRPC port",
            "[[transcode]] #1 descriptor_set = \"7\": expected a file path",
            "[[transcode]] #1 services = \"\": missing; the gRPC services to expose",
            "[[transcode]] #2 descriptor_set",
            "is not a valid FileDescriptorSet",
            "protoc --include_imports",
            "[[transcode]] #3 services = \"[]\": name at least one service",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
        let got = errors(&file, "[[transcode]]\nport = 1\ndescriptor_set = \"x.pb\"\nservices = [\"a.B\"]\nmax_body_byte = 5\nunmatched = \"drop\"\n");
        let all = got.join("\n");
        assert!(
            all.contains("max_body_byte = \"5\": unknown key; did you mean max_body_bytes?"),
            "{all}"
        );
        assert!(
            all.contains("unmatched = \"drop\": expected \"not_found\" or \"pass\""),
            "{all}"
        );
        let got = errors(&file, "transcode = 5\n");
        assert!(
            got[0].contains("expected [[transcode]] sections"),
            "{got:?}"
        );
    }
}
