//! Unit tests of [`super`] (`lifecycle.rs`).
use super::*;

#[test]
fn probes_parse() {
    assert_eq!(
        AppProbe::parse("http://127.0.0.1:8080/healthz"),
        Ok(AppProbe::Http {
            authority: "127.0.0.1:8080".into(),
            path: "/healthz".into()
        })
    );
    assert_eq!(
        AppProbe::parse("HTTP://localhost:80"),
        Ok(AppProbe::Http {
            authority: "localhost:80".into(),
            path: "/".into()
        })
    );
    assert_eq!(
        AppProbe::parse("tcp://[::1]:5432"),
        Ok(AppProbe::Tcp {
            authority: "[::1]:5432".into()
        })
    );
    for bad in [
        "127.0.0.1:8080",
        "http://127.0.0.1/healthz",
        "http://:8080/",
        "tcp://127.0.0.1:5432/x",
        "ftp://h:1",
        "http://h:0/",
    ] {
        assert!(AppProbe::parse(bad).is_err(), "{bad}");
    }
    assert_eq!(
        AppProbe::parse("http://127.0.0.1:8080/healthz")
            .unwrap()
            .to_string(),
        "http://127.0.0.1:8080/healthz"
    );
}

#[test]
fn status_lines() {
    assert_eq!(parse_status(b"HTTP/1.1 204 No Content\r\n"), Some(204));
    assert_eq!(parse_status(b"HTTP/1.0 503\r\n"), Some(503));
    assert_eq!(parse_status(b"SSH-2.0\r\n"), None);
    assert_eq!(parse_status(b""), None);
}

#[test]
fn overload_makes_it_not_ready() {
    let r = Readiness::new(false, false);
    r.set_listening();
    assert!(r.check().is_ok());
    r.set_load(Err("overloaded: 10000 inbound connections".into()));
    assert_eq!(
        r.check().unwrap_err(),
        vec!["load: overloaded: 10000 inbound connections".to_owned()]
    );
    r.set_load(Ok(()));
    assert!(r.check().is_ok());
}

#[test]
fn readiness_latches() {
    let r = Readiness::new(true, false);
    let problems = r.check().unwrap_err();
    assert_eq!(problems.len(), 2, "{problems:?}");
    r.set_listening();
    r.set_interception(Err("nothing attached".into()));
    assert_eq!(
        r.check().unwrap_err(),
        vec!["interception: nothing attached".to_owned()]
    );
    r.set_interception(Ok(()));
    assert!(r.check().is_ok());
    r.set_draining();
    assert_eq!(r.check().unwrap_err().len(), 1);
    assert!(r.is_listening());
}

#[test]
fn interception_pins() {
    let dir = std::env::temp_dir().join(format!("sidecar-lifecycle-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    assert!(check_interception(&dir, 0)
        .unwrap_err()
        .contains("nothing attached"));
    for prog in &REQUIRED_LINKS[..2] {
        std::fs::write(pins::link(&dir, prog), b"").unwrap();
    }
    let err = check_interception(&dir, 0).unwrap_err();
    assert!(
        err.contains("incomplete") && err.contains("sc_sockops"),
        "{err}"
    );
    for prog in &REQUIRED_LINKS[2..] {
        std::fs::write(pins::link(&dir, prog), b"").unwrap();
    }
    assert_eq!(check_interception(&dir, 0), Ok(()));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn http_probe_reads_the_status() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for status in ["503 Service Unavailable", "200 OK"] {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf).await;
            let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
            s.write_all(answer.as_bytes()).await.unwrap();
        }
    });
    let probe = AppProbe::parse(&format!("http://{addr}/healthz")).unwrap();
    let err = probe.probe().await.unwrap_err();
    assert!(err.ends_with("status 503"), "{err}");
    assert_eq!(probe.probe().await, Ok(()));
    let refused = AppProbe::parse("tcp://127.0.0.1:1").unwrap();
    assert!(refused.probe().await.is_err());
}
