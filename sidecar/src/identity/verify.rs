//! Verifying peers: a certificate chain to the trust bundle (rustls' WebPKI verification), then a
//! SPIFFE ID in the same trust domain as ours. Server names play no part: a mesh peer is reached
//! by IP address, and its identity is its SPIFFE ID, which the client may pin per destination.
use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, RootCertStore,
    SignatureScheme,
};

use super::spiffe::{self, SpiffeId};

/// The ALPN protocol of mesh TLS: a ClientHello offering it is a sidecar's, and is terminated by
/// the peer's sidecar; any other TLS (the app's own) is passed through untouched.
pub const MESH_ALPN: &[u8] = b"sidecar.mesh.dev/mtls-1";

/// Why a peer certificate was refused beyond what WebPKI checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerProblem {
    /// No (single, valid) SPIFFE ID in the leaf.
    NoSpiffeId(String),
    /// A SPIFFE ID of another trust domain.
    WrongTrustDomain { peer: String, ours: String },
}

impl std::fmt::Display for PeerProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerProblem::NoSpiffeId(e) => write!(f, "the peer certificate has no SPIFFE ID: {e}"),
            PeerProblem::WrongTrustDomain { peer, ours } => write!(
                f,
                "the peer {peer} is not in this pod's trust domain {ours}"
            ),
        }
    }
}

impl std::error::Error for PeerProblem {}

fn refuse(problem: PeerProblem) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(problem))))
}

/// The `result` label of a failed handshake, from its error: `unknown_ca`, `expired`,
/// `wrong_trust_domain`, `no_spiffe_id`, `bad_certificate`, `no_certificate`, `not_mesh` (the
/// peer did not speak mesh TLS), `timeout` or `error`.
pub fn failure_label(e: &std::io::Error) -> &'static str {
    if e.kind() == std::io::ErrorKind::TimedOut {
        return "timeout";
    }
    let Some(tls) = e.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return "not_mesh";
    };
    tls_failure_label(tls)
}

/// [`failure_label`] of a rustls error.
pub fn tls_failure_label(e: &Error) -> &'static str {
    match e {
        Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => "unknown_ca",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::Other(OtherError(inner)) => {
                match (**inner).downcast_ref::<PeerProblem>() {
                    Some(PeerProblem::WrongTrustDomain { .. }) => "wrong_trust_domain",
                    Some(PeerProblem::NoSpiffeId(_)) => "no_spiffe_id",
                    None => "bad_certificate",
                }
            }
            _ => "bad_certificate",
        },
        Error::NoCertificatesPresented => "no_certificate",
        Error::AlertReceived(alert) => match alert {
            rustls::AlertDescription::UnknownCA => "unknown_ca",
            rustls::AlertDescription::CertificateExpired => "expired",
            rustls::AlertDescription::BadCertificate
            | rustls::AlertDescription::CertificateUnknown
            | rustls::AlertDescription::CertificateRequired
            | rustls::AlertDescription::AccessDenied => "bad_certificate",
            _ => "not_mesh",
        },
        Error::InvalidMessage(_)
        | Error::InappropriateMessage { .. }
        | Error::InappropriateHandshakeMessage { .. }
        | Error::NoApplicationProtocol
        | Error::PeerIncompatible(_) => "not_mesh",
        _ => "error",
    }
}

/// True if a failed client handshake says the peer is not a sidecar of this mesh (so an
/// opportunistic connection may go in plaintext): it did not answer as TLS, refused our protocol,
/// or presented a certificate from outside our bundle. A peer whose certificate chains to our
/// bundle but is refused (expired, another trust domain) is a mesh peer with a problem: never a
/// reason to downgrade.
pub fn is_not_mesh(e: &std::io::Error) -> bool {
    matches!(failure_label(e), "not_mesh" | "unknown_ca")
}

/// The trust bundle and this pod's trust domain: builds both TLS configurations.
pub(crate) struct Trust {
    roots: Arc<RootCertStore>,
    ours: SpiffeId,
    algs: WebPkiSupportedAlgorithms,
    clients: Arc<dyn ClientCertVerifier>,
}

impl Trust {
    pub(crate) fn new(
        roots: Arc<RootCertStore>,
        ours: SpiffeId,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Trust, String> {
        let clients =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(provider))
                .build()
                .map_err(|e| format!("the trust bundle cannot verify clients: {e}"))?;
        Ok(Trust {
            roots,
            ours,
            algs: provider.signature_verification_algorithms,
            clients,
        })
    }

    /// Checks our own leaf as a peer would: it must chain to the bundle for both uses.
    pub(crate) fn check_own(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: SystemTime,
    ) -> Result<(), Error> {
        let now = UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        self.verify_server(leaf, intermediates, now)
            .map_err(|e| Error::General(format!("as a server certificate: {e}")))?;
        self.clients
            .verify_client_cert(leaf, intermediates, now)
            .map_err(|e| Error::General(format!("as a client certificate: {e}")))?;
        Ok(())
    }

    fn same_domain(&self, leaf: &CertificateDer<'_>) -> Result<SpiffeId, Error> {
        let facts = spiffe::facts(leaf).map_err(|e| refuse(PeerProblem::NoSpiffeId(e)))?;
        if facts.id.trust_domain() != self.ours.trust_domain() {
            return Err(refuse(PeerProblem::WrongTrustDomain {
                peer: facts.id.to_string(),
                ours: self.ours.trust_domain().to_owned(),
            }));
        }
        Ok(facts.id)
    }

    fn verify_server(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<SpiffeId, Error> {
        let parsed = ParsedCertificate::try_from(leaf)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        self.same_domain(leaf)
    }

    pub(crate) fn server_config(
        self: &Arc<Self>,
        key: Arc<rustls::sign::CertifiedKey>,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Arc<rustls::ServerConfig>, String> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::clone(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("TLS 1.3 server: {e}"))?
            .with_client_cert_verifier(Arc::new(SpiffeClients(Arc::clone(self))))
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(key)));
        config.alpn_protocols = vec![MESH_ALPN.to_vec()];
        // No session tickets: nothing arrives on an idle mesh connection that was not sent by
        // the peer's app (the connection pool's freshness check relies on it), and every
        // connection proves its client certificate afresh.
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(Arc::new(config))
    }

    pub(crate) fn client_config(
        self: &Arc<Self>,
        key: Arc<rustls::sign::CertifiedKey>,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Arc<rustls::ClientConfig>, String> {
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("TLS 1.3 client: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServers(Arc::clone(self))))
            .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(key)));
        config.alpn_protocols = vec![MESH_ALPN.to_vec()];
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }
}

/// Verifies a server: chain to the bundle, same trust domain. (The name it was reached by, an IP
/// address, is not in a SPIFFE certificate.)
#[derive(Debug)]
struct SpiffeServers(Arc<Trust>);

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust")
            .field("trust_domain", &self.ours.trust_domain())
            .finish()
    }
}

impl ServerCertVerifier for SpiffeServers {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.0.verify_server(end_entity, intermediates, now)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // TLS 1.3 only: a TLS 1.2 handshake never gets here.
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.algs.supported_schemes()
    }
}

/// Verifies a client: WebPKI (chain to the bundle, client use), then the trust domain.
#[derive(Debug)]
struct SpiffeClients(Arc<Trust>);

impl ClientCertVerifier for SpiffeClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.clients.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.0
            .clients
            .verify_client_cert(end_entity, intermediates, now)?;
        self.0.same_domain(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.clients.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.clients.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.clients.supported_verify_schemes()
    }
}

/// The SPIFFE ID of a verified peer's leaf (the verifiers above already checked it).
pub fn peer_id(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    let leaf = certs?.first()?;
    spiffe::facts(leaf).ok().map(|f| f.id)
}
