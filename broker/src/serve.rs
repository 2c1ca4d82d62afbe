//! `fleetgate serve`: every listener in one process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use provisioning::{Authority, InitOptions};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};

use crate::api::{self, AppState};
use crate::https;
use crate::tls;

#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub api_listen: SocketAddr,
    pub server_sans: Vec<String>,
    pub cert_lifetime: time::Duration,
    pub limits: https::Limits,
}

/// A server whose listeners are bound and whose data dir is open.
#[derive(Debug)]
pub struct Server {
    cfg: ServeConfig,
    auth: Arc<Authority>,
    api: TcpListener,
}

impl Server {
    /// Opens (or creates) the data dir and binds every listener. Errors here
    /// are configuration errors.
    pub async fn bind(cfg: ServeConfig) -> anyhow::Result<Self> {
        let dir = cfg.data_dir.clone();
        let opts = InitOptions {
            server_sans: cfg.server_sans.clone(),
        };
        let auth = tokio::task::spawn_blocking(move || Authority::open_or_init(&dir, &opts))
            .await
            .context("opening the data dir")??;
        let api = TcpListener::bind(cfg.api_listen)
            .await
            .with_context(|| format!("binding the admin API to {}", cfg.api_listen))?;
        Ok(Self {
            cfg,
            auth: Arc::new(auth),
            api,
        })
    }

    pub fn api_addr(&self) -> SocketAddr {
        // A bound listener always has a local address.
        self.api.local_addr().unwrap_or(self.cfg.api_listen)
    }

    pub fn authority(&self) -> &Arc<Authority> {
        &self.auth
    }

    /// Serves until `shutdown` turns true, then drains and flushes.
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let paths = &self.auth.paths;
        let api_tls = tls::api_server_config(
            self.auth.ca.root_der(),
            &paths.server_cert(),
            &paths.server_key(),
        )?;
        let (changes, _) = broadcast::channel(1024);
        let state = AppState {
            auth: self.auth.clone(),
            cert_lifetime: self.cfg.cert_lifetime,
            changes,
        };
        tracing::info!(api = %self.api_addr(), devices = self.auth.registry.device_count(), "serving");
        https::serve(
            "api",
            self.api,
            api_tls,
            api::router(state),
            self.cfg.limits.clone(),
            shutdown,
        )
        .await;
        let auth = self.auth.clone();
        tokio::task::spawn_blocking(move || auth.registry.flush())
            .await
            .context("flushing the registry")??;
        tracing::info!("stopped; registry flushed");
        Ok(())
    }
}

/// A shutdown signal: turns true on SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> anyhow::Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let which = tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        };
        tracing::info!(signal = which, "shutting down");
        let _ = tx.send(true);
    });
    Ok(rx)
}
