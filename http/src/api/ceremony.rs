//! What a root ceremony hands back to the nodes (the root is offline):
//! the root's CRL, and a new issuing CA (a rollover). A manufacturer CA
//! signed at a ceremony comes back through `POST /v1/manufacturers` (see
//! `manufacturers::request`).

use axum::extract::State;
use axum::Json;
pub use fleetgate_api::types::{RolloverBody, RolloverRequest, RootCrlBody};
use rustls_pki_types::pem::PemObject;
use serde_json::{json, Value};

use super::{Admin, ApiError, AppState, Body};

/// Installs a root CRL signed at a ceremony (`fleetgate ca crl
/// --root-dir`): every node serves it at `/crl/root.crl`.
pub async fn root_crl(
    State(st): State<AppState>,
    admin: Admin,
    Body(body): Body<RootCrlBody>,
) -> Result<Json<Value>, ApiError> {
    let der =
        rustls_pki_types::CertificateRevocationListDer::from_pem_slice(body.crl_pem.as_bytes())
            .map_err(|e| provisioning::Error::InvalidInput {
                reason: format!("crl_pem: no X509 CRL in it: {e}"),
            })?;
    let auth = st.auth.clone();
    let actor = admin.actor();
    let number = st
        .write(move || auth.install_root_crl(der.as_ref(), &actor))
        .await?;
    st.caught_up().await;
    tracing::info!(number, by = %admin.id, "root CRL installed");
    Ok(Json(json!({ "number": number })))
}

/// The first half of a CA rollover: this node makes the next issuing CA's
/// key (in its token, if its keys are in one) and a request for the root
/// (`fleetgate ca rollover --root-dir ROOTDIR` does both halves).
pub async fn rollover_request(
    State(st): State<AppState>,
    admin: Admin,
    Body(_): Body<Value>,
) -> Result<Json<RolloverRequest>, ApiError> {
    let auth = st.auth.clone();
    let req = st.write(move || auth.prepare_rollover()).await?;
    tracing::info!(generation = req.generation, by = %admin.id, "prepared the next issuing CA's key for a root ceremony");
    Ok(Json(RolloverRequest {
        generation: req.generation,
        common_name: provisioning::rollover::issuing_cn(req.generation),
        csr_pem: req.csr_pem,
        status_url: st.auth.ca.status_url().map(str::to_owned),
        root_pem: st.auth.ca.root_pem().to_owned(),
    }))
}

/// The second half: installs the new issuing CA the root signed, and uses
/// it at once: new certificates come from it; the earlier ones still
/// validate, answer OCSP and have their CRLs.
pub async fn rollover_install(
    State(st): State<AppState>,
    admin: Admin,
    Body(body): Body<RolloverBody>,
) -> Result<Json<Value>, ApiError> {
    let auth = st.auth.clone();
    let generation = st
        .write(move || auth.install_rollover(body.cert_pem.as_bytes()))
        .await?;
    // The new CA is a trust anchor for the next handshake; OCSP answers
    // for it through a responder it certifies.
    if let Err(e) = st.tls.reload() {
        tracing::error!(error = %e, "reloading TLS after the rollover");
    }
    let status = st.status.clone();
    super::blocking(move || status.reload()).await?;
    tracing::info!(generation, by = %admin.id, "issuing CA rolled over");
    Ok(Json(json!({
        "generation": generation,
        "issuer": st.auth.ca.issuing_name(),
    })))
}
