use super::*;
use crate::csr::{new_key_and_csr, KeyKind};
use crate::{Authority, Identity, InitOptions, DEFAULT_CERT_LIFETIME};

fn device(id: &str) -> Identity {
    Identity {
        role: Role::Device,
        id: DeviceId::try_new(id).unwrap(),
    }
}

// The device lifecycle through the registry and its store (the pure
// transitions and standing are tested in `lifecycle`).

#[test]
fn check_finds_broken_indexes() {
    let tmp = tempfile::tempdir().unwrap();
    let auth = Authority::open_or_init(tmp.path(), &InitOptions::default()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let id = DeviceId::try_new("dev-1").unwrap();
    let identity = crate::Identity {
        role: Role::Device,
        id: id.clone(),
    };
    let (new, cert) = auth
        .issue_new(&key, &identity, None, DEFAULT_CERT_LIFETIME)
        .unwrap();
    let r = &auth.registry;
    r.enroll(&new, &cert, "test").unwrap();
    r.suspend(&id, "test").unwrap();
    let clean = r.check().unwrap();
    assert!(clean.problems.is_empty(), "{:?}", clean.problems);
    assert_eq!((clean.devices, clean.certificates), (2, 2));

    // A lost status index entry, a dangling fingerprint, a stale mirror.
    let key = CertKey::new(None, &cert.issuer, cert.serial.clone());
    r.transact(|tx| {
        tx.by_status.remove(status_key(Status::Suspended, &id))?;
        tx.fingerprints.insert(b"feed", key.to_bytes())?;
        let mut c = decode_cert(&tx.certs.get(key.to_bytes())?.unwrap())?;
        c.device_status = Status::Active;
        tx.certs.insert(key.to_bytes(), encode(&c))
    })
    .unwrap();
    let report = r.check().unwrap();
    let all = report.problems.join("\n");
    assert!(
        all.contains("status index has 1 entries for 2 devices"),
        "{all}"
    );
    assert!(all.contains("fingerprint index entry feed"), "{all}");
    assert!(
        all.contains("mirrors status active but device dev-1 is suspended"),
        "{all}"
    );
    // The stale mirror also leaves the CRLs' index listing it.
    assert!(
        all.contains("is in the listed index but not revoked or held"),
        "{all}"
    );
    assert_eq!(report.problems.len(), 4, "{all}");
    // A browsing index entry lost.
    r.transact(|tx| {
        let (k, _) = r.scan(Space::Sorted, b"").next().unwrap()?;
        tx.txn.remove(Space::Sorted, &k);
        Ok(())
    })
    .unwrap();
    let all = r.check().unwrap().problems.join("\n");
    assert!(
        all.contains("sorted index has 0 stray entries and lacks 1"),
        "{all}"
    );
}

#[test]
fn certificates_are_kept_whole_and_served_only_as_registered() {
    let tmp = tempfile::tempdir().unwrap();
    let auth = Authority::open_or_init(tmp.path(), &InitOptions::default()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let (new, cert) = auth
        .issue_new(&key, &device("dev-pem"), None, DEFAULT_CERT_LIFETIME)
        .unwrap();
    let r = &auth.registry;
    r.enroll(&new, &cert, "test").unwrap();
    let k = cert.key();
    let (rec, pem) = r.certificate_pem(&k).unwrap().unwrap();
    assert_eq!(rec.serial, cert.serial);
    assert_eq!(pem, crate::pem::encode("CERTIFICATE", &cert.der));
    assert!(cert.chain_pem.starts_with(&pem));
    // Another certificate's bytes under this key: refused, not served.
    let (_, other) = auth
        .issue_new(&key, &device("dev-other"), None, DEFAULT_CERT_LIFETIME)
        .unwrap();
    r.transact(|tx| {
        tx.txn.insert(Space::CertDer, &k.to_bytes(), &other.der);
        Ok(())
    })
    .unwrap();
    let e = r.certificate_pem(&k).unwrap_err();
    assert!(matches!(e, Error::Corrupt(_)), "{e}");
    // Registered before the registry kept them: says so.
    r.transact(|tx| {
        tx.txn.remove(Space::CertDer, &k.to_bytes());
        Ok(())
    })
    .unwrap();
    let e = r.certificate_pem(&k).unwrap_err();
    assert!(matches!(e, Error::NotKept { .. }), "{e}");
    assert!(e.to_string().contains("before fleetgate kept"), "{e}");
    // No such certificate.
    let (_, unknown) = auth
        .issue_new(&key, &device("dev-none"), None, DEFAULT_CERT_LIFETIME)
        .unwrap();
    assert!(r.certificate_pem(&unknown.key()).unwrap().is_none());
}

#[test]
fn key_changes_say_what_live_connections_must_do() {
    let tmp = tempfile::tempdir().unwrap();
    let auth = Authority::open_or_init(tmp.path(), &InitOptions::default()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let id = DeviceId::try_new("dev-1").unwrap();
    let identity = crate::Identity {
        role: Role::Device,
        id: id.clone(),
    };
    let (new, cert) = auth
        .issue_new(&key, &identity, None, DEFAULT_CERT_LIFETIME)
        .unwrap();
    let r = &auth.registry;
    let d = r.enroll(&new, &cert, "test").unwrap();
    let record = |space, key: Vec<u8>| {
        let value = r.store.get(space, &key).unwrap();
        crate::store::Write { space, key, value }
    };
    // Enrolled: nothing for live connections.
    let enrolled = [
        record(Space::Devices, id.as_str().as_bytes().to_vec()),
        record(Space::Certs, cert.key().to_bytes()),
    ];
    assert!(changes_from(&enrolled).is_empty());
    r.suspend(&id, "test").unwrap();
    let suspended = [record(Space::Devices, id.as_str().as_bytes().to_vec())];
    assert!(matches!(
        changes_from(&suspended).as_slice(),
        [Change::DeviceOut { id: i, status: Status::Suspended }] if *i == d.id
    ));
    r.revoke_certificate(&cert.key(), RevocationReason::KeyCompromise, "test")
        .unwrap();
    let revoked = [record(Space::Certs, cert.key().to_bytes())];
    assert!(matches!(
        changes_from(&revoked).as_slice(),
        [Change::CertificateRevoked { key: k }] if *k == cert.key()
    ));
    // A manufacturer's key changed (even deleted): trust anchors reload.
    let gone = [crate::store::Write {
        space: Space::Manufacturers,
        key: b"acme".to_vec(),
        value: None,
    }];
    assert!(matches!(
        changes_from(&gone).as_slice(),
        [Change::Manufacturers]
    ));
}

#[test]
fn a_version_1_registry_is_migrated_on_open() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("registry");
    let auth = Authority::open_or_init(tmp.path(), &InitOptions::default()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut keys = Vec::new();
    for (id, m) in [("dev-1", None), ("dev-2", Some("acme"))] {
        let identity = crate::Identity {
            role: Role::Device,
            id: DeviceId::try_new(id).unwrap(),
        };
        let (new, cert) = auth
            .issue_new(&key, &identity, m, DEFAULT_CERT_LIFETIME)
            .unwrap();
        auth.registry.enroll(&new, &cert, "test").unwrap();
        keys.push(cert.key());
    }
    // Write it back as version 1 did: certificates by serial, devices
    // listing serials, no device_manufacturer mirror, no schema mark.
    let r = &auth.registry;
    let devices: Vec<_> = r.scan(Space::Devices, b"").map(Result::unwrap).collect();
    r.transact(|tx| {
        for k in &keys {
            let v = tx.certs.get(k.to_bytes())?.unwrap();
            tx.certs.remove(k.to_bytes())?;
            let mut c = serde_json::to_value(decode_cert(&v)?).unwrap();
            c.as_object_mut().unwrap().remove("device_manufacturer");
            tx.certs.insert(k.serial.as_bytes(), encode(&c))?;
            let fp = c["fingerprint"].as_str().unwrap().to_owned();
            tx.fingerprints.insert(fp.as_bytes(), k.serial.as_bytes())?;
        }
        for (id, v) in &devices {
            let mut d: serde_json::Value = serde_json::from_slice(v).unwrap();
            for c in d["certificates"].as_array_mut().unwrap() {
                let serial = c.as_str().unwrap().split(':').next().unwrap().to_owned();
                *c = serde_json::Value::String(serial);
            }
            tx.devices.insert(id, encode(&d))?;
        }
        tx.meta.remove("schema")
    })
    .unwrap();
    drop(auth);

    let r = Registry::open(&path).unwrap();
    let report = r.check().unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    for k in &keys {
        assert_eq!(r.standing(k).unwrap().unwrap().1, Standing::Good);
        // Schema 6: packed.
        let v = r.store.get(Space::Certs, &k.to_bytes()).unwrap().unwrap();
        assert_eq!(v[0], packed::PACKED);
    }
    let d2 = r.device(&DeviceId::try_new("dev-2").unwrap()).unwrap();
    assert_eq!(d2.certificates, vec![keys[1].clone()]);
    let c2 = r.certificate(&keys[1]).unwrap().unwrap();
    assert_eq!(c2.device_manufacturer.as_deref(), Some("acme"));
    // And its audit log is indexed by device (version 3).
    let trail = r
        .audit_of(&DeviceId::try_new("dev-2").unwrap(), 10)
        .unwrap();
    assert_eq!(trail.len(), 1);
    assert_eq!(trail[0].action, "enroll");
    // Opening again changes nothing.
    drop(r);
    let r = Registry::open(&path).unwrap();
    assert!(r.check().unwrap().problems.is_empty());
}

#[test]
fn a_manufacturer_revocation_takes_certificates_fleetgate_signed_for_its_devices() {
    // A registered manufacturer's device, rotated: fleetgate's issuing CA
    // signs (it has no key of the manufacturer's), the device's
    // manufacturer still decides the certificate's standing.
    let tmp = tempfile::tempdir().unwrap();
    let auth = Authority::open_or_init(tmp.path(), &InitOptions::default()).unwrap();
    let (rec, _) = auth
        .create_manufacturer(
            &DeviceId::try_new("acme").unwrap(),
            crate::registry::records::JitPolicy::AutoActivate,
            "test",
        )
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let identity = crate::Identity {
        role: Role::Device,
        id: DeviceId::try_new("dev-1").unwrap(),
    };
    let (new, first) = auth
        .issue_new(
            &key,
            &identity,
            Some(rec.name.as_str()),
            DEFAULT_CERT_LIFETIME,
        )
        .unwrap();
    auth.registry.enroll(&new, &first, "test").unwrap();
    let second = auth
        .ca
        .issue(&key, &identity, DEFAULT_CERT_LIFETIME)
        .unwrap();
    auth.registry
        .add_certificate(&identity.id, &second, "test")
        .unwrap();
    assert_eq!(first.manufacturer, None, "signed by fleetgate's own CA");
    for c in [&first, &second] {
        assert_eq!(
            auth.registry.standing(&c.key()).unwrap().unwrap().1,
            Standing::Good
        );
    }
    auth.registry
        .revoke_manufacturer("acme", RevocationReason::CaCompromise, "test")
        .unwrap();
    for c in [&first, &second] {
        assert!(matches!(
            auth.registry.standing(&c.key()).unwrap().unwrap().1,
            Standing::Revoked(_)
        ));
    }
    let view = auth.registry.device_view(&identity.id).unwrap();
    assert!(
        view.certificates.iter().all(|c| c.status == "revoked"),
        "{view:?}"
    );
    let listed = auth
        .registry
        .revoked_by_issuer(None, &auth.ca.issuing_name())
        .unwrap();
    assert_eq!(listed.len(), 2, "the issuing CA's CRL lists both");
}

#[test]
fn bulk_revocation_is_one_transaction() {
    let tmp = tempfile::tempdir().unwrap();
    let auth = Authority::open_or_init(tmp.path(), &InitOptions::default()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut ids = Vec::new();
    for i in 0..50 {
        let identity = crate::Identity {
            role: Role::Device,
            id: DeviceId::try_new(format!("d-{i}")).unwrap(),
        };
        let (new, cert) = auth
            .issue_new(&key, &identity, None, DEFAULT_CERT_LIFETIME)
            .unwrap();
        auth.registry.enroll(&new, &cert, "test").unwrap();
        ids.push(identity.id);
    }
    let r = &auth.registry;
    r.revoke(&ids[0], RevocationReason::KeyCompromise, "test")
        .unwrap();
    let mut asked = ids[..40].to_vec();
    asked.push(DeviceId::try_new("ghost").unwrap());
    asked.push(ids[1].clone());
    let out = r
        .revoke_many(&asked, RevocationReason::KeyCompromise, "test")
        .unwrap();
    assert_eq!(out.revoked.len(), 39);
    assert_eq!(out.already_revoked, vec![ids[0].clone()]);
    assert_eq!(out.not_found, vec![DeviceId::try_new("ghost").unwrap()]);
    for id in &ids[..40] {
        assert_eq!(r.device(id).unwrap().status, Status::Revoked);
    }
    assert_eq!(r.device(&ids[40]).unwrap().status, Status::Active);
    assert!(r.check().unwrap().problems.is_empty());
    let selected = r.select_devices(None, None, None).unwrap();
    assert_eq!(selected.len(), 51, "every device and the admin");
    let too_many: Vec<DeviceId> = (0..=MAX_BULK)
        .map(|i| DeviceId::try_new(format!("x-{i}")).unwrap())
        .collect();
    assert!(matches!(
        r.revoke_many(&too_many, RevocationReason::Unspecified, "test"),
        Err(Error::TooLarge { .. })
    ));
}

#[test]
fn enroll_rotate_and_status_lookups() {
    let tmp = tempfile::tempdir().unwrap();
    let auth = Authority::open_or_init(tmp.path(), &InitOptions::default()).unwrap();
    let (_k, csr) = new_key_and_csr(KeyKind::Ed25519, "x").unwrap();
    let req = crate::EnrollRequest {
        id: DeviceId::try_new("dev-1").unwrap(),
        role: Role::Device,
        manufacturer: None,
        csr: csr.into_bytes(),
        lifetime: DEFAULT_CERT_LIFETIME,
    };
    let (d, c1) = auth.enroll(&req, "test").unwrap();
    assert_eq!(d.status, Status::Active);
    assert!(matches!(
        auth.enroll(&req, "test"),
        Err(Error::AlreadyExists { .. })
    ));

    let (_k, csr2) = new_key_and_csr(KeyKind::EcdsaP384, "x").unwrap();
    let (d, c2) = auth
        .rotate(&req.id, csr2.as_bytes(), DEFAULT_CERT_LIFETIME, "test")
        .unwrap();
    assert_eq!(d.certificates, vec![c1.key(), c2.key()]);
    let r = &auth.registry;
    assert_eq!(r.standing(&c1.key()).unwrap().unwrap().1, Standing::Good);
    assert_eq!(
        r.certificate_by_fingerprint(&c2.fingerprint)
            .unwrap()
            .unwrap()
            .serial,
        c2.serial
    );

    r.suspend(&req.id, "test").unwrap();
    assert_eq!(
        r.standing(&c2.key()).unwrap().unwrap().1,
        Standing::Suspended
    );
    assert!(matches!(
        r.suspend(&req.id, "test"),
        Err(Error::InvalidTransition { .. })
    ));
    r.resume(&req.id, "test").unwrap();
    assert_eq!(r.standing(&c2.key()).unwrap().unwrap().1, Standing::Good);

    // Revoking one certificate leaves the other good.
    r.revoke_certificate(&c1.key(), RevocationReason::Superseded, "test")
        .unwrap();
    assert!(matches!(
        r.standing(&c1.key()).unwrap().unwrap().1,
        Standing::Revoked(Revocation {
            reason: RevocationReason::Superseded,
            ..
        })
    ));
    assert_eq!(r.standing(&c2.key()).unwrap().unwrap().1, Standing::Good);

    r.revoke(&req.id, RevocationReason::KeyCompromise, "test")
        .unwrap();
    assert!(matches!(
        r.standing(&c2.key()).unwrap().unwrap().1,
        Standing::Revoked(Revocation {
            reason: RevocationReason::KeyCompromise,
            ..
        })
    ));
    // Final.
    for e in [
        r.revoke(&req.id, RevocationReason::KeyCompromise, "test"),
        r.resume(&req.id, "test"),
        r.suspend(&req.id, "test"),
    ] {
        assert!(matches!(e, Err(Error::InvalidTransition { .. })), "{e:?}");
    }
    let (_k, csr3) = new_key_and_csr(KeyKind::EcdsaP256, "x").unwrap();
    assert!(auth
        .rotate(&req.id, csr3.as_bytes(), DEFAULT_CERT_LIFETIME, "test")
        .is_err());

    // Listing by status, paged, and the audit trail.
    let revoked = r.list(Some(Status::Revoked), None, 10).unwrap();
    assert_eq!(revoked.items.len(), 1);
    assert!(r
        .list(Some(Status::Active), None, 10)
        .unwrap()
        .items
        .iter()
        .all(|d| d.id.as_str() != "dev-1"));
    let actions: Vec<String> = r
        .audit(None, 100)
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.device.as_ref() == Some(&req.id))
        .map(|e| e.action)
        .collect();
    assert_eq!(
        actions,
        [
            "enroll",
            "rotate",
            "suspend",
            "resume",
            "revoke-certificate",
            "revoke"
        ]
    );
}

#[test]
fn paging_visits_every_device_once() {
    let tmp = tempfile::tempdir().unwrap();
    let auth = Authority::open_or_init(tmp.path(), &InitOptions::default()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let entry = |name: &str| {
        auth.issue_new(&key, &device(name), None, DEFAULT_CERT_LIFETIME)
            .unwrap()
    };
    let batch: Vec<_> = (0..25).map(|i| entry(&format!("d{i:02}"))).collect();
    let results = auth.registry.enroll_batch(&batch, "test").unwrap();
    assert!(results.iter().all(Result::is_ok));
    // A duplicate in a batch fails alone.
    let batch = vec![entry("d03"), entry("d99")];
    let results = auth.registry.enroll_batch(&batch, "test").unwrap();
    assert!(matches!(results[0], Err(Error::AlreadyExists { .. })));
    assert!(results[1].is_ok());
    let d99 = DeviceId::try_new("d99").unwrap();
    auth.registry
        .revoke(&d99, RevocationReason::Unspecified, "test")
        .unwrap();
    for status in [None, Some(Status::Active)] {
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = auth.registry.list(status, after.as_deref(), 7).unwrap();
            seen.extend(page.items.iter().map(|d| d.id.to_string()));
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        // 25 active devices and the admin, and, unfiltered, the revoked d99.
        let want = if status.is_some() { 26 } else { 27 };
        assert_eq!(seen.len(), want, "{status:?}");
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, seen);
    }
}

#[test]
fn a_version_2_log_gets_its_index_by_device_on_open() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("registry");
    let auth = Authority::open_or_init(tmp.path(), &InitOptions::default()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let id = DeviceId::try_new("dev-1").unwrap();
    let (new, cert) = auth
        .issue_new(&key, &device("dev-1"), None, DEFAULT_CERT_LIFETIME)
        .unwrap();
    let r = &auth.registry;
    r.enroll(&new, &cert, "test").unwrap();
    r.suspend(&id, "test").unwrap();
    r.resume(&id, "test").unwrap();
    let trail: Vec<String> = r
        .audit_of(&id, 10)
        .unwrap()
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(trail, ["resume", "suspend", "enroll"], "newest first");
    assert_eq!(r.audit_of(&id, 2).unwrap().len(), 2);
    // Version 2 had no index.
    let index: Vec<_> = r
        .scan(Space::AuditByDevice, b"")
        .map(Result::unwrap)
        .collect();
    let of_dev_1 = index
        .iter()
        .filter(|(k, _)| k.starts_with(b"dev-1\0"))
        .count();
    assert_eq!(of_dev_1, 3);
    r.transact(|tx| {
        for (k, _) in &index {
            tx.txn.remove(Space::AuditByDevice, k);
        }
        tx.meta.insert("schema", 2u64.to_be_bytes())
    })
    .unwrap();
    assert!(r.audit_of(&id, 10).unwrap().is_empty());
    drop(auth);

    let r = Registry::open(&path).unwrap();
    let trail: Vec<String> = r
        .audit_of(&id, 10)
        .unwrap()
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(trail, ["resume", "suspend", "enroll"]);
}

#[test]
fn crls_list_what_the_listed_index_holds_and_it_is_built_on_open() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("registry");
    let auth = Authority::open_or_init(tmp.path(), &InitOptions::default()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let r = &auth.registry;
    let mut certs = Vec::new();
    for id in ["a", "b", "c", "d"] {
        let (new, cert) = auth
            .issue_new(&key, &device(id), None, DEFAULT_CERT_LIFETIME)
            .unwrap();
        r.enroll(&new, &cert, "test").unwrap();
        certs.push(cert);
    }
    let id = |s: &str| DeviceId::try_new(s).unwrap();
    r.suspend(&id("a"), "test").unwrap();
    r.revoke(&id("b"), RevocationReason::KeyCompromise, "test")
        .unwrap();
    r.revoke_certificate(&certs[2].key(), RevocationReason::Superseded, "test")
        .unwrap();
    // Suspended and resumed: listed no more.
    r.suspend(&id("d"), "test").unwrap();
    r.resume(&id("d"), "test").unwrap();
    let issuer = certs[0].issuer.clone();
    type Entry = (String, OffsetDateTime, Option<u8>);
    let entries = |r: &Registry| -> Vec<Entry> {
        let mut s: Vec<Entry> = r
            .revoked_by_issuer(None, &issuer)
            .unwrap()
            .into_iter()
            .map(|l| {
                (
                    l.serial.to_hex(),
                    l.at,
                    l.reason.map(RevocationReason::code),
                )
            })
            .collect();
        s.sort();
        s
    };
    // What the CRL says of each, read from the records and devices.
    let mut want: Vec<Entry> = certs[..3]
        .iter()
        .map(|c| {
            let rec = r.certificate(&c.key()).unwrap().unwrap();
            let l = r
                .listing_now(None, &issuer, OffsetDateTime::now_utc(), &rec)
                .unwrap()
                .unwrap();
            (
                l.serial.to_hex(),
                l.at,
                l.reason.map(RevocationReason::code),
            )
        })
        .collect();
    want.sort();
    assert_eq!(entries(r), want);
    let reasons: Vec<_> = want.iter().map(|e| e.2).collect();
    assert!(reasons.contains(&None), "a hold: {reasons:?}");
    assert!(reasons.contains(&Some(RevocationReason::KeyCompromise.code())));
    assert!(reasons.contains(&Some(RevocationReason::Superseded.code())));
    // Each entry carries what the CRL says (schema 6).
    let index: Vec<_> = r.scan(Space::Listed, b"").map(Result::unwrap).collect();
    assert_eq!(index.len(), 3);
    assert!(index.iter().all(|(_, v)| !v.is_empty()));

    // Schema 5: JSON records, empty entries: read the old way, the same
    // list; packed on open.
    r.transact(|tx| {
        for (k, _) in &index {
            tx.txn.insert(Space::Listed, k, b"");
        }
        for c in &certs {
            let k = c.key().to_bytes();
            let rec = decode_cert(&tx.certs.get(&k)?.unwrap())?;
            tx.certs.insert(&k, encode(&rec))?;
        }
        tx.meta.insert("schema", 5u64.to_be_bytes())
    })
    .unwrap();
    assert_eq!(entries(r), want);
    // Version 3 had no index at all: made on open, the same list.
    r.transact(|tx| {
        for (k, _) in &index {
            tx.txn.remove(Space::Listed, k);
        }
        tx.meta.insert("schema", 3u64.to_be_bytes())
    })
    .unwrap();
    assert!(entries(r).is_empty());
    drop(auth);
    let r = Registry::open(&path).unwrap();
    assert_eq!(entries(&r), want);
    let index: Vec<_> = r.scan(Space::Listed, b"").map(Result::unwrap).collect();
    assert!(index.iter().all(|(_, v)| !v.is_empty()));
    for c in &certs {
        let v = r
            .store
            .get(Space::Certs, &c.key().to_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(v[0], packed::PACKED);
    }
    assert!(r.check().unwrap().problems.is_empty());

    // `check` reads the index against the records: an entry that says
    // another date, and one missing.
    let (k, revoked) = index
        .iter()
        .find_map(|(k, v)| {
            let l = Listing::decode(v).unwrap().unwrap();
            l.reason.is_some().then_some((k, l))
        })
        .unwrap();
    let mut wrong = revoked;
    wrong.at += time::Duration::days(1);
    let other = index.iter().find(|(o, _)| o != k).unwrap().0.clone();
    r.transact(|tx| {
        tx.txn.insert(Space::Listed, k, &wrong.encode());
        tx.txn.remove(Space::Listed, &other);
        Ok(())
    })
    .unwrap();
    let all = r.check().unwrap().problems.join("\n");
    assert!(all.contains("listed index entry of"), "{all}");
    assert!(
        all.contains("listed index has 2 entries for 3 revoked or held certificates"),
        "{all}"
    );
}

#[test]
fn a_registry_a_newer_fleetgate_wrote_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("registry");
    let r = Registry::open(&path).unwrap();
    r.transact(|tx| tx.meta.insert("schema", (SCHEMA + 1).to_be_bytes()))
        .unwrap();
    drop(r);
    let Err(e) = Registry::open(&path) else {
        panic!("a newer registry opened")
    };
    assert!(
        e.to_string().contains("newer than this fleetgate reads"),
        "{e}"
    );
}

mod stale_view;
