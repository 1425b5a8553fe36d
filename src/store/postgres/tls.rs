//! TLS to the server, with rustls: libpq's `sslmode` and `sslrootcert`.
//!
//! The connection string (URL or key=value form) may say
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (the default, as in libpq) | if the server offers it | not checked |
//! | `require` | always | not checked; checked as by `verify-ca` when `sslrootcert` is given, as libpq does |
//! | `verify-ca` | always | signed by a root of `sslrootcert` |
//! | `verify-full` | always | signed by a root of `sslrootcert`, and issued for the host connected to |
//!
//! `sslrootcert` names a PEM file of root certificates. Without it,
//! `verify-ca` and `verify-full` use `~/.postgresql/root.crt` as libpq
//! does, and fail with a message saying so if there is none.
//! (`PGSSLMODE` and the other environment variables of libpq are not read.)

use std::path::{Path, PathBuf};
use std::sync::Arc;

use postgres::config::SslMode;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode`, all of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl Mode {
    fn parse(text: &str) -> Result<Mode, String> {
        Ok(match text {
            "disable" => Mode::Disable,
            "prefer" => Mode::Prefer,
            "require" => Mode::Require,
            "verify-ca" => Mode::VerifyCa,
            "verify-full" => Mode::VerifyFull,
            "allow" => {
                return Err("sslmode \"allow\" is not supported (use prefer or disable)".into());
            }
            other => {
                return Err(format!(
                    "unknown sslmode {other:?} (disable, prefer, require, verify-ca or verify-full)"
                ));
            }
        })
    }
}

/// What a connection string says of TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Tls {
    pub(super) mode: Mode,
    pub(super) root_cert: Option<PathBuf>,
}

/// Takes `sslmode` and `sslrootcert` out of the connection string `url`
/// (the client library knows only some modes and no root certificates):
/// returns the rest, for the client, and what they say.
pub(super) fn split(url: &str) -> Result<(String, Tls), String> {
    let mut tls = Tls {
        mode: Mode::Prefer,
        root_cert: None,
    };
    let mut take = |key: &str, value: &str| -> Result<bool, String> {
        match key {
            "sslmode" => tls.mode = Mode::parse(value)?,
            "sslrootcert" => tls.root_cert = Some(PathBuf::from(value)),
            _ => return Ok(false),
        }
        Ok(true)
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            None => url.to_owned(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    if !take(&percent_decode(key), &percent_decode(value))? {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for (key, value, text) in key_values(url)? {
            if !take(&key, &value)? {
                kept.push(text);
            }
        }
        kept.join(" ")
    };
    Ok((rest, tls))
}

/// The pairs of a key=value connection string: key, unquoted value, and
/// the pair's own text.
fn key_values(text: &str) -> Result<Vec<(String, String, &str)>, String> {
    let mut pairs = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == bytes.len() {
            break;
        }
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = text[start..i].to_owned();
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == bytes.len() || bytes[i] != b'=' {
            return Err(format!(
                "{key:?} is not followed by '=' in the connection string"
            ));
        }
        i += 1;
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let mut value = String::new();
        if i < bytes.len() && bytes[i] == b'\'' {
            i += 1;
            loop {
                match text[i..].chars().next() {
                    None => return Err(format!("the value of {key:?} has no closing quote")),
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some('\\') => {
                        i += 1;
                        let Some(c) = text[i..].chars().next() else {
                            return Err(format!("the value of {key:?} has no closing quote"));
                        };
                        value.push(c);
                        i += c.len_utf8();
                    }
                    Some(c) => {
                        value.push(c);
                        i += c.len_utf8();
                    }
                }
            }
        } else {
            let from = i;
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                i += 1;
            }
            value.push_str(&text[from..i]);
        }
        pairs.push((key, value, &text[start..i]));
    }
    Ok(pairs)
}

/// `%XX` escapes decoded, as in a URL's query.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = text
                .get(i + 1..i + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Tls {
    /// The client library's mode for this one (it verifies nothing itself).
    pub(super) fn client_mode(&self) -> SslMode {
        match self.mode {
            Mode::Disable => SslMode::Disable,
            Mode::Prefer => SslMode::Prefer,
            Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
        }
    }

    /// The connector that does what the mode says.
    pub(super) fn connector(&self) -> Result<MakeRustlsConnect, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?;
        let verifier: Arc<dyn ServerCertVerifier> = match (self.mode, &self.root_cert) {
            (Mode::Disable | Mode::Prefer, _) | (Mode::Require, None) => {
                Arc::new(Unchecked(provider))
            }
            (Mode::Require | Mode::VerifyCa, Some(roots)) => {
                Arc::new(ChainOnly(webpki(&load_roots(roots)?, provider)?))
            }
            (Mode::VerifyCa, None) => Arc::new(ChainOnly(webpki(&default_roots()?, provider)?)),
            (Mode::VerifyFull, roots) => {
                let roots = match roots {
                    Some(path) => load_roots(path)?,
                    None => default_roots()?,
                };
                webpki(&roots, provider)?
            }
        };
        let config = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }
}

fn webpki(
    roots: &RootCertStore,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, String> {
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots.clone()), provider)
        .build()
        .map_err(|e| format!("TLS: cannot verify with these root certificates: {e}"))
}

/// The roots of libpq's default `sslrootcert`, `~/.postgresql/root.crt`.
fn default_roots() -> Result<RootCertStore, String> {
    let path = std::env::var_os("HOME").map(|home| Path::new(&home).join(".postgresql/root.crt"));
    match path {
        Some(path) if path.exists() => load_roots(&path),
        _ => Err(
            "sslmode verify-ca and verify-full need root certificates: set sslrootcert \
                  to a PEM file of them (~/.postgresql/root.crt does not exist)"
                .into(),
        ),
    }
}

fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let shown = path.display();
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read sslrootcert {shown}: {e}"))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("sslrootcert {shown} is not PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("sslrootcert {shown} holds a bad certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("sslrootcert {shown} holds no certificate"));
    }
    Ok(roots)
}

/// `prefer` and `require` without roots: the connection is encrypted, the
/// certificate not checked (libpq's meaning). The handshake's signatures
/// still are.
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a root; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_root_certs_come_out_of_both_forms() {
        let (rest, tls) = split(
            "postgres://me@db/app?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Froot.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://me@db/app?application_name=x");
        assert_eq!(tls.mode, Mode::VerifyFull);
        assert_eq!(tls.root_cert.as_deref(), Some(Path::new("/etc/root.pem")));
        let (rest, tls) = split("postgres://me@db/app?sslmode=require").unwrap();
        assert_eq!(
            (rest.as_str(), tls.mode),
            ("postgres://me@db/app", Mode::Require)
        );
        let (rest, tls) =
            split("host=db user=me sslmode = verify-ca sslrootcert='/a b/it\\'s.pem' dbname=app")
                .unwrap();
        assert_eq!(rest, "host=db user=me dbname=app");
        assert_eq!(tls.mode, Mode::VerifyCa);
        assert_eq!(tls.root_cert.as_deref(), Some(Path::new("/a b/it's.pem")));
        let (rest, tls) = split("postgres://me@db/app").unwrap();
        assert_eq!(
            (rest.as_str(), tls.mode),
            ("postgres://me@db/app", Mode::Prefer)
        );
    }

    #[test]
    fn bad_modes_and_strings_are_refused_with_a_reason() {
        let err = split("postgres://db/app?sslmode=sometimes").unwrap_err();
        assert!(err.contains("unknown sslmode \"sometimes\""), "{err}");
        assert!(
            split("postgres://db/app?sslmode=allow")
                .unwrap_err()
                .contains("allow")
        );
        assert!(
            split("host=db sslrootcert='open")
                .unwrap_err()
                .contains("closing quote")
        );
        assert!(split("host").unwrap_err().contains("'='"));
        let missing = Tls {
            mode: Mode::VerifyFull,
            root_cert: Some(PathBuf::from("/nonexistent/root.pem")),
        };
        let err = missing.connector().err().unwrap();
        assert!(
            err.contains("cannot read sslrootcert /nonexistent/root.pem"),
            "{err}"
        );
    }
}
