//! TLS, in builds with the `tls` feature: the listener's certificate and key (rustls,
//! on the sockets the router owns: the handshake runs on the connection's own
//! thread, see `client::connection`), and the roots trusted for https:// backends
//! (ureq with rustls, and the WebSocket tunnels' own rustls client, `backend::socket`). Both sides use one rustls crypto provider, aws-lc-rs. Without
//! the feature, `config` refuses the TLS keys, so these functions are never asked for
//! TLS.

use crate::control::config::Settings;

/// What the listener serves HTTPS with.
#[cfg(feature = "tls")]
pub type Identity = std::sync::Arc<rustls::ServerConfig>;

/// Without the `tls` feature there is no identity to serve with.
#[cfg(not(feature = "tls"))]
pub enum Identity {}

/// The listener's TLS identity, when `tls_cert_file` and `tls_key_file` are set.
#[cfg(feature = "tls")]
pub fn server_identity(settings: &Settings) -> Result<Option<Identity>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::sync::Arc;

    let (Some(cert), Some(key)) = (&settings.tls_cert_file, &settings.tls_key_file) else {
        return Ok(None);
    };
    let read = |what: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
    };
    let cert_pem = read("tls_cert_file", cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls_cert_file {} is not valid PEM: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "tls_cert_file {} holds no certificate",
            cert.display()
        ));
    }
    let key_der = PrivateKeyDer::from_pem_slice(&read("tls_key_file", key)?).map_err(|e| {
        format!(
            "tls_key_file {} holds no usable private key: {e}",
            key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| {
            format!(
                "tls_cert_file {} and tls_key_file {} do not make a usable identity: {e}",
                cert.display(),
                key.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}

/// Without the `tls` feature `config` refuses the TLS keys, so there is never one.
#[cfg(not(feature = "tls"))]
pub fn server_identity(_settings: &Settings) -> Result<Option<Identity>, String> {
    Ok(None)
}

/// The rustls client config of WebSocket tunnels to `https://` backends
/// (`request::tunnel`), which dial their backend themselves: the same roots as the
/// backend client's (`tls_ca_file`, else the public ones), HTTP/1.1 only.
#[cfg(feature = "tls")]
pub fn tunnel_client_config(
    settings: &Settings,
) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    let mut roots = rustls::RootCertStore::empty();
    match &settings.tls_ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("cannot read tls_ca_file {}: {e}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!(
                    "tls_ca_file {} holds no certificate",
                    path.display()
                ));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The TLS settings of the backend client: the certificates of `tls_ca_file` as the
/// only roots when it is set, else the public (Mozilla) roots.
#[cfg(feature = "tls")]
pub fn client_config(settings: &Settings) -> Result<ureq::tls::TlsConfig, String> {
    use std::sync::Arc;
    use ureq::tls::{PemItem, RootCerts, TlsConfig, TlsProvider};

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut builder = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(provider);
    if let Some(path) = &settings.tls_ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| format!("cannot read tls_ca_file {}: {e}", path.display()))?;
        let mut certs = Vec::new();
        for item in ureq::tls::parse_pem(&pem) {
            match item {
                Ok(PemItem::Certificate(cert)) => certs.push(cert),
                Ok(_) => {}
                Err(e) => {
                    return Err(format!(
                        "tls_ca_file {} is not valid PEM: {e}",
                        path.display()
                    ))
                }
            }
        }
        if certs.is_empty() {
            return Err(format!(
                "tls_ca_file {} holds no certificate",
                path.display()
            ));
        }
        builder = builder.root_certs(RootCerts::new_with_certs(&certs));
    }
    Ok(builder.build())
}
