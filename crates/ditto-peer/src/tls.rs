//! Mutual TLS between nodes (rustls), and the cluster's certificates
//! (rcgen), the way `cockroach cert` makes them: one cluster CA, and per node
//! a certificate whose DNS name is the node's name, for both server and
//! client use. A node accepts a peer only with a certificate from the
//! cluster CA that is valid for the node name its hello claims; a primary
//! accepts a replica's node only if its certificate is valid for the name
//! it dialled, so an address that answers as another node is refused.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const NODE_CERT: &str = "node.pem";
pub const NODE_KEY: &str = "node.key";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    File { path: PathBuf, source: io::Error },
    #[error("{path} exists already; certificates are never overwritten (move it away, or use another --out directory)")]
    Exists { path: PathBuf },
    #[error("{path}: {why}")]
    Pem { path: PathBuf, why: String },
    #[error("node name {name:?} is not usable in a certificate: {why}")]
    BadName { name: String, why: String },
    #[error("certificate generation failed: {0}")]
    Generate(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Node names are DNS labels: they are the certificates' subject names.
pub fn check_node_name(name: &str) -> Result<(), TlsError> {
    let bad = |why: &str| TlsError::BadName {
        name: name.into(),
        why: why.into(),
    };
    if name.is_empty() || name.len() > 63 {
        return Err(bad("it must be 1 to 63 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(bad("use lowercase letters, digits and '-' only"));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(bad("it may not start or end with '-'"));
    }
    Ok(())
}

fn gen_err(e: rcgen::Error) -> TlsError {
    TlsError::Generate(e.to_string())
}

/// Write a new file, never replacing one; keys are readable by the owner only.
fn write_new(path: &Path, contents: &str, secret: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                TlsError::Exists { path: path.into() }
            } else {
                TlsError::File {
                    path: path.into(),
                    source,
                }
            }
        })?;
    f.write_all(contents.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|source| TlsError::File {
            path: path.into(),
            source,
        })
}

fn read(path: &Path) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(|source| TlsError::File {
        path: path.into(),
        source,
    })
}

/// `now + days` (or `now - days` when negative), in rcgen's time type.
fn days_from_now(days: i64) -> time::OffsetDateTime {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let shift = Duration::from_secs(days.unsigned_abs() * 86_400);
    if days >= 0 {
        epoch + now + shift
    } else {
        epoch + now.saturating_sub(shift)
    }
}

/// Create the cluster CA in `dir` (`ca.pem`, `ca.key`); refuses to overwrite.
pub fn create_ca(dir: &Path) -> Result<(), TlsError> {
    fs::create_dir_all(dir).map_err(|source| TlsError::File {
        path: dir.into(),
        source,
    })?;
    for f in [CA_CERT, CA_KEY] {
        if dir.join(f).exists() {
            return Err(TlsError::Exists { path: dir.join(f) });
        }
    }
    let key = KeyPair::generate().map_err(gen_err)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "ditto cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = days_from_now(-1);
    params.not_after = days_from_now(3650);
    let cert = params.self_signed(&key).map_err(gen_err)?;
    write_new(&dir.join(CA_KEY), &key.serialize_pem(), true)?;
    write_new(&dir.join(CA_CERT), &cert.pem(), false)
}

/// Create `node.pem`/`node.key` for node `name` (and the other names or IP
/// addresses in `also`) in `out`, signed by the CA in `ca_dir`, valid from
/// `valid_from_days` to `valid_days` from now.
pub fn create_node_cert(
    name: &str,
    also: &[String],
    ca_dir: &Path,
    out: &Path,
    valid_from_days: i64,
    valid_days: i64,
) -> Result<(), TlsError> {
    check_node_name(name)?;
    fs::create_dir_all(out).map_err(|source| TlsError::File {
        path: out.into(),
        source,
    })?;
    for f in [NODE_CERT, NODE_KEY] {
        if out.join(f).exists() {
            return Err(TlsError::Exists { path: out.join(f) });
        }
    }
    let ca_key_path = ca_dir.join(CA_KEY);
    let ca_key = KeyPair::from_pem(&read(&ca_key_path)?).map_err(|e| TlsError::Pem {
        path: ca_key_path.clone(),
        why: format!("not a private key: {e}"),
    })?;
    let ca_cert_path = ca_dir.join(CA_CERT);
    let issuer =
        Issuer::from_ca_cert_pem(&read(&ca_cert_path)?, ca_key).map_err(|e| TlsError::Pem {
            path: ca_cert_path.clone(),
            why: format!("not a CA certificate: {e}"),
        })?;
    let key = KeyPair::generate().map_err(gen_err)?;
    let mut names = vec![name.to_string()];
    names.extend(also.iter().cloned());
    let mut params = CertificateParams::new(names).map_err(|e| TlsError::BadName {
        name: also.join(","),
        why: format!("not a DNS name or IP address: {e}"),
    })?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = days_from_now(valid_from_days);
    params.not_after = days_from_now(valid_days);
    let cert = params.signed_by(&key, &issuer).map_err(gen_err)?;
    write_new(&out.join(NODE_KEY), &key.serialize_pem(), true)?;
    write_new(&out.join(NODE_CERT), &cert.pem(), false)
}

/// Where a node's TLS files are (config `peer_tls`).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files `ditto cert` writes: `ca.pem` in `ca_dir`, `node.pem` and
    /// `node.key` in `node_dir`.
    pub fn in_dirs(ca_dir: &Path, node_dir: &Path) -> TlsFiles {
        TlsFiles {
            ca: ca_dir.join(CA_CERT),
            cert: node_dir.join(NODE_CERT),
            key: node_dir.join(NODE_KEY),
        }
    }
}

/// This node's TLS identity: accepts peers and dials them.
#[derive(Clone)]
pub struct PeerTls {
    pub node: String,
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub connector: tokio_rustls::TlsConnector,
}

impl PeerTls {
    pub fn load(node: &str, files: &TlsFiles) -> Result<PeerTls, TlsError> {
        let pem_err = |path: &Path, why: String| TlsError::Pem {
            path: path.into(),
            why,
        };
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&files.ca)
            .map_err(|e| pem_err(&files.ca, e.to_string()))?
        {
            let cert = cert.map_err(|e| pem_err(&files.ca, e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| pem_err(&files.ca, format!("not a usable CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(pem_err(&files.ca, "holds no certificate".into()));
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
            .map_err(|e| pem_err(&files.cert, e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| pem_err(&files.cert, e.to_string()))?;
        if chain.is_empty() {
            return Err(pem_err(&files.cert, "holds no certificate".into()));
        }
        let key = PrivateKeyDer::from_pem_file(&files.key)
            .map_err(|e| pem_err(&files.key, format!("no private key: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(roots);
        let config_err = |e: rustls::Error| TlsError::Config(e.to_string());
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(config_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(config_err)?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(config_err)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(config_err)?;
        Ok(PeerTls {
            node: node.into(),
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
        })
    }

    /// The server name a peer named `node` must present.
    pub fn server_name(node: &str) -> Result<ServerName<'static>, TlsError> {
        ServerName::try_from(node.to_string()).map_err(|e| TlsError::BadName {
            name: node.into(),
            why: e.to_string(),
        })
    }
}

/// Whether the (already CA-verified) certificate `der` is valid for `node`.
pub fn cert_names_node(der: &CertificateDer<'_>, node: &str) -> bool {
    let Ok(name) = ServerName::try_from(node) else {
        return false;
    };
    webpki::EndEntityCert::try_from(der)
        .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
}
