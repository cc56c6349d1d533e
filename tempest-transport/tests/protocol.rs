//! `PROTOCOL.md` pinned: the byte examples it shows are exactly what the
//! codec writes and reads (a change to the document or to the codec breaks
//! this test), its tables of frames and error codes match the enums, the
//! fast paths write postcard's bytes (and read what postcard reads), a
//! refusal reads the same in version 1 and version 2, and the algorithms it
//! spells out for other implementations (key grouping, slot bits, the
//! proofs of the data-plane secret) are the ones the code runs.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tempest_core::ledger::slot_bit;
use tempest_core::msg::key_instance;
use tempest_core::{Bytes, Delivery, Grouping, Msg, RootId};
use tempest_transport::auth::{self, Secret, Side, MIN_SECRET, SECRET_ENV};
use tempest_transport::codec::{
    check_magic_version, frame_size, peek_hello_version, report_size, FrameCodec, WireError,
    PRE_AUTH_MAX_FRAME,
};
use tempest_transport::gate::GateConfig;
use tempest_transport::link::{self, NoHello};
use tempest_transport::wire::{
    Ack, Deliveries, ErrorCode, Fail, Fixed, Frame, Hello, Members, PeerHello, PeerWelcome, Report,
    Role, SlotInfo, SlotRef, TaskMembers, Welcome, WireDag, WireEdge, WireTask, WorkerHello,
    DEFAULT_MAX_FRAME, ERROR_TAG, MAGIC, PROTOCOL_VERSION,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Decoder, Encoder, Framed};

const PROTOCOL_MD: &str = include_str!("../../PROTOCOL.md");

// ---------------------------------------------------------------------------
// Reading PROTOCOL.md
// ---------------------------------------------------------------------------

/// The lines of the fenced block that follows `<!-- example: NAME -->`.
fn example_block(name: &str) -> Vec<&'static str> {
    let marker = format!("<!-- example: {name} -->");
    let at = PROTOCOL_MD
        .find(&marker)
        .unwrap_or_else(|| panic!("PROTOCOL.md has no example `{name}`"));
    let mut lines = PROTOCOL_MD[at + marker.len()..].lines().skip(1);
    let fence = lines.next().unwrap_or_default();
    assert!(
        fence.starts_with("```"),
        "example `{name}`: a fenced block must follow its marker, found {fence:?}"
    );
    lines.take_while(|l| !l.starts_with("```")).collect()
}

/// The bytes an example of PROTOCOL.md shows: every line of its block is
/// hex bytes separated by single spaces, then optionally two or more spaces
/// and a note.
fn doc_bytes(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for line in example_block(name) {
        let hex = line.split("  ").next().unwrap_or_default();
        for token in hex.split(' ') {
            let ok = token.len() == 2 && token.bytes().all(|b| b.is_ascii_hexdigit());
            assert!(
                ok,
                "example `{name}`: {line:?} is not a line of bytes (`{token}`)"
            );
            out.push(u8::from_str_radix(token, 16).expect("hex"));
        }
    }
    out
}

/// Every example name PROTOCOL.md has.
fn doc_example_names() -> BTreeSet<String> {
    PROTOCOL_MD
        .match_indices("<!-- example: ")
        .map(|(at, m)| {
            let rest = &PROTOCOL_MD[at + m.len()..];
            rest[..rest.find(" -->").expect("marker closes")].to_owned()
        })
        .collect()
}

/// The rows of the first markdown table after `heading` whose first cell
/// is a number: (number, the other cells, trimmed).
fn table_rows(heading: &str) -> Vec<(u32, Vec<String>)> {
    let at = PROTOCOL_MD
        .find(heading)
        .unwrap_or_else(|| panic!("PROTOCOL.md has no {heading:?}"));
    PROTOCOL_MD[at..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| {
            let cells: Vec<String> = l
                .trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_owned())
                .collect();
            let n = cells.first()?.parse().ok()?;
            Some((n, cells[1..].to_vec()))
        })
        .collect()
}

/// The name in the first backticks of a cell.
fn ticked(cell: &str) -> &str {
    cell.split('`').nth(1).unwrap_or("")
}

// ---------------------------------------------------------------------------
// The examples
// ---------------------------------------------------------------------------

const SESSION: u64 = 0x9f3a_1c2d_4e5f_6071;
const ROOT_COW: u64 = 0x0000_002b_0000_0005;
const ROOT_MOO: u64 = 0x0000_0031_0000_0009;
const EDGE_COW: u64 = 0x1122_3344_5566_7788;
const EDGE_MOO: u64 = 0x0102_0304_0506_0708;
const EDGE_CHILD: u64 = 0xaabb_ccdd_eeff_0011;

fn slot(task: u32, instance: u32, incarnation: u32) -> SlotRef {
    SlotRef {
        task,
        instance,
        incarnation,
    }
}

/// The deployment's data-plane secret in the examples.
const SECRET: &str = "correct horse battery staple";
/// The worker's nonce in its `Hello` to the server.
const NONCE_WORKER: [u8; 16] = [
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f,
];
/// The server's nonce in its `Challenge`.
const NONCE_SERVER: [u8; 16] = [
    0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab, 0xac, 0xad, 0xae, 0xaf,
];
/// The sender's nonce in its peer `Hello`.
const NONCE_PEER: [u8; 16] = [
    0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2a, 0x2b, 0x2c, 0x2d, 0x2e, 0x2f,
];
/// The worker's proof for its `Hello`, under [`SECRET`], with both nonces.
const PROOF_WORKER: [u8; 32] = [
    0xaf, 0xe7, 0x5e, 0x85, 0xbb, 0x9b, 0x62, 0xad, 0x76, 0x80, 0x66, 0xea, 0xbc, 0x03, 0xef, 0xd7,
    0x28, 0x84, 0x2e, 0xfe, 0x3e, 0xaf, 0x53, 0x30, 0x58, 0x3d, 0x17, 0xaa, 0xd6, 0xf0, 0x0e, 0xed,
];
/// The server's proof for the same handshake.
const PROOF_SERVER: [u8; 32] = [
    0x17, 0xcd, 0x92, 0x27, 0xc2, 0x8c, 0x42, 0x2f, 0xfd, 0x64, 0x2a, 0x64, 0x0b, 0x4f, 0x1a, 0xed,
    0x52, 0xa3, 0x4d, 0x5e, 0x0c, 0xfb, 0xcf, 0xcd, 0xaf, 0x07, 0x01, 0x4e, 0x97, 0x78, 0x81, 0x1c,
];
/// The labels of the proofs, as PROTOCOL.md spells them: 32 bytes each.
const CONNECTOR_LABEL: &[u8] = b"tempest data plane v2: connector";
const ACCEPTOR_LABEL: &[u8] = b"tempest data plane v2: acceptor ";

/// A `Hello` of this build with a fixed nonce (`Hello::new` draws one).
fn hello(nonce: [u8; 16], role: Role) -> Hello {
    Hello {
        nonce,
        ..Hello::new("wc", role)
    }
}

/// The worker's `Hello` of the examples.
fn worker_hello() -> Hello {
    hello(
        NONCE_WORKER,
        Role::Worker(WorkerHello {
            task: "count".into(),
            instance: Some(1),
            instances: 2,
            layout: 3,
            peer: "h1:7001".into(),
        }),
    )
}

/// The examples of PROTOCOL.md: name, frame, and its bytes, written out
/// here as well so that the document, this list and the codec must agree.
fn examples() -> Vec<(&'static str, Frame, Vec<u8>)> {
    let message = "the peer speaks protocol version 1, this side speaks version 2";
    vec![
        (
            "worker-hello",
            Frame::Hello(worker_hello()),
            [
                &[0x00, 0x00, 0x00, 0x2d][..],                     // length 45
                &[0x00],                                           // Hello
                &[0xd0, 0x9a, 0x95, 0xa2, 0x05],                   // magic
                &[0x02],                                           // version 2
                &[0x02, b'w', b'c'],                               // topology
                &NONCE_WORKER,                                     // nonce, no length
                &[0x00],                                           // Worker
                &[0x05, b'c', b'o', b'u', b'n', b't'],             // task
                &[0x01, 0x01],                                     // instance Some(1)
                &[0x02],                                           // instances
                &[0x03],                                           // layout
                &[0x07, b'h', b'1', b':', b'7', b'0', b'0', b'1'], // peer
            ]
            .concat(),
        ),
        (
            "challenge",
            Frame::Challenge {
                nonce: NONCE_SERVER,
            },
            [&[0x00, 0x00, 0x00, 0x11, 0x0d][..], &NONCE_SERVER].concat(),
        ),
        (
            "connector-proof",
            Frame::Proof { mac: PROOF_WORKER },
            [&[0x00, 0x00, 0x00, 0x21, 0x0e][..], &PROOF_WORKER].concat(),
        ),
        (
            "acceptor-proof",
            Frame::Proof { mac: PROOF_SERVER },
            [&[0x00, 0x00, 0x00, 0x21, 0x0e][..], &PROOF_SERVER].concat(),
        ),
        (
            "welcome",
            Frame::Welcome(Welcome {
                instance: 1,
                incarnation: 3,
                session: SESSION,
                heartbeat_ms: 1000,
                batch_size: 256,
                dag: WireDag {
                    tasks: vec![
                        WireTask {
                            name: "split".into(),
                            edges: vec![WireEdge {
                                to: 1,
                                grouping: Grouping::Key,
                            }],
                        },
                        WireTask {
                            name: "count".into(),
                            edges: vec![WireEdge {
                                to: 2,
                                grouping: Grouping::Key,
                            }],
                        },
                        WireTask {
                            name: "output".into(),
                            edges: vec![],
                        },
                    ],
                    root: 0,
                },
                members: Members {
                    epoch: 7,
                    tasks: vec![
                        TaskMembers {
                            instances: 1,
                            layout: 0,
                            slots: vec![SlotInfo {
                                incarnation: 0,
                                peer: Some("h0:7000".into()),
                            }],
                        },
                        TaskMembers {
                            instances: 2,
                            layout: 3,
                            slots: vec![
                                SlotInfo {
                                    incarnation: 2,
                                    peer: Some("h2:7002".into()),
                                },
                                SlotInfo {
                                    incarnation: 3,
                                    peer: Some("h1:7001".into()),
                                },
                            ],
                        },
                        TaskMembers {
                            instances: 1,
                            layout: 0,
                            slots: vec![SlotInfo {
                                incarnation: 0,
                                peer: None,
                            }],
                        },
                    ],
                },
            }),
            [
                &[0x00, 0x00, 0x00, 0x58][..], // length 88
                &[0x01],                       // Welcome
                &[0x01],                       // instance
                &[0x03],                       // incarnation
                &[0xf1, 0xc0, 0xfd, 0xf2, 0xd4, 0x85, 0x87, 0x9d, 0x9f, 0x01], // session
                &[0xe8, 0x07],                 // heartbeat_ms
                &[0x80, 0x02],                 // batch_size
                &[0x03],                       // 3 tasks
                &[0x05, b's', b'p', b'l', b'i', b't'], // split
                &[0x01, 0x01, 0x01],           // -> 1 by key
                &[0x05, b'c', b'o', b'u', b'n', b't'], // count
                &[0x01, 0x02, 0x01],           // -> 2 by key
                &[0x06, b'o', b'u', b't', b'p', b'u', b't'], // output
                &[0x00],                       // no edges
                &[0x00],                       // root 0
                &[0x07],                       // epoch
                &[0x03],                       // 3 tasks
                &[0x01, 0x00],                 // split: 1, layout 0
                &[
                    0x01, 0x00, 0x01, 0x07, b'h', b'0', b':', b'7', b'0', b'0', b'0',
                ],
                &[0x02, 0x03], // count: 2, layout 3
                &[
                    0x02, 0x02, 0x01, 0x07, b'h', b'2', b':', b'7', b'0', b'0', b'2',
                ],
                &[0x03, 0x01, 0x07, b'h', b'1', b':', b'7', b'0', b'0', b'1'],
                &[0x01, 0x00],       // output: 1, layout 0
                &[0x01, 0x00, 0x00], // incarnation 0, nobody
            ]
            .concat(),
        ),
        (
            "peer-hello",
            Frame::Hello(hello(
                NONCE_PEER,
                Role::Peer(PeerHello {
                    session: SESSION,
                    from: Some(slot(0, 0, 0)),
                    to: slot(1, 1, 3),
                }),
            )),
            [
                &[0x00, 0x00, 0x00, 0x2c][..],   // length 44
                &[0x00],                         // Hello
                &[0xd0, 0x9a, 0x95, 0xa2, 0x05], // magic
                &[0x02],                         // version 2
                &[0x02, b'w', b'c'],             // topology
                &NONCE_PEER,                     // nonce, no length
                &[0x01],                         // Peer
                &[0xf1, 0xc0, 0xfd, 0xf2, 0xd4, 0x85, 0x87, 0x9d, 0x9f, 0x01], // session
                &[0x01, 0x00, 0x00, 0x00],       // from Some(0/0/0)
                &[0x01, 0x01, 0x03],             // to 1/1/3
            ]
            .concat(),
        ),
        (
            "peer-welcome",
            Frame::PeerWelcome(PeerWelcome {
                credit: 4,
                heartbeat_ms: 1000,
            }),
            vec![0x00, 0x00, 0x00, 0x04, 0x03, 0x04, 0xe8, 0x07],
        ),
        (
            "batch",
            Frame::Batch(Deliveries(vec![
                Delivery {
                    root: RootId(ROOT_COW),
                    edge: EDGE_COW,
                    msg: Msg::keyed_by_payload("cow"),
                },
                Delivery {
                    root: RootId(ROOT_MOO),
                    edge: EDGE_MOO,
                    msg: Msg::new("moo"),
                },
            ])),
            [
                &[0x00, 0x00, 0x00, 0x2c][..],                     // length 44
                &[0x04],                                           // Batch
                &[0x02],                                           // 2 messages
                &[0x05, 0x00, 0x00, 0x00, 0x2b, 0x00, 0x00, 0x00], // root
                &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11], // edge
                &[0x02],                                           // key = payload
                &[0x03, b'c', b'o', b'w'],                         // payload
                &[0x09, 0x00, 0x00, 0x00, 0x31, 0x00, 0x00, 0x00], // root
                &[0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01], // edge
                &[0x00],                                           // no key
                &[0x03, b'm', b'o', b'o'],                         // payload
            ]
            .concat(),
        ),
        (
            "credit",
            Frame::Credit { batches: 1 },
            vec![0x00, 0x00, 0x00, 0x02, 0x05, 0x01],
        ),
        (
            "report",
            Frame::Report(Report {
                dests: vec![slot(2, 0, 0)],
                acks: vec![Ack {
                    root: Fixed(ROOT_COW),
                    xor: Fixed(EDGE_COW ^ EDGE_CHILD),
                    slots: slot_bit(2, 0),
                }],
                fails: vec![Fail {
                    root: Fixed(ROOT_MOO),
                    message: "bad input".into(),
                    retryable: false,
                }],
            }),
            [
                &[0x00, 0x00, 0x00, 0x2f][..],                     // length 47
                &[0x06],                                           // Report
                &[0x01],                                           // 1 dest
                &[0x02, 0x00, 0x00],                               // 2/0/0
                &[0x01],                                           // 1 ack
                &[0x05, 0x00, 0x00, 0x00, 0x2b, 0x00, 0x00, 0x00], // root
                &[0x99, 0x77, 0x99, 0xbb, 0x99, 0xff, 0x99, 0xbb], // xor
                &[0x80, 0x80, 0x80, 0x80, 0x40],                   // slots 1 << 34
                &[0x01],                                           // 1 fail
                &[0x09, 0x00, 0x00, 0x00, 0x31, 0x00, 0x00, 0x00], // root
                &[0x09, b'b', b'a', b'd', b' ', b'i', b'n', b'p', b'u', b't'],
                &[0x00], // retryable: false
            ]
            .concat(),
        ),
        (
            "link-lost",
            Frame::LinkLost(slot(2, 0, 0)),
            vec![0x00, 0x00, 0x00, 0x04, 0x07, 0x02, 0x00, 0x00],
        ),
        (
            "heartbeat",
            Frame::Heartbeat { seq: 1 },
            vec![0x00, 0x00, 0x00, 0x02, 0x09, 0x01],
        ),
        (
            "heartbeat-ack",
            Frame::HeartbeatAck { seq: 1 },
            vec![0x00, 0x00, 0x00, 0x02, 0x0a, 0x01],
        ),
        (
            "shutdown",
            Frame::Shutdown {
                reason: "bye".into(),
            },
            vec![0x00, 0x00, 0x00, 0x05, 0x0c, 0x03, b'b', b'y', b'e'],
        ),
        (
            "goodbye",
            Frame::Goodbye,
            vec![0x00, 0x00, 0x00, 0x01, 0x0b],
        ),
        (
            "error",
            Frame::error(ErrorCode::VersionMismatch, message),
            [
                &[0x00, 0x00, 0x00, 0x41][..], // length 65
                &[0x08],                       // Error
                &[0x01],                       // VersionMismatch
                &[0x3e],                       // 62 bytes
                message.as_bytes(),
            ]
            .concat(),
        ),
    ]
}

/// A version 1 worker's `Hello`, as version 1's PROTOCOL.md pinned it.
const V1_HELLO: &[u8] = &[
    0x00, 0x00, 0x00, 0x12, // length 18
    0x00, // Hello
    0xd0, 0x9a, 0x95, 0xa2, 0x05, // magic
    0x01, // version 1
    0x02, b'w', b'c', // topology
    0x05, b's', b'p', b'l', b'i', b't', // task
    0x00, // instance: None
    0x00, // token: None
];

/// What a version 1 server answers a version 2 worker's `Hello`.
const V1_REFUSAL: &str = "the peer speaks protocol version 2, this side speaks version 1";

/// That answer's bytes, as version 1 writes them: `Error` is variant 8 and
/// `VersionMismatch` code 1 there too.
fn v1_error() -> Vec<u8> {
    [
        &[0x00, 0x00, 0x00, 0x41][..], // length 65
        &[0x08],                       // Error (variant 8 in version 1)
        &[0x01],                       // VersionMismatch
        &[0x3e],                       // 62 bytes
        V1_REFUSAL.as_bytes(),
    ]
    .concat()
}

/// Version 1's `Frame`, as far as a reader of its `Error` needs: the
/// variants in front of it (by index; their fields are never read here)
/// and `Error` at 8, with version 1's fields.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum V1Frame {
    Hello,
    Welcome,
    Pull,
    Batch,
    Heartbeat,
    HeartbeatAck,
    Goodbye,
    Shutdown,
    Error { code: V1ErrorCode, message: String },
}

/// Version 1's error codes, 0–11.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
enum V1ErrorCode {
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
}

const V1_CODES: [V1ErrorCode; 12] = [
    V1ErrorCode::BadMagic,
    V1ErrorCode::VersionMismatch,
    V1ErrorCode::BadToken,
    V1ErrorCode::UnknownTopology,
    V1ErrorCode::UnknownTask,
    V1ErrorCode::InstanceTaken,
    V1ErrorCode::BadInstance,
    V1ErrorCode::Malformed,
    V1ErrorCode::FrameTooLarge,
    V1ErrorCode::HandshakeTimeout,
    V1ErrorCode::UnexpectedFrame,
    V1ErrorCode::ShuttingDown,
];

fn encode(frame: &Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    FrameCodec::default()
        .encode_ref(frame, &mut buf)
        .unwrap_or_else(|e| panic!("{}: {e}", frame.name()));
    buf
}

fn decode_all(bytes: &[u8]) -> Result<Vec<Frame>, WireError> {
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(f) = codec.decode_eof(&mut buf)? {
        out.push(f);
    }
    Ok(out)
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn the_examples_are_what_the_codec_writes_and_reads() {
    for (name, frame, bytes) in examples() {
        let written = encode(&frame);
        assert_eq!(
            hex(&written),
            hex(&bytes),
            "example `{name}`: the codec writes other bytes"
        );
        assert_eq!(
            hex(&doc_bytes(name)),
            hex(&bytes),
            "example `{name}`: PROTOCOL.md shows other bytes"
        );
        // The length prefix counts the body.
        let len = u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
        assert_eq!(len, bytes.len() - 4, "example `{name}`: length prefix");
        assert_eq!(frame_size(&frame), len, "example `{name}`: frame_size");
        // The body is postcard's, whichever path the codec took.
        let body = postcard::to_stdvec(&frame).expect("postcard");
        assert_eq!(hex(&body), hex(&bytes[4..]), "example `{name}`: postcard");
        assert_eq!(
            postcard::from_bytes::<Frame>(&bytes[4..]).ok().as_ref(),
            Some(&frame),
            "example `{name}`: postcard reads it back"
        );
        // The Encoder writes the same.
        let mut buf = BytesMut::new();
        FrameCodec::default()
            .encode(frame.clone(), &mut buf)
            .expect("encode");
        assert_eq!(&buf[..], &bytes[..], "example `{name}`: Encoder::encode");
        // And it reads back: alone, and two in a row.
        assert_eq!(
            decode_all(&bytes).expect("decode"),
            std::slice::from_ref(&frame),
            "example `{name}`"
        );
        let twice = [&bytes[..], &bytes[..]].concat();
        assert_eq!(
            decode_all(&twice).expect("decode"),
            [frame.clone(), frame],
            "example `{name}`"
        );
    }
}

#[test]
fn every_example_in_the_document_is_pinned() {
    let pinned: BTreeSet<String> = examples()
        .iter()
        .map(|(n, _, _)| n.to_string())
        .chain(["v1-hello".to_string(), "v1-error".to_string()])
        .collect();
    assert_eq!(doc_example_names(), pinned);
    let required = [
        "worker-hello",
        "challenge",
        "connector-proof",
        "acceptor-proof",
        "peer-hello",
        "credit",
        "batch",
        "report",
        "error",
        "v1-error",
    ];
    for name in required {
        assert!(pinned.contains(name), "{name}");
    }
}

#[test]
fn the_examples_say_what_the_document_says_they_do() {
    let ex = examples();
    let frame = |n: &str| {
        ex.iter()
            .find(|(name, _, _)| *name == n)
            .map(|(_, f, _)| f.clone())
            .expect("example")
    };
    // Both Hellos are variant 0 with magic and version in front, then the
    // topology and the nonce, 16 bytes as they are.
    for (name, nonce) in [("worker-hello", NONCE_WORKER), ("peer-hello", NONCE_PEER)] {
        let bytes = doc_bytes(name);
        assert_eq!(bytes[4], 0, "{name}: Hello is variant 0");
        assert_eq!(
            peek_hello_version(&bytes[4..]),
            Some((MAGIC, PROTOCOL_VERSION)),
            "{name}"
        );
        assert_eq!(&bytes[11..14], b"\x02wc", "{name}: topology");
        assert_eq!(bytes[14..30], nonce, "{name}: the nonce");
        let Frame::Hello(h) = frame(name) else {
            panic!("{name}")
        };
        assert_eq!(h.nonce, nonce);
        // The transcript a proof covers: the body after its variant byte.
        assert_eq!(h.transcript(), &bytes[5..], "{name}: transcript");
    }
    // The challenge and the proofs: the nonce and the MACs, nothing else.
    assert_eq!(doc_bytes("challenge")[5..], NONCE_SERVER);
    assert_eq!(doc_bytes("connector-proof")[5..], PROOF_WORKER);
    assert_eq!(doc_bytes("acceptor-proof")[5..], PROOF_SERVER);
    // The batch: one key is the payload (tag 2), the other message has none (tag 0).
    let Frame::Batch(Deliveries(ds)) = frame("batch") else {
        panic!("batch")
    };
    assert_eq!(ds[0].msg.key(), Some(ds[0].msg.payload()));
    assert_eq!(ds[1].msg.key(), None);
    let bytes = doc_bytes("batch");
    assert_eq!((bytes[4 + 2 + 16], bytes[4 + 2 + 16 + 1 + 4 + 16]), (2, 0));
    // The report's ack: the child went to output/0, whose bit is 1 << 34,
    // and the ack's XOR is the handled edge id's and the child's.
    assert_eq!(slot_bit(2, 0), 1 << 34);
    let Frame::Report(r) = frame("report") else {
        panic!("report")
    };
    assert_eq!(r.acks[0].xor.0, 0xbb99_ff99_bb99_7799);
    assert_eq!(r.acks[0].xor.0 ^ EDGE_CHILD, EDGE_COW);
    assert_eq!(r.dests, [slot(2, 0, 0)]);
    // The Welcome's slot for count/1 is the worker's own incarnation.
    let Frame::Welcome(w) = frame("welcome") else {
        panic!("welcome")
    };
    let me = &w.members.tasks[1].slots[w.instance as usize];
    assert_eq!(me.incarnation, w.incarnation);
    assert_eq!(me.peer.as_deref(), Some("h1:7001"));
}

#[test]
fn a_version_1_hello_gets_the_documented_error() {
    let bytes = doc_bytes("v1-hello");
    assert_eq!(bytes, V1_HELLO, "PROTOCOL.md shows version 1's bytes");
    assert_eq!(peek_hello_version(&bytes[4..]), Some((MAGIC, 1)));
    let err = decode_all(&bytes).expect_err("a version 1 Hello is refused");
    assert!(
        matches!(err, WireError::Version { theirs: 1, ours: 2 }),
        "{err:?}"
    );
    assert_eq!(err.code(), ErrorCode::VersionMismatch);
    // The Error a refusal sends is the documented one, byte for byte.
    let refusal = err.frame();
    assert_eq!(hex(&encode(&refusal)), hex(&doc_bytes("error")));
    assert_eq!(decode_all(&doc_bytes("error")).expect("decode"), [refusal]);
}

#[test]
fn a_version_1_worker_reads_a_version_2_refusal() {
    // The refusal's body is what version 1 reads as its Error: variant 8,
    // code 1, then a length-prefixed message.
    let bytes = doc_bytes("error");
    let body = &bytes[4..];
    assert_eq!(ERROR_TAG, 8);
    assert_eq!(body[0], ERROR_TAG, "Error is variant 8, as in version 1");
    assert_eq!(body[1], 1, "VersionMismatch is code 1, as in version 1");
    assert_eq!(usize::from(body[2]), body.len() - 3, "the message's length");
    let message = std::str::from_utf8(&body[3..]).expect("UTF-8");
    assert_eq!(
        message,
        "the peer speaks protocol version 1, this side speaks version 2"
    );
    // A version 1 decoder reads it as its own Error, and that is fatal to
    // a version 1 worker.
    assert_eq!(
        postcard::from_bytes::<V1Frame>(body).expect("version 1 reads it"),
        V1Frame::Error {
            code: V1ErrorCode::VersionMismatch,
            message: message.into(),
        }
    );
    // Codes 0-11 read as version 1's own codes, whatever the refusal; the
    // codes added since are unknown to version 1.
    for (i, code) in ErrorCode::ALL.into_iter().enumerate() {
        let frame = encode(&Frame::error(code, "why"));
        let v1 = postcard::from_bytes::<V1Frame>(&frame[4..]);
        match V1_CODES.get(i) {
            Some(&v1_code) => {
                assert_eq!(format!("{v1_code:?}"), code.as_str());
                assert_eq!(
                    v1.ok(),
                    Some(V1Frame::Error {
                        code: v1_code,
                        message: "why".into()
                    }),
                    "{code}"
                );
            }
            None => assert!(v1.is_err(), "{code} is not a version 1 code"),
        }
    }
}

#[test]
fn a_version_2_worker_reads_a_version_1_refusal() {
    let bytes = doc_bytes("v1-error");
    assert_eq!(
        hex(&bytes),
        hex(&v1_error()),
        "PROTOCOL.md shows other bytes"
    );
    // These are version 1's bytes for its Error.
    let v1 = postcard::to_stdvec(&V1Frame::Error {
        code: V1ErrorCode::VersionMismatch,
        message: V1_REFUSAL.into(),
    })
    .expect("postcard");
    assert_eq!(hex(&v1), hex(&bytes[4..]));
    // The version 2 codec reads them as its Error, and the code is fatal:
    // the worker stops rather than retrying.
    let frames = decode_all(&bytes).expect("a version 2 worker reads it");
    assert_eq!(
        frames,
        [Frame::Error {
            code: ErrorCode::VersionMismatch,
            message: V1_REFUSAL.into(),
        }]
    );
    assert!(ErrorCode::VersionMismatch.is_fatal());
    // Version 1's Error of every code reads as version 2's same code.
    for (i, v1_code) in V1_CODES.into_iter().enumerate() {
        let body = postcard::to_stdvec(&V1Frame::Error {
            code: v1_code,
            message: "why".into(),
        })
        .expect("postcard");
        assert_eq!(
            decode_all(&[&(body.len() as u32).to_be_bytes()[..], &body].concat()).expect("decode"),
            [Frame::error(ErrorCode::ALL[i], "why")],
            "{v1_code:?}"
        );
    }
}

#[test]
fn the_documented_frame_limits_are_the_codes() {
    assert_eq!(DEFAULT_MAX_FRAME, 16 * 1024 * 1024);
    assert_eq!(PRE_AUTH_MAX_FRAME, 16 * 1024);
    for text in [
        "**16 MiB** (`DEFAULT_MAX_FRAME`",
        "**16 KiB** (`PRE_AUTH_MAX_FRAME`)",
    ] {
        assert!(PROTOCOL_MD.contains(text), "PROTOCOL.md says {text:?}");
    }
    // A Hello the size the document allows (a peer address of 255 bytes,
    // names of a reasonable size) is well within the limit, and so are the
    // frames of the challenge and response, of the sizes documented.
    let hello = Frame::Hello(Hello::new(
        "t".repeat(200),
        Role::Worker(WorkerHello {
            task: "k".repeat(200),
            instance: Some(u32::MAX),
            instances: 1024,
            layout: u64::MAX,
            peer: format!("{}:65535", "h".repeat(249)),
        }),
    ));
    assert!(frame_size(&hello) < PRE_AUTH_MAX_FRAME / 8);
    let challenge = Frame::Challenge { nonce: [0xff; 16] };
    let proof = Frame::Proof { mac: [0xff; 32] };
    assert_eq!((frame_size(&challenge), frame_size(&proof)), (17, 33));
    assert!(PROTOCOL_MD.contains("a `Challenge` 17 and a `Proof` 33"));
    // Until the Hello is accepted a connection reads under the limit; then
    // under the configured maximum.
    let mut codec = FrameCodec::new(PRE_AUTH_MAX_FRAME);
    let over = (PRE_AUTH_MAX_FRAME as u32 + 1).to_be_bytes();
    assert!(matches!(
        codec.decode(&mut BytesMut::from(&over[..])),
        Err(WireError::FrameTooLarge { max, .. }) if max == PRE_AUTH_MAX_FRAME
    ));
    codec.set_max_frame(DEFAULT_MAX_FRAME);
    assert!(codec
        .decode(&mut BytesMut::from(&over[..]))
        .expect("within the maximum")
        .is_none());
}

/// One frame of every variant, in variant order.
fn one_of_each() -> Vec<Frame> {
    let ex = examples();
    let by_name = |n: &str| {
        ex.iter()
            .find(|(name, _, _)| *name == n)
            .map(|(_, f, _)| f.clone())
            .expect("example")
    };
    vec![
        by_name("worker-hello"),
        by_name("welcome"),
        Frame::Members(Members::default()),
        by_name("peer-welcome"),
        by_name("batch"),
        by_name("credit"),
        by_name("report"),
        by_name("link-lost"),
        by_name("error"),
        by_name("heartbeat"),
        by_name("heartbeat-ack"),
        by_name("goodbye"),
        by_name("shutdown"),
        by_name("challenge"),
        by_name("connector-proof"),
    ]
}

#[test]
fn the_frame_table_gives_every_variant_its_index() {
    let rows = table_rows("| # | frame | link | dir | fields |");
    let frames = one_of_each();
    assert_eq!(rows.len(), frames.len(), "one row per frame variant");
    for (i, frame) in frames.iter().enumerate() {
        let body = &encode(frame)[4..];
        assert_eq!(usize::from(body[0]), i, "{} is variant {i}", frame.name());
        let (n, cells) = &rows[i];
        assert_eq!(*n as usize, i, "row {i} of the frame table");
        assert_eq!(
            ticked(&cells[0]),
            frame.name(),
            "row {i} of the frame table"
        );
    }
    // Hello and Error are where version 1 had them.
    assert_eq!((frames[0].name(), frames[8].name()), ("Hello", "Error"));
    assert_eq!(usize::from(ERROR_TAG), 8);
    // There is no variant after the last one in the table.
    let mut buf = BytesMut::from(&[0, 0, 0, 1, frames.len() as u8][..]);
    assert!(matches!(
        FrameCodec::default().decode(&mut buf),
        Err(WireError::Malformed(_))
    ));
}

#[test]
fn the_error_code_table_gives_every_code_its_index_and_fatality() {
    let rows = table_rows("| # | code | added | on refusal | sent when |");
    assert_eq!(rows.len(), ErrorCode::ALL.len(), "one row per error code");
    for (i, code) in ErrorCode::ALL.into_iter().enumerate() {
        assert_eq!(
            postcard::to_stdvec(&code).expect("postcard"),
            [i as u8],
            "{code} is code {i}"
        );
        let (n, cells) = &rows[i];
        assert_eq!(*n as usize, i);
        assert_eq!(ticked(&cells[0]), code.as_str(), "row {i}");
        let added = if i < 12 { "v1" } else { "v2" };
        assert_eq!(cells[1], added, "{code} was added in {added}");
        let fatal = if code.is_fatal() { "fatal" } else { "retry" };
        assert_eq!(cells[2], fatal, "{code}");
    }
    // No code beyond the table: an Error with code 18 is malformed.
    let last = ErrorCode::ALL.len() as u8;
    let mut buf = BytesMut::from(&[0, 0, 0, 3, ERROR_TAG, last, 0][..]);
    assert!(matches!(
        FrameCodec::default().decode(&mut buf),
        Err(WireError::Malformed(_))
    ));
    let mut buf = BytesMut::from(&[0, 0, 0, 3, ERROR_TAG, last - 1, 0][..]);
    assert_eq!(
        FrameCodec::default().decode(&mut buf).expect("decode"),
        Some(Frame::error(ErrorCode::Busy, ""))
    );
    assert_eq!(ErrorCode::ALL.len(), 18);
    assert!(!ErrorCode::Busy.is_fatal(), "Busy is retried");
    // BadToken keeps its name and number, and is the proof's refusal.
    assert_eq!(ErrorCode::ALL[2], ErrorCode::BadToken);
    assert!(ErrorCode::BadToken.is_fatal());
}

/// A proof as PROTOCOL.md spells it out for other implementations:
/// HMAC-SHA256 keyed with the secret, of the label, the connector's nonce,
/// the acceptor's and the transcript.
fn documented_proof(
    secret: &[u8],
    label: &[u8],
    connector: &[u8; 16],
    acceptor: &[u8; 16],
    transcript: &[u8],
) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key");
    for part in [label, connector, acceptor, transcript] {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

#[test]
fn the_proof_labels_are_32_bytes_each() {
    assert_eq!(CONNECTOR_LABEL.len(), 32);
    assert_eq!(ACCEPTOR_LABEL.len(), 32);
    assert!(CONNECTOR_LABEL.is_ascii() && ACCEPTOR_LABEL.is_ascii());
    assert_ne!(CONNECTOR_LABEL, ACCEPTOR_LABEL);
    assert_eq!(ACCEPTOR_LABEL.last(), Some(&b' '), "padded with a space");
    for label in [CONNECTOR_LABEL, ACCEPTOR_LABEL] {
        let quoted = format!("`{}`", std::str::from_utf8(label).expect("ASCII"));
        assert!(PROTOCOL_MD.contains(&quoted), "PROTOCOL.md spells {quoted}");
    }
    // They are the code's labels: its proofs are the documented ones.
    let secret = Secret::new(SECRET).expect("long enough");
    for (side, label) in [
        (Side::Connector, CONNECTOR_LABEL),
        (Side::Acceptor, ACCEPTOR_LABEL),
    ] {
        assert_eq!(
            auth::proof(&secret, side, &[1; 16], &[2; 16], b"H"),
            documented_proof(SECRET.as_bytes(), label, &[1; 16], &[2; 16], b"H"),
            "{side:?}"
        );
    }
}

/// The proofs of the worker's handshake in the examples, computed from the
/// document's own bytes, are the ones it shows: other implementations can
/// check their HMAC against them.
#[test]
fn the_documented_proofs_are_pinned() {
    assert!(PROTOCOL_MD.contains(&format!("`{SECRET}`")));
    assert_eq!(SECRET.len(), 28, "as the document says");
    let secret = Secret::new(SECRET).expect("long enough");
    let hello = doc_bytes("worker-hello");
    let connector: [u8; 16] = hello[14..30].try_into().expect("16 bytes");
    let transcript = &hello[5..];
    assert_eq!(transcript.len(), 44, "as the document says");
    let acceptor: [u8; 16] = doc_bytes("challenge")[5..].try_into().expect("16 bytes");
    let proof_c: [u8; 32] = doc_bytes("connector-proof")[5..]
        .try_into()
        .expect("32 bytes");
    let proof_a: [u8; 32] = doc_bytes("acceptor-proof")[5..]
        .try_into()
        .expect("32 bytes");
    // The document's construction gives the document's bytes…
    assert_eq!(
        hex(&documented_proof(
            SECRET.as_bytes(),
            CONNECTOR_LABEL,
            &connector,
            &acceptor,
            transcript
        )),
        hex(&proof_c),
        "the connector's proof"
    );
    assert_eq!(
        hex(&documented_proof(
            SECRET.as_bytes(),
            ACCEPTOR_LABEL,
            &connector,
            &acceptor,
            transcript
        )),
        hex(&proof_a),
        "the acceptor's proof"
    );
    assert_eq!((proof_c, proof_a), (PROOF_WORKER, PROOF_SERVER));
    // …and so does the code, from the Hello it would send.
    let h = worker_hello();
    assert_eq!(h.transcript(), transcript);
    let code = |side| auth::proof(&secret, side, &h.nonce, &acceptor, &h.transcript());
    assert_eq!(
        (code(Side::Connector), code(Side::Acceptor)),
        (proof_c, proof_a)
    );
    let verify = |secret: &Secret, side, na: &[u8; 16], t: &[u8], mac: &[u8; 32]| {
        auth::verify(secret, side, &connector, na, t, mac)
    };
    assert!(verify(
        &secret,
        Side::Connector,
        &acceptor,
        transcript,
        &proof_c
    ));
    assert!(verify(
        &secret,
        Side::Acceptor,
        &acceptor,
        transcript,
        &proof_a
    ));
    // One side's proof is not the other's, nor good for another challenge
    // (a replay), another Hello, or another secret.
    assert!(!verify(
        &secret,
        Side::Acceptor,
        &acceptor,
        transcript,
        &proof_c
    ));
    let mut other = acceptor;
    other[15] ^= 1;
    assert!(!verify(
        &secret,
        Side::Connector,
        &other,
        transcript,
        &proof_c
    ));
    let mut altered = transcript.to_vec();
    altered[7] = b'x';
    assert!(!verify(
        &secret,
        Side::Connector,
        &acceptor,
        &altered,
        &proof_c
    ));
    let wrong = Secret::new("correct horse battery stapler").expect("long enough");
    assert!(!verify(
        &wrong,
        Side::Connector,
        &acceptor,
        transcript,
        &proof_c
    ));
}

/// A connection written from the document alone: framed, nothing else.
async fn dial(addr: std::net::SocketAddr) -> Framed<TcpStream, FrameCodec> {
    Framed::new(
        TcpStream::connect(addr).await.expect("connect"),
        FrameCodec::default(),
    )
}

async fn next(conn: &mut Framed<TcpStream, FrameCodec>) -> Option<Frame> {
    tokio::time::timeout(Duration::from_secs(5), conn.next())
        .await
        .expect("an answer in time")
        .map(|f| f.expect("a frame"))
}

/// The acceptor's side as the crate runs it (`read_hello`, then
/// `authenticate`), answering `PeerWelcome` or its refusal, for `n`
/// connections.
fn acceptor(listener: TcpListener, secret: Secret, deadline: Duration, n: usize) {
    tokio::spawn(async move {
        for _ in 0..n {
            let (stream, _) = listener.accept().await.expect("accept");
            let mut conn = link::framed(stream, PRE_AUTH_MAX_FRAME);
            let outcome = match link::read_hello(&mut conn, deadline).await {
                Ok(hello) => link::authenticate(&mut conn, &hello, Some(&secret), deadline).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => {
                    let welcome = Frame::PeerWelcome(PeerWelcome {
                        credit: 4,
                        heartbeat_ms: 1000,
                    });
                    conn.send(welcome).await.expect("send");
                }
                Err(NoHello::Refuse(code, message)) => link::refuse(&mut conn, code, message).await,
                Err(NoHello::Closed) => {}
            }
        }
    });
}

#[tokio::test]
async fn an_acceptor_runs_the_documented_handshake() {
    let secret = Secret::new(SECRET).expect("long enough");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    acceptor(listener, secret, Duration::from_secs(1), 5);
    let h = worker_hello();
    let transcript = postcard::to_stdvec(&h).expect("postcard");

    // Hello, Challenge, the connector's Proof, the acceptor's, the welcome.
    let mut conn = dial(addr).await;
    conn.send(Frame::Hello(h.clone())).await.expect("send");
    let Some(Frame::Challenge { nonce: na }) = next(&mut conn).await else {
        panic!("a Challenge right after the Hello")
    };
    let mine = documented_proof(
        SECRET.as_bytes(),
        CONNECTOR_LABEL,
        &h.nonce,
        &na,
        &transcript,
    );
    conn.send(Frame::Proof { mac: mine }).await.expect("send");
    let theirs = documented_proof(
        SECRET.as_bytes(),
        ACCEPTOR_LABEL,
        &h.nonce,
        &na,
        &transcript,
    );
    assert_eq!(next(&mut conn).await, Some(Frame::Proof { mac: theirs }));
    assert!(matches!(next(&mut conn).await, Some(Frame::PeerWelcome(_))));

    // The same Hello and proof, recorded and replayed: another challenge,
    // so the proof is wrong.
    let mut replay = dial(addr).await;
    replay.send(Frame::Hello(h.clone())).await.expect("send");
    let Some(Frame::Challenge { nonce: other }) = next(&mut replay).await else {
        panic!("a Challenge")
    };
    assert_ne!(other, na, "a fresh nonce per connection");
    replay.send(Frame::Proof { mac: mine }).await.expect("send");
    assert!(matches!(
        next(&mut replay).await,
        Some(Frame::Error {
            code: ErrorCode::BadToken,
            ..
        })
    ));

    // Another secret: BadToken.
    let mut wrong = dial(addr).await;
    wrong.send(Frame::Hello(h.clone())).await.expect("send");
    let Some(Frame::Challenge { nonce }) = next(&mut wrong).await else {
        panic!("a Challenge")
    };
    let mac = documented_proof(
        b"not the secret at all",
        CONNECTOR_LABEL,
        &h.nonce,
        &nonce,
        &transcript,
    );
    wrong.send(Frame::Proof { mac }).await.expect("send");
    assert!(matches!(
        next(&mut wrong).await,
        Some(Frame::Error {
            code: ErrorCode::BadToken,
            ..
        })
    ));

    // Another frame in place of the Proof: BadToken too.
    let mut other_frame = dial(addr).await;
    other_frame
        .send(Frame::Hello(h.clone()))
        .await
        .expect("send");
    assert!(matches!(
        next(&mut other_frame).await,
        Some(Frame::Challenge { .. })
    ));
    other_frame
        .send(Frame::Heartbeat { seq: 1 })
        .await
        .expect("send");
    assert!(matches!(
        next(&mut other_frame).await,
        Some(Frame::Error {
            code: ErrorCode::BadToken,
            ..
        })
    ));

    // No Proof in time: HandshakeTimeout.
    let mut silent = dial(addr).await;
    silent.send(Frame::Hello(h)).await.expect("send");
    assert!(matches!(
        next(&mut silent).await,
        Some(Frame::Challenge { .. })
    ));
    assert!(matches!(
        next(&mut silent).await,
        Some(Frame::Error {
            code: ErrorCode::HandshakeTimeout,
            ..
        })
    ));
}

/// An acceptor written from the document: it challenges with
/// [`NONCE_SERVER`] (or not, with `challenge` false) and proves `secret`.
async fn documented_acceptor(listener: &TcpListener, secret: &[u8], challenge: bool) {
    let (stream, _) = listener.accept().await.expect("accept");
    let mut conn = Framed::new(stream, FrameCodec::new(PRE_AUTH_MAX_FRAME));
    let Some(Frame::Hello(h)) = next(&mut conn).await else {
        panic!("a Hello first")
    };
    if challenge {
        let transcript = postcard::to_stdvec(&h).expect("postcard");
        let nonce = NONCE_SERVER;
        conn.send(Frame::Challenge { nonce }).await.expect("send");
        let want = documented_proof(secret, CONNECTOR_LABEL, &h.nonce, &nonce, &transcript);
        let Some(Frame::Proof { mac }) = next(&mut conn).await else {
            return;
        };
        if mac != want {
            return refuse_bad_token(&mut conn).await;
        }
        let mac = documented_proof(secret, ACCEPTOR_LABEL, &h.nonce, &nonce, &transcript);
        conn.send(Frame::Proof { mac }).await.expect("send");
    }
    let welcome = Frame::PeerWelcome(PeerWelcome {
        credit: 4,
        heartbeat_ms: 1000,
    });
    // The connector may have closed already.
    let _ = conn.send(welcome).await;
}

async fn refuse_bad_token(conn: &mut Framed<TcpStream, FrameCodec>) {
    let _ = conn
        .send(Frame::error(ErrorCode::BadToken, "wrong data-plane secret"))
        .await;
}

#[tokio::test]
async fn a_connector_runs_the_documented_handshake() {
    let secret = Secret::new(SECRET).expect("long enough");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let hello = || {
        Hello::new(
            "wc",
            Role::Peer(PeerHello {
                session: SESSION,
                from: None,
                to: slot(1, 1, 3),
            }),
        )
    };

    // The whole handshake, with an acceptor written from the document.
    let (connected, ()) = tokio::join!(
        link::connect(&addr, DEFAULT_MAX_FRAME, hello(), Some(&secret), None),
        documented_acceptor(&listener, SECRET.as_bytes(), true),
    );
    let (_, answer) = connected.expect("connected");
    assert!(matches!(answer, Frame::PeerWelcome(_)), "{answer:?}");

    // An acceptor that does not challenge is not one of ours.
    let (connected, ()) = tokio::join!(
        link::connect(&addr, DEFAULT_MAX_FRAME, hello(), Some(&secret), None),
        documented_acceptor(&listener, SECRET.as_bytes(), false),
    );
    let e = connected.expect_err("refused");
    assert!(e.contains("did not ask for the data-plane secret"), "{e}");

    // Nor is one whose own proof is wrong (it has another secret).
    let (connected, ()) = tokio::join!(
        link::connect(&addr, DEFAULT_MAX_FRAME, hello(), Some(&secret), None),
        async {
            let (stream, _) = listener.accept().await.expect("accept");
            let mut conn = Framed::new(stream, FrameCodec::new(PRE_AUTH_MAX_FRAME));
            let Some(Frame::Hello(h)) = next(&mut conn).await else {
                panic!("a Hello first")
            };
            let transcript = postcard::to_stdvec(&h).expect("postcard");
            let nonce = NONCE_SERVER;
            conn.send(Frame::Challenge { nonce }).await.expect("send");
            assert!(matches!(next(&mut conn).await, Some(Frame::Proof { .. })));
            let mac = documented_proof(
                b"not the secret at all",
                ACCEPTOR_LABEL,
                &h.nonce,
                &nonce,
                &transcript,
            );
            conn.send(Frame::Proof { mac }).await.expect("send");
            let _ = conn
                .send(Frame::PeerWelcome(PeerWelcome {
                    credit: 4,
                    heartbeat_ms: 1000,
                }))
                .await;
        },
    );
    let e = connected.expect_err("refused");
    assert!(e.contains("could not prove the data-plane secret"), "{e}");

    // A connector with the wrong secret gets the acceptor's refusal.
    let wrong = Secret::new("correct horse battery stapler").expect("long enough");
    let (connected, ()) = tokio::join!(
        link::connect(&addr, DEFAULT_MAX_FRAME, hello(), Some(&wrong), None),
        documented_acceptor(&listener, SECRET.as_bytes(), true),
    );
    let (_, answer) = connected.expect("an answer");
    assert!(
        matches!(
            answer,
            Frame::Error {
                code: ErrorCode::BadToken,
                ..
            }
        ),
        "{answer:?}"
    );

    // A connector without a secret cannot answer a challenge.
    let (connected, ()) = tokio::join!(
        link::connect(&addr, DEFAULT_MAX_FRAME, hello(), None, None),
        documented_acceptor(&listener, SECRET.as_bytes(), true),
    );
    let e = connected.expect_err("refused");
    assert!(e.contains(SECRET_ENV), "{e}");

    // Without a secret on either side, the Hello is answered directly.
    let (connected, ()) = tokio::join!(
        link::connect(&addr, DEFAULT_MAX_FRAME, hello(), None, None),
        documented_acceptor(&listener, b"", false),
    );
    assert!(matches!(
        connected.expect("connected").1,
        Frame::PeerWelcome(_)
    ));
}

#[test]
fn the_documented_secret_and_gate_are_the_codes() {
    assert_eq!(SECRET_ENV, "TEMPEST_DATA_SECRET");
    assert_eq!(MIN_SECRET, 16);
    assert!(Secret::new("0123456789abcde").is_err(), "15 bytes");
    assert!(Secret::new(" 0123456789abcdef\n").is_ok(), "16, trimmed");
    assert!(Secret::new(" 0123456789abcde\n").is_err(), "15, trimmed");
    let gate = GateConfig::default();
    assert_eq!(
        (gate.max_failures, gate.max_handshakes, gate.max_connections),
        (16, 64, 4096)
    );
    for text in [
        "`TEMPEST_DATA_SECRET`".to_string(),
        format!("at least **{MIN_SECRET} bytes** (`MIN_SECRET`)"),
        format!("failed **{}**\n  proofs (`max_failures`", gate.max_failures),
        format!(
            "At most **{}** connections (`max_handshakes`)",
            gate.max_handshakes
        ),
        format!(
            "At most **{}** connections (`max_connections`)",
            gate.max_connections
        ),
    ] {
        assert!(PROTOCOL_MD.contains(&text), "PROTOCOL.md says {text:?}");
    }
}

#[test]
fn groupings_and_roles_are_encoded_as_documented() {
    for (g, i) in [
        (Grouping::Shuffle, 0u8),
        (Grouping::Key, 1),
        (Grouping::All, 2),
    ] {
        assert_eq!(postcard::to_stdvec(&g).expect("postcard"), [i], "{g}");
    }
    // The magic is "TEMP" in ASCII, and a version 2 Hello says 2.
    assert_eq!(&MAGIC.to_be_bytes(), b"TEMP");
    assert_eq!(PROTOCOL_VERSION, 2);
    assert!(check_magic_version(MAGIC, 2).is_ok());
    assert!(matches!(
        check_magic_version(MAGIC, 1),
        Err(WireError::Version { theirs: 1, ours: 2 })
    ));
    assert!(matches!(
        check_magic_version(0x4854_5450, 2),
        Err(WireError::BadMagic(0x4854_5450))
    ));
}

/// `key_instance` as PROTOCOL.md spells it out for other implementations.
fn documented_key_instance(key: &[u8], instances: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    ((u128::from(h) * u128::from(instances)) >> 64) as u32
}

#[test]
fn key_grouping_and_slot_bits_are_as_documented() {
    assert_eq!(documented_key_instance(b"cow", 2), key_instance(b"cow", 2));
    assert_eq!(slot_bit(0, 0), 1);
    assert_eq!(slot_bit(3, 13), 1 << 0, "3 x 17 + 13 = 64 folds to bit 0");
}

fn delivery() -> impl Strategy<Value = Delivery> {
    let bytes = |max: usize| proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from);
    let msg = prop_oneof![
        bytes(300).prop_map(Msg::new),
        bytes(300).prop_map(Msg::keyed_by_payload),
        (bytes(40), bytes(300)).prop_map(|(k, p)| Msg::new(p).with_key(k)),
        // A key equal to the payload, in a buffer of its own.
        bytes(40).prop_map(|p| Msg::new(p.clone()).with_key(Bytes::from(p.to_vec()))),
    ];
    (any::<u64>(), any::<u64>(), msg).prop_map(|(root, edge, msg)| Delivery {
        root: RootId(root),
        edge,
        msg,
    })
}

fn report() -> impl Strategy<Value = Report> {
    let dest = prop_oneof![any::<(u32, u32, u32)>(), (0u32..4, 0u32..4, 0u32..200)]
        .prop_map(|(t, i, n)| slot(t, i, n));
    let ack = any::<(u64, u64, u64)>().prop_map(|(r, x, slots)| Ack {
        root: Fixed(r),
        xor: Fixed(x),
        slots,
    });
    let fail = (any::<u64>(), ".{0,30}", any::<bool>()).prop_map(|(r, message, retryable)| Fail {
        root: Fixed(r),
        message,
        retryable,
    });
    (
        proptest::collection::vec(dest, 0..6),
        proptest::collection::vec(ack, 0..20),
        proptest::collection::vec(fail, 0..4),
    )
        .prop_map(|(dests, acks, fails)| Report { dests, acks, fails })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// The batch fast path writes exactly postcard's bytes for the same
    /// frame, and both readers (the fast path and postcard through the
    /// serde impl) give back an equal frame.
    #[test]
    fn the_batch_fast_path_is_postcard(ds in proptest::collection::vec(delivery(), 0..12)) {
        let frame = Frame::Batch(Deliveries(ds));
        let fast = encode(&frame);
        let slow = postcard::to_stdvec(&frame).expect("postcard");
        prop_assert_eq!(&fast[4..], &slow[..]);
        prop_assert_eq!(frame_size(&frame), slow.len());
        prop_assert_eq!(decode_all(&fast).expect("decode"), vec![frame.clone()]);
        prop_assert_eq!(postcard::from_bytes::<Frame>(&slow).expect("postcard"), frame);
    }

    /// The same for reports; `report_size` is their body's size.
    #[test]
    fn the_report_fast_path_is_postcard(r in report()) {
        let size = report_size(&r);
        let frame = Frame::Report(r);
        let fast = encode(&frame);
        let slow = postcard::to_stdvec(&frame).expect("postcard");
        prop_assert_eq!(&fast[4..], &slow[..]);
        prop_assert_eq!(size, slow.len());
        prop_assert_eq!(decode_all(&fast).expect("decode"), vec![frame.clone()]);
        prop_assert_eq!(postcard::from_bytes::<Frame>(&slow).expect("postcard"), frame);
    }

    /// Damaged reports and batches: the fast path reads exactly what
    /// postcard reads (the same frame, or both refuse it), but for a batch's
    /// key tag, which is one byte. Damage is a
    /// byte replaced, a byte inserted, or a one-byte varint written in a
    /// longer form (`05` as `85 80 00`: the same value; past 5 bytes for a
    /// `u32`, or 10 for a `u64`, malformed).
    #[test]
    fn the_fast_paths_read_what_postcard_reads(
        frame in prop_oneof![
            report().prop_map(Frame::Report),
            proptest::collection::vec(delivery(), 0..4)
                .prop_map(|ds| Frame::Batch(Deliveries(ds))),
        ],
        damage in proptest::collection::vec(
            (
                any::<proptest::sample::Index>(),
                0u8..3,
                prop_oneof![Just(0x80u8), Just(0xff), Just(0), any::<u8>()],
                1usize..8,
            ),
            1..4,
        ),
    ) {
        let mut body = postcard::to_stdvec(&frame).expect("postcard");
        for (at, how, b, n) in damage {
            // Keep the variant: the fast path is what is under test.
            let i = 1 + at.index(body.len() - 1);
            match how {
                0 => body[i] = b,
                1 => body.insert(i, b),
                _ => {
                    // `b` as `b|80 80 … 00`: the same value, n bytes longer.
                    body[i] |= 0x80;
                    let longer = std::iter::repeat_n(0x80, n - 1).chain([0]);
                    body.splice(i + 1..i + 1, longer);
                }
            }
        }
        let fast = decode_all(&[&(body.len() as u32).to_be_bytes()[..], &body].concat());
        // Postcard, as strict as the codec: nothing left over.
        let slow = postcard::take_from_bytes::<Frame>(&body)
            .map_err(|e| e.to_string())
            .and_then(|(f, rest)| {
                if rest.is_empty() { Ok(f) } else { Err("bytes left over".to_string()) }
            });
        match (fast, slow) {
            (Ok(f), Ok(s)) => prop_assert_eq!(f, vec![s]),
            (Err(WireError::Malformed(_)), Err(_)) => {}
            // A batch's key tag is one byte: written as a longer varint,
            // which postcard reads, the codec refuses it (senders write the
            // shortest form).
            (Err(WireError::Malformed(m)), Ok(s)) if body[0] == 4 => {
                prop_assert!(m.contains("key tag"), "{}", m);
                prop_assert_ne!(postcard::to_stdvec(&s).expect("postcard"), body);
            }
            (f, s) => prop_assert!(false, "{:02x?}: fast {:?}, postcard {:?}", body, f, s),
        }
    }

    /// The key tag is 2 exactly when the key's bytes are the payload's.
    #[test]
    fn the_key_tag_follows_the_key(d in delivery()) {
        let tag_at = 4 + 1 + 1 + 16;
        let expect = match d.msg.key() {
            None => 0,
            Some(k) if k == d.msg.payload() => 2,
            Some(_) => 1,
        };
        let bytes = encode(&Frame::Batch(Deliveries(vec![d])));
        prop_assert_eq!(bytes[tag_at], expect);
    }

    #[test]
    fn key_instance_is_the_documented_algorithm(
        key in proptest::collection::vec(any::<u8>(), 0..40),
        instances in 1u32..=1024,
    ) {
        prop_assert_eq!(key_instance(&key, instances), documented_key_instance(&key, instances));
    }

    #[test]
    fn proofs_are_the_documented_hmac(
        secret in proptest::collection::vec(any::<u8>(), 16..80),
        connector in any::<[u8; 16]>(),
        acceptor in any::<[u8; 16]>(),
        transcript in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        // Secret::new trims whitespace; keep the bytes as they are.
        let secret = [&b"k"[..], &secret, b"k"].concat();
        let s = Secret::new(&secret).expect("long enough");
        prop_assert_eq!(
            auth::proof(&s, Side::Connector, &connector, &acceptor, &transcript),
            documented_proof(&secret, CONNECTOR_LABEL, &connector, &acceptor, &transcript)
        );
        prop_assert_eq!(
            auth::proof(&s, Side::Acceptor, &connector, &acceptor, &transcript),
            documented_proof(&secret, ACCEPTOR_LABEL, &connector, &acceptor, &transcript)
        );
    }

    #[test]
    fn slot_bits_are_the_documented_fold(task in 0usize..1000, instance in 0u32..1024) {
        let n = (task as u64 * 17 + u64::from(instance)) % 64;
        prop_assert_eq!(slot_bit(task, instance), 1u64 << n);
    }
}
