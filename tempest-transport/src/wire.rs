//! The frames of the data plane, version 2.
//!
//! Two kinds of connection carry them, both opened by a [`Hello`]:
//!
//! - a **control link**, task worker → topology server: the worker joins
//!   ([`Role::Worker`]), learns the DAG and the membership ([`Welcome`],
//!   [`Members`]), and sends small aggregated [`Report`]s of acks and
//!   failures;
//! - a **peer link**, sender → receiver: an upstream worker (or the topology
//!   server, for the root task) connects to a downstream instance's peer port
//!   ([`Role::Peer`]) and pushes [`Frame::Batch`]es of messages against the
//!   credit the receiver grants ([`PeerWelcome`], [`Frame::Credit`]).
//!
//! `PROTOCOL.md` at the repository root is the specification; the codec is in
//! [`crate::codec`]. Every field records the protocol version that added it.

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use tempest_core::pipeline::{Dag, Grouping};
use tempest_core::Delivery;

/// The first field of every [`Hello`]: `"TEMP"` in ASCII.
pub const MAGIC: u32 = 0x5445_4d50;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 2;

/// The default maximum frame body size: 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// Every connection's opening frame.
///
/// `magic` and `version` are its first two fields, and `Hello` is variant 0
/// of [`Frame`], in every protocol version: a peer can always read them (see
/// [`crate::codec::peek_hello_version`]) even when the rest of another
/// version's `Hello` differs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`MAGIC`]. (v1)
    pub magic: u32,
    /// The protocol version the sender speaks. (v1)
    pub version: u16,
    /// The topology the sender belongs to. (v2)
    pub topology: String,
    /// The connector's nonce, for the challenge and response
    /// ([`crate::auth`]). (v2)
    pub nonce: [u8; 16],
    /// What the connection is for. (v2)
    pub role: Role,
}

impl Hello {
    /// A `Hello` of this build: [`MAGIC`], [`PROTOCOL_VERSION`] and a fresh
    /// nonce filled in.
    pub fn new(topology: impl Into<String>, role: Role) -> Self {
        Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            topology: topology.into(),
            nonce: crate::auth::nonce(),
            role,
        }
    }

    /// The bytes a proof is bound to: this `Hello`'s postcard encoding.
    pub fn transcript(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }
}

/// What a connection is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// A task worker joining its topology server (a control link). (v2)
    Worker(WorkerHello),
    /// A sender opening a peer link to a task instance. (v2)
    Peer(PeerHello),
}

/// A worker's request to join.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerHello {
    /// The task it runs. (v2)
    pub task: String,
    /// The instance it claims, or `None` for the lowest free one. (v2)
    pub instance: Option<u32>,
    /// How many instances its task has, as the worker was configured. (v2)
    pub instances: u32,
    /// The layout version those instances belong to: a server adopts the
    /// instance count of the highest layout its workers present. 0 for a
    /// count that comes from configuration alone. (v2)
    pub layout: u64,
    /// Where the worker accepts peer links, `host:port`. (v2)
    pub peer: String,
}

/// One use of a worker slot: an instance of a task, in one of its
/// incarnations (the n-th worker that has served it on this server).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SlotRef {
    /// The task's index in the DAG. (v2)
    pub task: u32,
    /// The instance. (v2)
    pub instance: u32,
    /// The incarnation. (v2)
    pub incarnation: u32,
}

/// A sender's request for a peer link.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerHello {
    /// The topology server's session both ends must be in. (v2)
    pub session: u64,
    /// The sending instance, or `None` for the topology server. (v2)
    pub from: Option<SlotRef>,
    /// The receiving instance and the incarnation the sender expects. (v2)
    pub to: SlotRef,
}

/// The server's answer to a worker's `Hello`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The instance the worker serves. (v2)
    pub instance: u32,
    /// Its incarnation. (v2)
    pub incarnation: u32,
    /// The server's session: a random number per server run. Peer links and
    /// reports only count within one session. (v2)
    pub session: u64,
    /// Send a heartbeat after this many milliseconds of silence; a peer
    /// silent for three times as long is dropped. (v2)
    pub heartbeat_ms: u32,
    /// The most messages a batch may carry. (v2)
    pub batch_size: u32,
    /// The pipeline: tasks, edges and groupings. (v2)
    pub dag: WireDag,
    /// Who serves which instance, and where. (v2)
    pub members: Members,
}

/// The answer to a peer's `Hello`: the link is open.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerWelcome {
    /// Batches the sender may send before it hears [`Frame::Credit`]. (v2)
    pub credit: u32,
    /// Heartbeat interval of the link, as in [`Welcome::heartbeat_ms`]. (v2)
    pub heartbeat_ms: u32,
}

/// The pipeline on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireDag {
    /// The tasks, by index. (v2)
    pub tasks: Vec<WireTask>,
    /// The index of the root task (the one the source feeds). (v2)
    pub root: u32,
}

/// A task of [`WireDag`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireTask {
    /// Its name. (v2)
    pub name: String,
    /// Its outgoing edges. (v2)
    pub edges: Vec<WireEdge>,
}

/// An edge of [`WireDag`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireEdge {
    /// The target task's index. (v2)
    pub to: u32,
    /// How messages spread over its instances. (v2)
    pub grouping: Grouping,
}

impl From<&Dag> for WireDag {
    fn from(dag: &Dag) -> Self {
        WireDag {
            tasks: dag
                .tasks()
                .map(|(_, t)| WireTask {
                    name: t.name.clone(),
                    edges: t
                        .edges
                        .iter()
                        .map(|e| WireEdge {
                            to: e.to.get() as u32,
                            grouping: e.grouping,
                        })
                        .collect(),
                })
                .collect(),
            root: dag.root().get() as u32,
        }
    }
}

/// The membership of a topology: every task's instance count and who
/// serves each instance. The server sends it whole in [`Welcome`] and again
/// in a [`Frame::Members`] whenever it changes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    /// Bumped at every change. (v2)
    pub epoch: u64,
    /// By task index. (v2)
    pub tasks: Vec<TaskMembers>,
}

/// One task's part of [`Members`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskMembers {
    /// Its instance count: what key grouping divides keys by. (v2)
    pub instances: u32,
    /// The layout version of that count. (v2)
    pub layout: u64,
    /// One per instance, `instances` of them. (v2)
    pub slots: Vec<SlotInfo>,
}

/// Who serves one instance.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotInfo {
    /// The current incarnation, or the next one while nobody serves it:
    /// messages sent meanwhile wait for that incarnation. (v2)
    pub incarnation: u32,
    /// Its peer address while a worker serves it. (v2)
    pub peer: Option<String>,
}

/// A 64-bit number sent as 8 little-endian bytes (random values, which a
/// varint would stretch to 10).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Fixed(pub u64);

impl Serialize for Fixed {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.to_le_bytes().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Fixed {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <[u8; 8]>::deserialize(d).map(|b| Fixed(u64::from_le_bytes(b)))
    }
}

/// One root's part of a [`Report`]: the XOR of the edge ids of the messages
/// of this root that were handled and of the children they emitted, and the
/// worker slots (mask bits) those children were sent to.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The root. (v2)
    pub root: Fixed,
    /// The XOR. (v2)
    pub xor: Fixed,
    /// The slot bits. (v2)
    pub slots: u64,
}

/// A message whose task failed: its root goes to the failure policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fail {
    /// The root. (v2)
    pub root: Fixed,
    /// The task's error. (v2)
    pub message: String,
    /// Whether a replay may help. (v2)
    pub retryable: bool,
}

/// What a worker did, aggregated over one or more batches.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Every slot incarnation the acks' children were sent to. A slot
    /// whose incarnation the server already saw leave lost those messages:
    /// their roots are replayed. (v2)
    pub dests: Vec<SlotRef>,
    /// Acks: consecutive acks of one root are folded into one. (v2)
    pub acks: Vec<Ack>,
    /// Failures. (v2)
    pub fails: Vec<Fail>,
}

impl Report {
    /// True when it says nothing.
    pub fn is_empty(&self) -> bool {
        self.acks.is_empty() && self.fails.is_empty()
    }
}

/// The messages of one [`Frame::Batch`], as the task instance will get
/// them. On the wire each is `root` and `edge` as 8 little-endian bytes, the
/// key (`0` none; `1` then length-prefixed bytes; `2` the same as the
/// payload) and the length-prefixed payload; the codec reads them as slices
/// of the frame, without copying.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Deliveries(pub Vec<Delivery>);

/// How a message's key goes on the wire.
#[derive(Serialize, Deserialize)]
enum WireKey {
    None,
    Bytes(Bytes),
    Payload,
}

#[derive(Serialize, Deserialize)]
struct WireDelivery {
    root: Fixed,
    edge: Fixed,
    key: WireKey,
    payload: Bytes,
}

impl Serialize for Deliveries {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for d in &self.0 {
            let payload = d.msg.payload().clone();
            let key = match d.msg.key() {
                None => WireKey::None,
                Some(k) if *k == payload => WireKey::Payload,
                Some(k) => WireKey::Bytes(k.clone()),
            };
            seq.serialize_element(&WireDelivery {
                root: Fixed(d.root.0),
                edge: Fixed(d.edge),
                key,
                payload,
            })?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for Deliveries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let wire = Vec::<WireDelivery>::deserialize(d)?;
        Ok(Deliveries(
            wire.into_iter()
                .map(|w| {
                    let key = match w.key {
                        WireKey::None => None,
                        WireKey::Bytes(k) => Some(k),
                        WireKey::Payload => Some(w.payload.clone()),
                    };
                    Delivery {
                        root: tempest_core::RootId(w.root.0),
                        edge: w.edge.0,
                        msg: tempest_core::Msg::from_parts(key, w.payload),
                    }
                })
                .collect(),
        ))
    }
}

/// Why a peer is closing the connection, sent in [`Frame::Error`].
///
/// Variants are encoded by position: new codes are only ever appended.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The `Hello` did not start with [`MAGIC`]: not a Tempest peer. (v1)
    BadMagic,
    /// The peer speaks another protocol version. (v1)
    VersionMismatch,
    /// The token (v1), or the data-plane secret's proof (v2), is missing or
    /// wrong.
    BadToken,
    /// The other side runs another topology. (v1)
    UnknownTopology,
    /// The topology has no task of that name. (v1)
    UnknownTask,
    /// The instance asked for is served by another live worker, or none was
    /// asked for and every instance is served. (v1)
    InstanceTaken,
    /// The instance asked for is out of range. (v1)
    BadInstance,
    /// A frame could not be decoded. (v1)
    Malformed,
    /// A frame exceeded the maximum frame size. (v1)
    FrameTooLarge,
    /// No `Hello` arrived in time. (v1)
    HandshakeTimeout,
    /// A valid frame arrived where the protocol does not allow it. (v1)
    UnexpectedFrame,
    /// The other side is going away. (v1)
    ShuttingDown,
    /// The worker's layout is older than the server's and its instance
    /// count differs. (v2)
    StaleLayout,
    /// The worker's instance count differs from the server's for the same
    /// layout version. (v2)
    LayoutConflict,
    /// A peer link for another session, instance or incarnation than this
    /// worker's. (v2)
    WrongPeer,
    /// The worker's pipeline is not the server's (another build). (v2)
    PipelineMismatch,
    /// The peer address a worker gave is not `HOST:PORT`. (v2)
    BadAddress,
    /// The acceptor has as many connections as it takes; try again later.
    /// (v2)
    Busy,
}

impl ErrorCode {
    /// Every code, by index (what the wire carries).
    pub const ALL: [ErrorCode; 18] = [
        ErrorCode::BadMagic,
        ErrorCode::VersionMismatch,
        ErrorCode::BadToken,
        ErrorCode::UnknownTopology,
        ErrorCode::UnknownTask,
        ErrorCode::InstanceTaken,
        ErrorCode::BadInstance,
        ErrorCode::Malformed,
        ErrorCode::FrameTooLarge,
        ErrorCode::HandshakeTimeout,
        ErrorCode::UnexpectedFrame,
        ErrorCode::ShuttingDown,
        ErrorCode::StaleLayout,
        ErrorCode::LayoutConflict,
        ErrorCode::WrongPeer,
        ErrorCode::PipelineMismatch,
        ErrorCode::BadAddress,
        ErrorCode::Busy,
    ];

    /// The code's name, as in the enum.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadMagic => "BadMagic",
            ErrorCode::VersionMismatch => "VersionMismatch",
            ErrorCode::BadToken => "BadToken",
            ErrorCode::UnknownTopology => "UnknownTopology",
            ErrorCode::UnknownTask => "UnknownTask",
            ErrorCode::InstanceTaken => "InstanceTaken",
            ErrorCode::BadInstance => "BadInstance",
            ErrorCode::Malformed => "Malformed",
            ErrorCode::FrameTooLarge => "FrameTooLarge",
            ErrorCode::HandshakeTimeout => "HandshakeTimeout",
            ErrorCode::UnexpectedFrame => "UnexpectedFrame",
            ErrorCode::ShuttingDown => "ShuttingDown",
            ErrorCode::StaleLayout => "StaleLayout",
            ErrorCode::LayoutConflict => "LayoutConflict",
            ErrorCode::WrongPeer => "WrongPeer",
            ErrorCode::PipelineMismatch => "PipelineMismatch",
            ErrorCode::BadAddress => "BadAddress",
            ErrorCode::Busy => "Busy",
        }
    }

    /// True for refusals that only an operator can fix: the worker stops
    /// rather than retrying.
    pub fn is_fatal(self) -> bool {
        matches!(
            self,
            ErrorCode::BadMagic
                | ErrorCode::VersionMismatch
                | ErrorCode::BadToken
                | ErrorCode::UnknownTopology
                | ErrorCode::UnknownTask
                | ErrorCode::BadInstance
                | ErrorCode::StaleLayout
                | ErrorCode::LayoutConflict
                | ErrorCode::PipelineMismatch
                | ErrorCode::BadAddress
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One frame of the protocol. See `PROTOCOL.md` for who sends what, when.
///
/// Variants are encoded by position. `Hello` is variant 0 and `Error`
/// variant 8 forever; [`ErrorCode`]s keep their numbers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// The first frame of every connection. (v1)
    Hello(Hello),
    /// Server → worker: the answer to an accepted worker `Hello`. (v2)
    Welcome(Welcome),
    /// Server → worker: the membership changed. (v2)
    Members(Members),
    /// Receiver → sender: the answer to an accepted peer `Hello`. (v2)
    PeerWelcome(PeerWelcome),
    /// Sender → receiver: messages for the receiving instance; uses one
    /// credit. (v2)
    Batch(Deliveries),
    /// Receiver → sender: this many more batches may be sent. (v2)
    Credit {
        /// Batches.
        batches: u32,
    },
    /// Worker → server: acks and failures. (v2)
    Report(Report),
    /// Worker → server: a peer link to this slot incarnation broke; what was
    /// sent on it may be lost. (v2)
    LinkLost(SlotRef),
    /// Either direction: a fatal problem; the sender closes after it. (v1;
    /// variant 8 in every version, as in version 1, so that a refusal is
    /// readable by a peer of any version.)
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// A message for humans naming the problem.
        message: String,
    },
    /// Either direction, after `heartbeat_ms` of silence. (v1)
    Heartbeat {
        /// Echoed in the `HeartbeatAck`.
        seq: u64,
    },
    /// The answer to a `Heartbeat`. (v1)
    HeartbeatAck {
        /// The `seq` of the heartbeat answered.
        seq: u64,
    },
    /// Worker → server: the worker is leaving; it closes after this. (v2)
    Goodbye,
    /// Server → worker: the server is going away; the worker leaves and
    /// comes back to the next one. (v1)
    Shutdown {
        /// Why, for the worker's log.
        reason: String,
    },
    /// Acceptor → connector, after a `Hello`, when the acceptor has a
    /// secret: prove you have it too. (v2)
    Challenge {
        /// The acceptor's nonce.
        nonce: [u8; 16],
    },
    /// Either direction: the answer to a `Challenge`, first from the
    /// connector, then from the acceptor ([`crate::auth::proof`]). (v2)
    Proof {
        /// HMAC-SHA256.
        mac: [u8; 32],
    },
}

impl Frame {
    /// The variant's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "Hello",
            Frame::Welcome(_) => "Welcome",
            Frame::Members(_) => "Members",
            Frame::PeerWelcome(_) => "PeerWelcome",
            Frame::Batch(_) => "Batch",
            Frame::Credit { .. } => "Credit",
            Frame::Report(_) => "Report",
            Frame::LinkLost(_) => "LinkLost",
            Frame::Heartbeat { .. } => "Heartbeat",
            Frame::HeartbeatAck { .. } => "HeartbeatAck",
            Frame::Goodbye => "Goodbye",
            Frame::Shutdown { .. } => "Shutdown",
            Frame::Challenge { .. } => "Challenge",
            Frame::Proof { .. } => "Proof",
            Frame::Error { .. } => "Error",
        }
    }

    /// An `Error` frame.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Frame::Error {
            code,
            message: message.into(),
        }
    }
}

/// The variant index of [`Frame::Batch`], which the codec reads itself.
pub(crate) const BATCH_TAG: u8 = 4;

/// The variant index of [`Frame::Report`], which the codec reads and writes
/// itself.
pub(crate) const REPORT_TAG: u8 = 6;

/// The variant index of [`Frame::Error`], in every version.
pub const ERROR_TAG: u8 = 8;
