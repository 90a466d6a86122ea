//! A small HTTP/1.1 client for the webhook and Slack notifiers: one POST per
//! connection, `http://` or `https://` (rustls with the webpki roots, plus an
//! optional private CA for internal endpoints), with a deadline.

use std::{path::Path, sync::Arc, time::Duration};

use rustls::pki_types::{CertificateDer, pem::PemObject};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::NotifyError;

/// How long one POST may take, connect to last byte.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response body read.
const MAX_RESPONSE: usize = 64 * 1024;

/// A response: status and body.
#[derive(Debug)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Body, at most 64 KiB.
    pub body: Vec<u8>,
}

/// Posts JSON to HTTP(S) endpoints.
#[derive(Clone)]
pub struct HttpClient {
    tls: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient").finish_non_exhaustive()
    }
}

impl HttpClient {
    /// A client trusting the webpki roots and, if given, the CA
    /// certificates in the PEM file `extra_ca`.
    pub fn new(extra_ca: Option<&Path>) -> Result<Self, NotifyError> {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(path) = extra_ca {
            let bad = |why: String| NotifyError(format!("CA file {}: {why}", path.display()));
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| bad(e.to_string()))?
                .collect::<Result<_, _>>()
                .map_err(|e| bad(e.to_string()))?;
            if certs.is_empty() {
                return Err(bad("holds no PEM certificate".into()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| bad(e.to_string()))?;
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| NotifyError(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Self {
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    /// POSTs `body` to `url` with `headers`; fails on transport errors and
    /// timeouts (the status is the caller's to judge).
    pub async fn post(
        &self,
        url: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Result<Response, NotifyError> {
        tokio::time::timeout(TIMEOUT, self.post_inner(url, headers, body))
            .await
            .map_err(|_| {
                NotifyError(format!(
                    "POST {} timed out after {}s",
                    redact_url(url),
                    TIMEOUT.as_secs()
                ))
            })?
    }

    async fn post_inner(
        &self,
        url: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Result<Response, NotifyError> {
        let shown = redact_url(url);
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            NotifyError(format!("POST {shown}: {what}: {e}"))
        };
        let uri: http::Uri = url.parse().map_err(|e| fail("invalid url", &e))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(NotifyError(format!(
                    "POST {shown}: use an http:// or https:// url"
                )));
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| NotifyError(format!("POST {shown}: no host")))?
            .to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = uri
            .authority()
            .map_or(host.clone(), |a| a.as_str().to_owned());
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let tcp = TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port))
            .await
            .map_err(|e| fail("connect", &e))?;
        tcp.set_nodelay(true).ok();
        let mut request = http::Request::builder()
            .method(http::Method::POST)
            .uri(path)
            .header(http::header::HOST, authority)
            .header(
                http::header::USER_AGENT,
                concat!("twokey-broker/", env!("CARGO_PKG_VERSION")),
            );
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| fail("request", &e))?;
        if https {
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| fail("server name", &e))?;
            let tls = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|e| fail("TLS", &e))?;
            exchange(TokioIo::new(tls), request)
                .await
                .map_err(|e| fail("exchange", &e))
        } else {
            exchange(TokioIo::new(tcp), request)
                .await
                .map_err(|e| fail("exchange", &e))
        }
    }
}

/// The URL without its path and query (which may carry a token).
pub fn redact_url(url: &str) -> String {
    match url.parse::<http::Uri>() {
        Ok(uri) => format!(
            "{}://{}",
            uri.scheme_str().unwrap_or("?"),
            uri.authority().map_or("?", |a| a.as_str())
        ),
        Err(_) => "(invalid url)".into(),
    }
}

async fn exchange<T>(io: T, request: http::Request<Full<Bytes>>) -> Result<Response, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes()
        .to_vec();
    driver.abort();
    Ok(Response { status, body })
}
