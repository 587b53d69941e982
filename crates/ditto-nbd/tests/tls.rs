//! NBD_OPT_STARTTLS as the protocol describes it, byte by byte: FORCEDTLS
//! answers other options with NBD_REP_ERR_TLS_REQD, STARTTLS is ACKed and
//! upgrades the stream, option haggling goes on over TLS (a second
//! STARTTLS is invalid), and the export works through it.

mod common;

use std::sync::Arc;

use common::*;
use ditto_nbd::proto::*;
use ditto_nbd::{NbdTls, Server, ServerConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

struct Certs {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

fn certs() -> Certs {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    Certs {
        cert: c.cert.der().clone(),
        key: PrivateKeyDer::Pkcs8(c.signing_key.serialize_der().into()),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server(required: bool, certs: &Certs) -> (Fixture, Arc<Server>) {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![certs.cert.clone()], certs.key.clone_key())
        .unwrap();
    let f = Fixture::new();
    let tls = NbdTls {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        required,
    };
    let server = Server::with_tls(f.registry.clone(), ServerConfig::default(), Some(tls));
    (f, server)
}

async fn upgrade(
    c: Client<tokio::io::DuplexStream>,
    certs: &Certs,
) -> Client<tokio_rustls::client::TlsStream<tokio::io::DuplexStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certs.cert.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("localhost").unwrap();
    Client::new(connector.connect(name, c.s).await.unwrap())
}

#[tokio::test]
async fn forced_tls_refuses_options_until_starttls_then_serves_over_tls() {
    let certs = certs();
    let (f, server) = server(true, &certs);
    let (c, s) = tokio::io::duplex(4 << 20);
    let task = tokio::spawn(server.serve_connection(s, "test-peer".into()));
    let mut c = Client::new(c);
    c.greet_default().await;
    c.send_option(NBD_OPT_LIST, b"").await;
    let r = c.read_opt_reply().await;
    assert_eq!(r.kind, NBD_REP_ERR_TLS_REQD);
    c.send_option(NBD_OPT_STARTTLS, b"junk").await;
    assert_eq!(c.read_opt_reply().await.kind, NBD_REP_ERR_INVALID);
    c.send_option(NBD_OPT_STARTTLS, b"").await;
    let r = c.read_opt_reply().await;
    assert_eq!((r.option, r.kind), (NBD_OPT_STARTTLS, NBD_REP_ACK));

    let mut t = upgrade(c, &certs).await;
    t.send_option(NBD_OPT_STARTTLS, b"").await;
    assert_eq!(t.read_opt_reply().await.kind, NBD_REP_ERR_INVALID);
    let (size, _) = t.go("disk").await;
    assert_eq!(size, DISK_SIZE);
    assert_eq!(t.write(0, b"over tls").await.error, 0);
    assert_eq!(&f.disk.snapshot()[..8], b"over tls");
    drop(t);
    let _ = task.await;
}

#[tokio::test]
async fn forced_tls_closes_a_plain_export_name() {
    let certs = certs();
    let (f, server) = server(true, &certs);
    let (c, s) = tokio::io::duplex(4 << 20);
    let task = tokio::spawn(server.serve_connection(s, "test-peer".into()));
    let mut c = Client::new(c);
    c.greet_default().await;
    c.send_option(NBD_OPT_EXPORT_NAME, b"disk").await;
    // The server hangs up: no export data, and the handler ends.
    tokio::time::timeout(std::time::Duration::from_secs(5), task)
        .await
        .expect("the server kept a plain client of a TLS-only server")
        .unwrap();
    assert!(f.disk.snapshot().iter().all(|b| *b == 0));
}

#[tokio::test]
async fn offered_tls_lets_plain_clients_in() {
    let certs = certs();
    let (_f, server) = server(false, &certs);
    let (c, s) = tokio::io::duplex(4 << 20);
    tokio::spawn(server.serve_connection(s, "test-peer".into()));
    let mut c = Client::new(c);
    c.greet_default().await;
    let (size, _) = c.go("disk").await;
    assert_eq!(size, DISK_SIZE);
}
