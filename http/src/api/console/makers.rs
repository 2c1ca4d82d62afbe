//! The console's manufacturer page (its CA, policy, quota, just-in-time
//! registrations and device count, and its revocation) and what a claim's
//! page adds (its uses, and the devices it provisioned).

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use provisioning::manufacturer::{ClaimRecord, ManufacturerRecord, DEFAULT_JIT_QUOTA};
use provisioning::registry::AuditEntry;
use provisioning::{DeviceId, Error};
use serde::Serialize;

use super::Operator;
use crate::api::{ApiError, AppState, Body, RevokeBody};

/// A manufacturer, as its page shows it.
#[derive(Debug, Serialize)]
pub(super) struct MakerView {
    #[serde(flatten)]
    record: ManufacturerRecord,
    /// Its devices, as last counted.
    devices: usize,
    /// The most it may register just in time.
    jit_quota: u64,
}

/// `GET /console/api/manufacturers/{name}`.
pub(super) async fn manufacturer(
    State(st): State<AppState>,
    _op: Operator,
    Path(name): Path<String>,
) -> Result<Json<MakerView>, ApiError> {
    let auth = st.auth.clone();
    let wanted = name.clone();
    let record = crate::api::blocking(move || auth.registry.manufacturer(&wanted))
        .await?
        .ok_or_else(|| ApiError::from(Error::ManufacturerNotFound { name: name.clone() }))?;
    let counts = super::current_counts(&st).await?;
    let devices = counts
        .manufacturers
        .iter()
        .find(|m| m.name == name)
        .map_or(0, |m| m.devices);
    Ok(Json(MakerView {
        jit_quota: record.jit_quota.unwrap_or(DEFAULT_JIT_QUOTA),
        record,
        devices,
    }))
}

/// `POST /console/api/manufacturers/{name}/revoke`: every device under it
/// is refused from then on (with a reason; CA compromise if none).
pub(super) async fn revoke(
    State(st): State<AppState>,
    op: Operator,
    headers: HeaderMap,
    Path(name): Path<String>,
    Body(body): Body<RevokeBody>,
) -> Result<Json<ManufacturerRecord>, ApiError> {
    op.check_change(&headers)?;
    let rec = crate::api::manufacturers::revoke_as(&st, name, &body, op.actor()).await?;
    super::counts_changed(&st);
    Ok(Json(rec))
}

/// What a claim's page adds: its uses, and the devices it provisioned
/// (the newest first, from the audit log).
#[derive(Debug, Serialize)]
pub(super) struct ClaimView {
    #[serde(flatten)]
    record: ClaimRecord,
    provisioned: Vec<AuditEntry>,
}

/// The claim `id`, if it is one (blocking: reads the registry).
pub(super) fn claim_of(st: &AppState, id: &DeviceId) -> Result<Option<ClaimView>, Error> {
    let Some(record) = st.auth.registry.claim(id)? else {
        return Ok(None);
    };
    let provisioned = super::audit::by_actor(st, &format!("claim:{id}"), super::PAGE)?;
    Ok(Some(ClaimView {
        record,
        provisioned,
    }))
}
