//! Identity loading and mesh handshakes with certificates minted here (rcgen, tests only).
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    SanType,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

struct Ca(CertifiedIssuer<'static, KeyPair>);

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Ca(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

    /// (tls.crt, tls.key) for `id`, valid for `days` from `from_days` (relative to today).
    fn leaf(&self, id: &str, from_days: i64, days: i64) -> (String, String) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = rcgen::date_time_ymd(2026, 1, 1)
            + (SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                - Duration::from_secs(1_767_225_600));
        params.not_before = now + time_days(from_days);
        params.not_after = now + time_days(from_days + days);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.0).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn time_days(days: i64) -> Duration {
    // rcgen's OffsetDateTime adds std Durations only forwards: callers pass offsets >= -1.
    Duration::from_secs((days.max(0) as u64) * 86_400)
}

fn write(dir: &Path, cert: &str, key: &str, bundle: &str) {
    std::fs::write(dir.join(CERT_FILE), cert).unwrap();
    std::fs::write(dir.join(KEY_FILE), key).unwrap();
    std::fs::write(dir.join(BUNDLE_FILE), bundle).unwrap();
}

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "sidecar-identity-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn load(cert: &str, key: &str, bundle: &str) -> Result<Identity, String> {
    Identity::from_pem(
        cert.as_bytes(),
        key.as_bytes(),
        bundle.as_bytes(),
        [0; 32],
        SystemTime::now(),
    )
}

#[test]
fn a_valid_set_loads_and_bad_ones_say_why() {
    let ca = Ca::new("mesh root");
    let other = Ca::new("another root");
    let (cert, key) = ca.leaf("spiffe://cluster.local/ns/shop/sa/orders", 0, 1);
    let id = load(&cert, &key, &ca.0.pem()).unwrap();
    assert_eq!(id.id.as_str(), "spiffe://cluster.local/ns/shop/sa/orders");
    assert_eq!(id.roots, 1);
    // Two roots (a CA rotation in progress): fine.
    let both = format!("{}{}", other.0.pem(), ca.0.pem());
    assert_eq!(load(&cert, &key, &both).unwrap().roots, 2);

    let (_, other_key) = ca.leaf("spiffe://cluster.local/ns/shop/sa/x", 0, 1);
    let e = load(&cert, &other_key, &ca.0.pem()).unwrap_err();
    assert!(e.contains("does not fit"), "{e}");
    let e = load(&cert, &key, &other.0.pem()).unwrap_err();
    assert!(e.contains("does not chain"), "{e}");
    let (future, future_key) = ca.leaf("spiffe://cluster.local/ns/a/sa/b", 2, 1);
    let e = load(&future, &future_key, &ca.0.pem()).unwrap_err();
    assert!(e.contains("not valid yet"), "{e}");
    let e = load("", &key, &ca.0.pem()).unwrap_err();
    assert!(e.contains("no certificate"), "{e}");
    let e = load(&cert, "", &ca.0.pem()).unwrap_err();
    assert!(e.contains("tls.key"), "{e}");
    let e = load(&cert, &key, "").unwrap_err();
    assert!(e.contains("ca.crt"), "{e}");
}

#[test]
fn a_rejected_reload_keeps_the_identity_in_force() {
    let ca = Ca::new("mesh root");
    let d = dir();
    let registry = Registry::new();
    let store = IdentityStore::new(d.clone(), &registry);
    assert!(store.current().is_none());
    assert!(store.ready_problem(Duration::ZERO).is_some());
    let (cert, key) = ca.leaf("spiffe://td/ns/a/sa/a", 0, 1);
    write(&d, &cert, &key, &ca.0.pem());
    assert_eq!(store.reload(), IdentityOutcome::Applied);
    assert_eq!(store.reload(), IdentityOutcome::Unchanged);
    let serial = store.current().unwrap().serial.clone();
    assert!(store.ready_problem(Duration::from_secs(60)).is_none());
    // The leaf expires within two days: not ready with that margin.
    assert!(store
        .ready_problem(Duration::from_secs(2 * 86_400))
        .is_some());
    std::fs::write(d.join(KEY_FILE), "garbage").unwrap();
    assert!(matches!(store.reload(), IdentityOutcome::Rejected(_)));
    assert_eq!(store.current().unwrap().serial, serial);
    let _ = std::fs::remove_dir_all(&d);
}

/// One mesh handshake over an in-memory pipe: the client's result and the server's.
async fn handshake(
    client: &Identity,
    server: &Identity,
) -> (Result<(), String>, Result<(), String>) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&client.client));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&server.server));
    let name = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let c = async move {
        let mut s = connector
            .connect(name, a)
            .await
            .map_err(|e| failure_label(&e))?;
        s.write_all(b"ping").await.map_err(|_| "write")?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.map_err(|_| "read")?;
        Ok::<_, &'static str>(())
    };
    let s = async move {
        let mut s = acceptor.accept(b).await.map_err(|e| failure_label(&e))?;
        let id = verify::peer_id(s.get_ref().1.peer_certificates()).ok_or("no id")?;
        assert_eq!(s.get_ref().1.alpn_protocol(), Some(MESH_ALPN));
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.map_err(|_| "read")?;
        s.write_all(&id.trust_domain().as_bytes()[..4])
            .await
            .map_err(|_| "write")?;
        s.flush().await.map_err(|_| "flush")?;
        Ok::<_, &'static str>(())
    };
    let (c, s) = tokio::join!(c, s);
    (c.map_err(str::to_owned), s.map_err(str::to_owned))
}

use self::verify::failure_label;

#[tokio::test]
async fn peers_must_chain_to_the_bundle_and_share_the_trust_domain() {
    let ca = Ca::new("mesh root");
    let other = Ca::new("another root");
    let pem = ca.0.pem();
    let mk = |ca: &Ca, id: &str| {
        let (c, k) = ca.leaf(id, 0, 1);
        load(&c, &k, &pem).unwrap_or_else(|_| {
            let bundle = format!("{pem}{}", ca.0.pem());
            load(&c, &k, &bundle).unwrap()
        })
    };
    let a = mk(&ca, "spiffe://mesh.test/ns/a/sa/a");
    let b = mk(&ca, "spiffe://mesh.test/ns/b/sa/b");
    assert_eq!(handshake(&a, &b).await, (Ok(()), Ok(())));
    // Another trust domain, same CA: both sides refuse.
    let stranger = mk(&ca, "spiffe://elsewhere.test/ns/a/sa/a");
    let (c, s) = handshake(&stranger, &b).await;
    assert_eq!(c.unwrap_err(), "wrong_trust_domain");
    assert!(s.is_err());
    // The client verifies first (TLS 1.3): it refuses the stranger, which hears an alert.
    let (c, s) = handshake(&a, &stranger).await;
    assert_eq!(c.unwrap_err(), "wrong_trust_domain");
    assert_eq!(s.unwrap_err(), "bad_certificate");
    // A client from another CA (its own bundle trusts both): the server does not know its CA.
    let outsider = mk(&other, "spiffe://mesh.test/ns/a/sa/a");
    let (_, s) = handshake(&outsider, &b).await;
    assert_eq!(s.unwrap_err(), "unknown_ca");
}
