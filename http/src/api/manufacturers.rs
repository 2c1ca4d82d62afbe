//! The admin API for manufacturers, batch enrollment and claims.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
pub use fleetgate_api::types::{
    BatchBody, BatchEntry, BatchReport, BatchResult, CeremonyRequest, ClaimBody, ClaimIssued,
    CreateBody, Created, QuotaBody, RegisterBody,
};
use provisioning::manufacturer::{BatchItem, Challenge, JitPolicy, ManufacturerRecord};
use provisioning::{Error, RevocationReason};

use super::{device_id, reason, Admin, ApiError, AppState, Body, RevokeBody};

/// Manufacturer names double as CRL names (`/crl/<name>.crl`).
const RESERVED: [&str; 2] = [
    provisioning::ca::ISSUING_CRL_NAME,
    provisioning::ca::ROOT_CRL_NAME,
];

fn manufacturer_name(name: String) -> Result<provisioning::DeviceId, ApiError> {
    if RESERVED.contains(&name.as_str()) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            format!("{name:?} is reserved"),
        ));
    }
    device_id(name)
}

fn policy(p: Option<String>) -> Result<JitPolicy, ApiError> {
    Ok(match p {
        Some(p) => p.parse()?,
        None => JitPolicy::AutoActivate,
    })
}

pub async fn create(
    State(st): State<AppState>,
    admin: Admin,
    Body(body): Body<CreateBody>,
) -> Result<(StatusCode, Json<Created>), ApiError> {
    let name = manufacturer_name(body.name)?;
    let policy = policy(body.policy)?;
    let auth = st.auth.clone();
    let actor = admin.actor();
    let quota = body.jit_quota;
    let signed = body.ca_cert_pem;
    let (manufacturer, key_pem) = st
        .write(move || {
            let (mut m, key) = match &signed {
                // Signed by the root at a ceremony, for a key prepared here.
                Some(pem) => auth.install_manufacturer(&name, policy, pem.as_bytes(), &actor)?,
                None => auth.create_manufacturer(&name, policy, &actor)?,
            };
            if let Some(q) = quota {
                m = auth.registry.set_jit_quota(name.as_str(), q, &actor)?;
            }
            Ok((m, key))
        })
        .await?;
    st.caught_up().await;
    tracing::info!(manufacturer = %manufacturer.name, by = %admin.id, "manufacturer CA issued");
    Ok((
        StatusCode::CREATED,
        Json(Created {
            manufacturer,
            key_pem,
            ca_pem: st.auth.ca.root_pem().to_owned(),
        }),
    ))
}

/// The first half of a manufacturer CA made at a root ceremony: this node
/// makes the CA's key (in its token, if its keys are in one) and returns a
/// request for the root to sign (`fleetgate manufacturer create NAME
/// --root-dir ROOTDIR` does both halves).
pub async fn request(
    State(st): State<AppState>,
    admin: Admin,
    Path(name): Path<String>,
) -> Result<Json<CeremonyRequest>, ApiError> {
    let name = manufacturer_name(name)?;
    let auth = st.auth.clone();
    let csr_pem = st
        .write({
            let name = name.clone();
            move || auth.prepare_manufacturer(&name)
        })
        .await?;
    tracing::info!(manufacturer = %name, by = %admin.id, "prepared a manufacturer CA key for a root ceremony");
    Ok(Json(CeremonyRequest {
        csr_pem,
        status_url: st.auth.ca.status_url().map(str::to_owned),
        root_pem: st.auth.ca.root_pem().to_owned(),
    }))
}

/// Sets how many devices a manufacturer may register just in time.
pub async fn quota(
    State(st): State<AppState>,
    admin: Admin,
    Path(name): Path<String>,
    Body(body): Body<QuotaBody>,
) -> Result<Json<ManufacturerRecord>, ApiError> {
    let auth = st.auth.clone();
    let actor = admin.actor();
    let m = st
        .write(move || auth.registry.set_jit_quota(&name, body.jit_quota, &actor))
        .await?;
    tracing::info!(manufacturer = %m.name, jit_quota = body.jit_quota, by = %admin.id, "manufacturer quota set");
    Ok(Json(m))
}

pub async fn list(
    State(st): State<AppState>,
    _admin: Admin,
) -> Result<Json<Vec<ManufacturerRecord>>, ApiError> {
    Ok(Json(st.auth.registry.manufacturers()?))
}

pub async fn show(
    State(st): State<AppState>,
    _admin: Admin,
    Path(name): Path<String>,
) -> Result<Json<ManufacturerRecord>, ApiError> {
    match st.auth.registry.manufacturer(&name)? {
        Some(m) => Ok(Json(m)),
        None => Err(Error::ManufacturerNotFound { name }.into()),
    }
}

pub async fn challenge(
    State(st): State<AppState>,
    _admin: Admin,
    Path(name): Path<String>,
) -> Result<Json<Challenge>, ApiError> {
    let name = manufacturer_name(name)?;
    let auth = st.auth.clone();
    Ok(Json(
        st.write(move || auth.manufacturer_challenge(&name)).await?,
    ))
}

pub async fn register(
    State(st): State<AppState>,
    admin: Admin,
    Path(name): Path<String>,
    Body(body): Body<RegisterBody>,
) -> Result<(StatusCode, Json<ManufacturerRecord>), ApiError> {
    let name = manufacturer_name(name)?;
    let policy = policy(body.policy)?;
    let auth = st.auth.clone();
    let actor = admin.actor();
    let rec = st
        .write(move || {
            auth.register_manufacturer(
                &name,
                body.ca_pem.as_bytes(),
                body.verification_pem.as_deref().map(str::as_bytes),
                policy,
                &actor,
            )
        })
        .await?;
    st.caught_up().await;
    tracing::info!(manufacturer = %rec.name, by = %admin.id, "manufacturer CA registered");
    Ok((StatusCode::CREATED, Json(rec)))
}

pub async fn revoke(
    State(st): State<AppState>,
    admin: Admin,
    Path(name): Path<String>,
    Body(body): Body<RevokeBody>,
) -> Result<Json<ManufacturerRecord>, ApiError> {
    Ok(Json(revoke_as(&st, name, &body, admin.actor()).await?))
}

/// Revokes manufacturer `name` for `actor` (the API's admin, or the
/// console's): `body`'s reason, CA compromise if none. Every device under
/// it is refused from then on.
pub(crate) async fn revoke_as(
    st: &AppState,
    name: String,
    body: &RevokeBody,
    actor: String,
) -> Result<ManufacturerRecord, ApiError> {
    let reason = match body.reason {
        Some(_) => reason(body)?,
        None => RevocationReason::CaCompromise,
    };
    let auth = st.auth.clone();
    let by = actor.clone();
    let rec = st
        .write(move || auth.registry.revoke_manufacturer(&name, reason, &by))
        .await?;
    tracing::warn!(manufacturer = %rec.name, %reason, by = %actor, "manufacturer revoked: every device under it is refused");
    st.metrics
        .revocations
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    st.caught_up().await;
    Ok(rec)
}

pub async fn enroll_batch(
    State(st): State<AppState>,
    admin: Admin,
    Body(body): Body<BatchBody>,
) -> Result<Json<BatchReport>, ApiError> {
    let lifetime = st.lifetime_days(body.lifetime_days)?;
    let items: Vec<BatchItem> = body
        .items
        .into_iter()
        .map(|e| BatchItem {
            name: e.name.unwrap_or_else(|| e.id.clone()),
            id: e.id,
            csr: e.csr.into_bytes(),
        })
        .collect();
    let auth = st.auth.clone();
    let actor = admin.actor();
    let manufacturer = body.manufacturer;
    let (items, results) = st
        .write(move || {
            let r = auth.enroll_batch(manufacturer.as_deref(), &items, lifetime, &actor)?;
            Ok((items, r))
        })
        .await?;
    st.caught_up().await;
    let results: Vec<BatchResult> = items
        .into_iter()
        .zip(results)
        .map(|(item, r)| match r {
            Ok(cert) => BatchResult {
                name: item.name,
                id: item.id,
                serial: Some(cert.serial),
                chain_pem: Some(cert.chain_pem),
                error: None,
            },
            Err(e) => {
                let e = ApiError::from(e);
                BatchResult {
                    name: item.name,
                    id: item.id,
                    serial: None,
                    chain_pem: None,
                    error: Some(super::ErrorDetail {
                        code: e.code().to_owned(),
                        message: e.message().to_owned(),
                    }),
                }
            }
        })
        .collect();
    let failed = results.iter().filter(|r| r.error.is_some()).count();
    tracing::info!(issued = results.len() - failed, failed, by = %admin.id, "batch enrollment");
    Ok(Json(BatchReport {
        issued: results.len() - failed,
        failed,
        ca_pem: st.auth.ca.root_pem().to_owned(),
        results,
    }))
}

pub async fn create_claim(
    State(st): State<AppState>,
    admin: Admin,
    Body(body): Body<ClaimBody>,
) -> Result<(StatusCode, Json<ClaimIssued>), ApiError> {
    let id = device_id(body.id)?;
    let lifetime = st.lifetime_days(body.lifetime_days)?;
    let auth = st.auth.clone();
    let actor = admin.actor();
    let (device, claim, cert) = st
        .write(move || {
            let (d, c, cert) = auth.create_claim(
                &id,
                body.uses,
                body.manufacturer.as_deref(),
                body.csr.as_bytes(),
                lifetime,
                &actor,
            )?;
            Ok((auth.registry.recent().device_view(&d.id)?, c, cert))
        })
        .await?;
    st.caught_up().await;
    Ok((
        StatusCode::CREATED,
        Json(ClaimIssued {
            device,
            uses_left: claim.uses_left,
            serial: cert.serial,
            chain_pem: cert.chain_pem,
            ca_pem: st.auth.ca.root_pem().to_owned(),
        }),
    ))
}
