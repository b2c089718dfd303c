//! Certificates for mutual TLS between sites: a private CA and one certificate per site.
//!
//! Layout of a certificate directory (backs `drblk cert --dir DIR --sites a,b`):
//!
//! | file          | content                                  | mode |
//! |---------------|------------------------------------------|------|
//! | `ca.pem`      | CA certificate (trust anchor of all sites) | 0644 |
//! | `ca.key`      | CA private key (PKCS#8)                   | 0600 |
//! | `<site>.pem`  | site certificate, SAN = DNS name `<site>` | 0644 |
//! | `<site>.key`  | site private key (PKCS#8)                 | 0600 |
//!
//! Keys are ECDSA P-256. A site certificate carries both the serverAuth and clientAuth
//! extended key usages, because either site can be primary (TLS client) or secondary (TLS
//! server) after a failover. Only `ca.pem`, `<site>.pem` and `<site>.key` need to be copied
//! to a site; `ca.key` stays with whoever issues certificates.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Errors of certificate generation and loading.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A site name is not usable as a DNS name.
    #[error("invalid site name {0:?}: use lowercase letters, digits, '-' and '.' (1-63 chars)")]
    InvalidSiteName(String),
    /// A file to be written exists and overwriting was not requested.
    #[error("{0} already exists (refusing to overwrite)")]
    Exists(PathBuf),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM file holds no usable certificate or key.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks that `name` is usable as a site name (a DNS label-ish name, also a file name).
pub fn validate_site_name(name: &str) -> Result<(), CertError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name != "ca"
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
        && !name.contains("..")
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(CertError::InvalidSiteName(name.to_string()))
    }
}

/// Validity window: from January 1st of this year for `years` years.
fn validity(params: &mut CertificateParams, years: i32) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Good enough for a calendar year (±1 day at year boundaries; the window starts Jan 1).
    let year = 1970 + (secs / 31_556_952) as i32;
    params.not_before = rcgen::date_time_ymd(year, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + years, 1, 1);
}

/// Parameters of a new drblk CA. The common name carries a fingerprint of the CA key, so
/// that two independently created CAs never share a name (a verifier would otherwise pick
/// the wrong one and report a bad signature instead of an unknown issuer).
fn ca_params(key: &KeyPair) -> CertificateParams {
    let fp: String = crc32c::crc32c(key.public_key_raw())
        .to_be_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "drblk");
    dn.push(DnType::CommonName, format!("drblk replication CA {fp}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut p, 20);
    p
}

fn site_params(site: &str) -> Result<CertificateParams, CertError> {
    let mut p = CertificateParams::new(vec![site.to_string()])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "drblk");
    dn.push(DnType::CommonName, site);
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    validity(&mut p, 10);
    Ok(p)
}

/// Writes `contents` to `path` atomically (temporary file + rename) with `mode`.
fn write_file(path: &Path, contents: &str, mode: u32, overwrite: bool) -> Result<(), CertError> {
    if !overwrite && path.exists() {
        return Err(CertError::Exists(path.to_path_buf()));
    }
    let tmp = path.with_extension("tmp~");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(contents.as_bytes()).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(())
}

/// What [`generate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// Whether a new CA was created (false: an existing `ca.pem`/`ca.key` was used).
    pub new_ca: bool,
    /// Files written.
    pub files: Vec<PathBuf>,
}

/// Creates (or reuses) the CA in `dir` and issues a certificate for every site in `sites`.
///
/// If `dir/ca.key` exists, it is used to issue the site certificates and the CA is left
/// alone; otherwise a new CA is created. Existing site files are replaced only with
/// `overwrite`. `dir` is created (mode 0700) if missing.
pub fn generate(dir: &Path, sites: &[&str], overwrite: bool) -> Result<Generated, CertError> {
    for s in sites {
        validate_site_name(s)?;
    }
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
    }
    let ca_key_path = dir.join("ca.key");
    let ca_pem_path = dir.join("ca.pem");
    let mut files = Vec::new();
    let (issuer, new_ca) = if ca_key_path.exists() {
        let pem = fs::read_to_string(&ca_key_path).map_err(io_err(&ca_key_path))?;
        let key = KeyPair::from_pem(&pem).map_err(|e| CertError::Pem {
            path: ca_key_path.clone(),
            what: format!("unusable CA key: {e}"),
        })?;
        let ca_pem = fs::read_to_string(&ca_pem_path).map_err(io_err(&ca_pem_path))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key).map_err(|e| CertError::Pem {
            path: ca_pem_path.clone(),
            what: format!("unusable CA certificate: {e}"),
        })?;
        (issuer, false)
    } else {
        let key = KeyPair::generate()?;
        let params = ca_params(&key);
        let cert = params.self_signed(&key)?;
        write_file(&ca_key_path, &key.serialize_pem(), 0o600, overwrite)?;
        write_file(&ca_pem_path, &cert.pem(), 0o644, overwrite)?;
        files.push(ca_pem_path.clone());
        files.push(ca_key_path.clone());
        (Issuer::new(params, key), true)
    };
    for site in sites {
        let key = KeyPair::generate()?;
        let cert = site_params(site)?.signed_by(&key, &issuer)?;
        let pem = dir.join(format!("{site}.pem"));
        let keyp = dir.join(format!("{site}.key"));
        write_file(&keyp, &key.serialize_pem(), 0o600, overwrite)?;
        write_file(&pem, &cert.pem(), 0o644, overwrite)?;
        files.push(pem);
        files.push(keyp);
    }
    Ok(Generated { new_ca, files })
}

/// Everything one site needs for mutual TLS: trust anchors, own chain and key.
#[derive(Debug)]
pub struct SiteIdentity {
    /// Name of the site (the DNS name in its certificate).
    pub site: String,
    /// CA certificates trusted to authenticate the peer.
    pub ca: Vec<CertificateDer<'static>>,
    /// The site's certificate chain (leaf first).
    pub chain: Vec<CertificateDer<'static>>,
    /// The site's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for SiteIdentity {
    fn clone(&self) -> Self {
        SiteIdentity {
            site: self.site.clone(),
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let data = fs::read(path).map_err(io_err(path))?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem {
            path: path.to_path_buf(),
            what: format!("bad PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(CertError::Pem {
            path: path.to_path_buf(),
            what: "no certificate found".into(),
        });
    }
    Ok(certs)
}

impl SiteIdentity {
    /// [`SiteIdentity::load`] for a daemon of site `site` talking to `peer_site`: the error
    /// names the files and the command that creates them.
    pub fn load_for_daemon(dir: &Path, site: &str, peer_site: &str) -> anyhow::Result<Self> {
        Self::load(dir, site).map_err(|e| {
            anyhow::anyhow!(e).context(format!(
                "loading this site's certificate ({}/{site}.pem); create one with `drblk cert --dir {} --sites {site},{peer_site}`",
                dir.display(),
                dir.display(),
            ))
        })
    }

    /// Loads `ca.pem`, `<site>.pem` and `<site>.key` from `dir`.
    ///
    /// Warns (log) if the key file is readable by group or others.
    pub fn load(dir: &Path, site: &str) -> Result<SiteIdentity, CertError> {
        validate_site_name(site)?;
        let key_path = dir.join(format!("{site}.key"));
        Self::load_files(
            site,
            &dir.join("ca.pem"),
            &dir.join(format!("{site}.pem")),
            &key_path,
        )
    }

    /// Loads an identity from explicit file paths.
    pub fn load_files(
        site: &str,
        ca_pem: &Path,
        cert_pem: &Path,
        key_pem: &Path,
    ) -> Result<SiteIdentity, CertError> {
        let ca = load_certs(ca_pem)?;
        let chain = load_certs(cert_pem)?;
        let meta = fs::metadata(key_pem).map_err(io_err(key_pem))?;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                path = %key_pem.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "private key file is accessible by group/others; chmod 600 it"
            );
        }
        let data = fs::read(key_pem).map_err(io_err(key_pem))?;
        let key = PrivateKeyDer::from_pem_slice(&data).map_err(|e| CertError::Pem {
            path: key_pem.to_path_buf(),
            what: format!("no usable private key: {e}"),
        })?;
        Ok(SiteIdentity {
            site: site.to_string(),
            ca,
            chain,
            key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_load_and_reuse_ca() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("certs");
        let g = generate(&d, &["primary", "secondary"], false).unwrap();
        assert!(g.new_ca);
        assert_eq!(g.files.len(), 6);
        for f in ["ca.key", "primary.key", "secondary.key"] {
            let m = fs::metadata(d.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(m, 0o600, "{f}");
        }
        let id = SiteIdentity::load(&d, "primary").unwrap();
        assert_eq!(id.ca.len(), 1);
        assert_eq!(id.chain.len(), 1);
        // Refuses to overwrite, reuses the CA for a new site.
        assert!(matches!(
            generate(&d, &["primary"], false),
            Err(CertError::Exists(_))
        ));
        let g2 = generate(&d, &["third"], false).unwrap();
        assert!(!g2.new_ca);
        assert!(SiteIdentity::load(&d, "third").is_ok());
        assert!(matches!(
            generate(&d, &["Bad Name"], false),
            Err(CertError::InvalidSiteName(_))
        ));
        assert!(SiteIdentity::load(&d, "missing").is_err());
    }
}
