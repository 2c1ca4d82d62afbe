//! Lightweight CMP (RFC 9483) at `/.well-known/cmp` on the API listener
//! (HTTP transfer, RFC 6712: `application/pkixcmp`), mapped onto the same
//! registry, CA, claims and audit log as the JSON API and EST.
//!
//! Every request is signature-protected by its sender's certificate (the
//! first of extraCerts), which must chain to fleetgate's root and be in
//! good standing in the registry, exactly as a TLS client certificate on
//! this listener. Then:
//! - `ir`/`cr`/`p10cr`: an admin enrolls any id, a claim spends one of its uses;
//!   the id is the template's subject CN, the key the template's, its
//!   proof of possession checked.
//! - `kur`: a device gets a new certificate for itself (an admin for any
//!   device); the old one stays valid.
//! - `rr`: a device revokes its own certificate, an admin any.
//! - `certConf` confirms (or, rejected, revokes) what an `ir`, `cr` or
//!   `kur` issued; `implicitConfirm` is granted when asked.
//! - `genm` with id-it-caCerts (or nothing) answers the CA certificates.
//!
//! Answers are signed by the CMP signer (`cmp/signer.crt`, issued by the
//! issuing CA). Refusals are CMP error messages (HTTP 200, RFC 6712 3.3)
//! with the PKIFailureInfo that names them and the reason, logged; only a
//! body that is not CMP at all over the wrong content type gets a bare
//! HTTP error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Router};
use cmpv2::body::PkiBody;
use provisioning::cmp::{self, FailInfo, Failure, Incoming, Reply, Responder};
use provisioning::{Authority, CertKey, DeviceId, EnrollRequest, Identity, RevocationReason, Role};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, UnixTime};

use super::{AppState, PeerIdentity};
use crate::https::PeerAddr;

/// Where CMP lives (RFC 9483 6.1).
pub const PATH: &str = "/.well-known/cmp";
/// How long an issued certificate waits for its certConf.
const CONFIRM_WITHIN: Duration = Duration::from_secs(300);
/// At most this many transactions wait for a certConf; past it the
/// oldest are forgotten (their certificates stay issued).
const MAX_PENDING: usize = 10_000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route(PATH, post(endpoint))
        .layer(axum::extract::DefaultBodyLimit::max(cmp::MAX_MESSAGE))
}

/// The CMP service: the signer, the verifier of senders' chains, and the
/// transactions waiting for a certConf.
pub struct Cmp {
    auth: Arc<Authority>,
    responder: Mutex<Arc<Responder>>,
    verifier: Arc<dyn ClientCertVerifier>,
    pending: Waiting,
    replays: Mutex<super::cmp_replay::ReplayGuard>,
}

/// Issued certificates waiting for their certConf, by transactionID.
#[derive(Default)]
struct Waiting(Mutex<HashMap<Vec<u8>, Pending>>);

impl std::fmt::Debug for Cmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cmp").finish_non_exhaustive()
    }
}

/// An issued certificate waiting for its certConf.
struct Pending {
    requester: Identity,
    cert: CertKey,
    hash: Vec<u8>,
    /// The senderNonce of our answer, which the certConf echoes.
    nonce: Vec<u8>,
    since: Instant,
}

impl Cmp {
    pub fn new(auth: Arc<Authority>) -> anyhow::Result<Self> {
        let roots = crate::tls::root_store(auth.ca.root_der())?;
        let verifier = WebPkiClientVerifier::builder(roots).build()?;
        let responder = Mutex::new(Arc::new(Self::load_responder(&auth)?));
        Ok(Self {
            auth,
            responder,
            verifier,
            pending: Waiting::default(),
            replays: Mutex::default(),
        })
    }

    fn load_responder(auth: &Authority) -> Result<Responder, provisioning::Error> {
        let (key, cert) = auth.cmp_signer()?;
        Responder::new(key, &cert, &auth.ca.issuing_der())
    }

    /// The signer, renewed first if it is within a week of expiry.
    fn responder(&self) -> Result<Arc<Responder>, provisioning::Error> {
        let mut r = self.responder.lock().unwrap_or_else(|e| e.into_inner());
        let left = r.not_after() - time::OffsetDateTime::now_utc();
        if left <= provisioning::ca::OCSP_SIGNER_RENEW_BEFORE {
            *r = Arc::new(Self::load_responder(&self.auth)?);
        }
        Ok(r.clone())
    }

    /// Refuses a message seen before, or whose time is off
    /// ([`super::cmp_replay`]).
    fn fresh(&self, msg: &Incoming<'_>, signer: &[u8]) -> Result<(), Failure> {
        let header = &msg.msg.header;
        let mut sender = [0u8; 32];
        sender.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, signer).as_ref());
        let h = super::cmp_replay::Header {
            sender,
            message_time: header.message_time.as_ref().map(|t| t.to_system_time()),
            sender_nonce: header.sender_nonce.as_ref().map(|n| n.as_bytes()),
            transaction: msg.transaction_id()?,
            opens: !matches!(msg.msg.body, PkiBody::CertConf(_)),
        };
        let mut replays = self.replays.lock().unwrap_or_else(|e| e.into_inner());
        replays.check(&h, std::time::SystemTime::now(), Instant::now())
    }
}

impl Waiting {
    fn remember(&self, transaction: &[u8], p: Pending) {
        let mut pending = self.0.lock().unwrap_or_else(|e| e.into_inner());
        pending.retain(|_, p| p.since.elapsed() < CONFIRM_WITHIN);
        if pending.len() >= MAX_PENDING {
            if let Some(oldest) = pending
                .iter()
                .min_by_key(|(_, p)| p.since)
                .map(|(k, _)| k.clone())
            {
                pending.remove(&oldest);
            }
        }
        pending.insert(transaction.to_vec(), p);
    }

    /// The certificate `transaction` issued, taken for its confirmation
    /// only if `check` passes: a certConf from anyone but the requester
    /// (or with the wrong nonce or hash) leaves it waiting.
    fn confirm(
        &self,
        transaction: &[u8],
        check: impl FnOnce(&Pending) -> Result<(), Failure>,
    ) -> Result<Pending, Failure> {
        let mut pending = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let waiting = pending
            .get(transaction)
            .filter(|p| p.since.elapsed() < CONFIRM_WITHIN)
            .ok_or_else(|| {
                Failure::new(
                    FailInfo::BadRequest,
                    "no certificate of this transaction waits for confirmation",
                )
            })?;
        check(waiting)?;
        pending
            .remove(transaction)
            .ok_or_else(|| Failure::new(FailInfo::SystemFailure, "the confirmation vanished"))
    }
}

/// How a message was answered, for the log.
struct Answer {
    reply: Reply,
    implicit_confirm: bool,
    /// What to remember until the certConf.
    pending: Option<Pending>,
}

impl Answer {
    fn plain(reply: Reply) -> Self {
        Self {
            reply,
            implicit_confirm: false,
            pending: None,
        }
    }
}

async fn endpoint(
    State(st): State<AppState>,
    addr: Option<Extension<PeerAddr>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(ct) = super::expect_content_type(&headers, "application/pkixcmp") {
        tracing::warn!(peer.addr = ?addr.map(|a| a.0 .0), content_type = %crate::printable(ct), "cmp: refused: wrong content type");
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            [(CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("unsupported_media_type: CMP takes Content-Type: application/pkixcmp (DER), not {ct:?}\n"),
        )
            .into_response();
    }
    let addr = addr.map(|a| a.0 .0);
    let state = st.clone();
    let done = tokio::task::spawn_blocking(move || answer(&state, &body, addr)).await;
    match done {
        Ok(Ok((der, wrote))) => {
            if wrote {
                st.caught_up().await;
            }
            (StatusCode::OK, [(CONTENT_TYPE, "application/pkixcmp")], der).into_response()
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cmp: no answer could be signed");
            super::ApiError::from(e).into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "cmp: the handler failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// The signed answer to `der`, and whether the registry was written.
fn answer(
    st: &AppState,
    der: &[u8],
    addr: Option<std::net::SocketAddr>,
) -> Result<(Vec<u8>, bool), provisioning::Error> {
    let responder = st.cmp.responder()?;
    // A validity in the template (openssl cmp -days): read here, and
    // parsed without it (crmf cannot read it).
    let taken = cmp::validity::take(der);
    let parsed = taken.as_ref().map_or(der, |t| &t.message[..]);
    let msg = match Incoming::parse_taken(der, parsed, taken.as_ref()) {
        Ok(m) => m,
        Err(f) => {
            tracing::warn!(peer.addr = ?addr, reason = %crate::printable(&f.to_string()), "cmp: refused");
            // Answered in its transaction if its header reads, so the
            // requester sees why.
            let header = Incoming::header_of(der);
            return Ok((
                responder
                    .respond(header.as_ref(), "", Reply::Error(f), false)?
                    .0,
                false,
            ));
        }
    };
    let kind = msg.kind();
    let (reply, implicit, pending, wrote, who) = match handle(st, &msg, addr) {
        Ok((a, who)) => {
            let wrote = !matches!(a.reply, Reply::CaCerts(_) | Reply::NothingKnown);
            (a.reply, a.implicit_confirm, a.pending, wrote, who)
        }
        Err((f, who)) => {
            tracing::warn!(peer.addr = ?addr, client = %who.as_deref().unwrap_or("-"), body = kind, reason = %crate::printable(&f.to_string()), "cmp: refused");
            (Reply::Error(f), false, None, false, who)
        }
    };
    let ok = !matches!(reply, Reply::Error(_));
    let (out, nonce) = responder.respond(Some(&msg.msg.header), kind, reply, implicit)?;
    if let Some(mut p) = pending {
        p.nonce = nonce;
        if let Ok(t) = msg.transaction_id() {
            st.cmp.pending.remember(t, p);
        }
    }
    if ok {
        tracing::info!(peer.addr = ?addr, client = %who.as_deref().unwrap_or("-"), body = kind, "cmp: answered");
    }
    Ok((out, wrote))
}

type Refusal = (Failure, Option<String>);

/// Checks who sent `msg` and does what it asks. The `String` names the
/// sender, for the log.
fn handle(
    st: &AppState,
    msg: &Incoming<'_>,
    addr: Option<std::net::SocketAddr>,
) -> Result<(Answer, Option<String>), Refusal> {
    let kind = msg.kind();
    let anon = |f: Failure| (f, None);
    if !matches!(
        msg.msg.body,
        PkiBody::Ir(_)
            | PkiBody::Cr(_)
            | PkiBody::P10cr(_)
            | PkiBody::KUr(_)
            | PkiBody::Rr(_)
            | PkiBody::CertConf(_)
            | PkiBody::GenM(_)
    ) {
        return Err(anon(Failure::new(
            FailInfo::BadRequest,
            format!("fleetgate answers ir, cr, p10cr, kur, rr, certConf and genm, not {kind}"),
        )));
    }
    msg.transaction_id().map_err(anon)?;
    let (signer, chain) = msg.signer_chain().map_err(anon)?;
    let intermediates: Vec<CertificateDer<'_>> = chain
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    st.cmp
        .verifier
        .verify_client_cert(
            &CertificateDer::from(signer.as_slice()),
            &intermediates,
            UnixTime::now(),
        )
        .map_err(|e| {
            anon(Failure::new(
                FailInfo::SignerNotTrusted,
                format!("the protection certificate does not chain to fleetgate's root: {e}"),
            ))
        })?;
    msg.verify_protection(&signer).map_err(anon)?;
    st.cmp.fresh(msg, &signer).map_err(anon)?;
    let peer = PeerIdentity::from_der(&signer, addr).map_err(|e| {
        anon(Failure::new(
            FailInfo::NotAuthorized,
            e.message().to_owned(),
        ))
    })?;
    let who = Some(named(&peer.identity));
    let refuse = |f: Failure| (f, who.clone());
    peer.enrolling(st).map_err(|e| {
        refuse(Failure::new(
            FailInfo::NotAuthorized,
            e.message().to_owned(),
        ))
    })?;
    let me = peer.identity.clone();
    let actor = format!("{} (cmp)", named(&me));
    let auth = &st.auth;
    let failed = |e: provisioning::Error| refuse(cmp::failure_of(&e));
    // The lifetime asked for (openssl cmp -days), within the server's.
    let (lifetime, shortened) = cmp::validity::lifetime(
        msg.requested.unwrap_or_default(),
        st.cert_lifetime,
        time::OffsetDateTime::now_utc(),
    )
    .map_err(&refuse)?;
    let notes = |mut left_out: Vec<String>| {
        left_out.extend(shortened.clone());
        left_out
    };
    let answer = match &msg.msg.body {
        PkiBody::Ir(_) | PkiBody::Cr(_) | PkiBody::P10cr(_) => {
            let req = match &msg.msg.body {
                PkiBody::P10cr(csr) => cmp::p10_request(csr),
                PkiBody::Ir(reqs) | PkiBody::Cr(reqs) => msg.cert_request(reqs),
                _ => unreachable!("matched above"),
            }
            .map_err(&refuse)?;
            let id = subject_id(&req.key.subject_cn).map_err(&refuse)?;
            let (_, cert) = match me.role {
                Role::Admin => auth.enroll_key(
                    &EnrollRequest {
                        id,
                        role: Role::Device,
                        manufacturer: None,
                        csr: Vec::new(),
                        lifetime,
                    },
                    &req.key,
                    &actor,
                ),
                Role::Claim => {
                    auth.provision_key_with_claim(&me.id, &id, &req.key, lifetime, &actor)
                }
                role => {
                    return Err(refuse(Failure::new(
                        FailInfo::NotAuthorized,
                        format!("a {role} certificate may not enroll new devices (a device renews itself with kur)"),
                    )))
                }
            }
            .map_err(failed)?;
            issued(msg, me, req.cert_req_id, cert, notes(req.key.left_out))
        }
        PkiBody::KUr(reqs) => {
            let req = msg.cert_request(reqs).map_err(&refuse)?;
            let id = match (me.role, &req.key.subject_cn) {
                (Role::Admin, _) => subject_id(&req.key.subject_cn).map_err(&refuse)?,
                (Role::Device, Some(cn)) if *cn != me.id.as_str() => {
                    return Err(refuse(Failure::new(
                        FailInfo::NotAuthorized,
                        format!("device {} may update only its own key, not {cn}'s", me.id),
                    )))
                }
                (Role::Device, _) => me.id.clone(),
                (role, _) => {
                    return Err(refuse(Failure::new(
                        FailInfo::NotAuthorized,
                        format!("a {role} certificate may not update keys"),
                    )))
                }
            };
            let (_, cert) = auth
                .rotate_key(&id, &req.key, lifetime, &actor)
                .map_err(failed)?;
            issued(msg, me, req.cert_req_id, cert, notes(req.key.left_out))
        }
        PkiBody::Rr(details) => {
            let req = cmp::revocation_request(details).map_err(&refuse)?;
            let rec = auth
                .registry
                .certificates_with_serial(&req.serial)
                .map_err(failed)?
                .into_iter()
                .find(|c| c.issuer == req.issuer)
                .ok_or_else(|| {
                    refuse(Failure::new(
                        FailInfo::BadCertId,
                        format!("no certificate {} from {}", req.serial, req.issuer),
                    ))
                })?;
            match me.role {
                Role::Admin => {}
                Role::Device if rec.device_id == me.id => {}
                role => {
                    return Err(refuse(Failure::new(
                        FailInfo::NotAuthorized,
                        format!(
                            "{role} {} may revoke only its own certificates, not {}'s",
                            me.id, rec.device_id
                        ),
                    )))
                }
            }
            let reason = match req.reason {
                None => RevocationReason::Unspecified,
                Some(code) => RevocationReason::ALL
                    .into_iter()
                    .find(|r| r.code() == code)
                    .ok_or_else(|| {
                        refuse(Failure::new(
                            FailInfo::BadRequest,
                            format!("CRL reason {code} is not one fleetgate records"),
                        ))
                    })?,
            };
            let rec = auth
                .registry
                .revoke_certificate(&rec.key(), reason, &actor)
                .map_err(failed)?;
            tracing::info!(serial = %rec.serial, device.id = %rec.device_id, %reason, by = %actor, "certificate revoked");
            st.metrics
                .revocations
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Answer::plain(Reply::Revoked)
        }
        PkiBody::CertConf(statuses) => {
            let conf = cmp::confirmation(statuses).map_err(&refuse)?;
            let transaction = msg.transaction_id().map_err(&refuse)?;
            let echoed = msg.msg.header.recip_nonce.as_ref().map(|n| n.as_bytes());
            // Checked before it is taken: nobody else can cancel it.
            let p = st
                .cmp
                .pending
                .confirm(transaction, |p| {
                    confirmable(p, &me, echoed, &conf.cert_hash)
                })
                .map_err(&refuse)?;
            if let Some(why) = conf.rejected {
                // The requester refused what it was given: it must not
                // stay usable.
                let rec = auth
                    .registry
                    .revoke_certificate(&p.cert, RevocationReason::CessationOfOperation, &actor)
                    .map_err(failed)?;
                tracing::warn!(serial = %rec.serial, device.id = %rec.device_id, reason = %crate::printable(&why), "cmp: certificate rejected by its requester; revoked");
            }
            Answer::plain(Reply::Confirmed)
        }
        PkiBody::GenM(itavs) => Answer::plain(if cmp::wants_ca_certs(itavs) {
            let ca = &st.auth.ca;
            Reply::CaCerts(vec![ca.issuing_der().to_vec(), ca.root_der().to_vec()])
        } else {
            Reply::NothingKnown
        }),
        _ => unreachable!("checked above"),
    };
    Ok((answer, who))
}

/// Whether `me` may confirm `p` with a certConf echoing `echoed` and
/// naming `hash`.
fn confirmable(
    p: &Pending,
    me: &Identity,
    echoed: Option<&[u8]>,
    hash: &[u8],
) -> Result<(), Failure> {
    if p.requester != *me {
        return Err(Failure::new(
            FailInfo::NotAuthorized,
            format!(
                "the transaction is {}'s, not {}'s",
                named(&p.requester),
                named(me)
            ),
        ));
    }
    if echoed != Some(p.nonce.as_slice()) {
        return Err(Failure::new(
            FailInfo::BadRecipientNonce,
            "recipNonce is not the senderNonce of fleetgate's answer",
        ));
    }
    if hash != p.hash {
        return Err(Failure::new(
            FailInfo::BadCertId,
            "certHash is not the issued certificate's SHA-256",
        ));
    }
    Ok(())
}

/// `role:id`, as the audit log names principals.
fn named(i: &Identity) -> String {
    format!("{}:{}", i.role, i.id)
}

/// The device id a template's subject CN names.
fn subject_id(cn: &Option<String>) -> Result<DeviceId, Failure> {
    let Some(cn) = cn else {
        return Err(Failure::new(
            FailInfo::BadCertTemplate,
            "the template's subject has no common name: CMP names the device there",
        ));
    };
    DeviceId::try_new(cn.clone()).map_err(|e| cmp::failure_of(&e))
}

/// The answer to an `ir`, `cr` or `kur` that issued `cert`.
fn issued(
    msg: &Incoming<'_>,
    requester: Identity,
    cert_req_id: der::asn1::Int,
    cert: provisioning::IssuedCert,
    left_out: Vec<String>,
) -> Answer {
    let implicit = msg.wants_implicit_confirm();
    tracing::info!(serial = %cert.serial, by = %named(&requester), body = msg.kind(), "cmp: issued");
    Answer {
        pending: (!implicit).then(|| Pending {
            requester,
            cert: cert.key(),
            hash: cmp::cert_hash(&cert.der),
            nonce: Vec::new(),
            since: Instant::now(),
        }),
        reply: Reply::Issued {
            cert_req_id,
            cert: cert.der,
            left_out,
        },
        implicit_confirm: implicit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use provisioning::Serial;

    fn identity(role: Role, id: &str) -> Identity {
        Identity {
            role,
            id: DeviceId::try_new(id).unwrap_or_else(|_| unreachable!("a valid id")),
        }
    }

    #[test]
    fn only_the_requester_can_confirm_or_cancel() {
        let waiting = Waiting::default();
        let victim = identity(Role::Device, "dev-1");
        waiting.remember(
            b"t1",
            Pending {
                requester: victim.clone(),
                cert: CertKey::new(
                    None,
                    "CN=issuing",
                    Serial::from_bytes(&[1]).unwrap_or_else(|_| unreachable!("a valid serial")),
                ),
                hash: vec![9; 32],
                nonce: vec![5; 16],
                since: Instant::now(),
            },
        );
        let check = |me: &Identity, nonce: &[u8], hash: &[u8]| {
            let (me, nonce, hash) = (me.clone(), nonce.to_vec(), hash.to_vec());
            move |p: &Pending| confirmable(p, &me, Some(&nonce), &hash)
        };
        // Someone else's certConf, a wrong nonce, a wrong hash: refused,
        // and the confirmation still waits.
        let other = identity(Role::Device, "dev-2");
        let e = waiting
            .confirm(b"t1", check(&other, &[5; 16], &[9; 32]))
            .err();
        assert_eq!(e.map(|e| e.info), Some(FailInfo::NotAuthorized));
        let e = waiting
            .confirm(b"t1", check(&victim, &[6; 16], &[9; 32]))
            .err();
        assert_eq!(e.map(|e| e.info), Some(FailInfo::BadRecipientNonce));
        let e = waiting
            .confirm(b"t1", check(&victim, &[5; 16], &[8; 32]))
            .err();
        assert_eq!(e.map(|e| e.info), Some(FailInfo::BadCertId));
        // The requester's own goes through, once.
        assert!(waiting
            .confirm(b"t1", check(&victim, &[5; 16], &[9; 32]))
            .is_ok());
        let e = waiting
            .confirm(b"t1", check(&victim, &[5; 16], &[9; 32]))
            .err();
        assert_eq!(e.map(|e| e.info), Some(FailInfo::BadRequest));
    }
}
