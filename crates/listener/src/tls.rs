//! TLS with clients: the acceptor built from `listener.tls_certificate` and
//! `tls_private_key` (read again at every reload), and [`Conn`], a stream
//! that starts plain and may be upgraded by `STARTTLS`.

use crate::ListenerError;
use rustls::pki_types::{
    pem::{self, PemObject},
    CertificateDer, PrivateKeyDer,
};
use std::{
    io,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::{server::TlsStream, TlsAcceptor};

/// Reads the certificate chain and key and builds a server configuration
/// that speaks TLS 1.2 and 1.3 only.
pub fn acceptor(certificate: &Path, private_key: &Path) -> Result<TlsAcceptor, ListenerError> {
    let pem_error = |key, path: &Path, source| match source {
        pem::Error::NoItemsFound => ListenerError::NothingInPem {
            key,
            path: path.to_owned(),
            what: if key == "tls_certificate" {
                "certificate"
            } else {
                "private key"
            },
        },
        source => ListenerError::Pem {
            key,
            path: path.to_owned(),
            source,
        },
    };
    let certs = CertificateDer::pem_file_iter(certificate)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error("tls_certificate", certificate, e))?;
    if certs.is_empty() {
        return Err(pem_error(
            "tls_certificate",
            certificate,
            pem::Error::NoItemsFound,
        ));
    }
    let key = PrivateKeyDer::from_pem_file(private_key)
        .map_err(|e| pem_error("tls_private_key", private_key, e))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .and_then(|builder| builder.with_no_client_auth().with_single_cert(certs, key))
    .map_err(|source| ListenerError::Tls {
        certificate: certificate.to_owned(),
        private_key: private_key.to_owned(),
        source,
    })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A client connection, plain or TLS.
pub enum Conn<S> {
    Plain(S),
    Tls(Box<TlsStream<S>>),
    /// Between taking the plain stream and finishing the handshake (or
    /// after a failed one).
    Gone,
}

impl<S> Conn<S> {
    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection gone")
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Conn<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Gone => Poll::Ready(Err(gone())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Gone => Poll::Ready(Ok(())),
        }
    }
}
