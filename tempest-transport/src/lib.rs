//! # tempest-transport
//!
//! The data plane of a distributed topology, protocol version 2
//! (`PROTOCOL.md` at the repository root):
//!
//! - [`wire`]: the frames, each field marked with the version that added it;
//! - [`codec`]: length-prefixed framing with a maximum frame size, and the
//!   zero-copy fast path for batches of messages;
//! - [`auth`]: the challenge and response that proves the data-plane
//!   secret without sending it;
//! - [`tls`]: TLS on every link (rustls), mutual, against the cluster's
//!   CA, under the challenge and response;
//! - [`link`]: what every connection shares (plain or TLS stream,
//!   accepting and connecting, handshake deadline, liveness, refusals);
//! - [`gate`]: connection limits of an accepting port;
//! - [`outbox`]: the sending side of peer links, with credit-based
//!   backpressure and load-aware shuffle;
//! - [`inbox`]: a worker's peer port, the receiving side.
//!
//! The topology server (`tempest-topology`) and the task worker
//! (`tempest-task`) build on it; the daemons and the CLI do not compile it.

#![warn(missing_docs)]

pub mod auth;
pub mod codec;
pub mod gate;
pub mod inbox;
pub mod link;
pub mod outbox;
pub mod tls;
pub mod wire;

pub use codec::{FrameCodec, WireError};
pub use tls::{DataTls, TlsError};
pub use wire::{Frame, DEFAULT_MAX_FRAME, PROTOCOL_VERSION};
