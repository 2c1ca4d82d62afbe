//! CSR handling and certificate inspection: whatever the bytes, an answer
//! (a validated CSR or a specific error), never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(csr) = provisioning::csr::validate_csr(data) {
        // What validation accepted must be signable.
        let _ = csr.key_kind.to_string();
    }
    let _ = provisioning::ca::inspect_certificate(data);
    if let Ok(info) = provisioning::ca::inspect_certificate(data) {
        let _ = provisioning::manufacturer::jit_identity(&info);
    }
});
