//! What every state change on the admin API must be, whoever presents the
//! admin certificate: not a cross-site request (an operator's browser
//! holding the admin certificate would otherwise sign any page's form
//! post), JSON, and not the removal of the last active admin.
//!
//! A browser sends `Sec-Fetch-Site` and `Origin` on a cross-site request
//! and cannot send `Content-Type: application/json` from a plain form:
//! either shows the request came from another site. The CLI, firmware-sim
//! and curl send neither header and label their bodies JSON.

use axum::extract::Request;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use provisioning::{DeviceId, Role, Status};

use super::{expect_content_type, ApiError, AppState};

/// Why a request is not the caller's own (a page of another site made the
/// browser send it), if it is not; `none_ok`: `Sec-Fetch-Site: none` (a
/// user typing the address, a bookmark) counts as the caller's own.
pub(crate) fn cross_site(headers: &HeaderMap, none_ok: bool) -> Option<&'static str> {
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    match text("sec-fetch-site") {
        None | Some("same-origin") => {}
        Some("none") if none_ok => {}
        Some(_) => return Some("a state change from another site (Sec-Fetch-Site)"),
    }
    if let Some(origin) = text("origin") {
        let own = text("host").is_some_and(|host| origin == format!("https://{host}"));
        if !own {
            return Some("a state change from another origin (Origin)");
        }
    }
    None
}

/// The refusal of a request to the JSON API that may not change
/// anything, if it may not: a cross-site request (403 `cross_site`), or a
/// body not labelled JSON (415). Safe methods pass.
pub(crate) fn refuse_change(method: &Method, headers: &HeaderMap) -> Option<ApiError> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return None;
    }
    if let Some(why) = cross_site(headers, true) {
        return Some(ApiError::new(StatusCode::FORBIDDEN, "cross_site", why));
    }
    expect_content_type(headers, "application/json")
        .err()
        .map(|given| {
            ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "a state change takes Content-Type: application/json (a body-less action \
                     takes {{}}), not {:?}",
                    crate::printable(given)
                ),
            )
        })
}

/// Middleware on the `/v1` routes: [`refuse_change`].
pub(crate) async fn json_api_only(req: Request, next: Next) -> Response {
    if req.uri().path().starts_with("/v1/") {
        if let Some(refusal) = refuse_change(req.method(), req.headers()) {
            let addr = req
                .extensions()
                .get::<crate::https::PeerAddr>()
                .map(|a| a.0);
            tracing::warn!(peer.addr = ?addr, path = %crate::printable(req.uri().path()), reason = %crate::printable(refusal.message()), "api: refused");
            return refusal.into_response();
        }
    }
    next.run(req).await
}

/// `?allow_last_admin=true`: the explicit override.
#[derive(Debug, Default, serde::Deserialize)]
pub struct LastAdmin {
    #[serde(default)]
    pub allow_last_admin: bool,
}

/// Refuses (409 `last_admin`) to take `ids` out of service when they are
/// every active admin there is: nobody could sign in to undo it. Only
/// admins among `ids` cost a look at the others.
pub(crate) async fn keep_an_admin(
    st: &AppState,
    ids: &[DeviceId],
    allow: &LastAdmin,
) -> Result<(), ApiError> {
    if allow.allow_last_admin {
        return Ok(());
    }
    let auth = st.auth.clone();
    let ids = ids.to_vec();
    let left = super::blocking(move || {
        let r = &auth.registry;
        let mut leaving = Vec::new();
        // A device's role never changes: the view answers.
        let recent = r.recent();
        for id in &ids {
            match recent.device(id) {
                Ok(d) if d.role == Role::Admin && d.status == Status::Active => leaving.push(d.id),
                Ok(_) | Err(provisioning::Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        if leaving.is_empty() {
            return Ok(None);
        }
        // Active admins are few; the status index walks active ones only.
        let mut after: Option<String> = None;
        loop {
            let page = r.list(Some(Status::Active), after.as_deref(), 1000)?;
            if page
                .items
                .iter()
                .any(|d| d.role == Role::Admin && !leaving.contains(&d.id))
            {
                return Ok(None);
            }
            match page.next {
                Some(n) => after = Some(n),
                None => return Ok(Some(leaving)),
            }
        }
    })
    .await?;
    match left {
        None => Ok(()),
        Some(leaving) => {
            let names: Vec<String> = leaving.iter().map(ToString::to_string).collect();
            let why = format!(
                "{} the last active admin: nobody could sign in to undo this \
                 (add ?allow_last_admin=true to do it anyway)",
                if names.len() == 1 {
                    format!("{} is", names[0])
                } else {
                    format!("{} are", names.join(", "))
                }
            );
            tracing::warn!(reason = %crate::printable(&why), "api: refused");
            Err(ApiError::new(StatusCode::CONFLICT, "last_admin", why))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                *k,
                v.parse().unwrap_or_else(|_| unreachable!("a test header")),
            );
        }
        h
    }

    #[test]
    fn a_cross_site_form_post_changes_nothing() {
        let attack = headers(&[
            ("host", "127.0.0.1:8443"),
            ("origin", "https://evil.example"),
            ("sec-fetch-site", "cross-site"),
            ("content-type", "application/x-www-form-urlencoded"),
        ]);
        let code = |m: &Method, h: &HeaderMap| refuse_change(m, h).map(|e| e.code());
        assert_eq!(code(&Method::POST, &attack), Some("cross_site"));
        // Each signal alone is enough.
        for h in [
            headers(&[
                ("sec-fetch-site", "same-site"),
                ("content-type", "application/json"),
            ]),
            headers(&[
                ("host", "127.0.0.1:8443"),
                ("origin", "https://evil.example"),
                ("content-type", "application/json"),
            ]),
            headers(&[
                ("host", "127.0.0.1:8443"),
                ("origin", "null"),
                ("content-type", "application/json"),
            ]),
            headers(&[("content-type", "text/plain")]),
            headers(&[]),
        ] {
            assert!(refuse_change(&Method::POST, &h).is_some(), "{h:?}");
            assert!(refuse_change(&Method::DELETE, &h).is_some(), "{h:?}");
        }
        // Reading is not a change.
        assert_eq!(code(&Method::GET, &attack), None);
        let form = headers(&[("content-type", "text/plain")]);
        assert_eq!(code(&Method::POST, &form), Some("unsupported_media_type"));
    }

    #[test]
    fn the_cli_and_the_operators_own_page_pass() {
        for h in [
            headers(&[
                ("host", "127.0.0.1:8443"),
                ("content-type", "application/json"),
            ]),
            headers(&[("content-type", "Application/JSON; charset=utf-8")]),
            headers(&[
                ("host", "127.0.0.1:8443"),
                ("origin", "https://127.0.0.1:8443"),
                ("sec-fetch-site", "same-origin"),
                ("content-type", "application/json"),
            ]),
            headers(&[
                ("sec-fetch-site", "none"),
                ("content-type", "application/json"),
            ]),
        ] {
            let refused = refuse_change(&Method::POST, &h).map(|e| e.message().to_owned());
            assert_eq!(refused, None, "{h:?}");
        }
        // The console wants same-origin only.
        assert!(cross_site(&headers(&[("sec-fetch-site", "none")]), false).is_some());
    }
}
