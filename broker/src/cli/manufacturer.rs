//! `fleetgate manufacturer ...` and batch enrollment through the admin API.

use super::*;

pub(super) async fn manufacturer_cmd(cmd: ManufacturerCmd) -> anyhow::Result<()> {
    match cmd {
        ManufacturerCmd::Create {
            name,
            out,
            policy,
            jit_quota,
            root_dir,
            root_pin_file,
            api,
        } => {
            check_out_name(&name)?;
            let client = api.client()?;
            let signed = match root_dir {
                None => None,
                Some(dir) => {
                    Some(root_ceremony(&client, &name, &dir, root_pin_file.as_deref()).await?)
                }
            };
            let created: Created = client
                .post(
                    "/v1/manufacturers",
                    &json!({"name": name, "policy": policy, "jit_quota": jit_quota,
                            "ca_cert_pem": signed}),
                )
                .await?;
            let m = &created.manufacturer;
            let (crt, key) = write_credentials(
                &out,
                &name,
                created.key_pem.as_deref(),
                &m.ca_pem,
                &created.ca_pem,
            )?;
            match &created.key_pem {
                Some(_) => outln!(
                    "manufacturer {name}: CA serial {}, policy {policy}; certificate {}, key {} \
                     (hand it to the factory; keep it secret)",
                    m.serial,
                    crt.display(),
                    key.display()
                ),
                None => outln!(
                    "manufacturer {name}: CA serial {}, policy {policy}; certificate {}; its key \
                     stays in the node's token (enroll its devices through fleetgate)",
                    m.serial,
                    crt.display()
                ),
            }
            Ok(())
        }
        ManufacturerCmd::Quota {
            name,
            jit_quota,
            api,
        } => {
            let m: ManufacturerRecord = api
                .client()?
                .post(
                    &format!("/v1/manufacturers/{name}/quota"),
                    &json!({ "jit_quota": jit_quota }),
                )
                .await?;
            outln!(
                "manufacturer {name}: just-in-time quota {} ({} registered)",
                m.jit_quota(),
                m.jit_registered
            );
            Ok(())
        }
        ManufacturerCmd::Challenge { name, api } => {
            let c: Challenge = api
                .client()?
                .post(&format!("/v1/manufacturers/{name}/challenge"), &json!({}))
                .await?;
            let code = &c.code;
            outln!("{code}");
            eprintln!(
                "sign a certificate with CN={code} using the CA's key before {}, e.g.\n  \
                 openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
                 -keyout verify.key -subj /CN={code} -out verify.csr\n  \
                 openssl x509 -req -in verify.csr -CA ca.crt -CAkey ca.key -days 1 -out verify.crt\n\
                 then: fleetgate manufacturer register {name} --ca-cert ca.crt --verification-cert verify.crt",
                rfc3339(c.expires_at)
            );
            Ok(())
        }
        ManufacturerCmd::Register {
            name,
            ca_cert,
            verification_cert,
            policy,
            api,
        } => {
            let ca_pem = std::fs::read_to_string(&ca_cert)
                .with_context(|| format!("reading {}", ca_cert.display()))?;
            let verification_pem = verification_cert
                .map(|p| {
                    std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
                })
                .transpose()?;
            let m: ManufacturerRecord = api
                .client()?
                .post(
                    &format!("/v1/manufacturers/{name}/register"),
                    &json!({"ca_pem": ca_pem, "verification_pem": verification_pem, "policy": policy}),
                )
                .await?;
            outln!(
                "manufacturer {name}: registered CA {} (policy {policy})",
                printable(&m.subject)
            );
            Ok(())
        }
        ManufacturerCmd::Revoke { name, reason, api } => {
            let _: ManufacturerRecord = api
                .client()?
                .post(
                    &format!("/v1/manufacturers/{name}/revoke"),
                    &json!({"reason": reason}),
                )
                .await?;
            outln!("manufacturer {name} is revoked ({reason}): its devices are refused");
            Ok(())
        }
        ManufacturerCmd::List { json, api } => {
            let all: Vec<ManufacturerRecord> = api.client()?.get("/v1/manufacturers").await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                outln!(
                    "{:<20} {:<10} {:<8} {:<13} CA",
                    "NAME",
                    "KIND",
                    "STATUS",
                    "POLICY"
                );
                for m in &all {
                    outln!(
                        "{:<20} {:<10} {:<8} {:<13} {}",
                        m.name,
                        format!("{:?}", m.kind).to_lowercase(),
                        format!("{:?}", m.status).to_lowercase(),
                        m.policy,
                        printable(&m.subject)
                    );
                }
            }
            Ok(())
        }
    }
}

/// `device enroll-batch`: every `*.csr` in `dir`, in chunks.
pub(super) async fn enroll_batch(
    manufacturer: Option<String>,
    dir: &Path,
    out: &Path,
    lifetime_days: Option<u32>,
    chunk: usize,
    api: &ApiArgs,
) -> anyhow::Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "csr" || x == "pem"))
        .collect();
    files.sort();
    if files.is_empty() {
        anyhow::bail!("no *.csr files in {}", dir.display());
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let client = api.client()?;
    let (mut issued, mut failed) = (0usize, 0usize);
    let started = std::time::Instant::now();
    for part in files.chunks(chunk.clamp(1, provisioning::manufacturer::MAX_BATCH)) {
        let mut items = Vec::with_capacity(part.len());
        for p in part {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let id = p
                .file_stem()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            // An unreadable file is that entry's failure, not the batch's.
            let csr = match std::fs::read(p) {
                Ok(b) if b.starts_with(b"-----") => String::from_utf8_lossy(&b).into_owned(),
                // DER: the API takes PEM.
                Ok(b) => provisioning::manufacturer::pem_encode("CERTIFICATE REQUEST", &b),
                Err(_) => String::new(),
            };
            items.push(json!({"name": name, "id": id, "csr": csr}));
        }
        let report: BatchReport = client
            .post(
                "/v1/devices/batch",
                &json!({"manufacturer": manufacturer, "lifetime_days": lifetime_days, "items": items}),
            )
            .await?;
        write_file(&out.join("ca.crt"), report.ca_pem.as_bytes(), false)?;
        for r in report.results {
            match (r.chain_pem, r.error) {
                (Some(pem), _) => {
                    write_file(&out.join(format!("{}.crt", r.id)), pem.as_bytes(), false)?;
                    issued += 1;
                }
                (None, error) => {
                    failed += 1;
                    let (message, code) =
                        error.map_or(("?".into(), "?".into()), |e| (e.message, e.code));
                    eprintln!("failed: {}: {message} ({code})", r.name);
                }
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    outln!(
        "issued {issued}, failed {failed} in {secs:.2} s ({:.0} certificates/s); certificates in {}",
        issued as f64 / secs.max(1e-9),
        out.display()
    );
    if failed > 0 {
        anyhow::bail!("{failed} of {} CSRs failed", issued + failed);
    }
    Ok(())
}

/// The root's half of a manufacturer CA, at a ceremony: the node prepares a
/// key and a request; the root in `root_dir` signs it here (it never
/// touches the network). Returns the CA certificate (PEM).
async fn root_ceremony(
    client: &ApiClient,
    name: &str,
    root_dir: &Path,
    pin_file: Option<&Path>,
) -> anyhow::Result<String> {
    let pin = pin_file
        .map(provisioning::keys::Pin::from_file)
        .transpose()?;
    let root = provisioning::ceremony::RootDir::new(root_dir).open(pin.as_ref())?;
    let req: fleetgate_api::types::CeremonyRequest = client
        .post(&format!("/v1/manufacturers/{name}/request"), &json!({}))
        .await?;
    if req.root_pem.trim() != root.pem.trim() {
        anyhow::bail!(
            "the node's root is not the root in {}: wrong root dir or wrong cluster",
            root_dir.display()
        );
    }
    let cert = provisioning::ceremony::sign_manufacturer_csr(
        &root,
        &req.csr_pem,
        name,
        req.status_url.as_deref(),
        provisioning::manufacturer::MANUFACTURER_CA_LIFETIME,
    )?;
    eprintln!(
        "root ceremony: signed manufacturer CA {name} (serial {}) for the key the node holds",
        cert.serial
    );
    Ok(cert.chain_pem)
}
