//! Certificates for TLS tests: a self-signed one, and a private CA with a
//! certificate it signed, written as PEM files in a harness's scratch
//! directory.

use crate::Harness;

impl Harness {
    /// A self-signed certificate for `localhost` and `127.0.0.1`, its PEM
    /// files in the scratch directory.
    pub fn self_signed(&self) -> TestCert {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("certificate");
        let (cert, key) = (self.dir().join("cert.pem"), self.dir().join("key.pem"));
        std::fs::write(&cert, c.cert.pem()).expect("write cert");
        std::fs::write(&key, c.signing_key.serialize_pem()).expect("write key");
        TestCert {
            pem: c.cert.pem(),
            cert: cert.display().to_string(),
            key: key.display().to_string(),
        }
    }

    /// A private CA and a certificate it signed for `names`: PEM files
    /// `ca.pem`, `leaf.pem` and `leaf-key.pem` in the scratch directory.
    pub fn private_ca(&self, names: &[&str]) -> PrivateCa {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "Fleet test CA");
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("CA key"))
            .expect("CA certificate");
        let leaf_key = KeyPair::generate().expect("leaf key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let leaf = CertificateParams::new(names)
            .expect("leaf params")
            .signed_by(&leaf_key, &ca)
            .expect("leaf certificate");
        let path = |name: &str| self.dir().join(name).display().to_string();
        std::fs::write(path("ca.pem"), ca.pem()).expect("write CA");
        std::fs::write(path("leaf.pem"), leaf.pem()).expect("write cert");
        std::fs::write(path("leaf-key.pem"), leaf_key.serialize_pem()).expect("write key");
        PrivateCa {
            ca: path("ca.pem"),
            cert: path("leaf.pem"),
            key: path("leaf-key.pem"),
        }
    }
}

/// PEM files of [`Harness::private_ca`].
#[derive(Debug, Clone)]
pub struct PrivateCa {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

/// A certificate from [`Harness::self_signed`].
#[derive(Debug, Clone)]
pub struct TestCert {
    pub pem: String,
    /// Paths of the PEM files, as arguments.
    pub cert: String,
    pub key: String,
}

impl TestCert {
    /// An HTTP client that trusts this certificate.
    pub fn https_client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(self.pem.as_bytes()).expect("pem"))
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .expect("client")
    }
}
