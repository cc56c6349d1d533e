//! The wire protocol between task workers and the topology server.
//!
//! A connection carries [`Frame`]s, each sent as a big-endian `u32` body
//! length followed by the body, the frame in [postcard] encoding.
//! [`FrameCodec`] does the framing for [`tokio_util::codec::Framed`]; it
//! enforces a maximum frame size on both sides ([`DEFAULT_MAX_FRAME`]) and
//! never truncates a frame.
//!
//! `PROTOCOL.md` at the repository root describes the conversation: the
//! handshake ([`Hello`] → [`Welcome`]), pipelined pulls, leases, heartbeats,
//! shutdown and the versioning rules.
//!
//! The `Wire*` types mirror the in-process units of work ([`Msg`],
//! [`Delivery`], [`Handled`]) and convert to and from them with `From`.
//!
//! ```
//! use bytes::BytesMut;
//! use tempest_core::wire::{Frame, FrameCodec, Hello};
//! use tokio_util::codec::{Decoder, Encoder};
//!
//! let mut codec = FrameCodec::default();
//! let mut buf = BytesMut::new();
//! let hello = Frame::Hello(Hello::new("wordcount", "split", None, None));
//! codec.encode(hello.clone(), &mut buf).unwrap();
//! assert_eq!(codec.decode(&mut buf).unwrap(), Some(hello));
//! ```

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder};

use crate::ledger::RootId;
use crate::work::{Delivery, Handled};
use crate::{Msg, TaskError, TaskResult};

/// The first field of every [`Hello`]: `"TEMP"` in ASCII.
pub const MAGIC: u32 = 0x5445_4d50;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// The default maximum frame body size: 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// Bytes of the length prefix in front of every frame body.
const LEN_PREFIX: usize = 4;

/// The worker's opening frame.
///
/// `magic` and `version` are its first two fields, and `Hello` is variant 0
/// of [`Frame`], in every protocol version: a server can always read them (see
/// [`peek_hello_version`]) even when the rest of a newer peer's `Hello`
/// changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`MAGIC`]. (v1)
    pub magic: u32,
    /// The protocol version the worker speaks. (v1)
    pub version: u16,
    /// The name of the topology the worker belongs to. (v1)
    pub topology: String,
    /// The task the worker runs. (v1)
    pub task: String,
    /// The instance the worker asks for, or `None` to let the server pick a
    /// free one. (v1)
    pub instance: Option<u32>,
    /// The cluster token, when the server requires one. (v1)
    pub token: Option<String>,
}

impl Hello {
    /// A `Hello` of this build: [`MAGIC`] and [`PROTOCOL_VERSION`] filled in.
    pub fn new(
        topology: impl Into<String>,
        task: impl Into<String>,
        instance: Option<u32>,
        token: Option<String>,
    ) -> Self {
        Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            topology: topology.into(),
            task: task.into(),
            instance,
            token,
        }
    }

    /// Checks the magic and the version: `Err(BadMagic)` or `Err(Version)`
    /// when they are not this build's.
    pub fn check(&self) -> Result<(), WireError> {
        check_magic_version(self.magic, self.version)
    }
}

fn check_magic_version(magic: u32, version: u16) -> Result<(), WireError> {
    if magic != MAGIC {
        Err(WireError::BadMagic(magic))
    } else if version != PROTOCOL_VERSION {
        Err(WireError::Version {
            theirs: version,
            ours: PROTOCOL_VERSION,
        })
    } else {
        Ok(())
    }
}

/// The server's answer to an accepted [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The instance of the task this connection serves. (v1)
    pub instance: u32,
    /// How many instances the task has. (v1)
    pub instances: u32,
    /// The batch size the worker should ask for in each pull. (v1)
    pub batch_size: u32,
    /// Send a heartbeat after this many milliseconds of silence; a peer
    /// silent for three times as long is dropped. (v1)
    pub heartbeat_ms: u32,
}

/// A [`Msg`] on the wire.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireMsg {
    /// The key, for key grouping. (v1)
    pub key: Option<Bytes>,
    /// The payload. (v1)
    pub payload: Bytes,
}

impl From<Msg> for WireMsg {
    fn from(msg: Msg) -> Self {
        let (key, payload) = msg.into_parts();
        WireMsg { key, payload }
    }
}

impl From<WireMsg> for Msg {
    fn from(msg: WireMsg) -> Self {
        Msg::from_parts(msg.key, msg.payload)
    }
}

/// A [`Delivery`] on the wire: server → worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireDelivery {
    /// The [`RootId`] of the message's tree, echoed in its result. (v1)
    pub root: u64,
    /// The message. (v1)
    pub msg: WireMsg,
}

impl From<Delivery> for WireDelivery {
    fn from(d: Delivery) -> Self {
        WireDelivery {
            root: d.root.0,
            msg: d.msg.into(),
        }
    }
}

impl From<WireDelivery> for Delivery {
    fn from(d: WireDelivery) -> Self {
        Delivery {
            root: RootId(d.root),
            msg: d.msg.into(),
        }
    }
}

/// A [`TaskResult`] on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireOutcome {
    /// Handled, nothing emitted (`Ok(None)`). (v1)
    Done,
    /// Handled, these messages emitted (`Ok(Some(msgs))`). (v1)
    Emit(Vec<WireMsg>),
    /// The task failed (`Err(e)`). (v1)
    Failed {
        /// The error's message.
        message: String,
        /// Whether a replay may fix it ([`TaskError::new`]) or not
        /// ([`TaskError::permanent`]).
        retryable: bool,
    },
}

impl From<TaskResult> for WireOutcome {
    fn from(r: TaskResult) -> Self {
        match r {
            Ok(None) => WireOutcome::Done,
            Ok(Some(msgs)) => WireOutcome::Emit(msgs.into_iter().map(WireMsg::from).collect()),
            Err(e) => WireOutcome::Failed {
                message: e.message().to_owned(),
                retryable: e.is_retryable(),
            },
        }
    }
}

impl From<WireOutcome> for TaskResult {
    fn from(o: WireOutcome) -> Self {
        match o {
            WireOutcome::Done => Ok(None),
            WireOutcome::Emit(msgs) => Ok(Some(msgs.into_iter().map(Msg::from).collect())),
            WireOutcome::Failed {
                message,
                retryable: true,
            } => Err(TaskError::new(message)),
            WireOutcome::Failed {
                message,
                retryable: false,
            } => Err(TaskError::permanent(message)),
        }
    }
}

/// A [`Handled`] on the wire: worker → server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireResult {
    /// The [`RootId`] of the delivery this is the result of. (v1)
    pub root: u64,
    /// What the task made of it. (v1)
    pub outcome: WireOutcome,
}

impl From<Handled> for WireResult {
    fn from(h: Handled) -> Self {
        WireResult {
            root: h.root.0,
            outcome: h.result.into(),
        }
    }
}

impl From<WireResult> for Handled {
    fn from(r: WireResult) -> Self {
        Handled {
            root: RootId(r.root),
            result: r.outcome.into(),
        }
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
    /// The cluster token is missing or wrong. (v1)
    BadToken,
    /// The server runs another topology. (v1)
    UnknownTopology,
    /// The topology has no task of that name. (v1)
    UnknownTask,
    /// The instance asked for is already served by another connection, or
    /// none was asked for and every instance is served. (v1)
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
    /// The server is going away. (v1)
    ShuttingDown,
}

impl ErrorCode {
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
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One frame of the protocol. See `PROTOCOL.md` for who sends what, when.
///
/// Variants are encoded by position. `Hello` is variant 0 forever; new
/// variants are only ever appended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// Worker → server, first frame of a connection. (v1)
    Hello(Hello),
    /// Server → worker, the answer to an accepted `Hello`. (v1)
    Welcome(Welcome),
    /// Worker → server: the results of earlier batches, in delivery order,
    /// and a request for up to `max` more deliveries. Every `Pull` with
    /// `max > 0` gets exactly one `Batch`; `max == 0` carries results only
    /// and gets none. (v1)
    Pull {
        /// How many deliveries the worker asks for; 0 asks for none.
        max: u32,
        /// Results of earlier deliveries, in the order they were delivered.
        results: Vec<WireResult>,
    },
    /// Server → worker: the answer to one `Pull` with `max > 0`, in the order
    /// the pulls came; empty after a long-poll timeout. (v1)
    Batch {
        /// At most `max` deliveries, each leased to this connection.
        deliveries: Vec<WireDelivery>,
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
    /// Worker → server: the last results; then the worker closes. (v1)
    Goodbye {
        /// Results of every delivery not yet returned, in delivery order.
        results: Vec<WireResult>,
    },
    /// Server → worker: the server is going away. The worker finishes its
    /// batch, answers `Goodbye` and reconnects later. (v1)
    Shutdown {
        /// Why, for the worker's log.
        reason: String,
    },
    /// Either direction: a fatal problem; the sender closes after it. (v1)
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// A message for humans naming the problem.
        message: String,
    },
}

impl Frame {
    /// The variant's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "Hello",
            Frame::Welcome(_) => "Welcome",
            Frame::Pull { .. } => "Pull",
            Frame::Batch { .. } => "Batch",
            Frame::Heartbeat { .. } => "Heartbeat",
            Frame::HeartbeatAck { .. } => "HeartbeatAck",
            Frame::Goodbye { .. } => "Goodbye",
            Frame::Shutdown { .. } => "Shutdown",
            Frame::Error { .. } => "Error",
        }
    }

    /// An `Error` frame for a codec error, to send before closing.
    pub fn error(err: &WireError) -> Self {
        Frame::Error {
            code: err.code(),
            message: err.to_string(),
        }
    }
}

/// What can go wrong reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// A frame body over the maximum frame size, read or written.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// The body's length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// A frame body that is not a valid frame.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The stream ended inside a frame.
    #[error("connection closed in the middle of a frame ({0} bytes buffered)")]
    Truncated(usize),
    /// The transport failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A frame could not be encoded.
    #[error("cannot encode frame: {0}")]
    Encode(String),
    /// A `Hello` of another protocol version.
    #[error("the peer speaks protocol version {theirs}, this side speaks version {ours}")]
    Version {
        /// The peer's version.
        theirs: u16,
        /// This build's, [`PROTOCOL_VERSION`].
        ours: u16,
    },
    /// A `Hello` whose magic is not [`MAGIC`]: not a Tempest peer.
    #[error("bad magic {0:#010x} (expected {MAGIC:#010x}): not a Tempest peer")]
    BadMagic(u32),
}

impl WireError {
    /// The [`ErrorCode`] to send the peer in a [`Frame::Error`].
    ///
    /// `Truncated`, `Io` and `Encode` map to `Malformed`; after them the
    /// connection is usually beyond sending anything.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            WireError::Version { .. } => ErrorCode::VersionMismatch,
            WireError::BadMagic(_) => ErrorCode::BadMagic,
            WireError::Malformed(_)
            | WireError::Truncated(_)
            | WireError::Io(_)
            | WireError::Encode(_) => ErrorCode::Malformed,
        }
    }
}

/// Reads only the magic and version at the front of a `Hello` frame body, so
/// a newer peer's `Hello` whose later fields changed still yields a clear
/// version mismatch. Returns `(magic, version)`, or `None` when `body` is not
/// a `Hello` (its variant tag is not 0) or too short.
pub fn peek_hello_version(body: &[u8]) -> Option<(u32, u16)> {
    // Variant 0 is the single varint byte 0.
    let rest = body.strip_prefix(&[0u8])?;
    let ((magic, version), _) = postcard::take_from_bytes::<(u32, u16)>(rest).ok()?;
    Some((magic, version))
}

/// Length-prefixed frames: `u32` big-endian body length, then the postcard
/// body.
///
/// Bodies over [`max_frame`](Self::max_frame) are refused both ways with
/// [`WireError::FrameTooLarge`]: the decoder refuses as soon as it reads the
/// length, before buffering the body; the encoder never writes one.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct FrameCodec {
    max_frame: usize,
}

impl FrameCodec {
    /// A codec with this maximum body size, in bytes. Values over
    /// `u32::MAX` are clamped to it: the length prefix cannot say more.
    pub fn new(max_frame: usize) -> Self {
        FrameCodec {
            max_frame: max_frame.min(u32::MAX as usize),
        }
    }

    /// The maximum body size, in bytes.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_FRAME)
    }
}

fn decode_body(body: &[u8]) -> Result<Frame, WireError> {
    let err = match postcard::take_from_bytes::<Frame>(body) {
        Ok((frame, [])) => return Ok(frame),
        Ok((frame, rest)) => format!(
            "{} frame followed by {} unexpected bytes",
            frame.name(),
            rest.len()
        ),
        Err(e) => e.to_string(),
    };
    // A Hello this build cannot parse may come from another version: say so
    // rather than "malformed".
    if let Some((magic, version)) = peek_hello_version(body) {
        check_magic_version(magic, version)?;
    }
    Err(WireError::Malformed(format!(
        "{err} ({} byte body)",
        body.len()
    )))
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        let Some(prefix) = src.get(..LEN_PREFIX) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        // u32 -> usize is lossless on every platform Tempest runs on; saturate
        // anyway so a 16-bit target would refuse rather than wrap.
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > self.max_frame {
            return Err(WireError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        let total = LEN_PREFIX + len;
        if src.len() < total {
            // Bounded by max_frame, checked above.
            src.reserve(total - src.len());
            return Ok(None);
        }
        src.advance(LEN_PREFIX);
        let body = src.split_to(len);
        decode_body(&body).map(Some)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if buf.is_empty() => Ok(None),
            None => Err(WireError::Truncated(buf.len())),
        }
    }
}

/// A postcard flavor that appends to a `BytesMut` and fails once the body
/// would pass `max` bytes, so an oversized frame is never buffered whole.
struct CappedBytesMut<'a> {
    buf: &'a mut BytesMut,
    written: usize,
    max: usize,
}

impl CappedBytesMut<'_> {
    fn room(&mut self, n: usize) -> postcard::Result<()> {
        match self.written.checked_add(n) {
            Some(w) if w <= self.max => {
                self.written = w;
                Ok(())
            }
            _ => Err(postcard::Error::SerializeBufferFull),
        }
    }
}

impl postcard::ser_flavors::Flavor for CappedBytesMut<'_> {
    type Output = usize;

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.room(data.len())?;
        self.buf.extend_from_slice(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.room(1)?;
        self.buf.put_u8(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<usize> {
        Ok(self.written)
    }
}

/// A postcard flavor that only counts bytes.
#[derive(Default)]
struct Counter(usize);

impl postcard::ser_flavors::Flavor for Counter {
    type Output = usize;

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0 = self.0.saturating_add(data.len());
        Ok(())
    }

    fn try_push(&mut self, _data: u8) -> postcard::Result<()> {
        self.0 = self.0.saturating_add(1);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<usize> {
        Ok(self.0)
    }
}

impl FrameCodec {
    /// Appends `frame`, length prefix and body, to `dst`: what
    /// [`Encoder::encode`] does, without taking the frame.
    ///
    /// On error `dst` is left as it was.
    pub fn encode_ref(&self, frame: &Frame, dst: &mut BytesMut) -> Result<(), WireError> {
        let start = dst.len();
        dst.put_u32(0); // patched below
        let flavor = CappedBytesMut {
            buf: dst,
            written: 0,
            max: self.max_frame,
        };
        let len = match postcard::serialize_with_flavor(frame, flavor) {
            Ok(len) => len,
            Err(e) => {
                dst.truncate(start);
                return Err(match e {
                    postcard::Error::SerializeBufferFull => WireError::FrameTooLarge {
                        len: postcard::serialize_with_flavor(frame, Counter::default())
                            .unwrap_or(usize::MAX),
                        max: self.max_frame,
                    },
                    e => WireError::Encode(e.to_string()),
                });
            }
        };
        let Ok(prefix) = u32::try_from(len) else {
            // Unreachable while max_frame <= u32::MAX, kept as a guard.
            dst.truncate(start);
            return Err(WireError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        };
        dst[start..start + LEN_PREFIX].copy_from_slice(&prefix.to_be_bytes());
        Ok(())
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = WireError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), WireError> {
        self.encode_ref(&frame, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(codec: &mut FrameCodec, frame: &Frame) -> BytesMut {
        let mut buf = BytesMut::new();
        codec.encode_ref(frame, &mut buf).unwrap();
        buf
    }

    fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
        prop_oneof![
            3 => proptest::collection::vec(any::<u8>(), 0..max),
            1 => Just(Vec::new()),
            1 => (0..=255u8, 1usize..200_000).prop_map(|(b, n)| vec![b; n]),
        ]
        .prop_map(Bytes::from)
    }

    fn wire_msg() -> impl Strategy<Value = WireMsg> {
        (proptest::option::of(bytes(32)), bytes(256))
            .prop_map(|(key, payload)| WireMsg { key, payload })
    }

    fn outcome() -> impl Strategy<Value = WireOutcome> {
        prop_oneof![
            Just(WireOutcome::Done),
            proptest::collection::vec(wire_msg(), 0..4).prop_map(WireOutcome::Emit),
            (".*", any::<bool>())
                .prop_map(|(message, retryable)| WireOutcome::Failed { message, retryable }),
        ]
    }

    fn results() -> impl Strategy<Value = Vec<WireResult>> {
        proptest::collection::vec(
            (any::<u64>(), outcome()).prop_map(|(root, outcome)| WireResult { root, outcome }),
            0..6,
        )
    }

    fn error_code() -> impl Strategy<Value = ErrorCode> {
        use ErrorCode::*;
        proptest::sample::select(vec![
            BadMagic,
            VersionMismatch,
            BadToken,
            UnknownTopology,
            UnknownTask,
            InstanceTaken,
            BadInstance,
            Malformed,
            FrameTooLarge,
            HandshakeTimeout,
            UnexpectedFrame,
            ShuttingDown,
        ])
    }

    fn frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (
                ".*",
                ".*",
                proptest::option::of(any::<u32>()),
                proptest::option::of(".*")
            )
                .prop_map(|(topo, task, i, tok)| Frame::Hello(Hello::new(topo, task, i, tok))),
            any::<(u32, u32, u32, u32)>().prop_map(|(a, b, c, d)| Frame::Welcome(Welcome {
                instance: a,
                instances: b,
                batch_size: c,
                heartbeat_ms: d
            })),
            (any::<u32>(), results()).prop_map(|(max, results)| Frame::Pull { max, results }),
            proptest::collection::vec(
                (any::<u64>(), wire_msg()).prop_map(|(root, msg)| WireDelivery { root, msg }),
                0..6
            )
            .prop_map(|deliveries| Frame::Batch { deliveries }),
            any::<u64>().prop_map(|seq| Frame::Heartbeat { seq }),
            any::<u64>().prop_map(|seq| Frame::HeartbeatAck { seq }),
            results().prop_map(|results| Frame::Goodbye { results }),
            ".*".prop_map(|reason| Frame::Shutdown { reason }),
            (error_code(), ".*").prop_map(|(code, message)| Frame::Error { code, message }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn wire_frames_round_trip(frames in proptest::collection::vec(frame(), 1..4)) {
            let mut codec = FrameCodec::default();
            let mut buf = BytesMut::new();
            for f in &frames {
                let before = buf.len();
                codec.encode_ref(f, &mut buf).unwrap();
                let len = u32::from_be_bytes(buf[before..before + 4].try_into().unwrap());
                prop_assert_eq!(len as usize, buf.len() - before - 4);
            }
            for f in &frames {
                prop_assert_eq!(codec.decode(&mut buf).unwrap(), Some(f.clone()));
            }
            prop_assert!(buf.is_empty());
            prop_assert!(codec.decode_eof(&mut buf).unwrap().is_none());
        }

        #[test]
        fn wire_decoder_survives_arbitrary_chunks(
            data in proptest::collection::vec(any::<u8>(), 0..2048),
            cuts in proptest::collection::vec(1usize..64, 0..64),
            max in prop_oneof![Just(DEFAULT_MAX_FRAME), 0usize..512],
        ) {
            let mut codec = FrameCodec::new(max);
            let mut buf = BytesMut::new();
            let mut rest = &data[..];
            let mut cuts = cuts.into_iter();
            'feed: while !rest.is_empty() {
                let n = cuts.next().unwrap_or(rest.len()).min(rest.len());
                buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                loop {
                    match codec.decode(&mut buf) {
                        Ok(Some(_)) => continue,
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                }
            }
            let _ = codec.decode_eof(&mut buf);
        }

        #[test]
        fn wire_frames_survive_arbitrary_chunks(
            frames in proptest::collection::vec(frame(), 1..4),
            cuts in proptest::collection::vec(1usize..4096, 0..64),
        ) {
            let mut codec = FrameCodec::default();
            let mut wire = BytesMut::new();
            for f in &frames {
                codec.encode_ref(f, &mut wire).unwrap();
            }
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut rest = &wire[..];
            let mut cuts = cuts.into_iter();
            while !rest.is_empty() {
                let n = cuts.next().unwrap_or(rest.len()).min(rest.len());
                buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                while let Some(f) = codec.decode(&mut buf).unwrap() {
                    got.push(f);
                }
            }
            prop_assert!(codec.decode_eof(&mut buf).unwrap().is_none());
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn wire_valid_prefix_then_garbage_body(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut codec = FrameCodec::default();
            let mut buf = BytesMut::new();
            buf.put_u32(body.len() as u32);
            buf.extend_from_slice(&body);
            // Either a frame (garbage can be valid) or an error; never a panic, never waiting.
            if let Ok(None) = codec.decode(&mut buf) {
                panic!("complete frame not decoded");
            }
        }

        #[test]
        fn wire_conversions_round_trip(key in proptest::option::of(bytes(16)), payload in bytes(64), root in any::<u64>(), o in outcome()) {
            let msg = Msg::from_parts(key, payload);
            let d = Delivery { root: RootId(root), msg: msg.clone() };
            prop_assert_eq!(Delivery::from(WireDelivery::from(d.clone())), d);
            let h = Handled { root: RootId(root), result: TaskResult::from(o.clone()) };
            let w = WireResult::from(h.clone());
            prop_assert_eq!(&w.outcome, &o);
            prop_assert_eq!(Handled::from(w), h);
        }
    }

    #[test]
    fn wire_task_result_mapping() {
        assert_eq!(WireOutcome::from(Ok(None)), WireOutcome::Done);
        assert_eq!(
            WireOutcome::from(Ok(Some(vec![Msg::new("a")]))),
            WireOutcome::Emit(vec![WireMsg {
                key: None,
                payload: Bytes::from_static(b"a")
            }])
        );
        let retry: TaskResult = WireOutcome::Failed {
            message: "later".into(),
            retryable: true,
        }
        .into();
        let e = retry.unwrap_err();
        assert!(e.is_retryable());
        assert_eq!(e.message(), "later");
        let perm: TaskResult = WireOutcome::Failed {
            message: "never".into(),
            retryable: false,
        }
        .into();
        assert!(!perm.unwrap_err().is_retryable());
        assert_eq!(
            WireOutcome::from(Err(TaskError::permanent("x"))),
            WireOutcome::Failed {
                message: "x".into(),
                retryable: false
            }
        );
    }

    #[test]
    fn wire_layout_is_length_prefixed() {
        let mut codec = FrameCodec::default();
        let buf = encode(&mut codec, &Frame::Heartbeat { seq: 7 });
        // Length 2: variant 4, varint 7.
        assert_eq!(&buf[..], &[0, 0, 0, 2, 4, 7]);
        let buf = encode(
            &mut codec,
            &Frame::Hello(Hello::new("t", "k", Some(3), None)),
        );
        let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
        assert_eq!(len, buf.len() - 4);
        assert_eq!(buf[4], 0, "Hello is variant 0");
        assert_eq!(
            peek_hello_version(&buf[4..]),
            Some((MAGIC, PROTOCOL_VERSION))
        );
        // Pinned: the bytes PROTOCOL.md shows. A change here breaks every peer.
        let buf = encode(
            &mut codec,
            &Frame::Hello(Hello::new("wc", "split", None, None)),
        );
        assert_eq!(
            &buf[..],
            &[
                0, 0, 0, 18, // length
                0,  // Hello
                0xd0, 0x9a, 0x95, 0xa2, 0x05, // magic
                1,    // version
                2, b'w', b'c', // topology
                5, b's', b'p', b'l', b'i', b't', // task
                0,    // instance: None
                0,    // token: None
            ]
        );
        let buf = encode(
            &mut codec,
            &Frame::Pull {
                max: 300,
                results: vec![
                    WireResult {
                        root: 5,
                        outcome: WireOutcome::Done,
                    },
                    WireResult {
                        root: 6,
                        outcome: WireOutcome::Failed {
                            message: "no".into(),
                            retryable: true,
                        },
                    },
                ],
            },
        );
        assert_eq!(
            &buf[..],
            &[0, 0, 0, 12, 2, 0xac, 0x02, 2, 5, 0, 6, 2, 2, b'n', b'o', 1]
        );
        assert_eq!(peek_hello_version(&[1, 2, 3]), None);
        assert_eq!(peek_hello_version(&[]), None);
        assert_eq!(peek_hello_version(&[0]), None);
    }

    #[test]
    fn wire_oversized_length_fails_before_the_body_arrives() {
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[0, 0]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(&[4, 1]); // 1025
        match codec.decode(&mut buf) {
            Err(
                e @ WireError::FrameTooLarge {
                    len: 1025,
                    max: 1024,
                },
            ) => {
                assert_eq!(e.code(), ErrorCode::FrameTooLarge)
            }
            other => panic!("{other:?}"),
        }
        // A 4 GiB claim does not allocate.
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(WireError::FrameTooLarge {
                len: 0xffff_ffff,
                ..
            })
        ));
        assert!(buf.capacity() < 1024);
        // At the limit is fine: the decoder just waits for the body.
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::from(&[0, 0, 4, 0][..]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
    }

    #[test]
    fn wire_oversized_frame_is_not_encoded() {
        let codec = FrameCodec::new(1000);
        let frame = Frame::Batch {
            deliveries: vec![WireDelivery {
                root: 1,
                msg: WireMsg {
                    key: None,
                    payload: Bytes::from(vec![7u8; 5000]),
                },
            }],
        };
        let mut buf = BytesMut::from(&b"keep"[..]);
        match codec.encode_ref(&frame, &mut buf) {
            Err(WireError::FrameTooLarge { len, max: 1000 }) => assert!(len > 5000, "{len}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            &buf[..],
            b"keep",
            "nothing of the refused frame is left behind"
        );
        // Exactly at the limit encodes; one byte over does not.
        let body = Counter::default();
        let size = postcard::serialize_with_flavor(&frame, body).unwrap();
        let mut codec = FrameCodec::new(size);
        let mut buf = BytesMut::new();
        codec.encode_ref(&frame, &mut buf).unwrap();
        assert_eq!(buf.len(), size + 4);
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(frame.clone()));
        let codec = FrameCodec::new(size - 1);
        assert!(matches!(
            codec.encode_ref(&frame, &mut buf),
            Err(WireError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn wire_truncated_frame() {
        let mut codec = FrameCodec::default();
        let full = encode(
            &mut codec,
            &Frame::Shutdown {
                reason: "bye".into(),
            },
        );
        for cut in 1..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert!(codec.decode(&mut buf).unwrap().is_none(), "cut {cut}");
            match codec.decode_eof(&mut buf) {
                Err(WireError::Truncated(n)) => assert_eq!(n, cut),
                other => panic!("cut {cut}: {other:?}"),
            }
        }
        let mut buf = full.clone();
        assert!(codec.decode_eof(&mut buf).unwrap().is_some());
        assert!(codec.decode_eof(&mut buf).unwrap().is_none());
    }

    #[test]
    fn wire_garbage_is_malformed() {
        let mut codec = FrameCodec::default();
        for body in [
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff][..], // bad varint variant
            &[99][..],                                 // unknown variant
            &[4][..],                                  // Heartbeat without seq
            &[4, 7, 7][..],                            // trailing byte
            &[7, 1, 0xff][..],                         // Shutdown with invalid UTF-8
            &[][..],                                   // empty body
        ] {
            let mut buf = BytesMut::new();
            buf.put_u32(body.len() as u32);
            buf.extend_from_slice(body);
            match codec.decode(&mut buf) {
                Err(e @ WireError::Malformed(_)) => assert_eq!(e.code(), ErrorCode::Malformed),
                other => panic!("{body:?}: {other:?}"),
            }
        }
    }

    /// A Hello as a future version might send it: different fields after
    /// `version`.
    #[derive(Serialize)]
    enum FutureFrame {
        Hello {
            magic: u32,
            version: u16,
            cluster: u64,
            topology: String,
            labels: Vec<(String, String)>,
        },
    }

    #[test]
    fn wire_future_hello_is_a_version_mismatch() {
        let future = FutureFrame::Hello {
            magic: MAGIC,
            version: 2,
            cluster: u64::MAX,
            topology: "wordcount".into(),
            labels: vec![("zone".into(), "b".into())],
        };
        let body = postcard::to_stdvec(&future).unwrap();
        assert_eq!(peek_hello_version(&body), Some((MAGIC, 2)));
        let mut buf = BytesMut::new();
        buf.put_u32(body.len() as u32);
        buf.extend_from_slice(&body);
        let err = FrameCodec::default().decode(&mut buf).unwrap_err();
        assert!(
            matches!(err, WireError::Version { theirs: 2, ours: 1 }),
            "{err:?}"
        );
        assert_eq!(err.code(), ErrorCode::VersionMismatch);
        let msg = err.to_string();
        assert!(msg.contains('2') && msg.contains('1'), "{msg}");

        // A v1 Hello with extra fields appended (strict decoding sees the trailing bytes).
        let mut hello = Hello::new("t", "k", None, None);
        hello.version = 2;
        let mut body = postcard::to_stdvec(&Frame::Hello(hello)).unwrap();
        body.extend_from_slice(&[3, b'x', b'y', b'z', 1]);
        let mut buf = BytesMut::new();
        buf.put_u32(body.len() as u32);
        buf.extend_from_slice(&body);
        assert!(matches!(
            FrameCodec::default().decode(&mut buf),
            Err(WireError::Version { theirs: 2, ours: 1 })
        ));
    }

    #[test]
    fn wire_bad_magic() {
        let future = FutureFrame::Hello {
            magic: 0x4854_5450,
            version: 1,
            cluster: 0,
            topology: String::new(),
            labels: vec![],
        };
        let body = postcard::to_stdvec(&future).unwrap();
        let mut buf = BytesMut::new();
        buf.put_u32(body.len() as u32);
        buf.extend_from_slice(&body);
        let err = FrameCodec::default().decode(&mut buf).unwrap_err();
        assert!(matches!(err, WireError::BadMagic(0x4854_5450)), "{err:?}");
        assert_eq!(err.code(), ErrorCode::BadMagic);

        // A well-formed Hello with the wrong magic decodes; `check` refuses it.
        let mut hello = Hello::new("t", "k", None, None);
        assert!(hello.check().is_ok());
        hello.magic = 1;
        assert!(matches!(hello.check(), Err(WireError::BadMagic(1))));
        hello.magic = MAGIC;
        hello.version = 9;
        let err = hello.check().unwrap_err();
        assert!(matches!(err, WireError::Version { theirs: 9, ours: 1 }));
        assert!(matches!(
            Frame::error(&err),
            Frame::Error {
                code: ErrorCode::VersionMismatch,
                ..
            }
        ));
    }

    #[test]
    fn wire_batch_is_compact() {
        let deliveries: Vec<WireDelivery> = (0..256u64)
            .map(|i| WireDelivery {
                // A realistic RootId: generation in the high half.
                root: (i << 32) | (1000 + i),
                msg: WireMsg {
                    key: None,
                    payload: Bytes::from(vec![b'x'; 100]),
                },
            })
            .collect();
        let buf = encode(&mut FrameCodec::default(), &Frame::Batch { deliveries });
        assert!(buf.len() < 256 * (100 + 16), "{} bytes", buf.len());
    }

    #[tokio::test]
    async fn wire_framed_duplex_round_trip() {
        use futures_util::{SinkExt, StreamExt};
        use tokio_util::codec::Framed;

        async fn send<T>(framed: &mut T, frame: Frame)
        where
            T: futures_util::Sink<Frame, Error = WireError> + Unpin,
        {
            framed.send(frame).await.unwrap();
        }

        async fn next<T>(framed: &mut T) -> Option<Frame>
        where
            T: futures_util::Stream<Item = Result<Frame, WireError>> + Unpin,
        {
            framed.next().await.map(Result::unwrap)
        }

        let (a, b) = tokio::io::duplex(64);
        let mut worker = Framed::new(a, FrameCodec::default());
        let mut server = Framed::new(b, FrameCodec::default());
        let big = Bytes::from(vec![1u8; 100_000]);

        let w = tokio::spawn(async move {
            send(
                &mut worker,
                Frame::Hello(Hello::new("wc", "split", None, Some("s3cret".into()))),
            )
            .await;
            let Some(Frame::Welcome(welcome)) = next(&mut worker).await else {
                panic!("no welcome");
            };
            send(
                &mut worker,
                Frame::Pull {
                    max: welcome.batch_size,
                    results: vec![],
                },
            )
            .await;
            let Some(Frame::Batch { deliveries }) = next(&mut worker).await else {
                panic!("no batch");
            };
            let results = deliveries
                .into_iter()
                .map(|d| WireResult {
                    root: d.root,
                    outcome: WireOutcome::Emit(vec![d.msg]),
                })
                .collect();
            send(&mut worker, Frame::Goodbye { results }).await;
            assert!(next(&mut worker).await.is_none(), "server closed");
        });

        let Some(Frame::Hello(hello)) = next(&mut server).await else {
            panic!("no hello");
        };
        hello.check().unwrap();
        assert_eq!(hello.token.as_deref(), Some("s3cret"));
        let welcome = Welcome {
            instance: 0,
            instances: 1,
            batch_size: 2,
            heartbeat_ms: 1000,
        };
        send(&mut server, Frame::Welcome(welcome)).await;
        let Some(Frame::Pull { max: 2, results }) = next(&mut server).await else {
            panic!("no pull");
        };
        assert!(results.is_empty());
        let deliveries = vec![
            WireDelivery {
                root: 1,
                msg: WireMsg {
                    key: Some(Bytes::from_static(b"k")),
                    payload: big.clone(),
                },
            },
            WireDelivery {
                root: 2,
                msg: WireMsg::default(),
            },
        ];
        send(
            &mut server,
            Frame::Batch {
                deliveries: deliveries.clone(),
            },
        )
        .await;
        let Some(Frame::Goodbye { results }) = next(&mut server).await else {
            panic!("no goodbye");
        };
        assert_eq!(results.len(), 2);
        assert_eq!(
            results[0].outcome,
            WireOutcome::Emit(vec![deliveries[0].msg.clone()])
        );
        drop(server);
        w.await.unwrap();
    }
}
