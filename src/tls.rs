//! TLS on the main listener: the server certificate from PEM files, client certificates checked
//! against `listen.client_ca` in `mtls` mode, and the caller's name read from a verified client
//! certificate.
//!
//! Everything here is loaded once at start (and by `check-config`), so a bad file stops the
//! gateway with a message naming the key and the file, not the first handshake.

use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::Listen;
use crate::error::TlsError;

/// The listener's TLS acceptor, or `None` for plain HTTP (no `listen.tls_cert`).
pub fn acceptor(listen: &Listen) -> Result<Option<TlsAcceptor>, TlsError> {
    let (Some(cert_path), Some(key_path)) = (&listen.tls_cert, &listen.tls_key) else {
        return Ok(None);
    };
    let chain = read_certificates("listen.tls_cert", cert_path)?;
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|source| TlsError::NoPrivateKey {
        path: key_path.clone(),
        source,
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::ListenerProtocols)?;
    let builder = match &listen.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca_path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certificates("listen.client_ca", ca_path)? {
                roots.add(cert).map_err(|source| TlsError::UnusableRoot {
                    key: "listen.client_ca",
                    what: "CA certificate",
                    path: ca_path.clone(),
                    source,
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .map_err(|source| TlsError::ClientVerifier {
                    path: ca_path.clone(),
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config =
        builder
            .with_single_cert(chain, key)
            .map_err(|source| TlsError::KeyMismatch {
                key_path: key_path.clone(),
                cert_path: cert_path.clone(),
                source,
            })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

fn read_certificates(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Unreadable {
        key,
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::NotPem {
            key,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            key,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The caller's name in a client certificate: its first DNS subject alternative name, else its
/// subject's common name. `None` if it has neither or cannot be parsed.
pub fn certificate_identity(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        let dns = san.value.general_names.iter().find_map(|name| match name {
            GeneralName::DNSName(dns) => Some(*dns),
            _ => None,
        });
        if let Some(name) = dns.and_then(usable) {
            return Some(name);
        }
    }
    let cn = parsed.subject().iter_common_name().next()?;
    usable(cn.as_str().ok()?)
}

/// A name goes into logs, the audit trail and metric labels: printable text only.
fn usable(name: &str) -> Option<String> {
    let ok = !name.is_empty() && name.len() <= 253 && name.chars().all(|c| !c.is_control());
    ok.then(|| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

    fn cert(sans: &[&str], cn: Option<&str>) -> CertificateDer<'static> {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name = DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn identity_is_the_first_dns_name() {
        let cert = cert(&["analytics", "analytics.internal"], Some("ignored"));
        assert_eq!(certificate_identity(&cert).as_deref(), Some("analytics"));
    }

    #[test]
    fn identity_falls_back_to_the_common_name() {
        let cert = cert(&[], Some("ci-runner"));
        assert_eq!(certificate_identity(&cert).as_deref(), Some("ci-runner"));
    }

    #[test]
    fn ip_addresses_are_not_names() {
        let cert = cert(&["10.0.0.7"], Some("data-tools"));
        assert_eq!(certificate_identity(&cert).as_deref(), Some("data-tools"));
    }

    #[test]
    fn certificate_without_a_name_has_no_identity() {
        assert_eq!(certificate_identity(&cert(&[], None)), None);
    }

    #[test]
    fn missing_files_are_named_with_their_key() {
        let listen = Listen {
            tls_cert: Some("/nonexistent/cert.pem".into()),
            tls_key: Some("/nonexistent/key.pem".into()),
            ..Listen::default()
        };
        let err = acceptor(&listen).err().unwrap().to_string();
        assert!(
            err.starts_with("listen.tls_cert: cannot read /nonexistent/cert.pem"),
            "{err}"
        );
    }
}
