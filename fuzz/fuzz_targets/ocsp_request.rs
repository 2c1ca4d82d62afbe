//! The OCSP request decoder and responder, against a real registry: every
//! input gets a DER OCSPResponse (a refusal is a response too).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use provisioning::ocsp::{read_response, Responder};
use provisioning::{Authority, InitOptions};

struct Fixture {
    _dir: tempfile::TempDir,
    auth: Authority,
    responder: Responder,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = Authority::open_or_init(&dir.path().join("data"), &InitOptions::default())
            .expect("data dir");
        let responder = auth.ocsp_responder().expect("responder");
        Fixture {
            _dir: dir,
            auth,
            responder,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let der = f.responder.respond(data, &f.auth.registry).der;
    // Always a well-formed OCSPResponse.
    read_response(&der).expect("the responder's own answer parses");
});
