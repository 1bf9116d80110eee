use std::io::Write as _;
use std::time::Duration;

use super::*;
use crate::policy::config_file::OwnedFlag;
use crate::policy::PolicyConfig;

struct Fixture {
    dir: PathBuf,
    file: PathBuf,
    reloader: Arc<Reloader>,
    store: Arc<PolicyStore>,
    registry: Registry,
}

/// Writes by rename (as editors and `kubectl cp` do): the reader sees the old or the new file.
fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.sync_all().unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn fixture(name: &str, text: &str, flags: Vec<OwnedFlag>) -> Fixture {
    let dir = std::env::temp_dir().join(format!("sidecar-reload-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("policy.toml");
    write(&file, text);
    let (reloader, store, registry) = reloader_for(PolicySource {
        file: Some(file.clone()),
        flags,
    });
    Fixture {
        dir,
        file,
        reloader,
        store,
        registry,
    }
}

/// A reloader of `source`, with the policies of its first reading in force.
fn reloader_for(source: PolicySource) -> (Arc<Reloader>, Arc<PolicyStore>, Registry) {
    let loaded = source.load();
    let config: PolicyConfig = loaded.result.unwrap();
    let store = Arc::new(PolicyStore::new(&config));
    let registry = Registry::new();
    let reloader = Arc::new(Reloader::new(
        source,
        Arc::clone(&store),
        loaded.text.and_then(Result::ok),
        None,
        &registry,
    ));
    (reloader, store, registry)
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn counter(registry: &Registry, result: &str) -> u64 {
    let text = crate::metrics::render(registry);
    let series = format!("sidecar_config_reloads_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().unwrap())
}

const RULE: &str = "[[destination]]\nmatch = \"10.0.0.7:80\"\nrequest_timeout = \"2s\"\n";

fn timeout_of(store: &PolicyStore) -> Duration {
    store
        .load()
        .outbound("10.0.0.7:80".parse().unwrap(), None)
        .policy()
        .request_timeout
}

#[test]
fn a_changed_file_is_applied_an_unchanged_one_is_not() {
    let f = fixture("apply", RULE, Vec::new());
    assert_eq!(timeout_of(&f.store), Duration::from_secs(2));
    write(&f.file, &RULE.replace("2s", "300ms"));
    let outcome = f.reloader.reload(Cause::Signal);
    assert!(
        matches!(outcome, Outcome::Applied(c) if c.replaced == 1),
        "{outcome:?}"
    );
    assert_eq!(timeout_of(&f.store), Duration::from_millis(300));
    assert_eq!(f.store.load().generation(), 1);

    // Only a comment: nothing to apply, the generation stays.
    write(
        &f.file,
        &format!("# tuned\n{}", RULE.replace("2s", "300ms")),
    );
    assert_eq!(f.reloader.reload(Cause::Admin), Outcome::Unchanged);
    assert_eq!(f.store.load().generation(), 1);
    assert_eq!(counter(&f.registry, "applied"), 1);
    assert_eq!(counter(&f.registry, "unchanged"), 1);

    let status = f.reloader.status_json();
    let text = std::fs::read_to_string(&f.file).unwrap();
    assert_eq!(
        status["sha256"],
        sha256_hex(&text),
        "the hash of the file read"
    );
    assert_eq!(status["generation"], 1);
    assert_eq!(status["last_attempt"]["cause"], "POST /reload");
    assert!(status["last_error"].is_null());
    assert!(crate::metrics::render(&f.registry).contains(&format!(
        "sidecar_config_info{{generation=\"1\",sha256=\"{}\"}} 1",
        sha256_hex(&text)
    )));
}

#[test]
fn an_invalid_or_missing_file_keeps_the_old_policy_and_says_why() {
    let f = fixture("invalid", RULE, Vec::new());
    let bad = "[defaults]\nrequest_timeout = \"soon\"\nconnect_timout = \"1s\"\n\n[[destination]]\nmatch = \"10.0.0.7:80\"\nrequest_timeout = \"0s\"\n";
    write(&f.file, bad);
    let Outcome::Rejected(errors) = f.reloader.reload(Cause::File) else {
        panic!("accepted an invalid file");
    };
    assert_eq!(errors.len(), 3, "every bad key: {errors:?}");
    assert_eq!(
        timeout_of(&f.store),
        Duration::from_secs(2),
        "old policy in force"
    );
    assert_eq!(f.store.load().generation(), 0);
    assert_eq!(counter(&f.registry, "rejected"), 1);
    let status = f.reloader.status_json();
    let listed: Vec<String> = status["last_error"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        listed
            .iter()
            .any(|k| k.contains("request_timeout") && k.contains("[defaults]")),
        "{listed:?}"
    );
    assert!(
        listed.iter().any(|k| k.contains("connect_timout")),
        "{listed:?}"
    );
    assert!(
        listed.iter().any(|k| k.contains("10.0.0.7:80")),
        "{listed:?}"
    );
    assert!(crate::metrics::render(&f.registry).contains("sidecar_config_last_reload_successful 0"));

    // Missing: rejected too, never "no policy".
    std::fs::remove_file(&f.file).unwrap();
    assert!(matches!(
        f.reloader.reload(Cause::Signal),
        Outcome::Rejected(_)
    ));
    assert_eq!(timeout_of(&f.store), Duration::from_secs(2));

    // Fixed: applied, and the error is gone.
    write(&f.file, &RULE.replace("2s", "1s"));
    assert!(matches!(
        f.reloader.reload(Cause::File),
        Outcome::Applied(_)
    ));
    assert_eq!(timeout_of(&f.store), Duration::from_secs(1));
    assert!(f.reloader.status_json()["last_error"].is_null());
    assert!(crate::metrics::render(&f.registry).contains("sidecar_config_last_reload_successful 1"));
}

#[test]
fn sources_say_where_each_default_comes_from() {
    let flags = vec![OwnedFlag {
        path: "connect_timeout",
        name: "--connect-timeout / SIDECAR_CONNECT_TIMEOUT",
        value: Some("250ms".into()),
        source: "environment",
    }];
    let f = fixture(
        "sources",
        "[defaults]\nrequest_timeout = \"5s\"\nbreaker.open_time = \"3s\"\n",
        flags,
    );
    let sources = &f.reloader.status_json()["sources"];
    assert_eq!(sources["defaults.connect_timeout"], "environment");
    assert_eq!(sources["defaults.request_timeout"], "file");
    assert_eq!(sources["defaults.breaker.open_time"], "file");
    assert_eq!(sources["defaults.idle_timeout"], "default");
}

#[test]
fn mount_points_are_found_in_mountinfo() {
    let mountinfo = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
        1203 1190 8:1 /var/lib/kubelet/pods/x/volumes/kubernetes.io~configmap/cfg/..2026_12_04/policy.toml /etc/sidecar/policy.toml ro - ext4 /dev/sda1 rw\n\
        1204 1190 8:1 /x /etc/with\\040space ro - ext4 /dev/sda1 rw\n";
    assert!(is_mount_point(
        mountinfo,
        Path::new("/etc/sidecar/policy.toml")
    ));
    assert!(!is_mount_point(
        mountinfo,
        Path::new("/etc/sidecar/other.toml")
    ));
    assert!(is_mount_point(mountinfo, Path::new("/etc/with space")));
    assert_eq!(Watch::of(None), Watch::NoFile);
}

/// The poller: a kubelet-style `..data` symlink swap is seen, and a burst of writes is one
/// reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_poller_sees_a_symlink_swap_and_settles_a_burst() {
    // A ConfigMap volume: policy.toml -> ..data/policy.toml, ..data -> ..2026_1.
    let dir = std::env::temp_dir().join(format!("sidecar-reload-cm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("..v1")).unwrap();
    std::fs::write(dir.join("..v1/policy.toml"), RULE).unwrap();
    std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/policy.toml", dir.join("policy.toml")).unwrap();
    let (reloader, store, registry) = reloader_for(PolicySource {
        file: Some(dir.join("policy.toml")),
        flags: Vec::new(),
    });
    let stop = CancellationToken::new();
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).unwrap();
    start(&reloader, hangups, &stop);
    let applied = |n: u64| {
        let registry = registry.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(10), async {
                while counter(&registry, "applied") < n {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
            .is_ok()
        }
    };

    // The kubelet's update: a new timestamped directory, a new ..data link renamed over the old.
    std::fs::create_dir_all(dir.join("..v2")).unwrap();
    std::fs::write(dir.join("..v2/policy.toml"), RULE.replace("2s", "700ms")).unwrap();
    std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    assert!(applied(1).await, "symlink swap not applied");
    assert_eq!(timeout_of(&store), Duration::from_millis(700));

    // 20 in-place writes within 100 ms: one reload, of the last one.
    let target = dir.join("..v2/policy.toml");
    for i in 0..20u64 {
        std::fs::write(&target, RULE.replace("2s", &format!("{}ms", 100 + i))).unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(applied(2).await, "burst not applied");
    assert_eq!(timeout_of(&store), Duration::from_millis(119));
    // Two more poll periods with nothing changed: still exactly two applied reloads.
    tokio::time::sleep(2 * POLL + SETTLE).await;
    assert_eq!(counter(&registry, "applied"), 2);
    assert_eq!(counter(&registry, "rejected"), 0);
    stop.cancel();
    let _ = std::fs::remove_dir_all(&dir);
}
