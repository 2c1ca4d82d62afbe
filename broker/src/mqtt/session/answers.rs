//! What the broker answers itself: a claim's certificate request, and
//! OCSP requests over MQTT.

use super::*;

impl Session {
    /// Answers an OCSP request straight back to this client (signed on the
    /// blocking pool, within this session's OCSP rate), and acknowledges it
    /// if it was sent with QoS 1. Over the rate, the request is dropped,
    /// counted and logged (once a second at most).
    pub(super) async fn answer_ocsp(
        &mut self,
        p: &Publish,
        reply_topic: String,
        correlation: Option<bytes::Bytes>,
    ) -> Result<(), String> {
        self.ack(p)?;
        if let crate::net::Verdict::Deny { warn } = self.ocsp_budget.check((), self.now().mono) {
            self.shared.metrics.refused(Refusal::RateLimited);
            if warn {
                tracing::warn!(
                    reason = "rate_limited",
                    "mqtt: OCSP requests over this session's rate; dropped"
                );
            }
            return Ok(());
        }
        let (status, request) = (self.shared.status.clone(), ocsp_request_der(&p.payload));
        let der = tokio::task::spawn_blocking(move || status.ocsp(&request))
            .await
            .map_err(|e| format!("OCSP task: {e}"))?;
        let props = self.ch.is_v5().then(|| PublishProperties {
            correlation_data: correlation,
            content_type: Some("application/ocsp-response".into()),
            ..PublishProperties::default()
        });
        tracing::debug!(topic = %crate::printable(&reply_topic), "mqtt: answered an OCSP request");
        self.encode(Packet::Publish(
            Publish::new(
                bytes::Bytes::from(reply_topic),
                bytes::Bytes::from(der),
                false,
            ),
            props,
        ))
    }

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

/// An OCSP request over MQTT as DER: sent as DER, or as base64 text
/// (what a shell can pass, e.g. `mosquitto_rr -m "$(base64 -w0 req.der)"`;
/// a DER request always holds bytes outside base64's alphabet, such as its
/// OID tags).
pub(super) fn ocsp_request_der(payload: &Bytes) -> Bytes {
    use base64ct::Encoding;
    let text = payload.iter().all(|b| {
        b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=') || b.is_ascii_whitespace()
    });
    if !text || payload.is_empty() {
        return payload.clone();
    }
    let compact: String = payload
        .iter()
        .filter(|b| !b.is_ascii_whitespace())
        .map(|b| char::from(*b))
        .collect();
    match base64ct::Base64::decode_vec(&compact) {
        Ok(der) => Bytes::from(der),
        Err(_) => payload.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ocsp_request_comes_as_der_or_as_base64_text() {
        // DER: taken as it is (its tags are outside base64's alphabet).
        let der = Bytes::from_static(&[0x30, 0x03, 0x30, 0x01, 0x00]);
        assert_eq!(ocsp_request_der(&der), der);
        // The same bytes as base64, with the line breaks a shell adds.
        let text = Bytes::from_static(b"MAMw\nAQA=\n");
        assert_eq!(ocsp_request_der(&text), der);
        // Not base64 after all: passed on, for the parser to refuse.
        let odd = Bytes::from_static(b"abc");
        assert_eq!(ocsp_request_der(&odd), odd);
        assert_eq!(ocsp_request_der(&Bytes::new()), Bytes::new());
    }
}
