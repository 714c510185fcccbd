//! TLS for every HTTP stage: one rustls client configuration (ring
//! provider), shared by [`crate::http::HttpClient`] and the load generator.
//!
//! Roots: the system's CA store (`/etc/ssl/certs` and what
//! `rustls-native-certs` finds) unless turned off, plus any CA bundle given
//! (PEM). A client certificate (PEM chain and key) is optional.
//!
//! ```
//! use cd_stages::tls::TlsOptions;
//! // Trust only a private CA (no system roots), offer HTTP/2 and HTTP/1.1.
//! let tls = TlsOptions::new().system_roots(false);
//! let config = tls.client_config(true).unwrap();
//! assert_eq!(config.alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);
//! ```

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::http::HttpError;

/// Where TLS trust and the client identity come from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TlsOptions {
    no_system_roots: bool,
    ca: Vec<Pem>,
    identity: Option<(Pem, Pem)>,
}

/// PEM text, from a file or given inline.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Pem {
    File(PathBuf),
    Bytes(Vec<u8>),
}

impl Pem {
    fn what(&self) -> String {
        match self {
            Pem::File(p) => p.display().to_string(),
            Pem::Bytes(_) => "PEM given in code".to_string(),
        }
    }

    fn read(&self) -> Result<Vec<u8>, HttpError> {
        match self {
            Pem::File(p) => std::fs::read(p).map_err(|e| HttpError::Config {
                what: p.display().to_string(),
                reason: format!("cannot read: {e}"),
            }),
            Pem::Bytes(b) => Ok(b.clone()),
        }
    }
}

impl TlsOptions {
    /// System roots, no extra CA, no client certificate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the system's CA store is trusted (default yes).
    pub fn system_roots(mut self, on: bool) -> Self {
        self.no_system_roots = !on;
        self
    }

    /// Also trusts the CA certificates in this PEM file.
    pub fn ca_file(mut self, path: impl AsRef<Path>) -> Self {
        self.ca.push(Pem::File(path.as_ref().to_path_buf()));
        self
    }

    /// Also trusts these CA certificates (PEM).
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca.push(Pem::Bytes(pem.into()));
        self
    }

    /// Presents this client certificate (PEM chain, leaf first) and key
    /// (PEM, PKCS#8, PKCS#1 or SEC1) for mutual TLS.
    pub fn client_cert_files(mut self, chain: impl AsRef<Path>, key: impl AsRef<Path>) -> Self {
        self.identity = Some((
            Pem::File(chain.as_ref().to_path_buf()),
            Pem::File(key.as_ref().to_path_buf()),
        ));
        self
    }

    /// Like [`TlsOptions::client_cert_files`], with the PEM given.
    pub fn client_cert_pem(mut self, chain: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.identity = Some((Pem::Bytes(chain.into()), Pem::Bytes(key.into())));
        self
    }

    /// The rustls client configuration, offering HTTP/2 by ALPN when `h2`.
    ///
    /// Errors: [`HttpError::Config`] naming the file (or "PEM given in code")
    /// that cannot be read, holds no certificate, or whose key does not fit.
    pub fn client_config(&self, h2: bool) -> Result<rustls::ClientConfig, HttpError> {
        let mut roots = if self.no_system_roots {
            RootCertStore::empty()
        } else {
            (*system_roots()).clone()
        };
        for pem in &self.ca {
            let bytes = pem.read()?;
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
                .collect::<Result<_, _>>()
                .map_err(|e| HttpError::Config {
                    what: pem.what(),
                    reason: format!("not PEM certificates: {e}"),
                })?;
            if certs.is_empty() {
                return Err(HttpError::Config {
                    what: pem.what(),
                    reason: "holds no certificate".into(),
                });
            }
            for cert in certs {
                roots.add(cert).map_err(|e| HttpError::Config {
                    what: pem.what(),
                    reason: format!("not a usable CA certificate: {e}"),
                })?;
            }
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| HttpError::Config {
            what: "TLS".into(),
            reason: e.to_string(),
        })?
        .with_root_certificates(roots);
        let mut config = match &self.identity {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => {
                let chain_bytes = chain.read()?;
                let certs: Vec<CertificateDer<'static>> =
                    CertificateDer::pem_slice_iter(&chain_bytes)
                        .collect::<Result<_, _>>()
                        .map_err(|e| HttpError::Config {
                            what: chain.what(),
                            reason: format!("not PEM certificates: {e}"),
                        })?;
                let key_der =
                    PrivateKeyDer::from_pem_slice(&key.read()?).map_err(|e| HttpError::Config {
                        what: key.what(),
                        reason: format!("no private key: {e}"),
                    })?;
                builder
                    .with_client_auth_cert(certs, key_der)
                    .map_err(|e| HttpError::Config {
                        what: chain.what(),
                        reason: format!("client certificate and key do not fit: {e}"),
                    })?
            }
        };
        config.alpn_protocols = if h2 {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        Ok(config)
    }
}

/// The system's CA store, read once per process (certificates that do not
/// parse are skipped, as browsers do).
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            Arc::new(roots)
        })
        .clone()
}

/// `err` and its causes. An I/O error wrapping another error is followed
/// into it (`io::Error::source` skips the wrapped error itself, which is
/// where hyper and rustls put theirs).
pub(crate) fn causes<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(err), |e| {
        match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        }
    })
}

/// Whether `err` (or one of its [`causes`]) is a TLS failure; returns its
/// text.
pub(crate) fn tls_failure(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    causes(err).find_map(|e| e.downcast_ref::<rustls::Error>().map(|t| t.to_string()))
}
