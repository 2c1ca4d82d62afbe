//! The operator console: a web page served by `fleetgate serve` itself on
//! the API listener, under `/console/`, behind the same authority as the
//! API.
//!
//! Access: `fleetgate console login` asks the API (as an admin) for a
//! one-time link; the link's page posts it back once for a session cookie
//! (`__Host-` prefixed, HttpOnly, Secure, SameSite=Strict) tied to that
//! admin, with an expiry and a logout. An admin client certificate in the
//! browser works too. Every state change needs the session's CSRF token in
//! `X-CSRF-Token` (a cross-site form cannot send it) and must not come from
//! another site (`Sec-Fetch-Site`, `Origin`); the page is static files
//! under a strict Content-Security-Policy, with no inline script. Actions
//! go to the audit log as `admin:<id> (console)`.
//!
//! Tokens and session ids are 32 random bytes; only their SHA-256 is kept,
//! in the registry, sealed ([`grants`]): a link from one node of a
//! cluster signs in on any, a session works on every node and outlives a
//! restart, and signing out ends it everywhere.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use provisioning::{AuditEntry, DeviceId, DeviceView, Error, Standing, Status};
use serde::{Deserialize, Serialize};

use super::{device_id, reason, transition, Admin, ApiError, AppState, RevokeBody};

mod audit;
mod certs;
mod devices;
mod grants;
mod makers;
use crate::https::PeerCert;
use crate::mqtt::NodeSession;
use grants::{Grant, Grants};

/// The session cookie. `__Host-`: Secure, Path=/, no Domain, so no other
/// host or path can set it.
const COOKIE_NAME: &str = "__Host-fleetgate-console";
/// How long a console session lasts.
const SESSION_LIFETIME: Duration = Duration::from_secs(8 * 3600);
/// A login link's default and longest lifetime.
pub const LINK_LIFETIME: Duration = Duration::from_secs(600);
const MAX_LINK_LIFETIME: Duration = Duration::from_secs(3600);
/// The chart's resolution and span.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
const SAMPLES: usize = 361;
/// Devices' counts by status and manufacturer are recomputed at most this
/// often (each is a scan).
const COUNTS_FOR: Duration = Duration::from_secs(10);
/// Counts that take longer than this are redone in the background, the
/// last ones answering meanwhile.
const SLOW_COUNTS: Duration = Duration::from_millis(100);
/// Rows on a page of devices or of the audit log.
pub(super) const PAGE: usize = 50;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The console's state: login links and sessions (in the registry), the
/// chart's samples, cached counts.
#[derive(Debug)]
pub struct Console {
    grants: Grants,
    samples: Mutex<VecDeque<Sample>>,
    counts: Mutex<Option<(Instant, Arc<Counts>)>>,
    /// The last count took long: stale counts answer while it is redone.
    slow_counts: AtomicBool,
    /// A count is being made in the background.
    counting: AtomicBool,
}

/// Counters at one instant.
#[derive(Clone, Copy, Debug, Serialize)]
struct Sample {
    /// Unix seconds.
    t: i64,
    sessions: u64,
    refusals: u64,
}

#[derive(Clone, Debug, Serialize)]
struct Counts {
    by_status: Vec<(Status, usize)>,
    manufacturers: Vec<ManufacturerCount>,
}

#[derive(Clone, Debug, Serialize)]
struct ManufacturerCount {
    name: String,
    status: provisioning::manufacturer::ManufacturerStatus,
    devices: usize,
}

impl Console {
    /// `secret`: the issuing CA key's seal secret, the same on every node
    /// of a cluster (see [`grants`]).
    pub fn new(secret: &[u8]) -> anyhow::Result<Self> {
        Ok(Self {
            grants: Grants::new(secret),
            samples: Mutex::new(VecDeque::with_capacity(SAMPLES)),
            counts: Mutex::default(),
            slow_counts: AtomicBool::new(false),
            counting: AtomicBool::new(false),
        })
    }

    /// The CSRF token of a certificate user: keyed to the certificate, the
    /// same on every node.
    fn cert_csrf(&self, cert_der: &[u8]) -> String {
        self.grants.mac(b"csrf", cert_der)
    }

    /// Records the counters now (every [`SAMPLE_EVERY`], from `serve`).
    pub fn sample(&self, metrics: &crate::metrics::Metrics) {
        let s = metrics.snapshot();
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() == SAMPLES {
            samples.pop_front();
        }
        samples.push_back(Sample {
            t: time::OffsetDateTime::now_utc().unix_timestamp(),
            sessions: s.sessions,
            refusals: s.refusals.values().sum(),
        });
    }

    /// How often [`Console::sample`] should run.
    pub fn sample_every() -> Duration {
        SAMPLE_EVERY
    }

    /// Connects and refusals in each interval between samples, oldest
    /// first, then since the last sample until `now`: `(unix seconds at
    /// its end, connects, refusals)`.
    fn series(&self, now: Sample) -> Vec<(i64, u64, u64)> {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let all: Vec<Sample> = samples.iter().copied().chain([now]).collect();
        all.windows(2)
            .map(|w| {
                (
                    w[1].t,
                    w[1].sessions.saturating_sub(w[0].sessions),
                    w[1].refusals.saturating_sub(w[0].refusals),
                )
            })
            .collect()
    }
}

/// Who uses the console: an admin, by a session cookie or a client
/// certificate, and the CSRF token their state changes must carry.
#[derive(Debug)]
pub struct Operator {
    admin: DeviceId,
    csrf: String,
    /// The session cookie's value, if signed in by a link.
    sid: Option<String>,
}

impl Operator {
    fn actor(&self) -> String {
        format!("admin:{} (console)", self.admin)
    }

    /// Refuses a state change that does not carry this operator's CSRF
    /// token, or that another site started.
    fn check_change(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let refuse = |why: &str| {
            tracing::warn!(client = %self.admin, reason = why, "console: refused a state change");
            ApiError::new(StatusCode::FORBIDDEN, "csrf", why)
        };
        if let Some(why) = super::guard::cross_site(headers, false) {
            return Err(refuse(why));
        }
        let given = headers
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if self.csrf.is_empty() || !same(given.as_bytes(), self.csrf.as_bytes()) {
            return Err(refuse("a state change without the console's CSRF token"));
        }
        Ok(())
    }
}

/// Runs `f` (registry reads and writes) off the async workers.
async fn off_thread<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    super::blocking(move || Ok(f())).await?
}

/// Whether `a` and `b` are equal, in time that depends on their lengths
/// only.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE_NAME)
        .map(|(_, v)| v.to_owned())
}

/// Why a link or session no longer holds, if it does not: it ends with
/// its admin's standing, and with that of the certificate it was asked
/// for with (revoked, suspended, expired).
fn grant_lapsed(st: &AppState, g: &Grant) -> Option<String> {
    if !matches!(st.auth.registry.device(&g.admin), Ok(d) if d.status == Status::Active) {
        return Some("the admin this session belongs to is no longer active".into());
    }
    match st.auth.registry.standing(&g.cert) {
        Ok(Some((rec, Standing::Good))) => {
            (rec.not_after <= time::OffsetDateTime::now_utc()).then(|| {
                format!(
                    "the certificate this session was asked for with ({}) expired",
                    rec.serial
                )
            })
        }
        Ok(Some((rec, s))) => Some(format!(
            "the certificate this session was asked for with ({}) is {}",
            rec.serial,
            match s {
                Standing::Revoked(r) => format!("revoked ({})", r.reason),
                Standing::Suspended => "suspended".into(),
                Standing::Pending => "pending".into(),
                Standing::Good => "good".into(),
            }
        )),
        Ok(None) => Some("the certificate this session was asked for with is gone".into()),
        Err(e) => Some(format!("the registry could not be read: {e}")),
    }
}

/// Whether the admin behind a session is still in good standing, and the
/// certificate it signed in with (a session ends with either).
fn admin_active(st: &AppState, g: &Grant) -> bool {
    grant_lapsed(st, g).is_none()
}

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        if let Some(sid) = cookie(&parts.headers) {
            let found = {
                let (st, sid) = (st.clone(), sid.clone());
                off_thread(move || {
                    let g = st.console.grants.session(&st.auth.registry, &sid)?;
                    let lapsed = g.as_ref().and_then(|g| grant_lapsed(&st, g));
                    if lapsed.is_some() {
                        st.console.grants.end_session(&st.auth.registry, &sid)?;
                    }
                    Ok((g, lapsed))
                })
                .await?
            };
            if let (Some(g), lapsed) = found {
                if let Some(why) = lapsed {
                    tracing::warn!(client = %g.admin, reason = %crate::printable(&why), "console: refused: the session ended");
                    return Err(ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        "session_ended",
                        why,
                    ));
                }
                return Ok(Operator {
                    admin: g.admin,
                    csrf: g.csrf,
                    sid: Some(sid),
                });
            }
        }
        // No (live) session: an admin client certificate will do.
        let has_cert = matches!(parts.extensions.get::<PeerCert>(), Some(PeerCert(Some(_))));
        if !has_cert {
            tracing::warn!(reason = "no session", "console: refused");
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "login_required",
                "sign in with a link from `fleetgate console login`, or an admin certificate",
            ));
        }
        let admin = Admin::from_request_parts(parts, st).await?;
        let csrf = match parts.extensions.get::<PeerCert>() {
            Some(PeerCert(Some(der))) => st.console.cert_csrf(der),
            _ => String::new(),
        };
        Ok(Operator {
            admin: admin.id,
            csrf,
            sid: None,
        })
    }
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/console/links", post(new_link))
        .route("/console", get(|| async { redirect("/console/") }))
        .route("/console/", get(index))
        .route("/console/login", get(login_page).post(login))
        .route("/console/logout", post(logout))
        .route("/console/assets/app.js", get(app_js))
        .route("/console/assets/style.css", get(style_css))
        .route("/console/assets/favicon.svg", get(favicon))
        .route("/console/api/me", get(me))
        .route("/console/api/overview", get(overview))
        .route("/console/api/devices", get(devices::devices))
        .route("/console/api/devices/{id}", get(device))
        .route("/console/api/devices/{id}/{action}", post(act))
        .route("/console/api/approve", post(approve_many))
        .route("/console/api/devices/{id}/rotate", post(certs::rotate))
        .route(
            "/console/api/certificates/{key}/revoke",
            post(certs::revoke),
        )
        .route("/console/api/certificates/{key}/pem", get(certs::pem))
        .route(
            "/console/api/manufacturers/{name}",
            get(makers::manufacturer),
        )
        .route(
            "/console/api/manufacturers/{name}/revoke",
            post(makers::revoke),
        )
        .route("/console/api/audit", get(audit::audit))
        .route("/console/api/activity", get(activity))
        .layer(axum::middleware::map_response(secure_headers))
}

/// Every console answer: the CSP, no sniffing, no framing, no referrer
/// (a login link's token must not leak), nothing cached.
async fn secure_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    if !h.contains_key(CACHE_CONTROL) {
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

fn redirect(to: &'static str) -> Response {
    (StatusCode::SEE_OTHER, [(LOCATION, to)]).into_response()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkBody {
    /// Seconds the link stays good (default 600, at most 3600).
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Link {
    /// The path to open on the API's address: `/console/login?token=...`.
    pub path: String,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: time::OffsetDateTime,
}

/// `POST /v1/console/links`: a one-time login link for the calling admin.
async fn new_link(
    State(st): State<AppState>,
    admin: Admin,
    super::Body(body): super::Body<LinkBody>,
) -> Result<(StatusCode, Json<Link>), ApiError> {
    let ttl = Duration::from_secs(body.ttl_seconds.unwrap_or(LINK_LIFETIME.as_secs()));
    if ttl.is_zero() || ttl > MAX_LINK_LIFETIME {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_input",
            format!(
                "ttl_seconds: 1 to {}, not {}",
                MAX_LINK_LIFETIME.as_secs(),
                ttl.as_secs()
            ),
        ));
    }
    let token = {
        let (st, id) = (st.clone(), admin.id.clone());
        off_thread(move || {
            st.console
                .grants
                .issue_link(&st.auth.registry, id, admin.cert, ttl)
        })
        .await?
    };
    tracing::info!(client = %admin.id, ttl_s = ttl.as_secs(), "console: login link issued");
    Ok((
        StatusCode::CREATED,
        Json(Link {
            path: format!("/console/login?token={token}"),
            expires_at: time::OffsetDateTime::now_utc() + ttl,
        }),
    ))
}

/// A page of the console's own, outside the app: a title and a body
/// (both already HTML-safe).
fn page(status: StatusCode, title: &str, body: &str) -> Response {
    (
        status,
        Html(format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
             <title>{title} · fleetgate</title>\
             <link rel=\"icon\" href=\"/console/assets/favicon.svg\" type=\"image/svg+xml\">\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
             <link rel=\"stylesheet\" href=\"/console/assets/style.css\"></head>\
             <body class=\"plain\"><main class=\"card\"><h1>{title}</h1>{body}</main></body></html>"
        )),
    )
        .into_response()
}

fn link_refused() -> Response {
    tracing::warn!(reason = "link used or expired", "console: refused a login");
    page(
        StatusCode::FORBIDDEN,
        "This link cannot be used",
        "<p id=\"refused\">This login link was already used, or it expired. \
         Run <code>fleetgate console login</code> for a new one.</p>",
    )
}

#[derive(Debug, Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// `GET /console/login?token=`: a button that spends the link (a GET
/// never does: link previews must not sign anyone in).
async fn login_page(State(st): State<AppState>, Query(q): Query<TokenQuery>) -> Response {
    let Some(token) = q
        .token
        .filter(|t| t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()))
    else {
        return link_refused();
    };
    let live = {
        let (st, token) = (st.clone(), token.clone());
        off_thread(move || st.console.grants.link_is_live(&st.auth.registry, &token)).await
    };
    match live {
        Ok(true) => {}
        Ok(false) => return link_refused(),
        Err(e) => return e.into_response(),
    }
    page(
        StatusCode::OK,
        "Sign in to fleetgate",
        &format!(
            "<form method=\"post\" action=\"/console/login\">\
             <input type=\"hidden\" name=\"token\" value=\"{token}\">\
             <button id=\"sign-in\" type=\"submit\">Sign in</button></form>"
        ),
    )
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    token: String,
}

/// `POST /console/login`: spends the link for a session cookie.
async fn login(
    State(st): State<AppState>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    if headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|s| s != "same-origin" && s != "none")
    {
        tracing::warn!(reason = "cross-site login", "console: refused a login");
        return page(
            StatusCode::FORBIDDEN,
            "Refused",
            "<p>A login from another site.</p>",
        );
    }
    let redeemed = {
        let st = st.clone();
        off_thread(move || {
            let Some((sid, grant)) =
                st.console
                    .grants
                    .redeem(&st.auth.registry, &f.token, SESSION_LIFETIME)?
            else {
                return Ok(None);
            };
            // A link dies with the certificate that asked for it.
            let lapsed = grant_lapsed(&st, &grant);
            if lapsed.is_some() {
                st.console.grants.end_session(&st.auth.registry, &sid)?;
            }
            Ok(Some((sid, grant, lapsed)))
        })
        .await
    };
    match redeemed {
        Ok(Some((sid, grant, lapsed))) => {
            if let Some(why) = lapsed {
                tracing::warn!(client = %grant.admin, reason = %crate::printable(&why), "console: refused a login");
                return page(
                    StatusCode::FORBIDDEN,
                    "This link cannot be used",
                    "<p id=\"refused\">The certificate or the admin this link was made for \
                     is no longer in good standing.</p>",
                );
            }
            tracing::info!(client = %grant.admin, "console: signed in by a login link");
            (
                StatusCode::SEE_OTHER,
                [
                    (LOCATION, "/console/".to_owned()),
                    (
                        SET_COOKIE,
                        format!(
                            "{COOKIE_NAME}={sid}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={}",
                            SESSION_LIFETIME.as_secs()
                        ),
                    ),
                ],
            )
                .into_response()
        }
        Ok(None) => link_refused(),
        Err(e) => e.into_response(),
    }
}

/// `POST /console/logout`: ends the session.
async fn logout(State(st): State<AppState>, op: Operator, headers: HeaderMap) -> Response {
    if let Err(e) = op.check_change(&headers) {
        return e.into_response();
    }
    if let Some(sid) = op.sid.clone() {
        let st = st.clone();
        if let Err(e) =
            off_thread(move || st.console.grants.end_session(&st.auth.registry, &sid)).await
        {
            return e.into_response();
        }
    }
    tracing::info!(client = %op.admin, "console: signed out");
    (
        StatusCode::NO_CONTENT,
        [(
            SET_COOKIE,
            format!("{COOKIE_NAME}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0"),
        )],
    )
        .into_response()
}

/// The app's shell; without a session or an admin certificate, how to get
/// one.
async fn index(op: Result<Operator, ApiError>) -> Response {
    match op {
        Ok(_) => Html(include_str!("index.html")).into_response(),
        Err(_) => page(
            StatusCode::UNAUTHORIZED,
            "Sign in",
            "<p id=\"login-required\">Run <code>fleetgate console login</code> and open the \
             link it prints, or present an admin client certificate.</p>",
        ),
    }
}

async fn app_js() -> Response {
    (
        [
            (CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (CACHE_CONTROL, "no-cache"),
        ],
        include_str!("app.js"),
    )
        .into_response()
}

async fn favicon() -> Response {
    (
        [
            (CONTENT_TYPE, "image/svg+xml"),
            (CACHE_CONTROL, "max-age=86400"),
        ],
        include_str!("favicon.svg"),
    )
        .into_response()
}

async fn style_css() -> Response {
    (
        [
            (CONTENT_TYPE, "text/css; charset=utf-8"),
            (CACHE_CONTROL, "no-cache"),
        ],
        include_str!("style.css"),
    )
        .into_response()
}

#[derive(Debug, Serialize)]
struct Me {
    admin: DeviceId,
    csrf: String,
    session: bool,
}

async fn me(op: Operator) -> Json<Me> {
    Json(Me {
        admin: op.admin,
        csrf: op.csrf,
        session: op.sid.is_some(),
    })
}

#[derive(Debug, Serialize)]
struct Overview {
    devices: usize,
    counts: Counts,
    live_sessions: usize,
    handshakes: u64,
    sessions: u64,
    kicked: u64,
    refusals: std::collections::BTreeMap<&'static str, u64>,
    /// `(unix seconds, connects, refusals)` per interval.
    series: Vec<(i64, u64, u64)>,
    series_step_s: u64,
}

/// Counts the devices for the overview in the background (at start, so
/// the first look at a large fleet does not wait for it).
pub fn count_soon(st: &AppState) {
    if !st.console.counting.swap(true, Ordering::Relaxed) {
        let st = st.clone();
        tokio::spawn(async move {
            if let Err(e) = count(&st).await {
                tracing::warn!(error = ?e, "console: counting devices failed");
            }
            st.console.counting.store(false, Ordering::Relaxed);
        });
    }
}

/// The counts behind the overview, counted now and kept.
async fn count(st: &AppState) -> Result<Arc<Counts>, ApiError> {
    let auth = st.auth.clone();
    let started = Instant::now();
    let c = Arc::new(
        super::blocking(move || {
            let by_status = auth.registry.count_by_status()?;
            let per = auth.registry.count_by_manufacturer()?;
            let manufacturers = auth
                .registry
                .manufacturers()?
                .into_iter()
                .map(|m| ManufacturerCount {
                    devices: per.get(m.name.as_str()).copied().unwrap_or(0),
                    status: m.status,
                    name: m.name.to_string(),
                })
                .collect();
            Ok(Counts {
                by_status,
                manufacturers,
            })
        })
        .await?,
    );
    st.console
        .slow_counts
        .store(started.elapsed() > SLOW_COUNTS, Ordering::Relaxed);
    *st.console.counts.lock().unwrap_or_else(|e| e.into_inner()) =
        Some((Instant::now(), c.clone()));
    Ok(c)
}

/// A change made from the console: the cached counts are stale from now
/// on, so the next overview counts again (in the background for a large
/// fleet, as ever) and the operator sees the change.
fn counts_changed(st: &AppState) {
    let mut c = st.console.counts.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((at, _)) = c.as_mut() {
        if let Some(old) = Instant::now().checked_sub(COUNTS_FOR) {
            *at = old;
        }
    }
}

/// The devices' counts by status and manufacturer: the last ones while
/// fresh, or while new ones are being made for a large fleet.
async fn current_counts(st: &AppState) -> Result<Arc<Counts>, ApiError> {
    let cached = {
        let c = st.console.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.as_ref()
            .map(|(at, c)| (c.clone(), at.elapsed() < COUNTS_FOR))
    };
    Ok(match cached {
        Some((c, true)) => c,
        // Counting a large fleet takes seconds: the last counts answer,
        // and new ones are made meanwhile (one count at a time).
        Some((c, false)) if st.console.slow_counts.load(Ordering::Relaxed) => {
            count_soon(st);
            c
        }
        _ => count(st).await?,
    })
}

async fn overview(State(st): State<AppState>, _op: Operator) -> Result<Json<Overview>, ApiError> {
    let counts = current_counts(&st).await?;
    let m = st.metrics.snapshot();
    let now = Sample {
        t: time::OffsetDateTime::now_utc().unix_timestamp(),
        sessions: m.sessions,
        refusals: m.refusals.values().sum(),
    };
    Ok(Json(Overview {
        devices: st.auth.registry.device_count(),
        counts: (*counts).clone(),
        live_sessions: st.broker.live_sessions(),
        handshakes: m.handshakes,
        sessions: m.sessions,
        kicked: m.kicked,
        refusals: m.refusals,
        series: st.console.series(now),
        series_step_s: SAMPLE_EVERY.as_secs(),
    }))
}

#[derive(Debug, Serialize)]
struct CommandRow {
    seq: u64,
    topic: String,
    bytes: usize,
    qos: u8,
    stored_at_ms: i64,
    expires_at_ms: Option<i64>,
}

#[derive(Debug, Serialize)]
struct DevicePageView {
    device: DeviceView,
    /// Its live sessions on every node that answered, each with its node.
    sessions: Vec<NodeSession>,
    audit: Vec<AuditEntry>,
    commands: Vec<CommandRow>,
    /// Why the queued commands could not be read, if they could not.
    commands_error: Option<String>,
    /// Its latest refusals on this node, newest first (in memory:
    /// [`crate::activity`]).
    refusals: Vec<crate::activity::Activity>,
    /// For a claim: its uses and the devices it provisioned.
    claim: Option<makers::ClaimView>,
    /// When it last connected or left.
    #[serde(with = "time::serde::rfc3339::option")]
    last_seen: Option<time::OffsetDateTime>,
}

async fn device(
    State(st): State<AppState>,
    _op: Operator,
    Path(id): Path<String>,
) -> Result<Json<DevicePageView>, ApiError> {
    let id = device_id(id)?;
    let (st2, id2) = (st.clone(), id.clone());
    let (device, audit, commands, claim, last_seen) = super::blocking(move || {
        let device = st2.auth.registry.device_view(&id2)?;
        let audit = st2.auth.registry.audit_of(&id2, 50)?;
        let claim = if device.role == provisioning::Role::Claim {
            makers::claim_of(&st2, &id2)?
        } else {
            None
        };
        let seen = st2.broker.last_seen(&id2);
        Ok((device, audit, st2.broker.queued_commands(&id2), claim, seen))
    })
    .await?;
    let (commands, commands_error) = match commands {
        Ok(q) => (
            q.into_iter()
                .map(|c| CommandRow {
                    seq: c.seq,
                    bytes: c.message.payload.len(),
                    topic: c.message.topic,
                    qos: c.message.qos,
                    stored_at_ms: c.message.stored_at_ms,
                    expires_at_ms: c.message.expires_at_ms,
                })
                .collect(),
            None,
        ),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    Ok(Json(DevicePageView {
        refusals: crate::activity::feed().refusals_of(id.as_str()),
        claim,
        last_seen,
        sessions: st
            .broker
            .sessions_anywhere(std::slice::from_ref(&id))
            .await
            .into_iter()
            .map(|(_, s)| s)
            .collect(),
        device,
        audit,
        commands,
        commands_error,
    }))
}

/// `POST /console/api/devices/{id}/{suspend|resume|revoke}`.
async fn act(
    State(st): State<AppState>,
    op: Operator,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    super::Body(body): super::Body<RevokeBody>,
) -> Result<Json<DeviceView>, ApiError> {
    op.check_change(&headers)?;
    if matches!(action.as_str(), "suspend" | "revoke") {
        let target = super::device_id(id.clone())?;
        let keep = super::guard::LastAdmin::default();
        super::guard::keep_an_admin(&st, std::slice::from_ref(&target), &keep).await?;
    }
    let actor = op.actor();
    let view = match action.as_str() {
        "suspend" => transition(&st, actor, id, |r, id, a| r.suspend(id, a)).await?,
        "resume" => transition(&st, actor, id, |r, id, a| r.resume(id, a)).await?,
        "approve" => transition(&st, actor, id, |r, id, a| r.approve(id, a)).await?,
        "revoke" => {
            let reason = reason(&body)?;
            let view = transition(&st, actor, id, move |r, id, a| r.revoke(id, reason, a)).await?;
            st.metrics
                .revocations
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            view
        }
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no action {other:?}: suspend, resume, approve or revoke"),
            ))
        }
    };
    tracing::info!(device.id = %view.id, action = %action, by = %op.actor(), "console: device changed");
    st.caught_up().await;
    counts_changed(&st);
    Ok(Json(view))
}

/// A bulk approval's devices.
#[derive(Debug, Deserialize)]
struct ApproveBody {
    ids: Vec<String>,
}

/// What a bulk approval did: the devices approved, and why each other
/// one was not.
#[derive(Debug, Serialize)]
struct Approved {
    approved: Vec<String>,
    refused: Vec<(String, String)>,
}

/// `POST /console/api/approve`: approves pending devices, each on its own
/// (one that cannot be, not pending or unknown, is reported and the rest
/// go on), up to a page's worth at once.
async fn approve_many(
    State(st): State<AppState>,
    op: Operator,
    headers: HeaderMap,
    super::Body(body): super::Body<ApproveBody>,
) -> Result<Json<Approved>, ApiError> {
    op.check_change(&headers)?;
    if body.ids.len() > provisioning::registry::MAX_PAGE {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "{} devices: at most {} at once",
                body.ids.len(),
                provisioning::registry::MAX_PAGE
            ),
        ));
    }
    let mut out = Approved {
        approved: Vec::new(),
        refused: Vec::new(),
    };
    for id in body.ids {
        match transition(&st, op.actor(), id.clone(), |r, id, a| r.approve(id, a)).await {
            Ok(v) => out.approved.push(v.id.to_string()),
            Err(e) => out.refused.push((id, e.message().to_owned())),
        }
    }
    tracing::info!(approved = out.approved.len(), refused = out.refused.len(), by = %op.actor(), "console: devices approved");
    st.caught_up().await;
    counts_changed(&st);
    Ok(Json(out))
}

/// `GET /console/api/activity`: refusals and kicks as they happen
/// (server-sent events, each a JSON [`crate::activity::Activity`]), after
/// the latest few. A session's stream ends when the session does (signed
/// out, expired, its admin no longer active), checked every few seconds.
async fn activity(
    State(st): State<AppState>,
    op: Operator,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Error>>> {
    use futures_util::StreamExt;
    let (recent, rx) = crate::activity::feed().follow();
    let past = futures_util::stream::iter(recent);
    let tick = tokio::time::interval(Duration::from_secs(5));
    let live = futures_util::stream::unfold((rx, tick), move |(mut rx, mut tick)| {
        let (st, sid) = (st.clone(), op.sid.clone());
        async move {
            loop {
                tokio::select! {
                    r = rx.recv() => match r {
                        Ok(a) => return Some((a, (rx, tick))),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    },
                    _ = tick.tick() => {
                        let ended = match sid.clone() {
                            Some(sid) => {
                                let st = st.clone();
                                off_thread(move || {
                                    let g = st.console.grants.session(&st.auth.registry, &sid)?;
                                    Ok(g.is_none_or(|g| !admin_active(&st, &g)))
                                })
                                .await
                                // The registry could not say: not ended.
                                .unwrap_or(false)
                            }
                            None => false,
                        };
                        if ended {
                            return None;
                        }
                    }
                }
            }
        }
    });
    let events = past.chain(live).map(|a| {
        Ok(Event::default()
            .event("activity")
            .data(serde_json::to_string(&*a).unwrap_or_default()))
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}
