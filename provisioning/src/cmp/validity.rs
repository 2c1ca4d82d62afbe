//! The validity a certificate request asks for (`openssl cmp -days N`).
//!
//! RFC 4211 puts an `OptionalValidity` in the certificate template
//! (`[4] SEQUENCE { notBefore [0] Time OPTIONAL, notAfter [1] Time
//! OPTIONAL }`), which `crmf` 0.2 decodes as X.509's `Validity` (both
//! times, untagged) and so refuses. So before the message is parsed, the
//! template's validity is read here and taken out of a copy of the
//! message, which `cmpv2` then parses; the original bytes still serve for
//! the protection and for the proof of possession, which sign what the
//! client sent.

use der::asn1::{AnyRef, ContextSpecific};
use der::{Decode, Encode, Sequence, Tag, TagMode, TagNumber, Tagged};
use x509_cert::time::Time;

/// What a template asks for (either may be absent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Requested {
    pub not_before: Option<time::OffsetDateTime>,
    pub not_after: Option<time::OffsetDateTime>,
}

/// RFC 4211's OptionalValidity, as it is in the template (IMPLICIT
/// `[4]`; each time a CHOICE, so explicitly tagged).
#[derive(Sequence)]
struct OptionalValidity {
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT", optional = "true")]
    not_before: Option<Time>,
    #[asn1(context_specific = "1", tag_mode = "EXPLICIT", optional = "true")]
    not_after: Option<Time>,
}

/// A message whose certificate request's template held a validity: a copy
/// without it, what it asked for, and the request as the client sent it
/// (what its proof of possession signs).
#[derive(Debug)]
pub struct Taken {
    pub message: Vec<u8>,
    pub requested: Requested,
    pub cert_req: Vec<u8>,
}

/// The body tags whose content is CertReqMessages: ir, cr, kur.
const CERT_REQUESTS: [u8; 3] = [0, 2, 7];

/// `None` if `der` is not an ir, cr or kur whose one request's template
/// has a validity (or does not parse that far: the caller's parse says
/// why).
pub fn take(der: &[u8]) -> Option<Taken> {
    let msg: Vec<AnyRef<'_>> = Vec::from_der(der).ok()?;
    let body = msg.get(1)?;
    let number = match body.tag() {
        Tag::ContextSpecific {
            constructed: true,
            number,
        } if CERT_REQUESTS.contains(&number.value()) => number,
        _ => return None,
    };
    // [n] EXPLICIT CertReqMessages ::= SEQUENCE OF CertReqMsg
    let reqs: Vec<AnyRef<'_>> = Vec::from_der(body.value()).ok()?;
    let [req_msg] = reqs.as_slice() else {
        return None;
    };
    // CertReqMsg ::= SEQUENCE { certReq, popo OPTIONAL, regInfo OPTIONAL }
    let req_msg_der = req_msg.to_der().ok()?;
    let mut parts: Vec<AnyRef<'_>> = Vec::from_der(&req_msg_der).ok()?;
    let cert_req_der = parts.first()?.to_der().ok()?;
    // CertRequest ::= SEQUENCE { certReqId, certTemplate, controls OPTIONAL }
    let mut cert_req: Vec<AnyRef<'_>> = Vec::from_der(&cert_req_der).ok()?;
    let template_der = cert_req.get(1)?.to_der().ok()?;
    let fields: Vec<AnyRef<'_>> = Vec::from_der(&template_der).ok()?;
    let is_validity = |f: &AnyRef<'_>| matches!(f.tag(), Tag::ContextSpecific { number, .. } if number.value() == 4);
    let validity = fields.iter().find(|f| is_validity(f))?;
    // IMPLICIT [4]: the SEQUENCE's contents under another tag.
    let v = OptionalValidity::from_der(
        &der::asn1::SequenceRef::from_der(&sequence_of(validity.value())?)
            .ok()?
            .to_der()
            .ok()?,
    )
    .ok()?;
    let when = |t: Option<Time>| {
        t.and_then(|t| {
            time::OffsetDateTime::from_unix_timestamp(
                i64::try_from(t.to_unix_duration().as_secs()).ok()?,
            )
            .ok()
        })
    };
    let requested = Requested {
        not_before: when(v.not_before),
        not_after: when(v.not_after),
    };
    // The same message, the template without its validity.
    let kept: Vec<AnyRef<'_>> = fields.into_iter().filter(|f| !is_validity(f)).collect();
    let template = kept.to_der().ok()?;
    cert_req[1] = AnyRef::from_der(&template).ok()?;
    let new_cert_req = cert_req.to_der().ok()?;
    parts[0] = AnyRef::from_der(&new_cert_req).ok()?;
    let new_req_msg = parts.to_der().ok()?;
    let new_reqs = vec![AnyRef::from_der(&new_req_msg).ok()?].to_der().ok()?;
    let new_body = ContextSpecific {
        tag_number: TagNumber::new(number.value()),
        tag_mode: TagMode::Explicit,
        value: AnyRef::from_der(&new_reqs).ok()?,
    }
    .to_der()
    .ok()?;
    let mut new_msg = msg;
    new_msg[1] = AnyRef::from_der(&new_body).ok()?;
    Some(Taken {
        message: new_msg.to_der().ok()?,
        requested,
        cert_req: cert_req_der,
    })
}

/// The lifetime to issue for what was requested, at most `max` (the
/// server's): and what was changed, in words, if anything was.
pub fn lifetime(
    r: Requested,
    max: time::Duration,
    now: time::OffsetDateTime,
) -> Result<(time::Duration, Option<String>), super::Failure> {
    let Some(not_after) = r.not_after else {
        let note = r
            .not_before
            .map(|_| "the requested notBefore was not taken: a certificate is valid from when it is issued".to_owned());
        return Ok((max, note));
    };
    let wanted = not_after - now;
    if wanted <= time::Duration::ZERO {
        return Err(super::Failure::new(
            super::FailInfo::BadCertTemplate,
            format!("the requested notAfter {not_after} has passed"),
        ));
    }
    let mut notes = Vec::new();
    if r.not_before
        .is_some_and(|b| b > now + time::Duration::minutes(5))
    {
        notes.push(
            "the requested notBefore was not taken: a certificate is valid from when it is issued"
                .to_owned(),
        );
    }
    let lifetime = if wanted > max {
        notes.push(format!(
            "the requested validity ({} days) was shortened to the server's {} days",
            wanted.whole_days(),
            max.whole_days()
        ));
        max
    } else {
        wanted
    };
    Ok((lifetime, (!notes.is_empty()).then(|| notes.join("; "))))
}

/// `contents` as a SEQUENCE's DER.
fn sequence_of(contents: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    der::Header::new(Tag::Sequence, der::Length::try_from(contents.len()).ok()?)
        .ok()?
        .encode_to_vec(&mut out)
        .ok()?;
    out.extend_from_slice(contents);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_requested_lifetime_is_honoured_within_the_servers() {
        let now = time::OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
        let max = time::Duration::days(90);
        let r = |days: i64| Requested {
            not_before: None,
            not_after: Some(now + time::Duration::days(days)),
        };
        assert_eq!(
            lifetime(r(30), max, now).unwrap(),
            (time::Duration::days(30), None)
        );
        let (l, note) = lifetime(r(400), max, now).unwrap();
        assert_eq!(l, max);
        assert!(note.unwrap().contains("shortened to the server's 90 days"));
        assert!(lifetime(r(-1), max, now).is_err());
        assert_eq!(
            lifetime(Requested::default(), max, now).unwrap(),
            (max, None)
        );
    }

    #[test]
    fn a_message_without_a_validity_is_left_alone() {
        let key = rcgen::KeyPair::generate().unwrap();
        let (sender_key, sender) = {
            let k = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name
                .push(rcgen::DnType::CommonName, "line-1");
            let c = p.self_signed(&k).unwrap();
            (k, c.der().to_vec())
        };
        let ir = super::super::initialization_request(&sender_key, &[sender], "dev-1", &key, true)
            .unwrap();
        assert!(take(&ir).is_none());
        assert!(take(b"garbage").is_none());
    }
}
