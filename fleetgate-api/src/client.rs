//! A client for the admin API: HTTPS with a client certificate.
//!
//! One connection per request: the CLI makes one or two requests a run, and
//! a fleet simulator enrolling thousands of devices gets spread over the
//! server's workers.

use std::sync::Arc;

use anyhow::{anyhow, Context};
use http_body_util::{BodyExt, Full};
pub use hyper::body::Bytes;
pub use hyper::{Method, StatusCode};
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use provisioning::registry::DeviceView;

use crate::types::{EnrollBody, Enrolled, ErrorBody, RevokeBatchBody, RevokeBody, Stats};

/// An error answer from the API, with its stable code.
#[derive(Debug, thiserror::Error)]
#[error("{message} ({code}, HTTP {status})")]
pub struct ApiFailure {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
}

#[derive(Clone)]
pub struct ApiClient {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    tls: TlsConnector,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl ApiClient {
    /// `base` is `https://host:port`.
    pub fn new(base: &str, tls: Arc<ClientConfig>) -> anyhow::Result<Self> {
        let uri: Uri = base.parse().with_context(|| format!("API URL {base:?}"))?;
        if uri.scheme_str() != Some("https") {
            return Err(anyhow!("API URL {base:?} must start with https://"));
        }
        let host = uri
            .host()
            .ok_or_else(|| anyhow!("API URL {base:?} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let server_name =
            ServerName::try_from(host.clone()).with_context(|| format!("API host {host:?}"))?;
        Ok(Self {
            port: uri.port_u16().unwrap_or(443),
            host,
            server_name,
            tls: TlsConnector::from(tls),
        })
    }

    /// Enrolls a device or service from its CSR: `POST /v1/devices`.
    pub async fn enroll(&self, body: &EnrollBody) -> anyhow::Result<Enrolled> {
        self.post("/v1/devices", body).await
    }

    /// A device with its certificates: `GET /v1/devices/{id}`.
    pub async fn device(&self, id: &str) -> anyhow::Result<DeviceView> {
        self.get(&format!("/v1/devices/{id}")).await
    }

    /// Revokes a device for `reason` (RFC 5280's names, kebab-case:
    /// `key-compromise`); `None` is unspecified.
    pub async fn revoke(&self, id: &str, reason: Option<&str>) -> anyhow::Result<DeviceView> {
        let body = RevokeBody {
            reason: reason.map(str::to_owned),
        };
        self.post(&format!("/v1/devices/{id}/revoke"), &body).await
    }

    /// Revokes many devices at once (by ids, or a manufacturer's lot).
    pub async fn revoke_batch(
        &self,
        body: &RevokeBatchBody,
    ) -> anyhow::Result<provisioning::BulkRevocation> {
        self.post("/v1/devices/revoke-batch", body).await
    }

    pub async fn suspend(&self, id: &str) -> anyhow::Result<DeviceView> {
        self.post(&format!("/v1/devices/{id}/suspend"), &serde_json::json!({}))
            .await
    }

    pub async fn resume(&self, id: &str) -> anyhow::Result<DeviceView> {
        self.post(&format!("/v1/devices/{id}/resume"), &serde_json::json!({}))
            .await
    }

    /// Device and session counts, and the server's counters.
    pub async fn stats(&self) -> anyhow::Result<Stats> {
        self.get("/v1/stats").await
    }

    pub async fn get<R: DeserializeOwned>(&self, path: &str) -> anyhow::Result<R> {
        self.call(Method::GET, path, None::<&()>).await
    }

    pub async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<R> {
        self.call(Method::POST, path, Some(body)).await
    }

    async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<R> {
        let (status, bytes) = self.raw(method, path, body).await?;
        if status.is_success() {
            serde_json::from_slice(&bytes).context("API answer does not parse")
        } else {
            match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(e) => Err(ApiFailure {
                    status,
                    code: e.error.code,
                    message: e.error.message,
                }
                .into()),
                Err(_) => Err(anyhow!(
                    "API answered HTTP {status}: {}",
                    String::from_utf8_lossy(&bytes)
                )),
            }
        }
    }

    /// One request with a JSON body; the status and body as they came.
    pub async fn raw<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let body = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b).context("encoding the request")?),
            None => Bytes::new(),
        };
        self.send(method, path, body).await
    }

    /// One request with `body` sent as it is, labelled JSON.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        self.send_as(method, path, "application/json", body).await
    }

    /// One request with `body` sent as it is, labelled `content_type`
    /// (EST's `application/pkcs10`, CMP's `application/pkixcmp`).
    pub async fn send_as(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Bytes,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .with_context(|| format!("connecting to the API at {}:{}", self.host, self.port))?;
        let _ = tcp.set_nodelay(true);
        let tls = match self.tls.connect(self.server_name.clone(), tcp).await {
            Ok(tls) => tls,
            Err(e) => {
                let hint = not_the_api(&e)
                    .map(|h| {
                        format!(
                            ": {h}; --api takes the admin API's address (serve's --api-listen, \
                             by default https://127.0.0.1:8443)"
                        )
                    })
                    .unwrap_or_default();
                return Err(anyhow::Error::new(e).context(format!(
                    "TLS handshake with the API at {}:{}{hint}",
                    self.host, self.port
                )));
            }
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .context("HTTP handshake with the API")?;
        // The connection's own error is kept: when the server ends the
        // connection before the request goes out, the request fails only
        // with "canceled" and the reason is here.
        let conn = tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, format!("{}:{}", self.host, self.port))
            .header(hyper::header::CONTENT_TYPE, content_type)
            .body(Full::new(body))
            .context("building the request")?;
        // TLS 1.3: a server that refuses the client's certificate says so
        // after the handshake, at the first read.
        let resp = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                let why = match tokio::time::timeout(std::time::Duration::from_secs(5), conn).await
                {
                    Ok(Ok(Err(why))) => Some(why),
                    _ => None,
                };
                let hint = not_the_api_in(&e)
                    .or_else(|| why.as_ref().and_then(|w| not_the_api_in(w)))
                    .map(|h| {
                        format!(
                            " ({}:{}: {h}; --api takes the admin API's address, serve's \
                         --api-listen, by default https://127.0.0.1:8443)",
                            self.host, self.port
                        )
                    });
                let ended = why
                    .filter(|_| hint.is_none())
                    .map(|w| format!(" (the connection ended: {w})"))
                    .unwrap_or_default();
                return Err(anyhow::Error::new(e)
                    .context(format!("API request{}{ended}", hint.unwrap_or_default())));
            }
        };
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .context("reading the API answer")?
            .to_bytes();
        Ok((status, bytes))
    }
}

/// [`not_the_api`] for an error anywhere in `e`'s chain of sources.
fn not_the_api_in(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(hint) = not_the_api(io) {
                return Some(hint);
            }
        }
        next = e.source();
    }
    None
}

/// What a failed handshake says about the server, when it is plainly not
/// fleetgate's admin API: another of its ports.
fn not_the_api(e: &std::io::Error) -> Option<&'static str> {
    let e = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    match e {
        // Plain bytes where a TLS record should be: an HTTP listener.
        rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType) => Some(
            "the server there does not speak TLS (fleetgate's OCSP/CRL and metrics ports are \
             plain HTTP)",
        ),
        // fleetgate's MQTT port refuses an admin's certificate.
        rustls::Error::AlertReceived(rustls::AlertDescription::AccessDenied) => Some(
            "the server there refused an admin's certificate (fleetgate's MQTT port does: \
             admins use the API)",
        ),
        _ => None,
    }
}
