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
