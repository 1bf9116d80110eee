//! SPIFFE IDs (`spiffe://<trust domain>/<path>`), as workload certificates carry them in their URI
//! SAN, and what a certificate says about itself (its ID, validity, serial).
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Longest SPIFFE ID accepted (the SPIFFE spec's limit for the whole URI).
pub const MAX_ID_LEN: usize = 2048;
/// Longest trust domain (a DNS name).
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// A workload's SPIFFE ID, validated: lower-case trust domain of `[a-z0-9.-_]`, a path of
/// non-empty segments of `[A-Za-z0-9.-_]` (no `.` or `..` segments), no query or fragment.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    text: Arc<str>,
    /// End of the trust domain in `text`.
    domain_end: usize,
}

impl SpiffeId {
    pub fn parse(text: &str) -> Result<SpiffeId, String> {
        if text.len() > MAX_ID_LEN {
            return Err(format!("longer than {MAX_ID_LEN} bytes"));
        }
        let rest = text
            .strip_prefix("spiffe://")
            .ok_or("not a SPIFFE ID: it must start with spiffe://")?;
        let (domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if domain.is_empty() || domain.len() > MAX_TRUST_DOMAIN_LEN {
            return Err("the trust domain is empty or too long".into());
        }
        if !domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return Err(format!(
                "trust domain {domain:?} may only hold a-z, 0-9, '.', '-' and '_'"
            ));
        }
        if path.is_empty() {
            return Err("a workload ID has a path (spiffe://domain/ns/NS/sa/SA)".into());
        }
        for segment in path[1..].split('/') {
            if segment.is_empty() || segment == "." || segment == ".." {
                return Err(format!("path {path:?} has an empty, '.' or '..' segment"));
            }
            if !segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            {
                return Err(format!(
                    "path segment {segment:?} may only hold letters, digits, '.', '-' and '_'"
                ));
            }
        }
        Ok(SpiffeId {
            text: text.into(),
            domain_end: "spiffe://".len() + domain.len(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn trust_domain(&self) -> &str {
        &self.text["spiffe://".len()..self.domain_end]
    }

    /// The path after the trust domain (`/ns/shop/sa/orders`).
    pub fn path(&self) -> &str {
        &self.text[self.domain_end..]
    }

    /// The Kubernetes namespace of an Istio-style ID (`/ns/<ns>/sa/<sa>`).
    pub fn namespace(&self) -> Option<&str> {
        let mut parts = self.path().split('/').skip(1);
        match (parts.next(), parts.next()) {
            (Some("ns"), Some(ns)) => Some(ns),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.text)
    }
}

/// What a certificate says about itself.
#[derive(Debug, Clone)]
pub struct CertFacts {
    pub id: SpiffeId,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Hex, colon-separated (as `openssl x509 -serial` shows it, lower case).
    pub serial: String,
}

fn unix(t: i64) -> SystemTime {
    if t >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(t as u64)
    } else {
        SystemTime::UNIX_EPOCH
    }
}

/// The SPIFFE ID of a DER certificate: exactly one URI SAN, a valid SPIFFE ID.
pub fn facts(der: &[u8]) -> Result<CertFacts, String> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| format!("not a valid X.509 certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("its subject alternative names cannot be read: {e}"))?
        .ok_or("it has no subject alternative names (a SPIFFE ID is a URI SAN)")?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let uri = uris
        .next()
        .ok_or("it has no URI SAN (a SPIFFE ID is a URI SAN)")?;
    if uris.next().is_some() {
        return Err("it has more than one URI SAN; a SPIFFE certificate has exactly one".into());
    }
    let id = SpiffeId::parse(uri).map_err(|e| format!("URI SAN {uri:?}: {e}"))?;
    let validity = cert.validity();
    Ok(CertFacts {
        id,
        not_before: unix(validity.not_before.timestamp()),
        not_after: unix(validity.not_after.timestamp()),
        serial: cert.raw_serial_as_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/orders").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.path(), "/ns/shop/sa/orders");
        assert_eq!(id.namespace(), Some("shop"));
        assert_eq!(
            SpiffeId::parse("spiffe://td/agent").unwrap().namespace(),
            None
        );
        for bad in [
            "http://td/ns/a",
            "spiffe://",
            "spiffe:///ns/a",
            "spiffe://TD/ns/a",
            "spiffe://td",
            "spiffe://td/",
            "spiffe://td/ns//a",
            "spiffe://td/ns/../a",
            "spiffe://td/ns/a?x=1",
            "spiffe://td/ns/a#f",
            "spiffe://td:8080/ns/a",
            "spiffe://us%65r@td/ns/a",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
        assert!(SpiffeId::parse(&format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN))).is_err());
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(facts(b"").is_err());
        assert!(facts(b"\x30\x03\x02\x01\x01").is_err());
    }
}
