//! CMP requests: whatever the bytes, a parsed message whose every check
//! answers (accepted or a failure with its PKIFailureInfo), never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use provisioning::cmp;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = cmp::Incoming::parse(data) else {
        return;
    };
    let _ = msg.kind();
    let _ = msg.transaction_id();
    let _ = msg.wants_implicit_confirm();
    if let Ok((signer, _)) = msg.signer_chain() {
        let _ = msg.verify_protection(&signer);
    }
    use cmpv2::body::PkiBody;
    match &msg.msg.body {
        PkiBody::Ir(r) | PkiBody::Cr(r) | PkiBody::KUr(r) => {
            let _ = cmp::cert_request(r);
        }
        PkiBody::Rr(r) => {
            let _ = cmp::revocation_request(r);
        }
        PkiBody::CertConf(c) => {
            let _ = cmp::confirmation(c);
        }
        PkiBody::GenM(g) => {
            let _ = cmp::wants_ca_certs(g);
        }
        _ => {}
    }
    let _ = cmp::issued_certificate(data);
});
