//! The soak scenario: the fleet for hours, with churn, checking memory,
//! CPU and that nothing is lost.

use super::*;

/// `soak`: DEVICES hold their connections (one message each per 1/RATE s)
/// for the duration while CHURN more devices a second connect, publish at
/// QoS 1 and leave (full handshakes), and a writer enrolls a device every
/// 500 ms and revokes one every 2 s through the API. Samples the broker's
/// RSS every 30 s; at the end, reads back every acknowledged write.
pub async fn soak(fleet: &Fleet, o: &Options, churn: usize) -> anyhow::Result<Report> {
    let ids = fleet.ids(o.devices);
    let pool: Vec<String> = (0..churn.max(1) * 10)
        .map(|i| format!("{}churn-{i}", fleet.prefix))
        .collect();
    let all: Vec<String> = ids.iter().chain(&pool).cloned().collect();
    fleet.ensure_enrolled(&all).await?;
    let api = fleet.api()?.clone();
    let period = (o.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / o.rate));
    let bar = fleet.bar(ids.len() as u64, "connecting");
    let rss_idle = rss_kib(o.broker_pid);
    let run = Running::spawn(fleet, &ids, period);
    let ramp = run.all_connected(o.connect_limit, &bar).await;
    bar.finish_and_clear();
    let held = run.connected();

    let (stop_tx, stop) = watch::channel(false);
    // Churn: CHURN cycles a second, each its own task.
    let churner = {
        let (target, pool, mut stop) = (fleet.target(), pool.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, 0u64);
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            let mut count = |r: Result<anyhow::Result<()>, tokio::task::JoinError>| match r {
                Ok(Ok(())) => ok += 1,
                Ok(Err(e)) => {
                    failed += 1;
                    // The error without the device id: one line per kind.
                    let e = e.to_string();
                    let kind = e.split_once(": ").map_or(e.as_str(), |(_, k)| k).to_owned();
                    *errors.entry(kind).or_insert(0) += 1;
                }
                Err(e) => {
                    failed += 1;
                    *errors.entry(e.to_string()).or_insert(0) += 1;
                }
            };
            let mut tasks = tokio::task::JoinSet::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut next = 0usize;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        for _ in 0..churn {
                            let (t, id) = (target.clone(), pool[next % pool.len()].clone());
                            next += 1;
                            tasks.spawn(async move { churn_once(&t, &id).await });
                        }
                    }
                    Some(r) = tasks.join_next() => count(r),
                    _ = stop.changed() => break,
                }
            }
            while let Some(r) = tasks.join_next().await {
                count(r);
            }
            (ok, failed, errors)
        })
    };
    // Writes that must survive: enrollments and revocations, acknowledged.
    let writer = {
        let (api, dir, prefix, mut stop) = (
            api.clone(),
            fleet.dir.join("soak-writes"),
            fleet.prefix.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            std::fs::create_dir_all(&dir)?;
            let (mut enrolled, mut revoked, mut failed) = (Vec::new(), Vec::new(), 0u64);
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            for n in 0u64.. {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => break,
                }
                let id = format!("{prefix}w-{n}-{}", std::process::id());
                match enroll_one(&api, &dir, &id, None).await {
                    Ok(_) => enrolled.push(id),
                    Err(_) => failed += 1,
                }
                if n % 4 == 3 {
                    if let Some(victim) = enrolled.get(revoked.len()).cloned() {
                        let r: anyhow::Result<Value> = api
                            .post(
                                &format!("/v1/devices/{victim}/revoke"),
                                &json!({"reason": "superseded"}),
                            )
                            .await;
                        match r {
                            Ok(_) => revoked.push(victim),
                            Err(_) => failed += 1,
                        }
                    }
                }
            }
            Ok::<_, anyhow::Error>((enrolled, revoked, failed))
        })
    };
    // RSS over time.
    let t0 = Instant::now();
    let mut samples = vec![
        json!({"t_s": 0, "rss_mib": rss_kib(o.broker_pid).map(|k| k as f64 / 1024.0), "held": held}),
    ];
    while t0.elapsed() < o.duration {
        let left = o.duration.saturating_sub(t0.elapsed());
        tokio::time::sleep(left.min(Duration::from_secs(30))).await;
        let dropped = run
            .snapshot()
            .iter()
            .filter(|(_, l)| l.dropped_at.is_some())
            .count();
        samples.push(json!({
            "t_s": t0.elapsed().as_secs(),
            "rss_mib": rss_kib(o.broker_pid).map(|k| k as f64 / 1024.0),
            "held": held.saturating_sub(dropped),
        }));
        if fleet.progress {
            eprintln!(
                "soak: {:>4} s  {}",
                t0.elapsed().as_secs(),
                samples.last().map(Value::to_string).unwrap_or_default()
            );
        }
    }
    let _ = stop_tx.send(true);
    let (churn_ok, churn_failed, churn_errors) = churner.await?;
    let (enrolled, revoked, write_failures) = writer.await??;
    let logs = run.finish().await;
    let dropped = logs.iter().filter(|(_, l)| l.dropped_at.is_some()).count();
    let sent_total: u64 = logs.iter().map(|(_, l)| l.sent).sum();

    // The acknowledged writes, for a check after a restart too.
    std::fs::write(
        fleet.dir.join("soak-writes/acked.json"),
        json!({"enrolled": enrolled, "revoked": revoked}).to_string(),
    )?;
    // Read back every acknowledged write.
    let mut lost = Vec::new();
    for id in &enrolled {
        let v: anyhow::Result<Value> = api.get(&format!("/v1/devices/{id}")).await;
        let want = if revoked.contains(id) {
            "revoked"
        } else {
            "active"
        };
        match v {
            Ok(d) if d["status"] == want => {}
            Ok(d) => lost.push(format!("{id}: {} (expected {want})", d["status"])),
            Err(e) => lost.push(format!("{id}: {e}")),
        }
    }
    let mut r = Report::new("soak");
    r.put("devices_held", held);
    r.put("ramp_s", ramp.as_secs_f64());
    r.put("duration_s", t0.elapsed().as_secs_f64());
    r.put("held_connections_dropped", dropped);
    r.put("sent_total", sent_total);
    r.put("churn_cycles_ok", churn_ok);
    r.put("churn_cycles_failed", churn_failed);
    r.put("churn_errors", json!(churn_errors));
    r.put("writes_acknowledged", enrolled.len() + revoked.len());
    r.put("writes_refused", write_failures);
    r.put("acknowledged_writes_lost", lost.len());
    if let Some(k) = rss_idle {
        r.put("broker_rss_idle_mib", k as f64 / 1024.0);
    }
    r.put("rss_samples", Value::Array(samples));
    r.expect(
        held == ids.len(),
        format!("{held} of {} connected", ids.len()),
    );
    r.expect(dropped == 0, format!("{dropped} held connections dropped"));
    r.expect(
        lost.is_empty(),
        format!("acknowledged writes lost: {lost:?}"),
    );
    r.expect(
        churn_failed == 0,
        format!("{churn_failed} churn cycles failed"),
    );
    Ok(r)
}
