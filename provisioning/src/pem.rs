//! PEM text (RFC 7468) for DER bytes: base64 in lines of 64, between the
//! label's BEGIN and END lines.

use base64ct::{Base64, Encoding};

/// PEM text for `der`, labelled `label` ("CERTIFICATE", "X509 CRL", ...).
pub fn encode(label: &str, der: &[u8]) -> String {
    let b64 = Base64::encode_string(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str(&format!("-----BEGIN {label}-----\n"));
    for line in b64.as_bytes().chunks(64) {
        // Base64 is ASCII: every chunk is text.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;

    #[test]
    fn pem_round_trip() {
        for len in [0usize, 1, 2, 3, 47, 48, 49, 500] {
            let der: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let pem = encode("CERTIFICATE", &der);
            assert!(pem.lines().all(|l| l.len() <= 64), "{pem}");
            let back = CertificateDer::from_pem_slice(pem.as_bytes());
            if len > 0 {
                assert_eq!(back.unwrap().as_ref(), &der[..], "{len}");
            }
        }
    }
}
