//! The provision scenario: factory devices getting their first
//! certificate with a shared claim over MQTT.

use super::*;

/// One factory device's first boot: connect with the shared claim, ask for
/// a certificate for a key made here, keep it, then connect as itself.
/// Returns how long the certificate took to arrive.
pub(super) async fn provision_one(
    fleet: &Fleet,
    claim: &Arc<rustls::ClientConfig>,
    id: &str,
) -> anyhow::Result<Duration> {
    let (key, csr) = new_key_and_csr(KeyKind::EcdsaP256, id)?;
    let opts = mqtt_options(fleet.broker, format!("boot-{id}"), claim.clone());
    let (client, mut events) = AsyncClient::new(opts, 8);
    let t0 = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let topic = format!("$fleetgate/provision/{id}");
    let mut step = Duration::from_millis(200);
    let mut connected = false;
    let answer = loop {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            // Closed before the handshake (the broker's limits): again
            // after a while, as a device would (the next poll reconnects).
            Ok(Err(e)) if !connected && throttle::closed_early(&e) => {
                if let Err(why) = throttle::back_off(&e, &mut step, deadline).await {
                    bail!("{id}: {why}");
                }
            }
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                connected = true;
                client.try_subscribe(format!("{topic}/+"), QoS::AtLeastOnce)?;
                client.try_publish(&topic, QoS::AtLeastOnce, false, csr.clone().into_bytes())?;
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.topic.starts_with(&topic) => {
                let v: Value = serde_json::from_slice(&p.payload)?;
                if p.topic.ends_with("/rejected") {
                    bail!("{id}: rejected: {v}");
                }
                break v;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("{id}: {e}"),
            Err(_) => bail!("{id}: no answer in 60 s"),
        }
    };
    let took = t0.elapsed();
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(200), events.poll()).await;
    let chain = answer["certificate_pem"]
        .as_str()
        .context("no certificate_pem")?;
    provisioning::ca::write_file(
        &fleet.dir.join(format!("{id}.key")),
        key.serialize_pem().as_bytes(),
        true,
    )?;
    provisioning::ca::write_file(
        &fleet.dir.join(format!("{id}.crt")),
        chain.as_bytes(),
        false,
    )?;
    // Now as itself.
    churn_once(&fleet.target(), id).await?;
    Ok(took)
}

/// `provision`: DEVICES factory-fresh devices share one claim (good for
/// exactly DEVICES uses) and provision themselves over MQTT at once; each
/// then connects with its own certificate. One more request must be
/// refused: the claim is spent.
pub async fn provision(fleet: &Fleet, o: &Options) -> anyhow::Result<Report> {
    let api = fleet.api()?.clone();
    let claim_id = format!("{}claim-{}", fleet.prefix, std::process::id());
    let (key, csr) = new_key_and_csr(KeyKind::EcdsaP256, &claim_id)?;
    let issued: Value = api
        .post(
            "/v1/claims",
            &json!({"id": claim_id, "csr": csr, "uses": o.devices}),
        )
        .await?;
    std::fs::create_dir_all(&fleet.dir)?;
    provisioning::ca::write_file(
        &fleet.dir.join(format!("{claim_id}.key")),
        key.serialize_pem().as_bytes(),
        true,
    )?;
    provisioning::ca::write_file(
        &fleet.dir.join(format!("{claim_id}.crt")),
        issued["chain_pem"]
            .as_str()
            .context("no chain_pem")?
            .as_bytes(),
        false,
    )?;
    provisioning::ca::write_file(
        &fleet.dir.join("ca.crt"),
        issued["ca_pem"].as_str().context("no ca_pem")?.as_bytes(),
        false,
    )?;
    let claim = fleet.target().tls(&claim_id)?;
    let run_id = std::process::id();
    let ids: Vec<String> = (0..o.devices)
        .map(|i| format!("{}factory-{run_id}-{i}", fleet.prefix))
        .collect();
    let bar = fleet.bar(ids.len() as u64, "provisioning");
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for id in ids.clone() {
        let (fleet, claim, bar) = (fleet.clone(), claim.clone(), bar.clone());
        tasks.spawn(async move {
            let r = provision_one(&fleet, &claim, &id).await;
            bar.inc(1);
            r
        });
    }
    let (mut lat, mut errors) = (Vec::new(), BTreeMap::<String, u64>::new());
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(d)) => lat.push(d),
            Ok(Err(e)) => {
                let e = e.to_string();
                let kind = e.split_once(": ").map_or(e.as_str(), |(_, k)| k).to_owned();
                *errors.entry(kind).or_insert(0) += 1;
            }
            Err(e) => *errors.entry(e.to_string()).or_insert(0) += 1,
        }
    }
    let took = t0.elapsed();
    bar.finish_and_clear();
    // One too many.
    let extra = provision_one(
        fleet,
        &claim,
        &format!("{}factory-{run_id}-extra", fleet.prefix),
    )
    .await;
    let spent = matches!(&extra, Err(e) if e.to_string().contains("claim_exhausted"));
    lat.sort();
    let mut r = Report::new("provision");
    r.put("devices", ids.len());
    r.put("provisioned_and_connected", lat.len());
    r.put("provisions_per_s", lat.len() as f64 / took.as_secs_f64());
    r.put("certificate_p50_ms", ms(percentile(&lat, 0.5)));
    r.put("certificate_p99_ms", ms(percentile(&lat, 0.99)));
    r.put("errors", json!(errors));
    r.put("claim_spent_refused", spent);
    r.expect(
        lat.len() == ids.len(),
        format!("{} of {} provisioned", lat.len(), ids.len()),
    );
    r.expect(
        spent,
        format!("a request past the claim's uses was not refused: {extra:?}"),
    );
    Ok(r)
}
