//! What the clients of a run did and saw, and what the harness knows of
//! the faults: the history the checker reads.
//!
//! Every time is milliseconds since the run started, on the harness's one
//! clock (all clients run in the harness's process, so their times
//! compare). An operation is recorded when it ends, with its start, its
//! end and its outcome: acknowledged, refused (the server said no, and
//! why), or unknown (a timeout, a cut connection: it may or may not have
//! happened).

use serde::{Deserialize, Serialize};

/// Milliseconds since the run started.
pub type Ms = u64;

/// A node of the cluster, by its number (0, 1, 2).
pub type Node = usize;

/// An OCSP answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertStatus {
    Good,
    Revoked,
    Unknown,
}

/// What a client did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// An operator enrolls a device through a node's API.
    Enroll { device: String, node: Node },
    /// An operator revokes a device through a node's API.
    Revoke { device: String, node: Node },
    /// An operator suspends a device.
    Suspend { device: String, node: Node },
    /// An operator resumes a suspended device.
    Resume { device: String, node: Node },
    /// A device connects to a node: acknowledged is a CONNACK that admits
    /// it.
    Connect { device: String, node: Node },
    /// A device publishes QoS 1 telemetry `seq`: acknowledged is its
    /// PUBACK.
    Publish {
        device: String,
        node: Node,
        seq: u64,
    },
    /// A consuming service received telemetry `seq` of `device` (recorded
    /// acknowledged, start = end = when it arrived).
    Consumed { device: String, seq: u64 },
    /// A service sends QoS 1 command `seq` to a device's persistent
    /// session: acknowledged is its PUBACK. `expires` is when its message
    /// expiry ends it, if it has one.
    Command {
        device: String,
        node: Node,
        seq: u64,
        expires: Option<Ms>,
    },
    /// A device received command `seq` (recorded acknowledged, start = end
    /// = when it arrived).
    Delivered { device: String, seq: u64 },
    /// A relying party asks a node's OCSP responder about the device's
    /// certificate: `answer` when acknowledged.
    Ocsp {
        device: String,
        node: Node,
        answer: Option<CertStatus>,
    },
}

impl Op {
    /// The device it is about.
    pub fn device(&self) -> &str {
        match self {
            Op::Enroll { device, .. }
            | Op::Revoke { device, .. }
            | Op::Suspend { device, .. }
            | Op::Resume { device, .. }
            | Op::Connect { device, .. }
            | Op::Publish { device, .. }
            | Op::Consumed { device, .. }
            | Op::Command { device, .. }
            | Op::Delivered { device, .. }
            | Op::Ocsp { device, .. } => device,
        }
    }
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", content = "why", rename_all = "snake_case")]
pub enum Outcome {
    /// Acknowledged.
    Ok,
    /// The server said no (its reason).
    Refused(String),
    /// No answer: it may or may not have taken effect.
    Unknown(String),
}

/// One operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unique in the history.
    pub id: u64,
    pub start: Ms,
    pub end: Ms,
    #[serde(flatten)]
    pub op: Op,
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl Event {
    pub fn ok(&self) -> bool {
        self.outcome == Outcome::Ok
    }
}

/// A stretch of time, both ends included.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub from: Ms,
    pub to: Ms,
}

/// A fault the harness injected, on a process (`node-1`, `etcd-2`,
/// `nats-0`) or a link between two (`node-1/etcd-2`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// `partition`, `kill`, `pause`, `skew`.
    pub kind: String,
    /// The processes it touches.
    pub targets: Vec<String>,
    #[serde(flatten)]
    pub span: Span,
}

/// A stretch a process did not answer its probe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Silence {
    pub process: String,
    #[serde(flatten)]
    pub span: Span,
}

/// What the harness knows, beside the operations.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    pub events: Vec<Event>,
    /// When each node could reach a majority of etcd (its process running
    /// and unpaused, no partition between it and most members), by node.
    pub contact: Vec<Vec<Span>>,
    pub faults: Vec<Fault>,
    pub silences: Vec<Silence>,
    /// Nodes' `--store-staleness-secs`, in ms.
    pub staleness: Ms,
    /// How long a node in contact may take to apply a change another node
    /// committed (its watch): allowed before a read counts as stale.
    pub propagation: Ms,
    /// How long a process may take to answer again once its fault ended.
    pub recovery: Ms,
    /// When the run ended.
    pub end: Ms,
    /// The devices the registry held at the end, read from a node in
    /// contact, if it was read.
    pub final_devices: Option<Vec<String>>,
    /// Of those, the ones revoked.
    #[serde(default)]
    pub final_revoked: Option<Vec<String>>,
    /// (process, what it needs): a fault on what it needs may keep it
    /// from answering too (a node starting waits for a majority of etcd).
    #[serde(default)]
    pub dependencies: Vec<(String, String)>,
}

impl History {
    /// Whether `node` was in contact with the majority for at least
    /// `self.propagation` between `after` and `at`: then it has heard of
    /// what was committed at `after`.
    pub fn heard(&self, node: Node, after: Ms, at: Ms) -> bool {
        self.contact.get(node).is_some_and(|spans| {
            spans.iter().any(|s| {
                let from = s.from.max(after);
                let to = s.to.min(at);
                to >= from && to - from >= self.propagation
            })
        })
    }

    /// The last time at or before `at` that `node` was in contact.
    pub fn last_contact(&self, node: Node, at: Ms) -> Option<Ms> {
        self.contact
            .get(node)?
            .iter()
            .filter(|s| s.from <= at)
            .map(|s| s.to.min(at))
            .max()
    }
}
