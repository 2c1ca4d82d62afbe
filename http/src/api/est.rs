//! EST (RFC 7030) under `/.well-known/est/` on the API listener: the same
//! registry, CA, manufacturers, claims and audit log as the JSON API.
//!
//! - `cacerts` (anyone): fleetgate's root and issuing CA, certs-only CMS.
//! - `simpleenroll`: a base64 PKCS#10 request in, the issued certificate
//!   out as certs-only CMS. The device id is the CSR's subject CN (the
//!   same id rules). An admin certificate may enroll any id; a claim
//!   certificate spends one of its uses, exactly as over MQTT.
//! - `simplereenroll`: a device with its current certificate gets a new
//!   one for the same id (the old one stays valid until it expires or is
//!   revoked); an admin may reenroll any device.
//! - `csrattrs`: what fleetgate asks CSRs to carry.
//!
//! A label (`/.well-known/est/<manufacturer>/simpleenroll`) names the
//! manufacturer: an admin enrolls the device under it; a claim's must be
//! its own. Every refusal is an HTTP error with a readable `text/plain`
//! body, and is logged with its reason.

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::header::{HeaderMap, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use provisioning::{est, DeviceId, EnrollRequest, Error, Identity, Role};

use super::{ApiError, AppState, PeerIdentity};

/// Where EST lives (RFC 7030 3.2.2).
pub const PREFIX: &str = "/.well-known/est";

pub fn router() -> Router<AppState> {
    Router::new()
        .route(&format!("{PREFIX}/cacerts"), get(cacerts))
        .route(&format!("{PREFIX}/csrattrs"), get(csrattrs))
        .route(&format!("{PREFIX}/simpleenroll"), post(enroll))
        .route(&format!("{PREFIX}/simplereenroll"), post(reenroll))
        .route(&format!("{PREFIX}/{{label}}/cacerts"), get(cacerts))
        .route(&format!("{PREFIX}/{{label}}/csrattrs"), get(csrattrs))
        .route(&format!("{PREFIX}/{{label}}/simpleenroll"), post(enroll))
        .route(
            &format!("{PREFIX}/{{label}}/simplereenroll"),
            post(reenroll),
        )
        .layer(axum::extract::DefaultBodyLimit::max(est::MAX_BODY))
}

/// An EST refusal: the status, and `<code>: <reason>` as plain text.
#[derive(Debug)]
pub struct EstError(ApiError);

impl From<ApiError> for EstError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<Error> for EstError {
    fn from(e: Error) -> Self {
        Self(ApiError::from(e))
    }
}

impl IntoResponse for EstError {
    fn into_response(self) -> Response {
        (
            self.0.status,
            [(CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{}: {}\n", self.0.code(), self.0.message()),
        )
            .into_response()
    }
}

fn refused(status: StatusCode, code: &'static str, why: impl Into<String>) -> EstError {
    EstError(ApiError::new(status, code, why))
}

/// Who asks: their certificate, checked against the registry.
#[derive(Debug)]
pub struct Caller {
    peer: PeerIdentity,
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = EstError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, EstError> {
        let peer = PeerIdentity::of(parts, "EST enrollment")?;
        peer.enrolling(st)?;
        Ok(Caller { peer })
    }
}

impl Caller {
    fn identity(&self) -> &Identity {
        &self.peer.identity
    }

    fn refuse(&self, code: &'static str, why: String) -> EstError {
        EstError(self.peer.refuse(StatusCode::FORBIDDEN, code, why))
    }

    fn actor(&self) -> String {
        let Identity { role, id } = self.identity();
        format!("{role}:{id} (est)")
    }
}

/// A certs-only CMS answer, base64 (RFC 7030 4.1.3, 4.2.3).
fn certs_only<'a>(certs: impl IntoIterator<Item = &'a [u8]>) -> Result<Response, EstError> {
    let cms = est::certs_only(certs)?;
    Ok((
        StatusCode::OK,
        [
            (
                CONTENT_TYPE,
                "application/pkcs7-mime; smime-type=certs-only",
            ),
            (
                axum::http::HeaderName::from_static("content-transfer-encoding"),
                "base64",
            ),
        ],
        est::to_base64(&cms),
    )
        .into_response())
}

async fn cacerts(State(st): State<AppState>) -> Result<Response, EstError> {
    let ca = &st.auth.ca;
    certs_only([ca.issuing_der().as_ref(), ca.root_der().as_ref()])
}

async fn csrattrs() -> Response {
    (
        StatusCode::OK,
        [
            (CONTENT_TYPE, "application/csrattrs"),
            (
                axum::http::HeaderName::from_static("content-transfer-encoding"),
                "base64",
            ),
        ],
        est::to_base64(&est::csr_attrs()),
    )
        .into_response()
}

/// The request's PKCS#10 (its signature checked) and the device id its
/// subject CN names.
fn request(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(provisioning::csr::ValidatedCsr, DeviceId), EstError> {
    if let Err(ct) = super::expect_content_type(headers, "application/pkcs10") {
        return Err(refused(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("EST takes Content-Type: application/pkcs10 (base64), not {ct:?}"),
        ));
    }
    // RFC 7030 says base64 DER; some clients send the CSR as PEM, which
    // says what it is: taken as it is.
    let csr = if body.trim_ascii_start().starts_with(b"-----BEGIN") {
        provisioning::csr::validate_csr(body)?
    } else {
        provisioning::csr::validate_csr(&est::from_base64(body)?)?
    };
    let Some(cn) = &csr.subject_cn else {
        return Err(refused(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            "the CSR's subject has no common name: EST names the device there",
        ));
    };
    let id = DeviceId::try_new(cn.clone())?;
    Ok((csr, id))
}

fn label_id(label: Option<String>) -> Result<Option<String>, EstError> {
    label
        .map(|l| {
            DeviceId::try_new(l).map(String::from).map_err(|e| {
                refused(
                    StatusCode::NOT_FOUND,
                    "manufacturer_not_found",
                    format!("label: {e}"),
                )
            })
        })
        .transpose()
}

/// `simpleenroll`, under a label or not.
async fn enroll(
    State(st): State<AppState>,
    label: Option<Path<String>>,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, EstError> {
    let label = label_id(label.map(|Path(l)| l))?;
    let (csr, id) = request(&headers, &body)?;
    let auth = st.auth.clone();
    let lifetime = st.cert_lifetime;
    let actor = caller.actor();
    let cert = match caller.identity().role {
        Role::Admin => {
            let req = EnrollRequest {
                id,
                role: Role::Device,
                manufacturer: label,
                csr: Vec::new(),
                lifetime,
            };
            st.write(move || auth.enroll_key(&req, &csr, &actor).map(|(_, c)| c))
                .await?
        }
        Role::Claim => {
            let claim = caller.identity().id.clone();
            let rec = st
                .auth
                .registry
                .claim(&claim)?
                .ok_or_else(|| caller.refuse("forbidden", format!("claim {claim} is not registered")))?;
            if label.is_some() && label != rec.manufacturer {
                return Err(caller.refuse(
                    "forbidden",
                    format!(
                        "claim {claim} enrolls for {}, not for label {}",
                        rec.manufacturer.as_deref().unwrap_or("fleetgate itself"),
                        label.as_deref().unwrap_or_default()
                    ),
                ));
            }
            st.write(move || {
                auth.provision_key_with_claim(&claim, &id, &csr, lifetime, &actor)
                    .map(|(_, c)| c)
            })
            .await?
        }
        role => {
            return Err(caller.refuse(
                "forbidden",
                format!(
                    "a {role} certificate may not enroll new devices; a device reenrolls itself at {PREFIX}/simplereenroll"
                ),
            ))
        }
    };
    st.caught_up().await;
    tracing::info!(serial = %cert.serial, by = %caller.actor(), "est: enrolled");
    certs_only([cert.der.as_slice()])
}

/// `simplereenroll`, under a label or not.
async fn reenroll(
    State(st): State<AppState>,
    label: Option<Path<String>>,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, EstError> {
    let label = label_id(label.map(|Path(l)| l))?;
    let (csr, id) = request(&headers, &body)?;
    let me = caller.identity();
    match me.role {
        Role::Admin => {}
        Role::Device if me.id == id => {}
        Role::Device => {
            return Err(caller.refuse(
                "wrong_identity",
                format!("device {} may reenroll only itself, not {id}", me.id),
            ))
        }
        role => {
            return Err(caller.refuse(
                "forbidden",
                format!("a {role} certificate may not reenroll"),
            ))
        }
    }
    if let Some(label) = &label {
        let device = st.auth.registry.device(&id)?;
        if device.manufacturer.as_deref() != Some(label.as_str()) {
            return Err(caller.refuse(
                "forbidden",
                format!("device {id} is not of manufacturer {label}"),
            ));
        }
    }
    let auth = st.auth.clone();
    let lifetime = st.cert_lifetime;
    let actor = caller.actor();
    let cert = st
        .write(move || auth.rotate_key(&id, &csr, lifetime, &actor).map(|(_, c)| c))
        .await?;
    st.caught_up().await;
    tracing::info!(serial = %cert.serial, by = %caller.actor(), "est: reenrolled");
    certs_only([cert.der.as_slice()])
}
