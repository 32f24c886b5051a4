//! Trust for the upstream connection: the system's roots plus `ca_file`.

use crate::DeliveryError;
use rustls::{
    crypto::aws_lc_rs,
    pki_types::{pem::PemObject, CertificateDer},
    ClientConfig, RootCertStore,
};
use std::{path::Path, sync::Arc};
use tokio_rustls::TlsConnector;

/// A connector that verifies the upstream's certificate against the system's
/// trust roots and the certificates in `ca_file`. TLS 1.2 or later only.
pub fn connector(ca_file: Option<&Path>) -> Result<TlsConnector, DeliveryError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::debug!(%error, "skipping a system trust root");
    }
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        let bad = |reason: String| DeliveryError::CaFile {
            path: path.to_owned(),
            reason,
        };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| bad(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("no PEM certificate in it".into()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| bad(e.to_string()))?;
        }
    }
    if roots.is_empty() {
        return Err(DeliveryError::NoTrustRoots);
    }
    let config = ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| DeliveryError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}
