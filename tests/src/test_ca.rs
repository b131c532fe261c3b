//! Test certificates (rcgen) for the fake servers that speak TLS (the
//! Kubernetes API, Redis, the model providers): a root CA, and leaves for
//! the names a client dials, signed by it or by an intermediate.

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
};

/// A CA named `common_name` (organisation "llm-egress tests"); with
/// `path_len`, an intermediate that may sign leaves only.
fn ca_params(common_name: &str, path_len: Option<u8>) -> CertificateParams {
    let mut params =
        CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| panic!("CA params: {e}"));
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    let dn = &mut params.distinguished_name;
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "llm-egress tests");
    params
}

/// A self-signed root CA.
pub fn root(common_name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let key = KeyPair::generate().unwrap_or_else(|e| panic!("CA key: {e}"));
    CertifiedIssuer::self_signed(ca_params(common_name, None), key)
        .unwrap_or_else(|e| panic!("CA cert: {e}"))
}

/// An intermediate CA signed by `ca`, which may sign leaves only.
pub fn intermediate(
    common_name: &str,
    ca: &CertifiedIssuer<'static, KeyPair>,
) -> CertifiedIssuer<'static, KeyPair> {
    let key = KeyPair::generate().unwrap_or_else(|e| panic!("intermediate key: {e}"));
    CertifiedIssuer::signed_by(ca_params(common_name, Some(0)), key, ca)
        .unwrap_or_else(|e| panic!("intermediate cert: {e}"))
}

/// The parameters of a leaf for `names` (DNS names or IP addresses, as
/// subject alternative names), named `common_name`.
pub fn leaf_params(names: &[&str], common_name: &str) -> CertificateParams {
    let sans: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(sans).unwrap_or_else(|e| panic!("leaf params: {e}"));
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params
}

/// A leaf made of `params`, signed by `issuer`, and its key.
pub fn sign(
    params: CertificateParams,
    issuer: &CertifiedIssuer<'static, KeyPair>,
) -> (Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap_or_else(|e| panic!("leaf key: {e}"));
    let cert = params
        .signed_by(&key, issuer)
        .unwrap_or_else(|e| panic!("leaf cert: {e}"));
    (cert, key)
}
