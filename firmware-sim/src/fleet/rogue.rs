//! The rogue scenario: attackers beside the fleet (foreign CAs, stolen
//! identities, garbage) while the real devices keep working.

use super::*;

/// How a rogue attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Refused: TLS alert or error, closed, or CONNACK refusal.
    Refused(String),
    /// The broker let it in and kept it.
    Accepted,
}

/// `rogue`: misbehaving devices beside well-behaved ones.
pub async fn rogue(fleet: &Fleet, o: &Options) -> anyhow::Result<Report> {
    let ids = fleet.ids(o.devices);
    fleet.ensure_enrolled(&ids).await?;
    let api = fleet.api()?.clone();
    let rogue_dir = fleet.dir.join("rogue");
    std::fs::create_dir_all(&rogue_dir)?;
    let (spoofer, escaper, bloater, cloned, expired) = (
        format!("{}rogue-spoof", fleet.prefix),
        format!("{}rogue-escape", fleet.prefix),
        format!("{}rogue-big", fleet.prefix),
        format!("{}rogue-cloned", fleet.prefix),
        format!("{}rogue-expired", fleet.prefix),
    );
    for id in [&spoofer, &escaper, &bloater, &cloned] {
        if !rogue_dir.join(format!("{id}.crt")).exists() {
            enroll_one(&api, &rogue_dir, id, None).await?;
        }
    }
    let ca = enroll_one(&api, &rogue_dir, &expired, Some(1)).await?;
    provisioning::ca::write_file(&rogue_dir.join("ca.crt"), ca.as_bytes(), false)?;

    let period = (o.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / o.rate));
    let bar = fleet.bar(ids.len() as u64, "connecting");
    let run = Running::spawn(fleet, &ids, period);
    run.all_connected(o.connect_limit, &bar).await;
    bar.finish_and_clear();

    let rogue_target = Target {
        broker: fleet.broker,
        ca: fleet.ca.clone(),
        creds: rogue_dir.clone(),
    };
    let addr = fleet.broker;
    let ca_pem = std::fs::read(&fleet.ca)?;
    let mut outcomes: BTreeMap<&str, Outcome> = BTreeMap::new();

    let foreign = foreign_identity(&ids[0], true)?;
    outcomes.insert(
        "foreign_ca",
        attempt(
            addr,
            client_config(&ca_pem, Some(&foreign))?,
            &wire::connect(&ids[0]),
        )
        .await,
    );
    let selfsigned = foreign_identity(&ids[0], false)?;
    outcomes.insert(
        "self_signed",
        attempt(
            addr,
            client_config(&ca_pem, Some(&selfsigned))?,
            &wire::connect(&ids[0]),
        )
        .await,
    );
    tokio::time::sleep(Duration::from_millis(1500)).await; // let the 1-second certificate expire
    outcomes.insert(
        "expired",
        attempt(addr, rogue_target.tls(&expired)?, &wire::connect(&expired)).await,
    );
    outcomes.insert(
        "no_certificate",
        attempt(addr, client_config(&ca_pem, None)?, &wire::connect(&ids[0])).await,
    );
    // Its own certificate, a well-behaved device's client id.
    outcomes.insert(
        "client_id_spoofing",
        attempt(addr, rogue_target.tls(&spoofer)?, &wire::connect(&ids[0])).await,
    );
    let mut escape = wire::connect(&escaper);
    escape.extend(wire::publish(
        &format!("devices/{}/telemetry", ids[0]),
        b"forged",
    ));
    outcomes.insert(
        "topic_escape",
        attempt(addr, rogue_target.tls(&escaper)?, &escape).await,
    );
    let mut big = wire::connect(&bloater);
    big.extend(wire::publish(
        &format!("devices/{bloater}/telemetry"),
        &vec![b'x'; 300 * 1024],
    ));
    outcomes.insert(
        "oversized_packet",
        attempt(addr, rogue_target.tls(&bloater)?, &big).await,
    );
    outcomes.insert("garbage_on_tls_port", garbage(addr).await);

    // A cloned certificate: the original is connected, the clone takes its
    // session over (MQTT semantics); the original is cut and it is logged.
    let clone_log = Arc::new(Mutex::new(DeviceLog::default()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let original = tokio::spawn(device(
        rogue_target.clone(),
        cloned.clone(),
        None,
        Instant::now(),
        clone_log.clone(),
        stop_rx.clone(),
        None,
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let clone_outcome = attempt(addr, rogue_target.tls(&cloned)?, &wire::connect(&cloned)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let original_cut = clone_log
        .lock()
        .map(|l| l.dropped_at.is_some())
        .unwrap_or(false);
    let _ = stop_tx.send(true);
    let _ = original.await;

    tokio::time::sleep(Duration::from_secs(1)).await;
    let logs = run.finish().await;
    let disturbed = logs
        .iter()
        .filter(|(_, l)| l.dropped_at.is_some() || l.connects != 1)
        .count();

    let mut r = Report::new("rogue");
    r.put("well_behaved_devices", ids.len());
    r.put("well_behaved_disturbed", disturbed);
    for (name, out) in &outcomes {
        let text = match out {
            Outcome::Refused(why) => format!("refused: {why}"),
            Outcome::Accepted => "ACCEPTED".to_owned(),
        };
        r.put(name, text);
        r.expect(
            matches!(out, Outcome::Refused(_)),
            format!("{name} was accepted"),
        );
    }
    r.put(
        "cloned_certificate",
        format!(
            "clone {:?}; original session cut: {original_cut}",
            clone_outcome
        ),
    );
    r.expect(
        original_cut,
        "a cloned certificate did not take over the original session",
    );
    r.expect(
        disturbed == 0,
        format!("{disturbed} well-behaved devices were disturbed"),
    );
    Ok(r)
}

/// A key and certificate for `id` from a CA the broker never heard of
/// (`from_ca`), or self-signed: (chain PEM, key PEM).
pub(super) fn foreign_identity(id: &str, from_ca: bool) -> anyhow::Result<(String, String)> {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        SanType,
    };
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(Vec::<String>::new())?;
    leaf.subject_alt_names = vec![SanType::URI(
        format!("urn:fleetgate:device:{id}").try_into()?,
    )];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if !from_ca {
        return Ok((leaf.self_signed(&key)?.pem(), key.serialize_pem()));
    }
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let cert = leaf.signed_by(&key, &issuer)?;
    Ok((
        format!("{}{}", cert.pem(), ca_cert.pem()),
        key.serialize_pem(),
    ))
}

pub(super) fn client_config(
    ca_pem: &[u8],
    identity: Option<&(String, String)>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    fleetgate_api::tls::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c?)?;
    }
    let b = rustls::ClientConfig::builder().with_root_certificates(roots);
    Ok(Arc::new(match identity {
        Some((chain, key)) => {
            let chain =
                CertificateDer::pem_slice_iter(chain.as_bytes()).collect::<Result<Vec<_>, _>>()?;
            b.with_client_auth_cert(chain, PrivateKeyDer::from_pem_slice(key.as_bytes())?)?
        }
        None => b.with_no_client_auth(),
    }))
}

/// Connects with `config`, sends `bytes`, and sees whether the broker keeps
/// the connection: refused if the handshake fails, the CONNACK refuses, or
/// the connection is closed within 2 s.
pub(super) async fn attempt(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    bytes: &[u8],
) -> Outcome {
    let r = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = ServerName::IpAddress(addr.ip().into());
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        tls.write_all(bytes).await?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            match tokio::time::timeout_at(deadline, tls.read(&mut chunk)).await {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) if buf.is_empty() => return Err(e.into()),
                Ok(Err(_)) => break,
                Err(_) => return Ok::<_, anyhow::Error>(None), // still open
            }
        }
        Ok(Some(buf))
    }
    .await;
    match r {
        Err(e) => Outcome::Refused(e.to_string()),
        Ok(None) => Outcome::Accepted,
        Ok(Some(b)) if b.len() >= 4 && b[0] == 0x20 && b[3] != 0 => {
            Outcome::Refused(format!("CONNACK return code {}", b[3]))
        }
        Ok(Some(b)) if b.is_empty() => Outcome::Refused("closed without a word".into()),
        Ok(Some(_)) => Outcome::Refused("connection closed".into()),
    }
}

pub(super) async fn garbage(addr: SocketAddr) -> Outcome {
    let r = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.write_all(b"\x16\x03\x01\x00\x05hello, this is not TLS\r\n\r\n")
            .await?;
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await??;
        Ok::<_, anyhow::Error>(n)
    }
    .await;
    match r {
        Ok(_) => Outcome::Refused("closed".into()),
        Err(e) if e.to_string().contains("deadline") => Outcome::Accepted,
        Err(e) => Outcome::Refused(e.to_string()),
    }
}
