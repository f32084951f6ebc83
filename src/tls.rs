//! TLS, in builds with the `tls` feature: the listener's certificate and key
//! (tiny_http with rustls), and the roots trusted for https:// backends (ureq with
//! rustls). Both sides use one rustls crypto provider, aws-lc-rs, which tiny_http's
//! rustls brings in anyway. Without the feature, `config` refuses the TLS keys, so
//! these functions are never asked for TLS.

use std::path::Path;

use crate::config::Settings;

/// The listener's TLS identity, when `tls_cert_file` and `tls_key_file` are set.
pub fn server_identity(settings: &Settings) -> Result<Option<tiny_http::SslConfig>, String> {
    let (Some(cert), Some(key)) = (&settings.tls_cert_file, &settings.tls_key_file) else {
        return Ok(None);
    };
    let read = |what: &str, path: &Path| {
        std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
    };
    Ok(Some(tiny_http::SslConfig::load_from_mem(
        read("tls_cert_file", cert)?,
        read("tls_key_file", key)?,
    )))
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
