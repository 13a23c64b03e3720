//! TLS for NBD (`NBD_OPT_STARTTLS`) through rustls: loading the server's certificate and
//! key, and optionally a CA that client certificates must chain to (mutual TLS).

use anyhow::{Context, Result, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

/// Whether the server offers TLS through `NBD_OPT_STARTTLS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// No TLS: STARTTLS is unsupported.
    #[default]
    Off,
    /// Clients may upgrade to TLS or stay in plain text.
    On,
    /// Only STARTTLS and ABORT are accepted until TLS is up.
    Require,
}

/// What the server needs to offer TLS.
#[derive(Clone)]
pub struct TlsSetup {
    /// Offered, or required.
    pub mode: TlsMode,
    /// The TLS server configuration.
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// Client certificates are required and verified.
    pub verifies_clients: bool,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup")
            .field("mode", &self.mode)
            .field("verifies_clients", &self.verifies_clients)
            .finish()
    }
}

/// aws-lc-rs rather than ring: ring takes only RSA moduli that are a multiple of 512 bits,
/// and refused keys such as the 2432-bit one of nbd's own test suite.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read the {what} {}", path.display()))?
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("{} is not a PEM certificate file", path.display()))?;
    if certs.is_empty() {
        bail!(
            "{} holds no certificate (expected PEM, -----BEGIN CERTIFICATE-----)",
            path.display()
        );
    }
    Ok(certs)
}

impl TlsSetup {
    /// Loads `cert` (PEM chain) and `key` (PEM private key); with `ca`, clients must present
    /// a certificate issued by it.
    pub fn load(mode: TlsMode, cert: &Path, key: &Path, ca: Option<&Path>) -> Result<TlsSetup> {
        let chain = certs(cert, "--tls-cert")?;
        let key_path = key;
        let key = PrivateKeyDer::from_pem_file(key_path).with_context(|| {
            format!(
                "cannot read a PEM private key from --tls-key {}",
                key_path.display()
            )
        })?;
        // A key the provider cannot use is a different fault from a key that does not match
        // the certificate, with a different remedy: say which.
        if let Err(e) = provider().key_provider.load_private_key(key.clone_key()) {
            bail!(
                "--tls-key {}: TLS cannot use this private key ({e}); give an RSA key of 2048 \
                 to 8192 bits, an ECDSA key on P-256, P-384 or P-521, or an Ed25519 key",
                key_path.display()
            );
        }
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("setting up TLS")?;
        let builder = match ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in certs(ca, "--tls-ca")? {
                    roots
                        .add(c)
                        .with_context(|| format!("bad CA certificate in {}", ca.display()))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .build()
                .with_context(|| format!("cannot verify clients with {}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder.with_single_cert(chain, key).with_context(|| {
            format!(
                "--tls-key {} does not go with --tls-cert {}",
                key_path.display(),
                cert.display()
            )
        })?;
        Ok(TlsSetup {
            mode,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            verifies_clients: ca.is_some(),
        })
    }
}
