//! A small MQTT 3.1.1 client over mutual TLS for the run's devices and
//! services: one operation at a time, each with its own outcome, which is
//! what a history needs (an event loop that retries by itself would hide
//! them). Packets are rumqttc's codec; TLS is rustls.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::{ConnectReturnCode, Packet, PubAck, Publish, QoS, Subscribe, SubscribeReasonCode};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Packets up to this size.
const MAX_PACKET: usize = 64 * 1024;

/// How an operation failed: the server said no, or no answer came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// A TLS alert, a CONNACK refusal, a SUBACK failure: what it said.
    Refused(String),
    /// A timeout, a closed connection: it may or may not have happened.
    Unknown(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused(w) => write!(f, "refused: {w}"),
            Failure::Unknown(w) => write!(f, "unknown: {w}"),
        }
    }
}

/// An I/O error as a failure: a TLS alert the server sent is a refusal.
fn io_failure(e: &std::io::Error) -> Failure {
    if let Some(rustls::Error::AlertReceived(alert)) =
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
    {
        return Failure::Refused(format!("tls alert {alert:?}"));
    }
    Failure::Unknown(e.to_string())
}

/// An open connection.
#[allow(missing_debug_implementations)] // a TLS stream
pub struct Conn {
    tls: TlsStream<TcpStream>,
    buf: BytesMut,
    pkid: u16,
    /// Messages that arrived while waiting for something else.
    pub inbox: Vec<Publish>,
}

impl Conn {
    /// Connects as `client_id` (TLS to `addr`, then CONNECT and CONNACK)
    /// within `within`; `clean`: a clean session. Returns whether the
    /// server had a session.
    pub async fn connect(
        addr: SocketAddr,
        tls: Arc<ClientConfig>,
        client_id: &str,
        clean: bool,
        within: Duration,
    ) -> Result<(Conn, bool), Failure> {
        let name = ServerName::IpAddress(addr.ip().into());
        let attempt = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| Failure::Unknown(format!("tcp: {e}")))?;
            let _ = tcp.set_nodelay(true);
            let tls = TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| io_failure(&e))?;
            let mut conn = Conn {
                tls,
                buf: BytesMut::with_capacity(4096),
                pkid: 0,
                inbox: Vec::new(),
            };
            let mut connect = rumqttc::Connect::new(client_id);
            connect.keep_alive = 60;
            connect.clean_session = clean;
            conn.send(&Packet::Connect(connect)).await?;
            match conn.read().await? {
                Packet::ConnAck(a) if a.code == ConnectReturnCode::Success => {
                    Ok((conn, a.session_present))
                }
                Packet::ConnAck(a) => Err(Failure::Refused(format!("connack {:?}", a.code))),
                other => Err(Failure::Unknown(format!("{other:?} before CONNACK"))),
            }
        };
        tokio::time::timeout(within, attempt)
            .await
            .unwrap_or_else(|_| Err(Failure::Unknown("no CONNACK in time".into())))
    }

    async fn send(&mut self, p: &Packet) -> Result<(), Failure> {
        let mut out = BytesMut::new();
        p.write(&mut out, MAX_PACKET)
            .map_err(|e| Failure::Unknown(format!("encoding: {e}")))?;
        self.tls.write_all(&out).await.map_err(|e| io_failure(&e))?;
        self.tls.flush().await.map_err(|e| io_failure(&e))
    }

    /// The next packet (no time limit: callers bound it).
    async fn read(&mut self) -> Result<Packet, Failure> {
        loop {
            match Packet::read(&mut self.buf, MAX_PACKET) {
                Ok(p) => return Ok(p),
                Err(rumqttc::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(Failure::Unknown(format!("decoding: {e}"))),
            }
            let n = self
                .tls
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| io_failure(&e))?;
            if n == 0 {
                return Err(Failure::Unknown("connection closed".into()));
            }
        }
    }

    fn next_pkid(&mut self) -> u16 {
        self.pkid = self.pkid % u16::MAX + 1;
        self.pkid
    }

    /// SUBSCRIBE at QoS 1 and its SUBACK.
    pub async fn subscribe(&mut self, filter: &str, within: Duration) -> Result<(), Failure> {
        let mut sub = Subscribe::new(filter, QoS::AtLeastOnce);
        sub.pkid = self.next_pkid();
        let pkid = sub.pkid;
        self.send(&Packet::Subscribe(sub)).await?;
        let wait = async {
            loop {
                match self.read().await? {
                    Packet::SubAck(a) if a.pkid == pkid => {
                        return match a.return_codes.first() {
                            Some(SubscribeReasonCode::Success(_)) => Ok(()),
                            _ => Err(Failure::Refused("suback failure".into())),
                        };
                    }
                    p => self.other(p).await?,
                }
            }
        };
        tokio::time::timeout(within, wait)
            .await
            .unwrap_or_else(|_| Err(Failure::Unknown("no SUBACK in time".into())))
    }

    /// A QoS 1 PUBLISH and its PUBACK.
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        within: Duration,
    ) -> Result<(), Failure> {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
        p.pkid = self.next_pkid();
        let pkid = p.pkid;
        self.send(&Packet::Publish(p)).await?;
        let wait = async {
            loop {
                match self.read().await? {
                    Packet::PubAck(a) if a.pkid == pkid => return Ok(()),
                    p => self.other(p).await?,
                }
            }
        };
        tokio::time::timeout(within, wait)
            .await
            .unwrap_or_else(|_| Err(Failure::Unknown("no PUBACK in time".into())))
    }

    /// Waits up to `within` for messages; they go to [`Conn::inbox`]. An
    /// error only if the connection ended.
    pub async fn idle(&mut self, within: Duration) -> Result<(), Failure> {
        let wait = async {
            loop {
                let p = self.read().await?;
                self.other(p).await?;
            }
        };
        match tokio::time::timeout(within, wait).await {
            Ok(r) => r,
            Err(_) => Ok(()),
        }
    }

    /// A packet nobody waited for: a PUBLISH is kept and acknowledged,
    /// once kept (at least once: a second copy is kept again).
    async fn other(&mut self, p: Packet) -> Result<(), Failure> {
        if let Packet::Publish(p) = p {
            let pkid = p.pkid;
            let qos = p.qos;
            self.inbox.push(p);
            if qos == QoS::AtLeastOnce {
                self.send(&Packet::PubAck(PubAck::new(pkid))).await?;
            }
        }
        Ok(())
    }

    /// DISCONNECT, then close.
    pub async fn disconnect(mut self) {
        let _ = self.send(&Packet::Disconnect).await;
        let _ = self.tls.shutdown().await;
    }
}

/// A connection's TLS config for `ca` and the identity (cert, key).
pub fn tls(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<Arc<ClientConfig>> {
    fleetgate_api::tls::install_crypto_provider();
    fleetgate_api::tls::client_config(ca, Some((cert, key)))
}

/// `addr` as a socket address.
pub fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap_or([127, 0, 0, 1].into()), port)
}
