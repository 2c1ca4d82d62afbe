//! A claim's side: it only provisions. A certificate for a CSR is sent
//! back on `<topic>/accepted`, or the reason on `<topic>/rejected`; a
//! claim's SUBSCRIBE is answered by the service side without the router.

use super::*;

impl Session {
    /// A claim's provisioning request: a device certificate for a CSR, sent
    /// back on `<topic>/accepted`, or the reason on `<topic>/rejected`.
    pub(super) async fn provision(&mut self, p: &Publish, req: String) -> Result<(), String> {
        self.ack(p)?;
        let topic = format!("{}{req}", super::super::acl::PROVISION);
        let parsed: Result<(String, Vec<u8>), (&'static str, String)> =
            if p.payload.first() == Some(&b'{') {
                serde_json::from_slice::<ProvisionRequest>(&p.payload)
                    .map(|r| (r.id.unwrap_or_else(|| req.clone()), r.csr.into_bytes()))
                    .map_err(|e| ("invalid_json", e.to_string()))
            } else {
                Ok((req.clone(), p.payload.to_vec()))
            };
        let claim = self.peer.identity.id.clone();
        let outcome = match parsed {
            Err(e) => Err(e),
            Ok((id, csr)) => {
                let auth = self.shared.auth.clone();
                let lifetime = self.shared.cert_lifetime;
                let done = tokio::task::spawn_blocking(move || {
                    let id = DeviceId::try_new(id)?;
                    let actor = format!("claim:{claim} (mqtt)");
                    auth.provision_with_claim(&claim, &id, &csr, lifetime, &actor)
                })
                .await;
                match done {
                    Ok(Ok((device, cert))) => Ok(serde_json::json!({
                        "id": device.id,
                        "serial": cert.serial,
                        "certificate_pem": cert.chain_pem,
                        "ca_pem": self.shared.auth.ca.root_pem(),
                        "not_after": cert.not_after.unix_timestamp(),
                    })),
                    Ok(Err(e)) => {
                        let w = crate::wire::of(&e);
                        Err((w.code, w.message))
                    }
                    Err(_) => Err(("internal", "internal error; see the server log".into())),
                }
            }
        };
        let (reply, body) = match outcome {
            Ok(body) => {
                self.shared
                    .metrics
                    .claim_provisions
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(request = %crate::printable(&req), device.id = %body["id"], "mqtt: claim provisioned a device");
                (format!("{topic}/accepted"), body)
            }
            Err((code, message)) => {
                tracing::warn!(reason = code, request = %crate::printable(&req), detail = %crate::printable(&message), "mqtt: provisioning request rejected");
                (
                    format!("{topic}/rejected"),
                    serde_json::json!({"code": code, "message": message}),
                )
            }
        };
        self.encode(Packet::Publish(
            Publish::new(
                bytes::Bytes::from(reply),
                bytes::Bytes::from(body.to_string()),
                false,
            ),
            None,
        ))
    }
}
