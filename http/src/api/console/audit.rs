//! The console's audit log: newest first, filtered by who, what, which
//! device and when, a page at a time or exported whole as CSV or JSON.
//!
//! A device's entries come from the log's index by device; other filters
//! read the log from the newest entry back, at most [`SCAN`] entries a
//! page, so a filter that matches little answers in bounded time with what
//! it found and where to go on (`next`, the `before` of the next page).

use axum::extract::{Query, State};
use axum::http::header::{CONTENT_DISPOSITION, CONTENT_TYPE};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use provisioning::registry::{AuditEntry, MAX_PAGE};
use provisioning::DeviceId;
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{Operator, PAGE};
use crate::api::{ApiError, AppState};

/// Entries read for one page at most.
pub(super) const SCAN: usize = 20_000;

/// Entries one export holds at most.
pub(super) const EXPORT_MAX: usize = 100_000;

#[derive(Debug, Default, Deserialize)]
pub(super) struct AuditQuery {
    /// Entries with a sequence number below this (the newest, if absent).
    before: Option<u64>,
    /// Who: entries whose actor contains this (any case).
    actor: Option<String>,
    /// What: entries whose action contains this (any case).
    action: Option<String>,
    /// Which device: its entries only.
    device: Option<String>,
    /// When: entries at or after this time (RFC 3339, or a date).
    from: Option<String>,
    /// ... and at or before this one.
    to: Option<String>,
    /// `csv` or `json`: every matching entry (up to [`EXPORT_MAX`]) as a
    /// download.
    format: Option<String>,
}

/// What an entry must be to be shown.
#[derive(Debug, Default)]
struct Filter {
    actor: Option<String>,
    action: Option<String>,
    device: Option<DeviceId>,
    from: Option<OffsetDateTime>,
    to: Option<OffsetDateTime>,
}

impl Filter {
    fn from_query(q: &AuditQuery) -> Result<Self, ApiError> {
        let text = |v: &Option<String>| {
            v.as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_lowercase)
        };
        let device = match q.device.as_deref().map(str::trim) {
            Some(d) if !d.is_empty() => Some(super::device_id(d.to_owned())?),
            _ => None,
        };
        Ok(Self {
            actor: text(&q.actor),
            action: text(&q.action),
            device,
            from: time_bound(q.from.as_deref(), false)?,
            to: time_bound(q.to.as_deref(), true)?,
        })
    }

    fn admits(&self, e: &AuditEntry) -> bool {
        let has = |field: &str, want: &Option<String>| {
            want.as_deref()
                .is_none_or(|w| field.to_lowercase().contains(w))
        };
        has(&e.actor, &self.actor)
            && has(&e.action, &self.action)
            && self
                .device
                .as_ref()
                .is_none_or(|d| e.device.as_ref() == Some(d))
            && self.from.is_none_or(|f| e.at >= f)
            && self.to.is_none_or(|t| e.at <= t)
    }
}

/// `2026-12-06T10:00:00Z`, or a date (`2026-12-06`: its start, or its end
/// for the upper bound).
fn time_bound(v: Option<&str>, end_of_day: bool) -> Result<Option<OffsetDateTime>, ApiError> {
    let Some(v) = v.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    if let Ok(t) = OffsetDateTime::parse(v, &Rfc3339) {
        return Ok(Some(t));
    }
    let date = time::Date::parse(v, time::macros::format_description!("[year]-[month]-[day]"))
        .map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!(
                    "{v:?} is not a time: RFC 3339 (2026-12-06T10:00:00Z) or a date (2026-12-06)"
                ),
            )
        })?;
    let t = if end_of_day {
        date.with_hms_nano(23, 59, 59, 999_999_999)
    } else {
        date.with_hms(0, 0, 0)
    }
    .map(time::PrimitiveDateTime::assume_utc)
    .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()))?;
    Ok(Some(t))
}

/// Up to `want` matching entries below `before`, newest first, reading at
/// most `scan` entries; and the `before` to go on from, if there may be
/// more.
fn matching(
    st: &AppState,
    f: &Filter,
    before: Option<u64>,
    want: usize,
    scan: usize,
) -> Result<(Vec<AuditEntry>, Option<u64>), provisioning::Error> {
    let mut items = Vec::new();
    if let Some(d) = &f.device {
        // The device's own index, newest first.
        let all = st.auth.registry.audit_of(d, scan)?;
        let mut left = all
            .into_iter()
            .filter(|e| before.is_none_or(|b| e.seq < b))
            .filter(|e| f.admits(e));
        items.extend(left.by_ref().take(want));
        let more = left.next().is_some();
        let next = more.then(|| items.last().map(|e| e.seq)).flatten();
        return Ok((items, next));
    }
    let mut cursor = before;
    let mut scanned = 0;
    loop {
        let page = st.auth.registry.audit_newest(cursor, MAX_PAGE)?;
        let last = page.items.last().map(|e| e.seq);
        for e in page.items {
            scanned += 1;
            if f.from.is_some_and(|from| e.at < from) {
                // Older than the range, and so is everything after.
                return Ok((items, None));
            }
            let seq = e.seq;
            if f.admits(&e) {
                items.push(e);
                if items.len() == want {
                    return Ok((items, Some(seq)));
                }
            }
            if scanned >= scan {
                return Ok((items, Some(seq)));
            }
        }
        match (page.next, last) {
            (Some(_), Some(last)) => cursor = Some(last),
            _ => return Ok((items, None)),
        }
    }
}

/// The newest entries (up to `limit`) of an actor whose name starts with
/// `actor` (`claim:line-4` finds `claim:line-4 (est)` too), reading at
/// most [`SCAN`] entries.
pub(super) fn by_actor(
    st: &AppState,
    actor: &str,
    limit: usize,
) -> Result<Vec<AuditEntry>, provisioning::Error> {
    let f = Filter {
        actor: Some(actor.to_lowercase()),
        ..Filter::default()
    };
    let (items, _) = matching(st, &f, None, limit, SCAN)?;
    Ok(items
        .into_iter()
        .filter(|e| e.actor.to_lowercase().starts_with(&actor.to_lowercase()))
        .collect())
}

/// A page of the log.
#[derive(Debug, Serialize)]
pub(super) struct AuditPage {
    items: Vec<AuditEntry>,
    /// The `before` of the next (older) page, if there may be one.
    next: Option<String>,
}

/// One row of an export.
#[derive(Serialize)]
struct Row<'a> {
    seq: u64,
    at: String,
    actor: &'a str,
    action: &'a str,
    device: &'a str,
    serial: String,
    detail: &'a str,
}

/// `GET /console/api/audit`: see [`AuditQuery`].
pub(super) async fn audit(
    State(st): State<AppState>,
    _op: Operator,
    Query(q): Query<AuditQuery>,
) -> Result<Response, ApiError> {
    let f = Filter::from_query(&q)?;
    let format = q.format.as_deref().unwrap_or("");
    if !matches!(format, "" | "csv" | "json") {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("format {format:?}: csv or json"),
        ));
    }
    let (want, scan) = if format.is_empty() {
        (PAGE, SCAN)
    } else {
        (EXPORT_MAX, usize::MAX)
    };
    let (items, next) = {
        let (st, before) = (st.clone(), q.before);
        crate::api::blocking(move || matching(&st, &f, before, want, scan)).await?
    };
    match format {
        "csv" => {
            let mut w = csv::Writer::from_writer(Vec::new());
            for e in &items {
                w.serialize(Row {
                    seq: e.seq,
                    at: e.at.format(&Rfc3339).unwrap_or_default(),
                    actor: &e.actor,
                    action: &e.action,
                    device: e.device.as_ref().map_or("", DeviceId::as_str),
                    serial: e.serial.as_ref().map(|s| s.to_hex()).unwrap_or_default(),
                    detail: &e.detail,
                })
                .map_err(internal)?;
            }
            let body = w.into_inner().map_err(internal)?;
            Ok(download("text/csv; charset=utf-8", "audit.csv", body))
        }
        "json" => {
            let body = serde_json::to_vec_pretty(&items).map_err(internal)?;
            Ok(download("application/json", "audit.json", body))
        }
        _ => Ok(Json(AuditPage {
            items,
            next: next.map(|n| n.to_string()),
        })
        .into_response()),
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "console: writing an audit export");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error; see the server log",
    )
}

fn download(content_type: &'static str, name: &str, body: Vec<u8>) -> Response {
    (
        [
            (CONTENT_TYPE, content_type.to_owned()),
            (
                CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        body,
    )
        .into_response()
}
