//! The checker: fleetgate's promises, as the README states them, checked
//! over a whole history. Pure: a history in, violations out, each naming
//! the operations involved.

use std::collections::{BTreeMap, HashMap};

use crate::history::{CertStatus, Event, History, Op, Outcome};

/// A promise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rule {
    /// An acknowledged revocation is never undone.
    RevocationUndone,
    /// After an acknowledged revocation no node admits the device once it
    /// has heard from the majority, nor beyond the staleness bound of its
    /// last contact.
    AdmittedAfterRevocation,
    /// OCSP never answers good for a certificate whose revocation was
    /// acknowledged before the request, on a node in contact.
    GoodAfterRevocation,
    /// An acknowledged enrollment is never lost.
    EnrollmentLost,
    /// An acknowledged QoS 1 command to a persistent session is delivered
    /// at least once, unless its device was revoked or it expired.
    CommandLost,
    /// ... and in order.
    CommandOutOfOrder,
    /// QoS 1 telemetry acknowledged to a device reaches a consuming
    /// service at least once.
    TelemetryLost,
    /// No process stops answering for longer than the fault that caused
    /// it (and its recovery).
    Unavailable,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::RevocationUndone => "revocation_undone",
            Rule::AdmittedAfterRevocation => "admitted_after_revocation",
            Rule::GoodAfterRevocation => "good_after_revocation",
            Rule::EnrollmentLost => "enrollment_lost",
            Rule::CommandLost => "command_lost",
            Rule::CommandOutOfOrder => "command_out_of_order",
            Rule::TelemetryLost => "telemetry_lost",
            Rule::Unavailable => "unavailable",
        }
    }
}

/// A broken promise, with the operations that show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub rule: Rule,
    pub events: Vec<u64>,
    pub detail: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} (operations {:?})",
            self.rule.as_str(),
            self.detail,
            self.events
        )
    }
}

/// Every violation in `h`, by rule, then by operation.
pub fn check(h: &History) -> Vec<Violation> {
    let mut by_device: HashMap<&str, Vec<&Event>> = HashMap::new();
    for e in &h.events {
        by_device.entry(e.op.device()).or_default().push(e);
    }
    let mut out = Vec::new();
    for (device, events) in &by_device {
        revocations(h, device, events, &mut out);
        enrollments(h, device, events, &mut out);
        commands(h, device, events, &mut out);
        telemetry(device, events, &mut out);
    }
    availability(h, &mut out);
    out.sort_by(|a, b| (a.rule, &a.events).cmp(&(b.rule, &b.events)));
    out
}

/// The revocation rules, for one device.
fn revocations(h: &History, device: &str, events: &[&Event], out: &mut Vec<Violation>) {
    let Some(revoked) = events
        .iter()
        .filter(|e| e.ok() && matches!(e.op, Op::Revoke { .. }))
        .min_by_key(|e| e.end)
    else {
        return;
    };
    let t = revoked.end;
    if let Some(held) = &h.final_revoked {
        if !held.iter().any(|d| d == device) {
            out.push(Violation {
                rule: Rule::RevocationUndone,
                events: vec![revoked.id],
                detail: format!(
                    "{device} revoked at {t} ms, not revoked in the registry at the end"
                ),
            });
        }
    }
    for e in events.iter().filter(|e| e.ok() && e.start > t) {
        match &e.op {
            Op::Resume { .. } | Op::Enroll { .. } => out.push(Violation {
                rule: Rule::RevocationUndone,
                events: vec![revoked.id, e.id],
                detail: format!(
                    "{device} revoked at {t} ms, then {} acknowledged at {} ms",
                    name(&e.op),
                    e.end
                ),
            }),
            Op::Connect { node, .. } => {
                let heard = h.heard(*node, t, e.start);
                let stale = h
                    .last_contact(*node, e.start)
                    .is_none_or(|c| e.start > c + h.staleness);
                if heard || stale {
                    out.push(Violation {
                        rule: Rule::AdmittedAfterRevocation,
                        events: vec![revoked.id, e.id],
                        detail: format!(
                            "{device} revoked at {t} ms, admitted by node {node} at {} ms ({})",
                            e.start,
                            if heard {
                                "it had heard from the majority since"
                            } else {
                                "past the staleness bound of its last contact"
                            }
                        ),
                    });
                }
            }
            Op::Ocsp {
                node,
                answer: Some(CertStatus::Good),
                ..
            } if h.heard(*node, t, e.start) => out.push(Violation {
                rule: Rule::GoodAfterRevocation,
                events: vec![revoked.id, e.id],
                detail: format!(
                    "{device} revoked at {t} ms, OCSP on node {node} said good at {} ms",
                    e.start
                ),
            }),
            _ => {}
        }
    }
}

/// An acknowledged enrollment stays: nothing in contact says unknown
/// after it, and the registry holds it at the end.
fn enrollments(h: &History, device: &str, events: &[&Event], out: &mut Vec<Violation>) {
    let Some(enrolled) = events
        .iter()
        .filter(|e| e.ok() && matches!(e.op, Op::Enroll { .. }))
        .min_by_key(|e| e.end)
    else {
        return;
    };
    let t = enrolled.end;
    for e in events.iter().filter(|e| e.start > t) {
        let unknown_here = match (&e.op, &e.outcome) {
            (
                Op::Ocsp {
                    node,
                    answer: Some(CertStatus::Unknown),
                    ..
                },
                Outcome::Ok,
            ) => Some(*node),
            (Op::Connect { node, .. }, Outcome::Refused(why)) if why.contains("unknown") => {
                Some(*node)
            }
            _ => None,
        };
        if let Some(node) = unknown_here.filter(|n| h.heard(*n, t, e.start)) {
            out.push(Violation {
                rule: Rule::EnrollmentLost,
                events: vec![enrolled.id, e.id],
                detail: format!(
                    "{device} enrolled at {t} ms, unknown to node {node} at {} ms",
                    e.start
                ),
            });
        }
    }
    if let Some(held) = &h.final_devices {
        if !held.iter().any(|d| d == device) {
            out.push(Violation {
                rule: Rule::EnrollmentLost,
                events: vec![enrolled.id],
                detail: format!("{device} enrolled at {t} ms, not in the registry at the end"),
            });
        }
    }
}

/// Commands acknowledged to a service reach the device's persistent
/// session, at least once and in order, unless it was revoked or they
/// expired.
fn commands(h: &History, device: &str, events: &[&Event], out: &mut Vec<Violation>) {
    let revoked = events
        .iter()
        .any(|e| matches!(e.op, Op::Revoke { .. }) && !matches!(e.outcome, Outcome::Refused(_)));
    let mut sent: Vec<(&Event, u64, bool)> = events
        .iter()
        .filter(|e| e.ok())
        .filter_map(|e| match &e.op {
            Op::Command { seq, expires, .. } => {
                Some((*e, *seq, expires.is_some_and(|x| x <= h.end)))
            }
            _ => None,
        })
        .collect();
    sent.sort_by_key(|(e, _, _)| e.end);
    // Each command's first arrival.
    let mut first: BTreeMap<u64, &Event> = BTreeMap::new();
    for e in events {
        if let Op::Delivered { seq, .. } = e.op {
            first
                .entry(seq)
                .and_modify(|f| {
                    if e.start < f.start {
                        *f = e;
                    }
                })
                .or_insert(e);
        }
    }
    for (e, seq, expired) in &sent {
        if !first.contains_key(seq) && !revoked && !expired {
            out.push(Violation {
                rule: Rule::CommandLost,
                events: vec![e.id],
                detail: format!(
                    "command {seq} to {device}, acknowledged at {} ms, never delivered",
                    e.end
                ),
            });
        }
    }
    // In the order they were acknowledged: a command acknowledged before
    // another first arrives before it.
    let arrivals: Vec<(u64, &Event)> = sent
        .iter()
        .filter_map(|(_, seq, _)| first.get(seq).map(|d| (*seq, *d)))
        .collect();
    for pair in arrivals.windows(2) {
        let ((a, da), (b, db)) = (pair[0], pair[1]);
        if db.start < da.start {
            out.push(Violation {
                rule: Rule::CommandOutOfOrder,
                events: vec![da.id, db.id],
                detail: format!(
                    "{device} got command {b} at {} ms before command {a} at {} ms, acknowledged in the other order",
                    db.start, da.start
                ),
            });
        }
    }
}

/// Telemetry acknowledged to a device reaches a consumer.
fn telemetry(device: &str, events: &[&Event], out: &mut Vec<Violation>) {
    let consumed: std::collections::HashSet<u64> = events
        .iter()
        .filter_map(|e| match e.op {
            Op::Consumed { seq, .. } => Some(seq),
            _ => None,
        })
        .collect();
    for e in events.iter().filter(|e| e.ok()) {
        if let Op::Publish { seq, node, .. } = e.op {
            if !consumed.contains(&seq) {
                out.push(Violation {
                    rule: Rule::TelemetryLost,
                    events: vec![e.id],
                    detail: format!(
                        "telemetry {seq} of {device}, acknowledged by node {node} at {} ms, never consumed",
                        e.end
                    ),
                });
            }
        }
    }
}

/// A process silent longer than the faults on it (and its recovery).
fn availability(h: &History, out: &mut Vec<Violation>) {
    for s in &h.silences {
        // The faults touching the process and overlapping the silence
        // explain it up to their end, plus the recovery.
        // Its own faults, and those on what it needs.
        let touches = |t: &String| {
            t == &s.process
                || h.dependencies
                    .iter()
                    .any(|(p, needs)| p == &s.process && needs == t)
        };
        let explained_to = h
            .faults
            .iter()
            .filter(|f| f.targets.iter().any(touches))
            .filter(|f| f.span.from <= s.span.to && s.span.from <= f.span.to + h.recovery)
            .map(|f| f.span.to + h.recovery)
            .max();
        let unexplained = match explained_to {
            Some(to) => s.span.to > to,
            None => true,
        };
        if unexplained {
            out.push(Violation {
                rule: Rule::Unavailable,
                events: Vec::new(),
                detail: format!(
                    "{} did not answer from {} to {} ms{}",
                    s.process,
                    s.span.from,
                    s.span.to,
                    match explained_to {
                        Some(to) => format!(", past its faults' end and recovery at {to} ms"),
                        None => ", with no fault on it".to_owned(),
                    }
                ),
            });
        }
    }
}

fn name(op: &Op) -> &'static str {
    match op {
        Op::Enroll { .. } => "an enrollment",
        Op::Resume { .. } => "a resume",
        _ => "an operation",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Fault, Silence, Span};

    /// A history builder: operations with made-up times, nodes always in
    /// contact unless told.
    struct H(History);

    impl H {
        fn new() -> Self {
            H(History {
                contact: vec![
                    vec![Span {
                        from: 0,
                        to: 100_000
                    }];
                    3
                ],
                staleness: 60_000,
                propagation: 1_000,
                recovery: 5_000,
                end: 100_000,
                ..History::default()
            })
        }
        fn op(mut self, start: u64, end: u64, op: Op, outcome: Outcome) -> Self {
            let id = self.0.events.len() as u64;
            self.0.events.push(Event {
                id,
                start,
                end,
                op,
                outcome,
            });
            self
        }
        fn ok(self, start: u64, end: u64, op: Op) -> Self {
            self.op(start, end, op, Outcome::Ok)
        }
        fn rules(&self) -> Vec<Rule> {
            check(&self.0).into_iter().map(|v| v.rule).collect()
        }
    }

    fn d() -> String {
        "dev-1".to_owned()
    }

    #[test]
    fn a_clean_history_has_no_violation() {
        let h = H::new()
            .ok(
                0,
                10,
                Op::Enroll {
                    device: d(),
                    node: 0,
                },
            )
            .ok(
                20,
                30,
                Op::Connect {
                    device: d(),
                    node: 1,
                },
            )
            .ok(
                40,
                50,
                Op::Publish {
                    device: d(),
                    node: 1,
                    seq: 1,
                },
            )
            .ok(
                60,
                60,
                Op::Consumed {
                    device: d(),
                    seq: 1,
                },
            )
            .ok(
                70,
                80,
                Op::Command {
                    device: d(),
                    node: 2,
                    seq: 1,
                    expires: None,
                },
            )
            .ok(
                90,
                90,
                Op::Delivered {
                    device: d(),
                    seq: 1,
                },
            )
            .ok(
                100,
                110,
                Op::Revoke {
                    device: d(),
                    node: 0,
                },
            )
            // Right after the revocation, another node may not have heard.
            .ok(
                300,
                310,
                Op::Connect {
                    device: d(),
                    node: 2,
                },
            )
            .ok(
                5_000,
                5_010,
                Op::Ocsp {
                    device: d(),
                    node: 1,
                    answer: Some(CertStatus::Revoked),
                },
            )
            .op(
                6_000,
                6_010,
                Op::Connect {
                    device: d(),
                    node: 1,
                },
                Outcome::Refused("revoked".into()),
            );
        assert_eq!(h.rules(), []);
    }

    #[test]
    fn admission_after_a_revocation_the_node_heard_of_is_caught() {
        let h = H::new()
            .ok(
                0,
                10,
                Op::Revoke {
                    device: d(),
                    node: 0,
                },
            )
            .ok(
                5_000,
                5_010,
                Op::Connect {
                    device: d(),
                    node: 1,
                },
            );
        let v = check(&h.0);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].rule, Rule::AdmittedAfterRevocation);
        assert_eq!(v[0].events, [0, 1]);
    }

    #[test]
    fn a_partitioned_node_may_admit_from_its_view_but_not_past_the_staleness_bound() {
        let mut h = H::new()
            .ok(
                0,
                10,
                Op::Revoke {
                    device: d(),
                    node: 0,
                },
            )
            .ok(
                30_000,
                30_010,
                Op::Connect {
                    device: d(),
                    node: 2,
                },
            );
        // Node 2 cut off from the majority from 5 ms on.
        h.0.contact[2] = vec![Span { from: 0, to: 5 }];
        assert_eq!(h.rules(), [], "within the bound, from its last view");
        let h = h.ok(
            70_000,
            70_010,
            Op::Connect {
                device: d(),
                node: 2,
            },
        );
        assert_eq!(h.rules(), [Rule::AdmittedAfterRevocation], "past it");
    }

    #[test]
    fn a_revocation_taken_back_is_caught() {
        let h = H::new()
            .ok(
                0,
                10,
                Op::Revoke {
                    device: d(),
                    node: 0,
                },
            )
            .ok(
                20,
                30,
                Op::Resume {
                    device: d(),
                    node: 1,
                },
            );
        assert_eq!(h.rules(), [Rule::RevocationUndone]);
    }

    #[test]
    fn ocsp_good_after_a_revocation_is_caught_once_the_node_heard() {
        let h = H::new()
            .ok(
                0,
                10,
                Op::Revoke {
                    device: d(),
                    node: 0,
                },
            )
            .ok(
                200,
                210,
                Op::Ocsp {
                    device: d(),
                    node: 1,
                    answer: Some(CertStatus::Good),
                },
            )
            .ok(
                3_000,
                3_010,
                Op::Ocsp {
                    device: d(),
                    node: 1,
                    answer: Some(CertStatus::Good),
                },
            );
        let v = check(&h.0);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(
            (v[0].rule, v[0].events.clone()),
            (Rule::GoodAfterRevocation, vec![0, 2])
        );
    }

    #[test]
    fn a_lost_enrollment_is_caught() {
        let mut h = H::new()
            .ok(
                0,
                10,
                Op::Enroll {
                    device: d(),
                    node: 0,
                },
            )
            .ok(
                5_000,
                5_010,
                Op::Ocsp {
                    device: d(),
                    node: 2,
                    answer: Some(CertStatus::Unknown),
                },
            );
        h.0.final_devices = Some(vec!["other".into()]);
        assert_eq!(h.rules(), [Rule::EnrollmentLost, Rule::EnrollmentLost]);
    }

    #[test]
    fn lost_and_reordered_commands_are_caught_unless_revoked_or_expired() {
        let h = H::new()
            .ok(
                0,
                10,
                Op::Command {
                    device: d(),
                    node: 0,
                    seq: 1,
                    expires: None,
                },
            )
            .ok(
                20,
                30,
                Op::Command {
                    device: d(),
                    node: 0,
                    seq: 2,
                    expires: None,
                },
            )
            .ok(
                40,
                50,
                Op::Command {
                    device: d(),
                    node: 0,
                    seq: 3,
                    expires: None,
                },
            )
            .ok(
                60,
                70,
                Op::Command {
                    device: d(),
                    node: 0,
                    seq: 4,
                    expires: Some(500),
                },
            )
            .ok(
                100,
                100,
                Op::Delivered {
                    device: d(),
                    seq: 2,
                },
            )
            .ok(
                110,
                110,
                Op::Delivered {
                    device: d(),
                    seq: 1,
                },
            )
            // A redelivery is fine.
            .ok(
                120,
                120,
                Op::Delivered {
                    device: d(),
                    seq: 2,
                },
            );
        assert_eq!(h.rules(), [Rule::CommandLost, Rule::CommandOutOfOrder]);
        let v = check(&h.0);
        assert!(v[0].detail.contains("command 3"), "{}", v[0]);
        // Revoked: nothing is owed.
        let h = h.ok(
            130,
            140,
            Op::Revoke {
                device: d(),
                node: 1,
            },
        );
        assert_eq!(h.rules(), [Rule::CommandOutOfOrder]);
    }

    #[test]
    fn lost_telemetry_is_caught_and_unacknowledged_telemetry_is_not_owed() {
        let h = H::new()
            .ok(
                0,
                10,
                Op::Publish {
                    device: d(),
                    node: 0,
                    seq: 1,
                },
            )
            .op(
                20,
                30,
                Op::Publish {
                    device: d(),
                    node: 0,
                    seq: 2,
                },
                Outcome::Unknown("cut".into()),
            )
            .ok(
                40,
                50,
                Op::Publish {
                    device: d(),
                    node: 0,
                    seq: 3,
                },
            )
            .ok(
                60,
                60,
                Op::Consumed {
                    device: d(),
                    seq: 3,
                },
            );
        let v = check(&h.0);
        assert_eq!(v.len(), 1);
        assert_eq!(
            (v[0].rule, v[0].events.clone()),
            (Rule::TelemetryLost, vec![0])
        );
    }

    #[test]
    fn a_silence_past_its_fault_and_one_without_a_fault_are_caught() {
        let mut h = H::new();
        h.0.faults.push(Fault {
            kind: "kill".into(),
            targets: vec!["node-1".into()],
            span: Span {
                from: 1_000,
                to: 2_000,
            },
        });
        h.0.silences.push(Silence {
            process: "node-1".into(),
            span: Span {
                from: 1_000,
                to: 6_000,
            },
        });
        assert_eq!(h.rules(), [], "within the fault and its recovery");
        h.0.silences.push(Silence {
            process: "node-1".into(),
            span: Span {
                from: 1_500,
                to: 9_000,
            },
        });
        h.0.silences.push(Silence {
            process: "node-2".into(),
            span: Span {
                from: 1_000,
                to: 1_100,
            },
        });
        assert_eq!(h.rules(), [Rule::Unavailable, Rule::Unavailable]);
    }

    #[test]
    fn a_silence_explained_by_a_fault_on_what_it_needs_only_if_told() {
        let mut h = H::new();
        h.0.faults.push(Fault {
            kind: "partition".into(),
            targets: vec!["etcd-0".into(), "etcd-1".into()],
            span: Span {
                from: 1_000,
                to: 20_000,
            },
        });
        h.0.silences.push(Silence {
            process: "node-0".into(),
            span: Span {
                from: 2_000,
                to: 21_000,
            },
        });
        assert_eq!(h.rules(), [Rule::Unavailable], "etcd is not node-0's");
        h.0.dependencies.push(("node-0".into(), "etcd-1".into()));
        assert_eq!(h.rules(), [], "node-0 needs etcd-1");
    }

    #[test]
    fn a_revocation_not_in_the_registry_at_the_end_is_undone() {
        let revoke = Op::Revoke {
            device: d(),
            node: 0,
        };
        let mut h = H::new().ok(0, 10, revoke);
        h.0.final_revoked = Some(vec!["dev-2".into()]);
        assert_eq!(h.rules(), [Rule::RevocationUndone]);
        h.0.final_revoked = Some(vec![d()]);
        assert_eq!(h.rules(), []);
    }

    #[test]
    fn a_history_survives_json_lines() {
        let h = H::new()
            .ok(
                0,
                10,
                Op::Ocsp {
                    device: d(),
                    node: 1,
                    answer: Some(CertStatus::Good),
                },
            )
            .op(
                20,
                30,
                Op::Connect {
                    device: d(),
                    node: 1,
                },
                Outcome::Refused("revoked".into()),
            );
        let text = serde_json::to_string(&h.0).unwrap();
        let back: History = serde_json::from_str(&text).unwrap();
        assert_eq!(back, h.0);
        let line = serde_json::to_string(&h.0.events[1]).unwrap();
        assert!(
            line.contains(r#""op":"connect""#) && line.contains(r#""outcome":"refused""#),
            "{line}"
        );
    }
}
