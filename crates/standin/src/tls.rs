//! TLS material for the fake submission server (and other servers the
//! tests start): a throwaway CA and a server certificate it signed for
//! `localhost` and `127.0.0.1`.
//!
//! A CA (rather than one self-signed leaf) lets the relay be tested the way
//! it is deployed: trusting a CA file and verifying the server name.

use std::io;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

/// A generated CA and an acceptor presenting a certificate it signed.
pub(crate) struct TlsMaterial {
    /// PEM of the CA certificate, for clients to trust.
    pub(crate) ca_pem: String,
    /// Server side of the handshake.
    pub(crate) acceptor: TlsAcceptor,
}

/// A fresh CA and a server certificate it signed for `localhost` and
/// `127.0.0.1`, in PEM: for a server the tests start themselves (a
/// PostgreSQL server's `ssl_cert_file` and `ssl_key_file`) and the clients
/// that trust the CA.
pub struct LocalhostCertificate {
    /// The CA certificate, for clients to trust.
    pub ca_pem: String,
    /// The server's certificate.
    pub cert_pem: String,
    /// The server's private key (PKCS #8).
    pub key_pem: String,
    cert_der: rustls::pki_types::CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl LocalhostCertificate {
    /// Generates one.
    pub fn generate() -> io::Result<LocalhostCertificate> {
        let ca_key = KeyPair::generate().map_err(io::Error::other)?;
        let mut ca_params =
            CertificateParams::new(Vec::<String>::new()).map_err(io::Error::other)?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "relay-standin fake Microsoft 365 CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).map_err(io::Error::other)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().map_err(io::Error::other)?;
        let mut server_params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .map_err(io::Error::other)?;
        server_params
            .distinguished_name
            .push(DnType::CommonName, "FAKE.prod.outlook.com");
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .map_err(io::Error::other)?;
        Ok(LocalhostCertificate {
            ca_pem: ca_cert.pem(),
            cert_pem: server_cert.pem(),
            key_pem: server_key.serialize_pem(),
            cert_der: server_cert.der().clone(),
            key_der: server_key.serialize_der(),
        })
    }
}

/// Generates a fresh CA and server certificate and builds a rustls server
/// config (TLS 1.2 and 1.3) with the aws-lc-rs provider, so nothing depends
/// on the process-wide default provider.
pub(crate) fn generate() -> io::Result<TlsMaterial> {
    let certificate = LocalhostCertificate::generate()?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certificate.key_der));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(io::Error::other)?
    .with_no_client_auth()
    .with_single_cert(vec![certificate.cert_der], key)
    .map_err(io::Error::other)?;

    Ok(TlsMaterial {
        ca_pem: certificate.ca_pem,
        acceptor: TlsAcceptor::from(Arc::new(config)),
    })
}
