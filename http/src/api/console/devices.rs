//! The console's device list: in the order people read ids (`dev-2`
//! before `dev-10`), searched by id prefix (one stretch of the id order,
//! whatever the fleet's size) or inside ids (a bounded scan), filtered by
//! status, role, connection (to any node that answers, and which) and
//! expiry (soonest first, from the registry's expiry index), a page at a
//! time with each row's certificate expiry.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use provisioning::registry::DeviceRecord;
use provisioning::{DeviceId, Status};
use serde::{Deserialize, Serialize};

use super::{Operator, PAGE};
use crate::api::{ApiError, AppState};

/// Devices looked at to answer one search page.
const SEARCH_SCAN: usize = 50_000;

#[derive(Debug, Deserialize)]
pub(super) struct DevicesQuery {
    /// Part of the id, or a manufacturer's name.
    q: Option<String>,
    status: Option<String>,
    /// `device`, `service`, `admin`, `claim` or `node`; any if absent.
    role: Option<String>,
    /// Only those connected, to any node that answers.
    #[serde(default)]
    connected: bool,
    /// Only active devices whose certificates in good standing all expire
    /// within this many days, soonest first.
    expiring: Option<u32>,
    after: Option<String>,
}

#[derive(Debug, Serialize)]
struct DeviceRow {
    id: DeviceId,
    role: provisioning::Role,
    status: Status,
    manufacturer: Option<String>,
    connected: bool,
    /// The nodes it is connected to (usually one).
    nodes: Vec<String>,
    /// When its last certificate in good standing expires.
    #[serde(with = "time::serde::rfc3339::option")]
    expires: Option<time::OffsetDateTime>,
    /// When it last connected or left (any node; to within the nodes'
    /// write interval, 30 s).
    #[serde(with = "time::serde::rfc3339::option")]
    last_seen: Option<time::OffsetDateTime>,
}

#[derive(Debug, Serialize)]
pub(super) struct DevicePage {
    items: Vec<DeviceRow>,
    next: Option<String>,
    /// Every principal in the registry, when nothing filters the list.
    total: Option<usize>,
}

pub(super) async fn devices(
    State(st): State<AppState>,
    _op: Operator,
    Query(q): Query<DevicesQuery>,
) -> Result<Json<DevicePage>, ApiError> {
    let status = q
        .status
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<Status>())
        .transpose()?;
    let role = q
        .role
        .as_deref()
        .filter(|r| !r.is_empty())
        .map(|r| {
            r.parse::<provisioning::Role>().map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    format!("role {r:?}: device, service, admin, claim or node"),
                )
            })
        })
        .transpose()?;
    let text = q.q.unwrap_or_default().trim().to_owned();
    let unfiltered = text.is_empty()
        && status.is_none()
        && role.is_none()
        && !q.connected
        && q.expiring.is_none();
    if q.expiring.is_some_and(|d| d == 0 || d > 3650) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "expiring: a number of days from 1 to 3650",
        ));
    }
    let needle = text.to_lowercase();
    let auth = st.auth.clone();
    let broker = st.broker.clone();
    let wanted = move |d: &DeviceRecord| {
        status.is_none_or(|s| s == d.status)
            && role.is_none_or(|r| r == d.role)
            && (needle.is_empty()
                || d.id.as_str().to_lowercase().contains(&needle)
                || d.manufacturer
                    .as_deref()
                    .is_some_and(|m| m.to_lowercase() == needle))
    };
    // Those connected: every node's sessions, in id order.
    let connected = match q.connected {
        true => Some(broker.connected_anywhere(q.after.as_deref(), PAGE).await),
        false => None,
    };
    let find = move || -> Result<Found, provisioning::Error> {
        // What an operator looks through reads the node's view of the
        // registry (on etcd, milliseconds behind the cluster; its own
        // writes already in it): a search is no scan of etcd.
        let registry = auth.registry.recent();
        if let Some((ids, more)) = connected {
            let next = more.then(|| ids.last().map(|i| i.to_string())).flatten();
            let mut found = Vec::new();
            for id in ids {
                match registry.device(&id) {
                    Ok(d) if wanted(&d) => found.push(d),
                    Ok(_) | Err(provisioning::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            return Ok((found, next));
        }
        if let Some(days) = q.expiring {
            let now = time::OffsetDateTime::now_utc();
            let until = now + time::Duration::days(days.into());
            let mut after = q.after;
            let mut found = Vec::new();
            let mut scanned = 0;
            // Each page of the index read is filtered like the others.
            loop {
                let want = PAGE - found.len();
                let page = registry.expiring(now, until, after.as_deref(), want)?;
                scanned += page.items.len();
                found.extend(page.items.into_iter().map(|e| e.device).filter(&wanted));
                after = page.next;
                if after.is_none() || found.len() >= PAGE || scanned >= SEARCH_SCAN {
                    return Ok((found, after));
                }
            }
        }
        // Ids that start with the text are one stretch of the id order:
        // read there, however large the fleet (unless the text names a
        // manufacturer, whose devices are searched for below).
        if !text.is_empty() && registry.manufacturer(&text)?.is_none() {
            if let Some((mut found, next)) =
                by_prefix(&registry, status, &text, q.after.as_deref())?
            {
                found.retain(|d| role.is_none_or(|r| r == d.role));
                return Ok((found, next));
            }
        }
        let after = q.after;
        if !text.is_empty() && status.is_none() {
            // A search inside ids: one read of the id order, as far as
            // it must go.
            return pick(registry.devices_after(after.as_deref()), &wanted);
        }
        // In the order people read ids (dev-2 before dev-10); a search
        // inside ids reads the id order itself, one read a device where
        // the sorted index takes two, so that its bounded scan stays fast.
        // With no text and no role to filter by (a status is the index's),
        // every device read is shown: read no more than a page (on etcd
        // each device is a request).
        let shown = text.is_empty() && role.is_none();
        let (mut next, mut more, mut read) = (after, true, 0);
        let mut page = Vec::new().into_iter();
        let pages = std::iter::from_fn(|| loop {
            if let Some(d) = page.next() {
                read += 1;
                return Some(Ok(d));
            }
            if !more {
                return None;
            }
            let want = if shown {
                PAGE - read.min(PAGE - 1)
            } else {
                500
            };
            let got = match text.is_empty() {
                true => registry.list_sorted(status, next.as_deref(), want),
                false => registry.list(status, next.as_deref(), want),
            };
            match got {
                Ok(p) => {
                    more = p.next.is_some();
                    next = p.next;
                    page = p.items.into_iter();
                }
                Err(e) => {
                    more = false;
                    return Some(Err(e));
                }
            }
        });
        pick(pages, &wanted)
    };
    let auth = st.auth.clone();
    let broker = st.broker.clone();
    let (found, next, expiries, seen, total) = crate::api::blocking(move || {
        let (found, next) = find()?;
        // Each row's latest certificate in good standing: one read each.
        let recent = auth.registry.recent();
        let expiries = found
            .iter()
            .map(|d| {
                Ok(recent
                    .device_view(&d.id)?
                    .certificates
                    .iter()
                    .filter(|c| c.status == "good")
                    .map(|c| c.record.not_after)
                    .max())
            })
            .collect::<Result<Vec<_>, provisioning::Error>>()?;
        let seen: Vec<_> = found.iter().map(|d| broker.last_seen(&d.id)).collect();
        let total = unfiltered.then(|| auth.registry.device_count());
        Ok((found, next, expiries, seen, total))
    })
    .await?;
    let ids: Vec<DeviceId> = found.iter().map(|d| d.id.clone()).collect();
    let mut nodes: std::collections::HashMap<DeviceId, Vec<String>> = Default::default();
    for (id, s) in st.broker.sessions_anywhere(&ids).await {
        nodes.entry(id).or_default().push(s.node);
    }
    let items = found
        .into_iter()
        .zip(expiries)
        .zip(seen)
        .map(|((d, expires), last_seen)| DeviceRow {
            nodes: nodes.remove(&d.id).unwrap_or_default(),
            connected: false,
            id: d.id,
            role: d.role,
            status: d.status,
            manufacturer: d.manufacturer,
            expires,
            last_seen,
        })
        .map(|mut r: DeviceRow| {
            r.connected = !r.nodes.is_empty();
            r
        })
        .collect();
    Ok(Json(DevicePage { items, next, total }))
}

/// A page of devices found, and the id to go on after if there are more.
type Found = (Vec<DeviceRecord>, Option<String>);

/// The devices `wanted` keeps of those `devices` reads in id order: a
/// page of them, and where the next page starts (`None`: no more), after
/// reading at most [`SEARCH_SCAN`].
fn pick(
    devices: impl Iterator<Item = Result<DeviceRecord, provisioning::Error>>,
    wanted: &dyn Fn(&DeviceRecord) -> bool,
) -> Result<Found, provisioning::Error> {
    let mut found = Vec::new();
    for (scanned, d) in (1..).zip(devices) {
        let d = d?;
        let after = Some(d.id.to_string());
        if wanted(&d) {
            found.push(d);
            if found.len() == PAGE {
                return Ok((found, after));
            }
        }
        if scanned >= SEARCH_SCAN {
            return Ok((found, after));
        }
    }
    Ok((found, None))
}

/// A page of the devices whose ids start with `text` (with `status`),
/// after `after`; `None` if none there does (the search then looks inside
/// ids, a bounded scan).
fn by_prefix(
    registry: &provisioning::Registry,
    status: Option<Status>,
    text: &str,
    after: Option<&str>,
) -> Result<Option<Found>, provisioning::Error> {
    let mut found = Vec::new();
    // The id that is the text itself comes first; `list` reads after it.
    let from = match after {
        Some(a) if a >= text => a.to_owned(),
        _ => {
            if let Ok(id) = DeviceId::try_new(text) {
                match registry.device(&id) {
                    Ok(d) if status.is_none_or(|s| s == d.status) => found.push(d),
                    Ok(_) | Err(provisioning::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            text.to_owned()
        }
    };
    let page = registry.list(status, Some(&from), PAGE + 1)?;
    let mut more = false;
    for d in page.items {
        if !d.id.as_str().starts_with(text) {
            break;
        }
        if found.len() == PAGE {
            more = true;
            break;
        }
        found.push(d);
    }
    if found.is_empty() {
        // Nothing (more) starts with it: the caller searches inside ids.
        return Ok(None);
    }
    let next = more
        .then(|| found.last().map(|d| d.id.to_string()))
        .flatten();
    Ok(Some((found, next)))
}
