//! `fleetgate serve`: its options, parsed into a `ServeConfig`, and the
//! offline `fleetgate check` of a data dir.

use super::*;

#[derive(Args, Debug)]
pub(super) struct ServeArgs {
    /// A configuration file (TOML) with any of these options, under the
    /// names of their flags; flags and FLEETGATE_* variables win over it
    /// (`fleetgate config example` prints one with every default). SIGHUP
    /// reads it again.
    #[arg(help_heading = "General", long, env = "FLEETGATE_CONFIG")]
    pub(super) config: Option<PathBuf>,
    /// What is logged, as `FLEETGATE_LOG` or RUST_LOG filters say it
    /// (`info`, `debug`, `info,broker::mqtt=debug`); SIGHUP applies a new
    /// value from the configuration file.
    #[arg(help_heading = "General", long, env = "FLEETGATE_LOG", default_value = super::DEFAULT_LOG)]
    pub(super) log_level: String,
    /// Where the CA, keys and registry live.
    #[arg(
        help_heading = "General",
        long,
        env = "FLEETGATE_DATA_DIR",
        default_value = "fleetgate-data"
    )]
    data_dir: PathBuf,
    /// The PIN of the PKCS#11 token the CA and signer keys are in (a file
    /// only its owner reads; first line). Needed when `ca init
    /// --ca-key-uri` put them there.
    #[arg(help_heading = "General", long, env = "FLEETGATE_PIN_FILE")]
    pin_file: Option<PathBuf>,
    /// Admin API address (HTTPS, mutual TLS).
    #[arg(
        help_heading = "Listeners",
        long,
        default_value = "127.0.0.1:8443",
        env = "FLEETGATE_API_LISTEN"
    )]
    api_listen: SocketAddr,
    /// MQTT address (TLS only, client certificates required).
    #[arg(
        help_heading = "Listeners",
        long,
        default_value = "127.0.0.1:8883",
        env = "FLEETGATE_MQTT_LISTEN"
    )]
    mqtt_listen: SocketAddr,
    /// OCSP responder and CRL address (plain HTTP).
    #[arg(
        help_heading = "Listeners",
        long,
        default_value = "127.0.0.1:8080",
        env = "FLEETGATE_OCSP_LISTEN"
    )]
    ocsp_listen: SocketAddr,
    /// Prometheus metrics address (plain HTTP, GET /metrics); off unless given.
    #[arg(help_heading = "Listeners", long, env = "FLEETGATE_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Public base URL of the OCSP/CRL service, written into issued
    /// certificates (default: http://OCSP_LISTEN).
    #[arg(help_heading = "Listeners", long, env = "FLEETGATE_PUBLIC_URL")]
    public_url: Option<String>,
    /// Extra DNS names or IPs for the server certificate.
    #[arg(help_heading = "Listeners", long = "san", env = "FLEETGATE_SAN")]
    sans: Vec<String>,
    /// MiB of the data dir's database (the embedded registry, or a cluster
    /// node's MQTT sessions) kept in memory at most, beyond what is being
    /// read: sled's page cache. Most of the resident memory of a node
    /// with a large registry; at a million devices, 1024 holds every
    /// certificate record admission reads (p99 18 µs, 256: 130 µs). On
    /// etcd, also about what the node's view of the registry reads ahead
    /// of its fleet: certificate and device records, half each.
    #[arg(
        help_heading = "General",
        long,
        default_value_t = 1024,
        value_parser = clap::value_parser!(u64).range(16..=65536),
        env = "FLEETGATE_REGISTRY_CACHE_MIB"
    )]
    registry_cache_mib: u64,
    /// Where the registry lives: the embedded one in the data dir (the
    /// default), or `etcd://host:port[,host:port...]`, an etcd cluster that
    /// several nodes share (each with the same CA in its data dir).
    #[arg(help_heading = "Registry store (a cluster on etcd)", long, value_parser = parse_store, env = "FLEETGATE_STORE")]
    store: Option<EtcdEndpoints>,
    /// With --store https://: the CA (PEM) that signed etcd's certificates
    /// (etcdctl's --cacert).
    #[arg(
        help_heading = "Registry store (a cluster on etcd)",
        long,
        env = "FLEETGATE_STORE_CA"
    )]
    store_ca: Option<PathBuf>,
    /// With --store https://: this node's client certificate (PEM; its CN
    /// is the etcd user, e.g. from `fleetgate node enroll`).
    #[arg(
        help_heading = "Registry store (a cluster on etcd)",
        long,
        requires = "store_key",
        env = "FLEETGATE_STORE_CERT"
    )]
    store_cert: Option<PathBuf>,
    /// With --store https://: the key of --store-cert (PEM).
    #[arg(
        help_heading = "Registry store (a cluster on etcd)",
        long,
        requires = "store_cert",
        env = "FLEETGATE_STORE_KEY"
    )]
    store_key: Option<PathBuf>,
    /// With --store etcd: how long this node may answer admission from its
    /// last view of the registry while etcd has no majority (devices it
    /// knows are admitted, nothing is written); past it, new connections
    /// are refused: it fails closed.
    #[arg(
        help_heading = "Registry store (a cluster on etcd)",
        long,
        default_value_t = 60,
        env = "FLEETGATE_STORE_STALENESS_SECS"
    )]
    store_staleness_secs: u64,
    /// Messages across nodes: NATS servers with JetStream,
    /// `tls://host:port[,tls://host:port...]` (or `nats://` without TLS,
    /// for development: a warning says so). A service on any node then
    /// sees every device, and commands reach a device on any node. Leave
    /// it out on a single node.
    #[arg(
        help_heading = "Message bus (a cluster on NATS)",
        long,
        value_delimiter = ',',
        env = "FLEETGATE_NATS"
    )]
    nats: Vec<String>,
    /// With --nats: the CA (PEM) that signed the NATS servers' certificates.
    #[arg(
        help_heading = "Message bus (a cluster on NATS)",
        long,
        env = "FLEETGATE_NATS_CA"
    )]
    nats_ca: Option<PathBuf>,
    /// With --nats: this node's client certificate (PEM, with its chain),
    /// e.g. from `fleetgate node enroll`; NATS maps it to a user.
    #[arg(
        help_heading = "Message bus (a cluster on NATS)",
        long,
        requires = "nats_key",
        env = "FLEETGATE_NATS_CERT"
    )]
    nats_cert: Option<PathBuf>,
    /// With --nats: the key of --nats-cert (PEM).
    #[arg(
        help_heading = "Message bus (a cluster on NATS)",
        long,
        requires = "nats_cert",
        env = "FLEETGATE_NATS_KEY"
    )]
    nats_key: Option<PathBuf>,
    /// With --nats: replicas of the message stream (3 on a three-server
    /// NATS cluster: a server can go without losing what was stored).
    #[arg(
        help_heading = "Message bus (a cluster on NATS)",
        long,
        default_value_t = 1,
        env = "FLEETGATE_NATS_REPLICAS"
    )]
    nats_replicas: usize,
    /// With --nats: how long the message stream keeps a message.
    #[arg(
        help_heading = "Message bus (a cluster on NATS)",
        long,
        default_value_t = 3600,
        env = "FLEETGATE_NATS_MAX_AGE_SECS"
    )]
    nats_max_age_secs: u64,
    /// Most concurrent MQTT connections; more are closed at once.
    #[arg(
        help_heading = "Connections",
        long,
        default_value_t = 10_000,
        env = "FLEETGATE_MAX_CONNECTIONS"
    )]
    max_connections: usize,
    /// Most TLS handshakes in progress on the MQTT port; more are closed.
    #[arg(
        help_heading = "Connections",
        long,
        default_value_t = 512,
        env = "FLEETGATE_MAX_HANDSHAKES"
    )]
    max_handshakes: usize,
    /// Threads that run MQTT sessions once their TLS handshake is done
    /// (handshakes run on every core). One serves a fleet's steady traffic
    /// at the least CPU per message; more, for a node whose message rate
    /// needs more than a core.
    #[arg(
        help_heading = "Connections",
        long,
        default_value_t = 1,
        value_parser = clap::value_parser!(u16).range(1..=256),
        env = "FLEETGATE_SESSION_THREADS"
    )]
    session_threads: u16,
    /// Milliseconds a new MQTT session stays on the threads that ran its
    /// handshake, from its CONNACK, before it moves to the session
    /// threads: a client that connects, publishes and leaves within it
    /// costs no handoff. 0: every session moves before its CONNECT.
    #[arg(
        help_heading = "Connections",
        long,
        default_value_t = 500,
        value_parser = clap::value_parser!(u64).range(0..=60_000),
        env = "FLEETGATE_SESSION_SETTLE_MS"
    )]
    session_settle_ms: u64,
    /// Seconds a client has to complete its TLS handshake (MQTT, admin
    /// API) or send its request headers (OCSP/CRL, metrics).
    #[arg(help_heading = "Connections", long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300), env = "FLEETGATE_HANDSHAKE_TIMEOUT_SECS")]
    handshake_timeout_secs: u64,
    /// New MQTT connections per second from one IP address (0: no limit).
    #[arg(
        help_heading = "Connections",
        long,
        default_value_t = 100.0,
        env = "FLEETGATE_CONNECT_RATE_PER_IP"
    )]
    connect_rate_per_ip: f64,
    /// Burst allowed above --connect-rate-per-ip.
    #[arg(
        help_heading = "Connections",
        long,
        default_value_t = 200.0,
        env = "FLEETGATE_CONNECT_BURST_PER_IP"
    )]
    connect_burst_per_ip: f64,
    /// Most concurrent connections on each HTTP listener (admin API,
    /// OCSP/CRL, metrics). At the cap, a new connection evicts the oldest
    /// one with no request in flight.
    #[arg(
        help_heading = "Connections",
        long,
        default_value_t = 1024,
        env = "FLEETGATE_HTTP_MAX_CONNECTIONS"
    )]
    http_max_connections: usize,
    /// Most connections one IP address may hold open on each HTTP listener.
    #[arg(
        help_heading = "Connections",
        long,
        default_value_t = 64,
        env = "FLEETGATE_HTTP_MAX_PER_IP"
    )]
    http_max_per_ip: usize,
    /// New HTTP connections per second from one IP address (0, the
    /// default: no limit; the burst is twice this). Scripts that enroll
    /// one device per call open hundreds a second from one address.
    #[arg(
        help_heading = "Connections",
        long,
        default_value_t = 0.0,
        env = "FLEETGATE_HTTP_RATE_PER_IP"
    )]
    http_rate_per_ip: f64,
    /// Largest MQTT packet accepted (and advertised to MQTT 5 clients), in
    /// bytes, headers included: the default takes a 256 KiB payload with up
    /// to 8 KiB of topic and properties. Larger ones end the connection
    /// (MQTT 5: DISCONNECT 0x95).
    #[arg(help_heading = "MQTT sessions and messages", long, default_value_t = crate::mqtt::MAX_PACKET_SIZE, env = "FLEETGATE_MAX_PACKET_SIZE")]
    max_packet_size: usize,
    /// Subscriptions one MQTT session may hold; more are refused (SUBACK
    /// 0x97, or 0x80 on 3.1.1). 0: no limit.
    #[arg(
        help_heading = "MQTT sessions and messages",
        long,
        default_value_t = 100,
        env = "FLEETGATE_MAX_SUBSCRIPTIONS"
    )]
    max_subscriptions: usize,
    /// Topics a device may start publishing to per minute (also the burst);
    /// beyond it its messages to new topics are refused (PUBACK 0x97) or,
    /// at QoS 0 and on 3.1.1, dropped; each is counted and logged. Every
    /// new topic costs the shared router. 0: no limit.
    #[arg(
        help_heading = "MQTT sessions and messages",
        long,
        default_value_t = 60,
        env = "FLEETGATE_NEW_TOPICS_PER_MINUTE"
    )]
    new_topics_per_minute: u32,
    /// OCSP requests over MQTT answered per second per session (the burst
    /// is five times this); more are dropped and counted.
    #[arg(
        help_heading = "MQTT sessions and messages",
        long,
        default_value_t = 1.0,
        env = "FLEETGATE_MQTT_OCSP_RATE"
    )]
    mqtt_ocsp_rate: f64,
    /// MiB of messages the router keeps per subscription filter for
    /// subscribers that lag behind (older ones are dropped): bounds memory
    /// under sustained traffic. Counted as the router counts, topic and
    /// payload: in memory a small message costs about twelve times that.
    #[arg(help_heading = "MQTT sessions and messages", long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=4096), env = "FLEETGATE_ROUTER_LOG_MIB")]
    router_log_mib: u64,
    /// Commands one device's persistent session may hold while it is away
    /// (QoS 1 and 2); more are refused (MQTT 5 PUBACK 0x97).
    #[arg(help_heading = "MQTT sessions and messages", long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000), env = "FLEETGATE_COMMAND_QUEUE_MAX")]
    command_queue_max: u64,
    /// Bytes (topics and payloads) one device's command queue may hold.
    #[arg(help_heading = "MQTT sessions and messages", long, default_value_t = 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..=1024 * 1024 * 1024), env = "FLEETGATE_COMMAND_QUEUE_BYTES")]
    command_queue_bytes: u64,
    /// Bytes one device's retained messages may take, as stored (topics,
    /// payloads and properties); past it a new retained message is refused
    /// (MQTT 5 PUBACK 0x97). Their count is bounded by --command-queue-max.
    #[arg(help_heading = "MQTT sessions and messages", long, default_value_t = 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..=1024 * 1024 * 1024), env = "FLEETGATE_RETAINED_BYTES")]
    retained_bytes: u64,
    /// Seconds a queued command waits at most, whatever its own expiry.
    #[arg(help_heading = "MQTT sessions and messages", long, default_value_t = 24 * 3600, value_parser = clap::value_parser!(u64).range(1..=30 * 24 * 3600), env = "FLEETGATE_COMMAND_TTL_SECS")]
    command_ttl_secs: u64,
    /// Lifetime of issued device certificates, in days.
    #[arg(help_heading = "Certificates, manufacturers and audit", long, default_value_t = 90, value_parser = clap::value_parser!(u32).range(1..=3650), env = "FLEETGATE_CERT_LIFETIME_DAYS")]
    cert_lifetime_days: u32,
    /// Devices one manufacturer may register just in time per second
    /// (0: no limit). Its total is capped by its quota.
    #[arg(
        help_heading = "Certificates, manufacturers and audit",
        long,
        default_value_t = 20.0,
        env = "FLEETGATE_JIT_RATE"
    )]
    jit_rate: f64,
    /// Burst allowed above --jit-rate.
    #[arg(
        help_heading = "Certificates, manufacturers and audit",
        long,
        default_value_t = 100.0,
        env = "FLEETGATE_JIT_BURST"
    )]
    jit_burst: f64,
    /// Seconds between seals of the audit log (a hash chain signed by the
    /// issuing CA; `fleetgate audit verify` checks it).
    #[arg(help_heading = "Certificates, manufacturers and audit", long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400), env = "FLEETGATE_AUDIT_SEAL_SECS")]
    audit_seal_secs: u64,
    /// Seconds between upkeep runs (server and OCSP signing certificate
    /// renewal). For tests.
    #[arg(help_heading = "Certificates, manufacturers and audit", long, default_value_t = 6 * 3600, hide = true, value_parser = clap::value_parser!(u64).range(1..), env = "FLEETGATE_UPKEEP_INTERVAL_SECS")]
    upkeep_interval_secs: u64,
    /// How old an audit entry must be to be sealed. For tests.
    #[arg(
        help_heading = "Certificates, manufacturers and audit",
        long,
        default_value_t = 30,
        hide = true,
        env = "FLEETGATE_AUDIT_SETTLE_SECS"
    )]
    audit_settle_secs: u64,
}

/// The etcd members' client addresses of `--store`.
#[derive(Clone, Debug)]
pub(super) struct EtcdEndpoints {
    pub(super) members: Vec<String>,
    /// `https://`: TLS, with --store-ca, --store-cert and --store-key.
    pub(super) tls: bool,
}

/// `https://host:port[,host:port...]` (TLS) or `etcd://...` (plain): the
/// members' client addresses.
pub(super) fn parse_store(s: &str) -> Result<EtcdEndpoints, String> {
    let (list, tls) = match (s.strip_prefix("https://"), s.strip_prefix("etcd://")) {
        (Some(list), _) => (list, true),
        (None, Some(list)) => (list, false),
        (None, None) => {
            return Err(format!(
                "{s:?}: the store is https://host:port[,host:port...] (or etcd://... without \
                 TLS, for development; leave --store out for the embedded registry)"
            ))
        }
    };
    let endpoints: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect();
    if endpoints.is_empty() || endpoints.iter().any(|e| !e.contains(':')) {
        return Err(format!("{s:?}: every etcd member is host:port"));
    }
    Ok(EtcdEndpoints {
        members: endpoints,
        tls,
    })
}

pub(super) async fn serve_cmd(
    args: ServeArgs,
    reloader: Option<super::config::Reloader>,
) -> ExitCode {
    let cfg = ServeConfig {
        data_dir: args.data_dir,
        pin_file: args.pin_file,
        store_tls: match &args.store {
            Some(EtcdEndpoints { tls: true, .. }) => {
                let Some(ca) = args.store_ca.clone() else {
                    eprintln!("error: --store https://... needs --store-ca (the CA of etcd's certificates)");
                    return ExitCode::from(EXIT_CONFIG);
                };
                Some(crate::etcd::EtcdTls {
                    ca,
                    identity: args.store_cert.clone().zip(args.store_key.clone()),
                })
            }
            _ => None,
        },
        store: args.store.map(|e| e.members),
        store_staleness: std::time::Duration::from_secs(args.store_staleness_secs),
        registry_cache_mib: args.registry_cache_mib,
        nats: (!args.nats.is_empty()).then(|| crate::bus::BusConfig {
            servers: args.nats.clone(),
            ca: args.nats_ca.clone(),
            identity: args.nats_cert.clone().zip(args.nats_key.clone()),
            replicas: args.nats_replicas,
            max_age: std::time::Duration::from_secs(args.nats_max_age_secs.max(1)),
        }),
        api_listen: args.api_listen,
        mqtt_listen: args.mqtt_listen,
        ocsp_listen: args.ocsp_listen,
        metrics_listen: args.metrics_listen,
        public_url: args.public_url,
        server_sans: args.sans,
        cert_lifetime: time::Duration::days(args.cert_lifetime_days.into()),
        limits: https::Limits {
            handshake_timeout: std::time::Duration::from_secs(args.handshake_timeout_secs),
            max_connections: args.http_max_connections.max(1),
            max_per_ip: args.http_max_per_ip.max(1),
            rate_per_ip: (args.http_rate_per_ip > 0.0).then_some(crate::net::Rate {
                per_second: args.http_rate_per_ip,
                burst: (args.http_rate_per_ip * 2.0).max(1.0),
            }),
            ..https::Limits::default()
        },
        upkeep_interval: std::time::Duration::from_secs(args.upkeep_interval_secs),
        audit_seal: std::time::Duration::from_secs(args.audit_seal_secs),
        audit_settle: std::time::Duration::from_secs(args.audit_settle_secs),
        reload_config: reloader.map(|r| {
            let r = std::sync::Mutex::new(r);
            crate::serve::ConfigReload(std::sync::Arc::new(move || {
                r.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .reload()
            }))
        }),
        mqtt: MqttConfig {
            max_connections: args.max_connections.max(1),
            max_handshakes: args.max_handshakes.max(1),
            session_threads: usize::from(args.session_threads),
            session_settle: std::time::Duration::from_millis(args.session_settle_ms),
            handshake_timeout: std::time::Duration::from_secs(args.handshake_timeout_secs),
            connect_rate_per_ip: (args.connect_rate_per_ip > 0.0).then_some(crate::net::Rate {
                per_second: args.connect_rate_per_ip,
                burst: args.connect_burst_per_ip.max(1.0),
            }),
            max_packet_size: args.max_packet_size.clamp(64, 256 * 1024 * 1024),
            max_subscriptions: args.max_subscriptions,
            new_topics_per_minute: args.new_topics_per_minute,
            jit_rate: (args.jit_rate > 0.0).then_some(crate::net::Rate {
                per_second: args.jit_rate,
                burst: args.jit_burst.max(1.0),
            }),
            ocsp_rate: crate::net::Rate {
                per_second: args.mqtt_ocsp_rate.max(0.001),
                burst: (args.mqtt_ocsp_rate * 5.0).max(1.0),
            },
            router_log_bytes: usize::try_from(args.router_log_mib)
                .unwrap_or(8)
                .saturating_mul(1024 * 1024),
            queue_limits: provisioning::sessions::QueueLimits {
                max_messages: usize::try_from(args.command_queue_max).unwrap_or(100),
                max_bytes: usize::try_from(args.command_queue_bytes).unwrap_or(1024 * 1024),
                max_age_ms: i64::try_from(args.command_ttl_secs).unwrap_or(86_400) * 1000,
                retained_bytes: usize::try_from(args.retained_bytes).unwrap_or(1024 * 1024),
            },
            ..MqttConfig::default()
        },
    };
    // A file size limit (RLIMIT_FSIZE) must fail the write, as a full disk
    // does, not kill the process: with a handler installed, SIGXFSZ is
    // not fatal and the write returns EFBIG.
    let _xfsz = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(25));
    let server = match Server::bind(cfg).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let shutdown = match crate::serve::shutdown_on_signals() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    // One machine-readable line on stdout once every listener is bound.
    let metrics = server
        .metrics_addr()
        .map(|a| format!(" metrics={a}"))
        .unwrap_or_default();
    outln!(
        "listening api={} mqtt={} ocsp={}{metrics}",
        server.api_addr(),
        server.mqtt_addr(),
        server.ocsp_addr()
    );
    match server.run(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub(super) fn check_cmd(
    dir: &Path,
    key_policy: KeyPolicyArg,
    keys_only: bool,
    json: bool,
) -> ExitCode {
    use provisioning::keys::report::{report, KeyPolicy};
    let paths = Paths::new(dir);
    if !paths.marker().exists() {
        eprintln!(
            "error: {}: not an initialized fleetgate data dir",
            dir.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let keys = report(
        &paths,
        match key_policy {
            KeyPolicyArg::Any => KeyPolicy::Any,
            KeyPolicyArg::OfflineRoot => KeyPolicy::OfflineRoot,
            KeyPolicyArg::Hsm => KeyPolicy::Hsm,
        },
    );
    if !json {
        for k in &keys.keys {
            outln!(
                "key: {:<28} {:<10} {}{}",
                k.role,
                if k.location == "file" || k.location == "absent" {
                    k.location.as_str()
                } else {
                    "token"
                },
                if k.location.starts_with("pkcs11:") {
                    k.location.clone()
                } else {
                    k.path.display().to_string()
                },
                k.mode
                    .as_ref()
                    .map(|m| format!(" (mode {m})"))
                    .unwrap_or_default()
            );
        }
        for s in &keys.strays {
            outln!(
                "key: {:<28} {:<10} {}",
                "unknown private key",
                "file",
                s.display()
            );
        }
        for p in &keys.problems {
            outln!("problem: {p}");
        }
    }
    if keys_only {
        if json {
            outln!(
                "{}",
                serde_json::to_string_pretty(&keys).unwrap_or_default()
            );
        }
        return if keys.problems.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let registry = match provisioning::Registry::open(&paths.registry()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "error: opening {}: {e} (is a server running on it? stop it first, or check \
                 --keys-only)",
                paths.registry().display()
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match registry.check() {
        Ok(report) => {
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&json!({"registry": report, "keys": keys}))
                        .unwrap_or_default()
                );
            } else {
                for p in &report.problems {
                    outln!("problem: {p}");
                }
                outln!(
                    "{}: {} devices, {} certificates, {} manufacturers, {} audit entries, {} problems",
                    if report.problems.is_empty() && keys.problems.is_empty() { "consistent" } else { "INCONSISTENT" },
                    report.devices,
                    report.certificates,
                    report.manufacturers,
                    report.audit_entries,
                    report.problems.len() + keys.problems.len()
                );
            }
            if report.problems.is_empty() && keys.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: reading the registry: {e}");
            ExitCode::FAILURE
        }
    }
}
