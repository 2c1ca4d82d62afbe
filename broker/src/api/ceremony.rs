//! What a root ceremony hands back to the nodes (the root is offline):
//! the root's CRL. A manufacturer CA signed at a ceremony comes back
//! through `POST /v1/manufacturers` (see `manufacturers::request`).

use axum::extract::State;
use axum::Json;
pub use fleetgate_api::types::RootCrlBody;
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
