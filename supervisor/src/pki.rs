//! Throwaway certificates for `postcopy demo --tls` and for the tests:
//! a CA, and host certificates it signs for loopback (`localhost`,
//! 127.0.0.1, ::1), written as PEM files. Made with rcgen on the spot;
//! nothing here is ever a real deployment's key.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::tls::TlsFiles;

/// A CA that signs host certificates.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// Where its certificate is (the `--tls-ca` file).
    pub ca_path: PathBuf,
}

/// How a host certificate should come out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Validity {
    /// Valid from 1975 to 4096 (rcgen's default).
    #[default]
    Now,
    /// Valid only in 2000.
    Expired,
}

fn err(e: impl std::fmt::Display) -> String {
    format!("making test certificates: {e}")
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

impl TestCa {
    /// A new CA named `name`, its certificate written to `dir/NAME-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Result<TestCa, String> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("postcopy test CA {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().map_err(err)?;
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(err)?;
        let ca_path = dir.join(format!("{name}-ca.pem"));
        write(&ca_path, &issuer.pem())?;
        Ok(TestCa { issuer, ca_path })
    }

    /// A host certificate for loopback signed by this CA, usable by both
    /// ends (server and client authentication), and its key:
    /// `dir/HOST-cert.pem`, `dir/HOST-key.pem`. The returned files name
    /// this CA as `ca`.
    pub fn host(&self, dir: &Path, host: &str, validity: Validity) -> Result<TlsFiles, String> {
        let mut params = CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])
        .map_err(err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("postcopy test host {host}"));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if validity == Validity::Expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2000, 12, 31);
        }
        let key = KeyPair::generate().map_err(err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        let files = TlsFiles {
            cert: dir.join(format!("{host}-cert.pem")),
            key: dir.join(format!("{host}-key.pem")),
            ca: self.ca_path.clone(),
        };
        write(&files.cert, &cert.pem())?;
        write(&files.key, &key.serialize_pem())?;
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::Tls;

    /// What the generator writes loads as a host identity; a key that is
    /// not the certificate's is refused by name.
    #[test]
    fn generated_files_load() {
        let dir = std::env::temp_dir().join(format!("postcopy-pki-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = TestCa::new(&dir, "a").unwrap();
        let one = ca.host(&dir, "one", Validity::Now).unwrap();
        let two = ca.host(&dir, "two", Validity::Now).unwrap();
        Tls::load(&one, None).unwrap();
        let mixed = TlsFiles {
            key: two.key.clone(),
            ..one.clone()
        };
        let e = Tls::load(&mixed, None).unwrap_err();
        assert!(e.contains("--tls-cert") && e.contains("--tls-key"), "{e}");
        let missing = TlsFiles {
            ca: dir.join("nope.pem"),
            ..one
        };
        let e = Tls::load(&missing, None).unwrap_err();
        assert!(e.contains("--tls-ca") && e.contains("nope.pem"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
