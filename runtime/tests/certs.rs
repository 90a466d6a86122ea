//! Client certificates a twokey server must refuse, one test per case,
//! against a server built exactly as the services build theirs
//! (`TlsFiles::server_tls` + `serve::incoming` + `serve::server`, identity
//! from `Authenticator`). Certificate problems end the TLS handshake with the
//! alert rustls sends (asserted exactly); identity problems in a valid
//! certificate are UNAUTHENTICATED.

use std::{net::SocketAddr, path::Path, sync::Arc};

use rustls::{
    AlertDescription,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use tokio::{io::AsyncReadExt, net::TcpStream, sync::oneshot, task::JoinHandle};
use tonic::{Code, Request, Status, service::interceptor::InterceptedService};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use twokey_runtime::{
    Authenticator, serve,
    tls::{ClientAuth, TlsFiles},
};
use twokey_testkit::pki::{DevCa, LeafSpec, LeafUsage};

const TD: &str = "twokey.local";

struct Pki {
    dir: tempfile::TempDir,
    ca: DevCa,
}

impl Pki {
    fn new() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::new(TD).unwrap();
        ca.write(dir.path()).unwrap();
        ca.issue_service(TD, "vault")
            .unwrap()
            .write(dir.path(), "vault")
            .unwrap();
        Self { dir, ca }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a client certificate made from `spec` by `ca` as `name`.
    fn client(&self, name: &str, ca: &DevCa, spec: &LeafSpec) -> TlsFiles {
        ca.issue(spec).unwrap().write(self.path(), name).unwrap();
        TlsFiles::in_dir(self.path(), name)
    }

    fn alice(&self) -> LeafSpec {
        LeafSpec::new(&format!("spiffe://{TD}/user/alice"))
    }
}

struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Serves gRPC health behind `Authenticator::authenticate`.
async fn serve(files: TlsFiles, auth: ClientAuth) -> Server {
    let tls = files.server_tls(auth).unwrap();
    let listener = serve::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let authenticator = Authenticator::new(TD);
    let health = InterceptedService::new(health, move |request: Request<()>| {
        authenticator.authenticate(&request)?;
        Ok::<_, Status>(request)
    });
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        serve::server()
            .unwrap()
            .add_service(health)
            .serve_with_incoming_shutdown(serve::incoming(listener, tls), async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    Server {
        addr,
        stop: Some(stop),
        task: Some(task),
    }
}

async fn check(server: &Server, client: &TlsFiles) -> Result<(), Status> {
    let channel = client
        .channel(&format!("https://{}", server.addr), "vault")
        .unwrap();
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
}

/// Runs a TLS handshake as `client` and reads once: the alert the server
/// ended the connection with, if it did.
async fn alert(server: &Server, client: &TlsFiles) -> Option<AlertDescription> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&client.ca).unwrap() {
        roots.add(ca.unwrap()).unwrap();
    }
    let certs = CertificateDer::pem_file_iter(&client.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&client.key).unwrap();
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let error = match connector
        .connect(ServerName::try_from("vault").unwrap(), tcp)
        .await
    {
        Ok(mut stream) => {
            // TLS 1.3: the server checks the client's certificate after the
            // client finished; its verdict is the first thing to read.
            let mut buf = [0u8; 64];
            match stream.read(&mut buf).await {
                Ok(_) => return None,
                Err(e) => e,
            }
        }
        Err(e) => e,
    };
    match error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::AlertReceived(alert)) => Some(*alert),
        other => panic!("expected a TLS alert, got {other:?} ({error})"),
    }
}

/// Asserts the handshake ends with `want`, and that a gRPC call never
/// reaches the service: tonic's client reports the connection's failure as
/// UNKNOWN "transport error" with the alert as its source.
async fn assert_refused_in_handshake(server: &Server, client: &TlsFiles, want: AlertDescription) {
    assert_eq!(alert(server, client).await, Some(want));
    let status = check(server, client).await.unwrap_err();
    assert_eq!(status.code(), Code::Unknown, "{status:?}");
    assert_eq!(status.message(), "transport error");
    assert!(
        format!("{status:?}").contains(&format!("received fatal alert: {want:?}")),
        "{status:?}"
    );
}

async fn assert_unauthenticated(server: &Server, client: &TlsFiles, says: &str) {
    assert_eq!(alert(server, client).await, None, "the handshake succeeds");
    let status = check(server, client).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains(says), "{status:?}");
}

#[tokio::test]
async fn a_valid_certificate_is_served() {
    let pki = Pki::new();
    let server = serve(TlsFiles::in_dir(pki.path(), "vault"), ClientAuth::Required).await;
    let alice = pki.client("alice", &pki.ca, &pki.alice());
    assert_eq!(alert(&server, &alice).await, None);
    check(&server, &alice).await.unwrap();
}

#[tokio::test]
async fn an_expired_certificate_is_refused_in_the_handshake() {
    let pki = Pki::new();
    let server = serve(TlsFiles::in_dir(pki.path(), "vault"), ClientAuth::Required).await;
    let mut spec = pki.alice();
    let now = time::OffsetDateTime::now_utc();
    spec.not_before = now - time::Duration::days(2);
    spec.not_after = now - time::Duration::days(1);
    let expired = pki.client("expired", &pki.ca, &spec);
    assert_refused_in_handshake(&server, &expired, AlertDescription::CertificateExpired).await;
}

#[tokio::test]
async fn a_not_yet_valid_certificate_is_refused_in_the_handshake() {
    let pki = Pki::new();
    let server = serve(TlsFiles::in_dir(pki.path(), "vault"), ClientAuth::Required).await;
    let mut spec = pki.alice();
    let now = time::OffsetDateTime::now_utc();
    spec.not_before = now + time::Duration::days(1);
    spec.not_after = now + time::Duration::days(2);
    let early = pki.client("early", &pki.ca, &spec);
    assert_refused_in_handshake(&server, &early, AlertDescription::CertificateExpired).await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_in_the_handshake() {
    let pki = Pki::new();
    let server = serve(TlsFiles::in_dir(pki.path(), "vault"), ClientAuth::Required).await;
    let other = DevCa::new("other.example").unwrap();
    let foreign = pki.client("foreign", &other, &pki.alice());
    assert_refused_in_handshake(&server, &foreign, AlertDescription::UnknownCA).await;
    // A CA that copies our CA's name: its signature does not verify.
    let impostor = DevCa::new(TD).unwrap();
    let forged = pki.client("forged", &impostor, &pki.alice());
    assert_refused_in_handshake(&server, &forged, AlertDescription::DecryptError).await;
}

#[tokio::test]
async fn no_certificate_is_refused_in_the_handshake_where_one_is_required() {
    let pki = Pki::new();
    let server = serve(TlsFiles::in_dir(pki.path(), "vault"), ClientAuth::Required).await;
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(pki.path().join("ca.crt")).unwrap() {
        roots.add(ca.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut stream = connector
        .connect(ServerName::try_from("vault").unwrap(), tcp)
        .await
        .unwrap();
    let error = stream.read(&mut [0u8; 16]).await.unwrap_err();
    let alert = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>());
    assert_eq!(
        alert,
        Some(&rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired
        ))
    );
}

#[tokio::test]
async fn no_certificate_is_unauthenticated_where_one_is_optional() {
    // The broker's mode: connect without a certificate, get a clear answer.
    let pki = Pki::new();
    let server = serve(TlsFiles::in_dir(pki.path(), "vault"), ClientAuth::Optional).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(
                    std::fs::read(pki.path().join("ca.crt")).unwrap(),
                ))
                .domain_name("vault"),
        )
        .unwrap()
        .connect_lazy();
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // A certificate that is presented must still verify.
    let other = DevCa::new("other.example").unwrap();
    let foreign = pki.client("foreign", &other, &pki.alice());
    assert_refused_in_handshake(&server, &foreign, AlertDescription::UnknownCA).await;
}

#[tokio::test]
async fn a_certificate_without_a_san_is_unauthenticated() {
    let pki = Pki::new();
    let server = serve(TlsFiles::in_dir(pki.path(), "vault"), ClientAuth::Required).await;
    let mut spec = pki.alice();
    spec.spiffe_ids.clear();
    let bare = pki.client("bare", &pki.ca, &spec);
    assert_unauthenticated(&server, &bare, "carries 0 SPIFFE IDs").await;
}

#[tokio::test]
async fn a_certificate_with_two_spiffe_ids_is_unauthenticated() {
    let pki = Pki::new();
    let server = serve(TlsFiles::in_dir(pki.path(), "vault"), ClientAuth::Required).await;
    let mut spec = pki.alice();
    spec.spiffe_ids.push(format!("spiffe://{TD}/user/bob"));
    let two = pki.client("two", &pki.ca, &spec);
    assert_unauthenticated(&server, &two, "carries 2 SPIFFE IDs").await;
}

#[tokio::test]
async fn a_spiffe_id_from_another_trust_domain_is_unauthenticated() {
    let pki = Pki::new();
    let server = serve(TlsFiles::in_dir(pki.path(), "vault"), ClientAuth::Required).await;
    let spec = LeafSpec::new("spiffe://evil.example/user/alice");
    let stranger = pki.client("stranger", &pki.ca, &spec);
    assert_unauthenticated(
        &server,
        &stranger,
        "spiffe://evil.example/user/alice is not in trust domain twokey.local",
    )
    .await;
}

#[tokio::test]
async fn a_revoked_certificate_is_refused_in_the_handshake_when_a_crl_is_configured() {
    let pki = Pki::new();
    let revoked = pki.ca.issue(&pki.alice()).unwrap();
    revoked.write(pki.path(), "revoked").unwrap();
    let revoked = TlsFiles::in_dir(pki.path(), "revoked");
    let fine = pki.client("fine", &pki.ca, &pki.alice());
    let crl = pki.path().join("ca.crl");
    let pem = std::fs::read_to_string(&revoked.cert).unwrap();
    std::fs::write(&crl, pki.ca.crl_pem(&[&pem]).unwrap()).unwrap();

    // Without the CRL the certificate is served; with it, it is refused and
    // other certificates of the same CA still are served.
    let plain = serve(TlsFiles::in_dir(pki.path(), "vault"), ClientAuth::Required).await;
    check(&plain, &revoked).await.unwrap();
    let mut files = TlsFiles::in_dir(pki.path(), "vault");
    files.crl = Some(crl);
    let server = serve(files, ClientAuth::Required).await;
    assert_refused_in_handshake(&server, &revoked, AlertDescription::CertificateRevoked).await;
    assert_eq!(alert(&server, &fine).await, None);
    check(&server, &fine).await.unwrap();
}

#[test]
fn a_crl_file_that_is_not_a_crl_is_refused_at_start() {
    let pki = Pki::new();
    let mut files = TlsFiles::in_dir(pki.path(), "vault");
    files.crl = Some(pki.path().join("ca.crt"));
    let err = files.server_tls(ClientAuth::Required).unwrap_err();
    assert!(err.to_string().contains("ca.crt"), "{err}");
}

#[tokio::test]
async fn a_server_only_certificate_is_refused_as_a_client() {
    let pki = Pki::new();
    let server = serve(TlsFiles::in_dir(pki.path(), "vault"), ClientAuth::Required).await;
    let mut spec = pki.alice();
    spec.usage = LeafUsage::ServerOnly;
    let server_only = pki.client("server-only", &pki.ca, &spec);
    // rustls' verifier already refuses a certificate whose extended key
    // usages leave clientAuth out.
    assert_refused_in_handshake(
        &server,
        &server_only,
        AlertDescription::UnsupportedCertificate,
    )
    .await;
}

#[tokio::test]
async fn a_certificate_without_extended_key_usages_is_unauthenticated() {
    let pki = Pki::new();
    let server = serve(TlsFiles::in_dir(pki.path(), "vault"), ClientAuth::Required).await;
    let mut spec = pki.alice();
    spec.usage = LeafUsage::Unspecified;
    let bare = pki.client("no-eku", &pki.ca, &spec);
    assert_unauthenticated(
        &server,
        &bare,
        &format!("the client certificate of spiffe://{TD}/user/alice does not carry the clientAuth extended key usage"),
    )
    .await;
}

#[test]
fn a_private_key_readable_by_others_is_refused_by_servers_and_clients() {
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::new();
    let files = TlsFiles::in_dir(pki.path(), "vault");
    std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let said = |e: twokey_runtime::tls::TlsError| e.to_string();
    let server = said(files.server_tls(ClientAuth::Required).unwrap_err());
    let client = said(files.channel("https://127.0.0.1:1", "vault").unwrap_err());
    for message in [server, client] {
        assert!(
            message.contains("is readable by group or others (mode 640)")
                && message.contains(&format!("chmod 600 {}", files.key.display())),
            "{message}"
        );
    }
    std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o400)).unwrap();
    files.server_tls(ClientAuth::Required).unwrap();
}

#[tokio::test]
async fn a_plain_http_address_is_refused_with_what_to_use() {
    let pki = Pki::new();
    let files = TlsFiles::in_dir(pki.path(), "vault");
    let err = files
        .channel("http://127.0.0.1:7400", "broker")
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "address \"http://127.0.0.1:7400\" is not https://: every twokey service speaks only \
         mutual TLS; use https://HOST:PORT"
    );
    files.channel("HTTPS://127.0.0.1:7400", "broker").unwrap();
}
