//! Status answers over plain HTTP: the OCSP responder (RFC 6960, with the
//! RFC 5019 GET form) and CRLs, from the node's [`StatusService`].
//!
//! - `POST /` with `application/ocsp-request`
//! - `GET /<base64 request, URL-encoded>`
//! - `GET /crl/issuing.crl`: DER, re-signed after every change and daily;
//!   `/crl/root.crl` (revoked manufacturer CAs) and `/crl/<manufacturer>.crl`
//!   for each manufacturer CA fleetgate issued
//!
//! Bodies over 64 KiB get HTTP 413: never a panic.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use fleetgate_mqtt::status::{decode_base64, StatusService};
use provisioning::ocsp::{Answer, MAX_REQUEST_LEN};
use time::OffsetDateTime;

pub fn router(status: Arc<StatusService>) -> Router {
    Router::new()
        .route("/", post(post_ocsp))
        .route("/crl/{name}", get(get_crl))
        .route("/{*request}", get(get_ocsp))
        .layer(DefaultBodyLimit::max(MAX_REQUEST_LEN))
        .with_state(status)
}

/// An HTTP answer to an OCSP request. A GET's successful answer may be
/// cached by HTTP caches (RFC 5019 6.2): max-age never past nextUpdate,
/// with Last-Modified (thisUpdate), Expires (nextUpdate) and an ETag.
fn ocsp_response(a: Answer, cacheable: bool) -> Response {
    let mut headers = vec![(header::CONTENT_TYPE, "application/ocsp-response".to_owned())];
    if let (true, Some(this), Some(next)) = (cacheable, a.this_update, a.next_update) {
        let max_age = (next - OffsetDateTime::now_utc())
            .whole_seconds()
            .clamp(0, 600);
        headers.push((
            header::CACHE_CONTROL,
            format!("max-age={max_age}, public, no-transform, must-revalidate"),
        ));
        headers.push((header::LAST_MODIFIED, http_date(this)));
        headers.push((header::EXPIRES, http_date(next)));
        let digest = ring::digest::digest(&ring::digest::SHA256, &a.der);
        headers.push((
            header::ETAG,
            format!("\"{}\"", provisioning::id::hex(digest.as_ref())),
        ));
    }
    let mut resp = a.der.into_response();
    for (k, v) in headers {
        if let Ok(v) = axum::http::HeaderValue::from_str(&v) {
            resp.headers_mut().insert(k, v);
        }
    }
    resp
}

/// RFC 9110 IMF-fixdate: `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn http_date(t: OffsetDateTime) -> String {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    t.to_offset(time::UtcOffset::UTC)
        .format(FORMAT)
        .unwrap_or_default()
}

async fn answer(status: Arc<StatusService>, request: Vec<u8>) -> Result<Answer, Response> {
    tokio::task::spawn_blocking(move || status.answer(&request))
        .await
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn post_ocsp(
    State(status): State<Arc<StatusService>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.eq_ignore_ascii_case("application/ocsp-request") {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "OCSP requests are POSTed as application/ocsp-request\n",
        )
            .into_response();
    }
    match answer(status, body.to_vec()).await {
        Ok(a) => ocsp_response(a, false),
        Err(r) => r,
    }
}

async fn get_ocsp(
    State(status): State<Arc<StatusService>>,
    Path(encoded): Path<String>,
) -> Response {
    // axum has percent-decoded the path; RFC 5019 requests are base64.
    let request = decode_base64(encoded.trim_start_matches('/')).unwrap_or_default();
    match answer(status, request).await {
        Ok(a) => ocsp_response(a, true),
        Err(r) => r,
    }
}

async fn get_crl(State(status): State<Arc<StatusService>>, Path(name): Path<String>) -> Response {
    let Some(name) = name
        .strip_suffix(".crl")
        .filter(|n| provisioning::DeviceId::try_new(*n).is_ok())
        .map(str::to_owned)
    else {
        return (StatusCode::NOT_FOUND, "no such CRL\n").into_response();
    };
    match tokio::task::spawn_blocking(move || status.crl(&name)).await {
        Ok(Ok(Some(der))) => {
            ([(header::CONTENT_TYPE, "application/pkix-crl")], der).into_response()
        }
        Ok(Ok(None)) => (StatusCode::NOT_FOUND, "no such CRL\n").into_response(),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "building the CRL");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::http_date;

    #[test]
    fn http_dates() {
        let t = time::macros::datetime!(1994-11-06 08:49:37 UTC);
        assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
    }
}
