//! The admin API's JSON bodies through the real router and handlers, as an
//! authenticated admin, against a real registry. The first byte picks the
//! endpoint; the rest is the body. Bad input must get a 4xx, never a 5xx
//! or a panic.
#![no_main]

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Method, Request};
use broker::api::{self, AppState};
use broker::https::PeerCert;
use broker::metrics::Metrics;
use broker::mqtt::{Broker, MqttConfig};
use broker::status::StatusService;
use broker::tls::ServerTls;
use libfuzzer_sys::fuzz_target;
use provisioning::{Authority, InitOptions};
use tower::ServiceExt;

struct Fixture {
    _dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    app: axum::Router,
    /// The admin certificate, DER: what the TLS layer would have attached.
    admin: Vec<u8>,
}

const PATHS: &[&str] = &[
    "/v1/devices",
    "/v1/devices/batch",
    "/v1/devices/dev-1/revoke",
    "/v1/devices/dev-1/suspend",
    "/v1/devices/dev-1/rotate",
    "/v1/certificates/01/revoke",
    "/v1/manufacturers",
    "/v1/manufacturers/acme/register",
    "/v1/manufacturers/acme/revoke",
    "/v1/claims",
];

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        broker::tls::install_crypto_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let auth = Arc::new(
            Authority::open_or_init(&dir.path().join("data"), &InitOptions::default())
                .expect("data dir"),
        );
        let admin = broker::tls::load_certs(&auth.paths.admin_cert()).expect("admin.crt")[0].to_vec();
        let app = rt.block_on(async {
            let metrics = Arc::new(Metrics::default());
            let status = Arc::new(StatusService::new(auth.clone(), metrics.clone()).expect("status"));
            let tls = Arc::new(ServerTls::load(&auth, metrics.clone()).expect("tls"));
            let broker = Broker::new(
                auth.clone(),
                time::Duration::days(90),
                metrics.clone(),
                status.clone(),
                tls.mqtt_verifier(),
                MqttConfig::default(),
            );
            // The events follower, as `serve` runs it (its task lives on
            // the fixture's runtime).
            let (_follower, applied) = broker::events::spawn(
                auth.registry.clone(),
                broker.clone(),
                tls.clone(),
                status.clone(),
            );
            let cmp = std::sync::Arc::new(api::cmp::Cmp::new(auth.clone()).unwrap());
            api::router(AppState {
                cmp,
                console: std::sync::Arc::new(
                    api::console::Console::new(
                        &auth.ca.first_issuing().key().seal_secret().unwrap(),
                    )
                    .unwrap(),
                ),
                auth: auth.clone(),
                cert_lifetime: time::Duration::days(90),
                applied,
                metrics,
                tls,
                broker,
                status,
            })
        });
        Fixture {
            _dir: dir,
            rt,
            app,
            admin,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let f = fixture();
    let path = PATHS[pick as usize % PATHS.len()];
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_vec()))
        .expect("request");
    req.extensions_mut().insert(PeerCert(Some(
        rustls_pki_types::CertificateDer::from(f.admin.clone()),
    )));
    let resp = f.rt.block_on(f.app.clone().oneshot(req)).expect("infallible");
    assert!(
        !resp.status().is_server_error(),
        "{path}: {} for {:?}",
        resp.status(),
        String::from_utf8_lossy(body)
    );
});
