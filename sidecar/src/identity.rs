//! Workload identity for mesh mTLS: the pod's certificate, key and trust bundle, read from files
//! that an existing issuer keeps up to date (cert-manager's csi-driver-spiffe, SPIRE, Kubernetes
//! pod certificates, a TLS Secret): `tls.crt` (the leaf, then its chain), `tls.key`, `ca.crt` (the
//! trust bundle; several roots are fine, which is how a CA rotation works).
//!
//! A set of files is put in force only if the key matches the leaf, the leaf is valid now, holds
//! exactly one SPIFFE ID (URI SAN) and chains to the bundle for both TLS client and server use.
//! Otherwise the identity in force stays (or there is none yet), and why is logged once, shown in
//! `/config` and counted. Each new handshake takes the identity in force ([`IdentityStore::current`]),
//! so a rotation never touches a connection already open.
//!
//! Peers are verified against the bundle, and must be in this identity's trust domain
//! ([`verify`]). No CA key is ever read or needed here.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

pub mod spiffe;
pub mod verify;

pub use spiffe::SpiffeId;

pub use verify::MESH_ALPN;

/// The files of an identity directory.
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";
pub const BUNDLE_FILE: &str = "ca.crt";
/// Larger files are refused (a certificate chain is a few KiB).
const MAX_FILE_BYTES: u64 = 256 * 1024;

/// The identity in force: who this pod is, and the TLS configurations that prove it.
pub struct Identity {
    pub id: SpiffeId,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial: String,
    /// Roots in the bundle.
    pub roots: usize,
    /// Accepts mesh TLS (our ALPN), client certificate required and verified.
    pub server: Arc<rustls::ServerConfig>,
    /// Originates mesh TLS with this certificate, verifying the server's.
    pub client: Arc<rustls::ClientConfig>,
    /// Over the three files' contents (what the watcher compares).
    digest: [u8; 32],
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id)
            .field("serial", &self.serial)
            .finish()
    }
}

impl Identity {
    /// Reads and checks an identity directory (see the module documentation).
    pub fn load(dir: &Path) -> Result<Identity, String> {
        let (files, digest) = read_files(dir)?;
        Identity::from_pem(&files[0], &files[1], &files[2], digest, SystemTime::now())
    }

    fn from_pem(
        cert: &[u8],
        key: &[u8],
        bundle: &[u8],
        digest: [u8; 32],
        now: SystemTime,
    ) -> Result<Identity, String> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{CERT_FILE}: not PEM certificates: {e}"))?;
        let leaf = chain
            .first()
            .ok_or_else(|| format!("{CERT_FILE}: no certificate in it"))?;
        let facts = spiffe::facts(leaf).map_err(|e| format!("{CERT_FILE}: the leaf: {e}"))?;
        if now < facts.not_before {
            return Err(format!(
                "{CERT_FILE}: the leaf is not valid yet (from {}); is the clock right?",
                crate::units::rfc3339(facts.not_before)
            ));
        }
        if now >= facts.not_after {
            return Err(format!(
                "{CERT_FILE}: the leaf expired at {}; the issuer has not renewed it",
                crate::units::rfc3339(facts.not_after)
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| {
            format!("{KEY_FILE}: no PEM private key (PKCS#8, SEC1 or PKCS#1) in it: {e}")
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certified = rustls::sign::CertifiedKey::from_der(chain.clone(), key, &provider)
            .map_err(|e| format!("{KEY_FILE}: does not fit {CERT_FILE}'s leaf: {e}"))?;
        let mut roots = rustls::RootCertStore::empty();
        let mut count = 0;
        for (i, root) in CertificateDer::pem_slice_iter(bundle).enumerate() {
            let root = root.map_err(|e| format!("{BUNDLE_FILE}: not PEM certificates: {e}"))?;
            roots
                .add(root)
                .map_err(|e| format!("{BUNDLE_FILE}: certificate #{}: {e}", i + 1))?;
            count += 1;
        }
        if count == 0 {
            return Err(format!("{BUNDLE_FILE}: no certificate in it"));
        }
        let roots = Arc::new(roots);
        let trust = Arc::new(verify::Trust::new(
            Arc::clone(&roots),
            facts.id.clone(),
            &provider,
        )?);
        trust
            .check_own(leaf, &chain[1..], now)
            .map_err(|e| format!("{CERT_FILE}: the leaf does not chain to {BUNDLE_FILE}: {e}"))?;
        let certified = Arc::new(certified);
        let server = trust.server_config(Arc::clone(&certified), &provider)?;
        let client = trust.client_config(certified, &provider)?;
        Ok(Identity {
            id: facts.id,
            not_before: facts.not_before,
            not_after: facts.not_after,
            serial: facts.serial,
            roots: count,
            server,
            client,
            digest,
        })
    }

    /// The digest of the three files this identity was read from.
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// Time until the leaf expires (zero once it has).
    pub fn expires_in(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default()
    }
}

/// The three files' contents and their combined digest.
fn read_files(dir: &Path) -> Result<([Vec<u8>; 3], [u8; 32]), String> {
    use std::io::Read as _;
    let mut hasher = Sha256::new();
    let mut out: [Vec<u8>; 3] = Default::default();
    for (slot, name) in out.iter_mut().zip([CERT_FILE, KEY_FILE, BUNDLE_FILE]) {
        let path = dir.join(name);
        let file = std::fs::File::open(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        file.take(MAX_FILE_BYTES + 1)
            .read_to_end(slot)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if slot.len() as u64 > MAX_FILE_BYTES {
            return Err(format!(
                "{} is larger than {} KiB: not a certificate file",
                path.display(),
                MAX_FILE_BYTES / 1024
            ));
        }
        hasher.update((slot.len() as u64).to_le_bytes());
        hasher.update(&*slot);
    }
    Ok((out, hasher.finalize().into()))
}

/// What a reload of the identity did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityOutcome {
    Applied,
    Unchanged,
    /// The identity in force (if any) stays.
    Rejected(String),
}

impl IdentityOutcome {
    pub fn label(&self) -> &'static str {
        match self {
            IdentityOutcome::Applied => "applied",
            IdentityOutcome::Unchanged => "unchanged",
            IdentityOutcome::Rejected(_) => "rejected",
        }
    }
}

#[derive(Debug)]
struct IdentityMetrics {
    reloads: IntCounterVec,
    expiry: IntGauge,
    loaded: IntGauge,
}

impl IdentityMetrics {
    fn new(registry: &Registry) -> IdentityMetrics {
        // Constant, valid definitions: creating them cannot fail.
        let reloads = IntCounterVec::new(
            Opts::new(
                "sidecar_identity_reloads_total",
                "Identity directory reloads, by result: applied, rejected (the identity in force stays), unchanged",
            ),
            &["result"],
        )
        .unwrap_or_else(|e| unreachable!("{e}"));
        let expiry = IntGauge::new(
            "sidecar_identity_expiry_timestamp_seconds",
            "When the workload certificate in force expires (Unix time; 0: no identity)",
        )
        .unwrap_or_else(|e| unreachable!("{e}"));
        let loaded = IntGauge::new(
            "sidecar_identity_loaded",
            "1 if a valid workload identity is in force",
        )
        .unwrap_or_else(|e| unreachable!("{e}"));
        crate::metrics::register(registry, Box::new(reloads.clone()), "identity reloads");
        crate::metrics::register(registry, Box::new(expiry.clone()), "identity expiry");
        crate::metrics::register(registry, Box::new(loaded.clone()), "identity loaded");
        IdentityMetrics {
            reloads,
            expiry,
            loaded,
        }
    }
}

#[derive(Debug, Default)]
struct Status {
    loaded_at: Option<SystemTime>,
    last_error: Option<String>,
    /// The digest of the files last looked at (applied or rejected), so a broken set is
    /// reported once.
    last_digest: Option<[u8; 32]>,
}

/// The identity in force, swapped whole when the files change.
#[derive(Debug)]
pub struct IdentityStore {
    dir: PathBuf,
    current: ArcSwapOption<Identity>,
    status: Mutex<Status>,
    metrics: IdentityMetrics,
}

impl IdentityStore {
    /// Loads `dir` now. Missing or invalid files are not fatal (the issuer may not have written
    /// them yet): the proxy runs without an identity, and `/ready` says so while a port needs one.
    pub fn new(dir: PathBuf, registry: &Registry) -> IdentityStore {
        let store = IdentityStore {
            dir,
            current: ArcSwapOption::empty(),
            status: Mutex::new(Status::default()),
            metrics: IdentityMetrics::new(registry),
        };
        store.reload();
        store
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The identity for a new handshake.
    pub fn current(&self) -> Option<Arc<Identity>> {
        self.current.load_full()
    }

    /// The files' digest now (what the watcher compares), or why they cannot be read.
    pub fn snapshot(&self) -> Result<[u8; 32], String> {
        read_files(&self.dir).map(|(_, d)| d)
    }

    /// Reads the files again; puts them in force if they are valid and different. Blocking.
    pub fn reload(&self) -> IdentityOutcome {
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        let outcome = match read_files(&self.dir) {
            Err(e) => IdentityOutcome::Rejected(e),
            Ok((_, digest))
                if self
                    .current
                    .load()
                    .as_ref()
                    .is_some_and(|c| c.digest == digest) =>
            {
                IdentityOutcome::Unchanged
            }
            Ok((files, digest)) => {
                match Identity::from_pem(&files[0], &files[1], &files[2], digest, SystemTime::now())
                {
                    Ok(identity) => {
                        info!(
                            id = %identity.id,
                            serial = %identity.serial,
                            expires = %crate::units::rfc3339(identity.not_after),
                            roots = identity.roots,
                            "workload identity in force"
                        );
                        self.metrics
                            .expiry
                            .set(crate::units::unix_seconds(identity.not_after));
                        self.metrics.loaded.set(1);
                        self.current.store(Some(Arc::new(identity)));
                        status.loaded_at = Some(SystemTime::now());
                        IdentityOutcome::Applied
                    }
                    Err(e) => IdentityOutcome::Rejected(e),
                }
            }
        };
        self.metrics
            .reloads
            .with_label_values(&[outcome.label()])
            .inc();
        match &outcome {
            IdentityOutcome::Rejected(e) => {
                if status.last_error.as_deref() != Some(e) {
                    let keeping = if self.current.load().is_some() {
                        "the identity in force stays"
                    } else {
                        "no identity: mesh TLS is off until valid files arrive"
                    };
                    warn!(dir = %self.dir.display(), "identity not loaded: {e}; {keeping}");
                }
                status.last_error = Some(e.clone());
            }
            IdentityOutcome::Applied | IdentityOutcome::Unchanged => status.last_error = None,
        }
        status.last_digest = self.current.load().as_ref().map(|c| c.digest);
        outcome
    }

    /// Why a port that needs an identity could not be served now: none, or it expires within
    /// `margin` (the issuer is late: better to be taken out of rotation than to fail handshakes).
    pub fn ready_problem(&self, margin: Duration) -> Option<String> {
        let Some(identity) = self.current() else {
            let status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
            return Some(format!(
                "no workload identity in {}: {}",
                self.dir.display(),
                status.last_error.as_deref().unwrap_or("not loaded yet")
            ));
        };
        let now = SystemTime::now();
        if identity.expires_in(now) <= margin {
            return Some(format!(
                "the workload certificate {} expires at {} (within {:?}); the issuer has not renewed it",
                identity.serial,
                crate::units::rfc3339(identity.not_after),
                margin
            ));
        }
        None
    }

    /// For `/config`.
    pub fn status_json(&self) -> serde_json::Value {
        let status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.current();
        serde_json::json!({
            "dir": self.dir.display().to_string(),
            "id": current.as_ref().map(|c| c.id.to_string()),
            "serial": current.as_ref().map(|c| c.serial.clone()),
            "not_after": current.as_ref().map(|c| crate::units::rfc3339(c.not_after)),
            "roots": current.as_ref().map(|c| c.roots),
            "loaded_at": status.loaded_at.map(crate::units::rfc3339),
            "last_error": status.last_error,
        })
    }
}

#[cfg(test)]
mod tests;
