//! A device's certificates from the console: each one downloaded as PEM,
//! revoked on its own, and a new one issued for the device's new key
//! (rotation from the device's CSR: its private key never leaves it, and
//! the console never sees one).

use axum::extract::{Path, State};
use axum::http::header::{CONTENT_DISPOSITION, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use provisioning::CertKey;

use super::{counts_changed, Operator};
use crate::api::{ApiError, AppState, Enrolled, RevokeBody, RotateBody};

/// `GET /console/api/certificates/{key}/pem`: the certificate as issued,
/// as a file named after its device and serial.
pub(super) async fn pem(
    State(st): State<AppState>,
    _op: Operator,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let key = key.parse::<CertKey>()?;
    let serial = key.to_string();
    let auth = st.auth.clone();
    let found = crate::api::blocking(move || auth.registry.certificate_pem(&key)).await?;
    let (rec, pem) = found.ok_or(provisioning::Error::CertNotFound { serial })?;
    // Ids and hex serials are safe in a quoted file name.
    let name = format!("{}-{}.pem", rec.device_id, rec.serial.to_hex());
    let disposition = HeaderValue::from_str(&format!("attachment; filename=\"{name}\""))
        .unwrap_or(HeaderValue::from_static("attachment"));
    Ok((
        [
            (
                CONTENT_TYPE,
                HeaderValue::from_static("application/x-pem-file"),
            ),
            (CONTENT_DISPOSITION, disposition),
        ],
        pem,
    )
        .into_response())
}

/// `POST /console/api/devices/{id}/rotate`: a certificate for the key of
/// the CSR given, signed as the device's others are; the old ones stay
/// good until revoked or expired, so the device can switch over.
pub(super) async fn rotate(
    State(st): State<AppState>,
    op: Operator,
    headers: HeaderMap,
    Path(id): Path<String>,
    crate::api::Body(body): crate::api::Body<RotateBody>,
) -> Result<(StatusCode, Json<Enrolled>), ApiError> {
    op.check_change(&headers)?;
    let out = crate::api::rotate_as(&st, id, body, op.actor()).await?;
    tracing::info!(device.id = %out.1.device.id, serial = %out.1.serial, by = %op.actor(), "console: certificate rotated");
    counts_changed(&st);
    Ok(out)
}

/// `POST /console/api/certificates/{key}/revoke`: one certificate (by its
/// key, `<serial>:<scope>`), with a reason; its device's other
/// certificates keep working.
pub(super) async fn revoke(
    State(st): State<AppState>,
    op: Operator,
    headers: HeaderMap,
    Path(key): Path<String>,
    crate::api::Body(body): crate::api::Body<RevokeBody>,
) -> Result<Json<provisioning::registry::CertRecord>, ApiError> {
    op.check_change(&headers)?;
    let key = key.parse::<CertKey>()?;
    Ok(Json(
        crate::api::revoke_certificate_as(&st, key, &body, op.actor()).await?,
    ))
}
