//! The admin API: JSON over HTTPS, mutual TLS, admin role only.
//!
//! Every error is `{"error": {"code": "...", "message": "..."}}` with a stable
//! code; [`ApiError::from`] is the one place provisioning errors become HTTP.

pub use fleetgate_api::types::{
    AuditQuery, EnrollBody, Enrolled, ErrorBody, ErrorDetail, ListQuery, RevokeBatchBody,
    RevokeBody, RotateBody, Stats,
};
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use provisioning::ca::inspect_certificate;
use provisioning::registry::{Page, MAX_PAGE};
use provisioning::{
    Authority, CertKey, CertRecord, DeviceId, DeviceView, EnrollRequest, Error, Identity,
    RevocationReason, Role, Serial, Standing, Status,
};

pub mod ceremony;
pub mod cmp;
mod cmp_replay;
pub mod console;
pub mod est;
pub(crate) mod guard;
pub mod manufacturers;

use crate::https::{PeerAddr, PeerCert};
use crate::metrics::{Metrics, Snapshot};
use crate::mqtt::Broker;
use crate::status::StatusService;
use crate::tls::ServerTls;

/// Request bodies larger than this are refused with 413.
pub const MAX_BODY: usize = 64 * 1024;
/// ... except a batch enrollment's, which may carry 10,000 CSRs.
pub const MAX_BATCH_BODY: usize = 32 * 1024 * 1024;
pub use provisioning::events::Change;

/// The longest certificate lifetime the API grants.
pub const MAX_LIFETIME_DAYS: u32 = 3650;

#[derive(Clone, Debug)]
pub struct AppState {
    pub auth: Arc<Authority>,
    pub cert_lifetime: time::Duration,
    /// What this node has applied of the registry's committed writes.
    pub applied: crate::events::Applied,
    pub metrics: Arc<Metrics>,
    pub tls: Arc<ServerTls>,
    pub broker: Broker,
    pub status: Arc<StatusService>,
    pub cmp: Arc<cmp::Cmp>,
    pub console: Arc<console::Console>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/devices", post(enroll).get(list))
        .route("/v1/devices/{id}", get(show))
        .route("/v1/devices/{id}/suspend", post(suspend))
        .route("/v1/devices/{id}/resume", post(resume))
        .route("/v1/devices/{id}/approve", post(approve))
        .route("/v1/devices/{id}/revoke", post(revoke))
        .route("/v1/devices/{id}/rotate", post(rotate))
        .route("/v1/devices/revoke-batch", post(revoke_batch))
        .route("/v1/certificates/{serial}", get(show_certificate))
        .route("/v1/certificates/{serial}/revoke", post(revoke_certificate))
        .route("/v1/audit", get(audit))
        .route("/v1/audit/verify", get(verify_audit))
        .route("/v1/stats", get(stats))
        .route(
            "/v1/server-certificate/renew",
            post(renew_server_certificate),
        )
        .route(
            "/v1/manufacturers",
            post(manufacturers::create).get(manufacturers::list),
        )
        .route("/v1/manufacturers/{name}", get(manufacturers::show))
        .route(
            "/v1/manufacturers/{name}/request",
            post(manufacturers::request),
        )
        .route("/v1/ca/root-crl", post(ceremony::root_crl))
        .route("/v1/ca/issuing/request", post(ceremony::rollover_request))
        .route("/v1/ca/issuing", post(ceremony::rollover_install))
        .route(
            "/v1/manufacturers/{name}/challenge",
            post(manufacturers::challenge),
        )
        .route(
            "/v1/manufacturers/{name}/register",
            post(manufacturers::register),
        )
        .route(
            "/v1/manufacturers/{name}/revoke",
            post(manufacturers::revoke),
        )
        .route("/v1/manufacturers/{name}/quota", post(manufacturers::quota))
        .route("/v1/claims", post(manufacturers::create_claim))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        // Thousands of CSRs in one call.
        .merge(
            Router::new()
                .route("/v1/devices/batch", post(manufacturers::enroll_batch))
                .layer(axum::extract::DefaultBodyLimit::max(MAX_BATCH_BODY)),
        )
        .merge(est::router())
        .merge(cmp::router())
        .merge(console::router())
        // Cross-site and non-JSON state changes refused on every /v1 route.
        .layer(axum::middleware::from_fn(guard::json_api_only))
        .with_state(state)
}

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        // One table for every front: crate::wire.
        let w = crate::wire::of(&e);
        Self::new(
            StatusCode::from_u16(w.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            w.code,
            w.message,
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let code = if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            "too_large"
        } else {
            "invalid_json"
        };
        Self::new(r.status(), code, r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_query", r.body_text())
    }
}

/// A JSON body whose rejections are our JSON errors.
#[derive(Debug)]
pub struct Body<T>(pub T);

impl<T, S> FromRequest<S> for Body<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Ok(Body(Json::<T>::from_request(req, state).await?.0))
    }
}

/// The authenticated operator making a request.
#[derive(Debug)]
pub struct Admin {
    pub id: DeviceId,
    /// The certificate it presented: what a console session it asks for
    /// is bound to.
    pub cert: CertKey,
}

impl Admin {
    pub(crate) fn actor(&self) -> String {
        format!("admin:{}", self.id)
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let peer = PeerIdentity::of(parts, "the admin API")?;
        let Identity { role, id } = peer.identity.clone();
        if role != Role::Admin {
            return Err(peer.refuse(
                StatusCode::FORBIDDEN,
                "admin_role_required",
                format!("certificate of {role} {id} has no admin role"),
            ));
        }
        // Admin certificates come only from fleetgate's own issuing CA: a
        // manufacturer CA (whose key a factory holds) can sign a leaf with
        // any serial and URI, and that leaf chains to our root too.
        if state.auth.ca.issuing_named(&peer.info.issuer).is_none() {
            return Err(peer.refuse(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "admin certificates are issued by fleetgate's issuing CA, not by {}",
                    crate::printable(&peer.info.issuer)
                ),
            ));
        }
        let rec = peer.registered(state, &[None])?;
        if rec.manufacturer.is_some() {
            return Err(peer.refuse(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "certificate {} is a manufacturer's, not an admin's",
                    peer.info.serial
                ),
            ));
        }
        Ok(Admin {
            id,
            cert: rec.key(),
        })
    }
}

/// Who presented a client certificate, as it names itself (not yet
/// checked against the registry).
#[derive(Debug)]
pub(crate) struct PeerIdentity {
    pub info: provisioning::ca::CertInfo,
    pub identity: Identity,
    addr: Option<std::net::SocketAddr>,
}

impl PeerIdentity {
    /// The client certificate's identity; 401 without one, 403 if it
    /// names none or may not sign. `what` names the service in the
    /// refusal.
    pub(crate) fn of(parts: &Parts, what: &str) -> Result<Self, ApiError> {
        let addr = parts.extensions.get::<PeerAddr>().map(|a| a.0);
        let Some(PeerCert(Some(der))) = parts.extensions.get::<PeerCert>() else {
            let reason = format!(
                "{what} needs a client certificate (curl --cert admin.crt --key admin.key)"
            );
            tracing::warn!(peer.addr = ?addr, reason = %crate::printable(&reason), "api: refused");
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "client_certificate_required",
                reason,
            ));
        };
        Self::from_der(der, addr)
    }

    /// The identity `der` names (a certificate whose chain the caller
    /// verified); 403 if it names none or may not sign.
    pub(crate) fn from_der(
        der: &[u8],
        addr: Option<std::net::SocketAddr>,
    ) -> Result<Self, ApiError> {
        let refuse = |reason: String| {
            tracing::warn!(peer.addr = ?addr, reason = %crate::printable(&reason), "api: refused");
            ApiError::new(StatusCode::FORBIDDEN, "forbidden", reason)
        };
        let info =
            inspect_certificate(der).map_err(|e| refuse(format!("client certificate: {e}")))?;
        if info.lacks_digital_signature {
            return Err(refuse(
                "client certificate's key usage lacks digitalSignature".into(),
            ));
        }
        let Some(identity) = info.identity.clone() else {
            return Err(refuse(
                "client certificate names no fleetgate identity".into(),
            ));
        };
        Ok(Self {
            info,
            identity,
            addr,
        })
    }

    /// A refusal, logged with the peer's address and the reason.
    pub(crate) fn refuse(
        &self,
        status: StatusCode,
        code: &'static str,
        reason: String,
    ) -> ApiError {
        tracing::warn!(peer.addr = ?self.addr, client = %self.identity.id, reason = %crate::printable(&reason), "api: refused");
        ApiError::new(status, code, reason)
    }

    /// [`PeerIdentity::registered`] under the scopes an enrollment
    /// caller's certificate may be kept in: fleetgate's own CAs, and for a
    /// device, the manufacturer whose CA fleetgate issued may have signed it.
    pub(crate) fn enrolling(&self, state: &AppState) -> Result<CertRecord, ApiError> {
        let manufacturer = match self.identity.role {
            Role::Device => match state.auth.registry.recent().device(&self.identity.id) {
                Ok(d) => d.manufacturer,
                Err(Error::NotFound { .. }) => None,
                Err(e) => return Err(e.into()),
            },
            _ => None,
        };
        self.registered(state, &[None, manufacturer.as_deref()])
    }

    /// The registry's record of this very certificate, in good standing
    /// and registered to the identity it names, looked up under each of
    /// `scopes` (the manufacturer its issuer works for; `None`: fleetgate's
    /// own CAs) until one knows it.
    pub(crate) fn registered(
        &self,
        state: &AppState,
        scopes: &[Option<&str>],
    ) -> Result<CertRecord, ApiError> {
        let Identity { role, id } = &self.identity;
        let serial = &self.info.serial;
        let mut found = None;
        // As admission reads it: this node's view (on etcd, milliseconds
        // behind the cluster), not a round trip per request.
        let registry = state.auth.registry.recent();
        for scope in scopes {
            let key = CertKey::new(*scope, &self.info.issuer, serial.clone());
            if let Some(s) = registry.standing(&key)? {
                found = Some(s);
                break;
            }
        }
        match found {
            Some((rec, Standing::Good))
                if rec.device_id == *id
                    && rec.role == *role
                    && rec.fingerprint == self.info.fingerprint =>
            {
                Ok(rec)
            }
            Some((_, Standing::Good)) => Err(self.refuse(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("certificate {serial} is not the one registered to {role} {id}"),
            )),
            Some((_, s)) => Err(self.refuse(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "{role} certificate {serial} is {}",
                    match s {
                        Standing::Revoked(r) => format!("revoked ({})", r.reason),
                        Standing::Suspended => "suspended".into(),
                        Standing::Pending => "pending approval".into(),
                        Standing::Good => "good".into(),
                    }
                ),
            )),
            None => Err(self.refuse(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("{role} certificate {serial} is not in the registry"),
            )),
        }
    }
}

/// `Err` with the Content-Type as given, unless it names `want` (its
/// parameters aside, in any case).
pub(crate) fn expect_content_type<'a>(
    headers: &'a axum::http::HeaderMap,
    want: &str,
) -> Result<(), &'a str> {
    let ct = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case(want) {
        Ok(())
    } else {
        Err(ct)
    }
}

impl AppState {
    /// [`blocking`], timed into the registry write latency.
    pub(crate) async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, Error> + Send + 'static,
    ) -> Result<T, ApiError> {
        let metrics = self.metrics.clone();
        blocking(move || metrics.registry_writes.time(f)).await
    }
}

/// Runs registry writes (signing, fsync) off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => {
            tracing::error!(error = %e, "registry task failed");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error; see the server log",
            ))
        }
    }
}

pub(crate) fn device_id(s: String) -> Result<DeviceId, ApiError> {
    Ok(DeviceId::try_new(s)?)
}

impl AppState {
    pub(crate) fn lifetime(
        &self,
        days: Option<u32>,
        seconds: Option<u32>,
    ) -> Result<time::Duration, ApiError> {
        match (days, seconds) {
            (Some(_), Some(_)) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_input",
                "give lifetime_days or lifetime_seconds, not both",
            )),
            (None, Some(s)) if s > 0 => Ok(time::Duration::seconds(s.into())),
            (None, Some(_)) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_input",
                "lifetime_seconds must be positive",
            )),
            (days, None) => self.lifetime_days(days),
        }
    }

    pub(crate) fn lifetime_days(&self, days: Option<u32>) -> Result<time::Duration, ApiError> {
        match days {
            None => Ok(self.cert_lifetime),
            Some(d) if (1..=MAX_LIFETIME_DAYS).contains(&d) => Ok(time::Duration::days(d.into())),
            Some(d) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_input",
                format!("lifetime_days {d} is outside 1..={MAX_LIFETIME_DAYS}"),
            )),
        }
    }

    /// The answer to an enrollment or rotation.
    pub(crate) fn enrolled(
        &self,
        device: DeviceView,
        cert: provisioning::IssuedCert,
    ) -> (StatusCode, Json<Enrolled>) {
        (
            StatusCode::CREATED,
            Json(Enrolled {
                device,
                serial: cert.serial,
                chain_pem: cert.chain_pem,
                ca_pem: self.auth.ca.root_pem().to_owned(),
            }),
        )
    }

    /// After a write: answers once this node has applied it (sessions it
    /// takes out cut, trust anchors it brings loaded). The registry
    /// announced it; the events follower applies it.
    pub(crate) async fn caught_up(&self) {
        self.applied.caught_up().await;
    }
}

async fn enroll(
    State(st): State<AppState>,
    admin: Admin,
    Body(body): Body<EnrollBody>,
) -> Result<(StatusCode, Json<Enrolled>), ApiError> {
    let manufacturer = body
        .manufacturer
        .map(|m| DeviceId::try_new(m).map(String::from))
        .transpose()
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_input",
                format!("manufacturer: {e}"),
            )
        })?;
    let req = EnrollRequest {
        id: device_id(body.id)?,
        role: body.role.unwrap_or(Role::Device),
        manufacturer,
        csr: body.csr.into_bytes(),
        lifetime: st.lifetime(body.lifetime_days, body.lifetime_seconds)?,
    };
    let auth = st.auth.clone();
    let actor = admin.actor();
    let (device, cert) = st
        .write(move || {
            let (d, c) = auth.enroll(&req, &actor)?;
            Ok((auth.registry.recent().device_view(&d.id)?, c))
        })
        .await?;
    st.caught_up().await;
    Ok(st.enrolled(device, cert))
}

async fn rotate(
    State(st): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
    Body(body): Body<RotateBody>,
) -> Result<(StatusCode, Json<Enrolled>), ApiError> {
    rotate_as(&st, id, body, admin.actor()).await
}

/// A new certificate for device `id`'s new key (its CSR), as `actor`.
pub(crate) async fn rotate_as(
    st: &AppState,
    id: String,
    body: RotateBody,
    actor: String,
) -> Result<(StatusCode, Json<Enrolled>), ApiError> {
    let id = device_id(id)?;
    let lifetime = st.lifetime(body.lifetime_days, body.lifetime_seconds)?;
    let auth = st.auth.clone();
    let (device, cert) = st
        .write(move || {
            let (d, c) = auth.rotate(&id, body.csr.as_bytes(), lifetime, &actor)?;
            Ok((auth.registry.recent().device_view(&d.id)?, c))
        })
        .await?;
    st.caught_up().await;
    Ok(st.enrolled(device, cert))
}

async fn show(
    State(st): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> Result<Json<DeviceView>, ApiError> {
    Ok(Json(st.auth.registry.device_view(&device_id(id)?)?))
}

async fn list(
    State(st): State<AppState>,
    _admin: Admin,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Page<provisioning::DeviceRecord>>, ApiError> {
    let Query(q) = q?;
    let status = q.status.map(|s| s.parse::<Status>()).transpose()?;
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    Ok(Json(st.auth.registry.list(
        status,
        q.after.as_deref(),
        limit,
    )?))
}

/// Runs a registry state change as `actor` on the blocking pool and returns
/// the device as it is afterwards.
pub(crate) async fn transition(
    st: &AppState,
    actor: String,
    id: String,
    change: impl FnOnce(
            &provisioning::Registry,
            &DeviceId,
            &str,
        ) -> Result<provisioning::DeviceRecord, Error>
        + Send
        + 'static,
) -> Result<DeviceView, ApiError> {
    let id = device_id(id)?;
    let auth = st.auth.clone();
    st.write(move || {
        change(&auth.registry, &id, &actor)?;
        // The answer from the view, which holds this node's own writes.
        auth.registry.recent().device_view(&id)
    })
    .await
}

async fn suspend(
    State(st): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
    allow: Result<Query<guard::LastAdmin>, QueryRejection>,
) -> Result<Json<DeviceView>, ApiError> {
    let id = device_id(id)?;
    guard::keep_an_admin(&st, std::slice::from_ref(&id), &allow?.0).await?;
    let id = id.to_string();
    let view = transition(&st, admin.actor(), id, |r, id, actor| r.suspend(id, actor)).await?;
    st.metrics
        .revocations
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    st.caught_up().await;
    Ok(Json(view))
}

async fn resume(
    State(st): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
) -> Result<Json<DeviceView>, ApiError> {
    let view = transition(&st, admin.actor(), id, |r, id, actor| r.resume(id, actor)).await?;
    st.caught_up().await;
    Ok(Json(view))
}

/// Lets in a device that registered itself just in time as pending.
async fn approve(
    State(st): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
) -> Result<Json<DeviceView>, ApiError> {
    let view = transition(&st, admin.actor(), id, |r, id, actor| r.approve(id, actor)).await?;
    tracing::info!(device.id = %view.id, by = %admin.id, "approved");
    st.caught_up().await;
    Ok(Json(view))
}

pub(crate) fn reason(body: &RevokeBody) -> Result<RevocationReason, ApiError> {
    Ok(match &body.reason {
        Some(r) => r.parse()?,
        None => RevocationReason::Unspecified,
    })
}

async fn revoke(
    State(st): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
    allow: Result<Query<guard::LastAdmin>, QueryRejection>,
    Body(body): Body<RevokeBody>,
) -> Result<Json<DeviceView>, ApiError> {
    let reason = reason(&body)?;
    let id = device_id(id)?;
    guard::keep_an_admin(&st, std::slice::from_ref(&id), &allow?.0).await?;
    let id = id.to_string();
    let view = transition(&st, admin.actor(), id, move |r, id, actor| {
        r.revoke(id, reason, actor)
    })
    .await?;
    tracing::info!(device.id = %view.id, reason = %reason, by = %admin.id, "revoked");
    st.metrics
        .revocations
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    st.caught_up().await;
    Ok(Json(view))
}

async fn revoke_batch(
    State(st): State<AppState>,
    admin: Admin,
    allow: Result<Query<guard::LastAdmin>, QueryRejection>,
    Body(body): Body<RevokeBatchBody>,
) -> Result<Json<provisioning::BulkRevocation>, ApiError> {
    let Query(allow) = allow?;
    let invalid = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", m);
    let reason = reason(&RevokeBody {
        reason: body.reason.clone(),
    })?;
    let time = |s: &Option<String>, what: &str| {
        s.as_deref()
            .map(|t| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                    .map_err(|e| {
                        invalid(format!("{what}: {e} (RFC 3339, e.g. 2026-11-01T00:00:00Z)"))
                    })
            })
            .transpose()
    };
    let (after, before) = (
        time(&body.issued_after, "issued_after")?,
        time(&body.issued_before, "issued_before")?,
    );
    let selector = body.manufacturer.is_some() || after.is_some() || before.is_some();
    let ids = match (body.ids, selector) {
        (Some(_), true) => {
            return Err(invalid(
                "give ids or a selector (manufacturer, issued_after, issued_before), not both"
                    .into(),
            ))
        }
        (None, false) => {
            return Err(invalid(
                "give ids, or a selector (manufacturer, issued_after, issued_before)".into(),
            ))
        }
        (Some(ids), false) => {
            if ids.len() > provisioning::registry::MAX_BULK {
                return Err(Error::TooLarge {
                    len: ids.len(),
                    max: provisioning::registry::MAX_BULK,
                }
                .into());
            }
            ids.into_iter()
                .map(device_id)
                .collect::<Result<Vec<_>, _>>()?
        }
        (None, true) => {
            let auth = st.auth.clone();
            let m = body.manufacturer.clone();
            if let Some(m) = &m {
                auth.known_manufacturer(m)?;
            }
            blocking(move || auth.registry.select_devices(m.as_deref(), after, before)).await?
        }
    };
    guard::keep_an_admin(&st, &ids, &allow).await?;
    let auth = st.auth.clone();
    let actor = admin.actor();
    let out = st
        .write(move || auth.registry.revoke_many(&ids, reason, &actor))
        .await?;
    tracing::info!(
        revoked = out.revoked.len(),
        already_revoked = out.already_revoked.len(),
        not_found = out.not_found.len(),
        reason = %reason,
        by = %admin.id,
        "bulk revocation"
    );
    st.metrics.revocations.fetch_add(
        out.revoked.len() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    if !out.revoked.is_empty() {
        st.caught_up().await;
    }
    Ok(Json(out))
}

/// The certificate a path names: by its key (`<serial>:<scope>`, as
/// `device show` lists them), or by serial alone when only one issuer used
/// that serial.
fn certificate(st: &AppState, s: &str) -> Result<CertRecord, ApiError> {
    if s.contains(':') {
        let key = s.parse::<CertKey>()?;
        return st
            .auth
            .registry
            .certificate(&key)?
            .ok_or_else(|| Error::CertNotFound { serial: s.into() }.into());
    }
    let serial = s.parse::<Serial>()?;
    let mut found = st.auth.registry.certificates_with_serial(&serial)?;
    match found.len() {
        0 => Err(Error::CertNotFound { serial: s.into() }.into()),
        1 => Ok(found.remove(0)),
        _ => Err(ApiError::new(
            StatusCode::CONFLICT,
            "ambiguous_serial",
            format!(
                "serial {serial} was issued by {} issuers; name one by its key: {}",
                found.len(),
                found
                    .iter()
                    .map(|c| format!("{} ({})", c.key(), c.issuer))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

async fn show_certificate(
    State(st): State<AppState>,
    _admin: Admin,
    Path(s): Path<String>,
) -> Result<Json<CertRecord>, ApiError> {
    Ok(Json(certificate(&st, &s)?))
}

async fn revoke_certificate(
    State(st): State<AppState>,
    admin: Admin,
    Path(s): Path<String>,
    Body(body): Body<RevokeBody>,
) -> Result<Json<CertRecord>, ApiError> {
    let key = certificate(&st, &s)?.key();
    Ok(Json(
        revoke_certificate_as(&st, key, &body, admin.actor()).await?,
    ))
}

/// Revokes one certificate for `actor` (the API's admin, or the
/// console's), with `body`'s reason.
pub(crate) async fn revoke_certificate_as(
    st: &AppState,
    key: CertKey,
    body: &RevokeBody,
    actor: String,
) -> Result<CertRecord, ApiError> {
    let reason = reason(body)?;
    let auth = st.auth.clone();
    let by = actor.clone();
    let rec = st
        .write(move || auth.registry.revoke_certificate(&key, reason, &by))
        .await?;
    tracing::info!(serial = %rec.serial, device.id = %rec.device_id, reason = %reason, by = %actor, "certificate revoked");
    st.metrics
        .revocations
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    st.caught_up().await;
    Ok(rec)
}

async fn audit(
    State(st): State<AppState>,
    _admin: Admin,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<Page<provisioning::AuditEntry>>, ApiError> {
    let Query(q) = q?;
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    let newest = match q.order.as_deref() {
        None | Some("oldest") => q.before.is_some(),
        Some("newest") => true,
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                format!("order: newest or oldest, not {:?}", crate::printable(other)),
            ))
        }
    };
    if newest && q.after.is_some() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "after pages oldest first, before newest first: not both",
        ));
    }
    Ok(Json(if newest {
        st.auth.registry.audit_newest(q.before, limit)?
    } else {
        st.auth.registry.audit(q.after, limit)?
    }))
}

/// `GET /v1/audit/verify`: the whole log against its chain and signed
/// checkpoints, and the registry against the log.
async fn verify_audit(
    State(st): State<AppState>,
    _admin: Admin,
) -> Result<Json<provisioning::registry::Verification>, ApiError> {
    let auth = st.auth.clone();
    let v = blocking(move || auth.verify_audit()).await?;
    for p in v.problems.iter().take(10) {
        tracing::error!(detail = %crate::printable(p), "audit: ALARM: the audit log does not verify");
    }
    Ok(Json(v))
}

async fn stats(State(st): State<AppState>, _admin: Admin) -> Result<Json<Stats>, ApiError> {
    let snapshot: Snapshot = st.metrics.snapshot();
    Ok(Json(Stats {
        devices: st.auth.registry.device_count(),
        live_sessions: st.broker.live_sessions(),
        counters: serde_json::to_value(snapshot).unwrap_or_default(),
    }))
}

/// Reissues the listeners' certificate and applies it to new handshakes;
/// open connections keep theirs.
async fn renew_server_certificate(
    State(st): State<AppState>,
    admin: Admin,
) -> Result<Json<serde_json::Value>, ApiError> {
    let auth = st.auth.clone();
    st.write(move || auth.reissue_server_cert()).await?;
    st.tls.reload().map_err(|e| {
        tracing::error!(error = %e, "reloading TLS");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    })?;
    tracing::info!(by = %admin.id, "server certificate renewed");
    Ok(Json(serde_json::json!({"renewed": true})))
}
