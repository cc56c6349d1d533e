//! The codec's properties and edge cases (ported from version 1's wire
//! tests to the frames of version 2): random frames of every variant round
//! trip, whatever chunks the stream arrives in; garbage never panics and
//! never leaves the decoder waiting on a complete frame; oversized frames are
//! refused both ways before anything is buffered or allocated for them;
//! truncated frames, trailing bytes, impossible counts, other versions and
//! other protocols are refused with the right error; a connection reads
//! under the pre-handshake limit until its `Hello` is accepted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use proptest::prelude::*;
use serde::Serialize;
use tempest_core::{Delivery, Grouping, Msg, RootId};
use tempest_transport::codec::{
    check_magic_version, delivery_size, frame_size, peek_hello_version, FrameCodec, WireError,
    PRE_AUTH_MAX_FRAME,
};
use tempest_transport::wire::{
    Ack, Deliveries, ErrorCode, Fail, Fixed, Frame, Hello, Members, PeerHello, PeerWelcome, Report,
    Role, SlotInfo, SlotRef, TaskMembers, Welcome, WireDag, WireEdge, WireTask, WorkerHello,
    DEFAULT_MAX_FRAME, ERROR_TAG, MAGIC, PROTOCOL_VERSION,
};
use tokio_util::codec::{Decoder, Encoder, Framed};

// ---------------------------------------------------------------------------
// Measuring allocations: the largest single allocation this thread makes
// while a closure runs (other test threads are not counted).
// ---------------------------------------------------------------------------

struct Measuring;

thread_local! {
    static MEASURING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = MEASURING.try_with(|m| {
        if m.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

// SAFETY: every call is passed on to the system allocator unchanged; the
// bookkeeping only touches const-initialised thread locals, which neither
// allocate nor have destructors.
unsafe impl GlobalAlloc for Measuring {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Measuring = Measuring;

/// Runs `f`, returning its result and the largest allocation it made.
fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|l| l.set(0));
    MEASURING.with(|m| m.set(true));
    let r = f();
    MEASURING.with(|m| m.set(false));
    (r, LARGEST.with(Cell::get))
}

#[test]
fn the_allocation_meter_sees_allocations() {
    let (v, largest) = largest_allocation(|| Vec::<u8>::with_capacity(1 << 20));
    assert!(largest >= 1 << 20, "{largest}");
    drop(v);
    let (_, largest) = largest_allocation(|| 1 + 1);
    assert_eq!(largest, 0);
}

// ---------------------------------------------------------------------------
// Helpers and strategies
// ---------------------------------------------------------------------------

fn encode(frame: &Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    FrameCodec::default()
        .encode_ref(frame, &mut buf)
        .unwrap_or_else(|e| panic!("{}: {e}", frame.name()));
    buf
}

/// A length prefix and `body`.
fn framed_body(body: &[u8]) -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_u32(body.len() as u32);
    buf.extend_from_slice(body);
    buf
}

/// Decodes one complete frame from a length prefix and `body`.
fn decode_body(body: &[u8]) -> Result<Option<Frame>, WireError> {
    FrameCodec::default().decode(&mut framed_body(body))
}

fn slot(task: u32, instance: u32, incarnation: u32) -> SlotRef {
    SlotRef {
        task,
        instance,
        incarnation,
    }
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![".{0,24}", Just(String::new()), "[a-z]{1,8}"]
}

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    prop_oneof![
        3 => proptest::collection::vec(any::<u8>(), 0..max),
        1 => Just(Vec::new()),
        1 => (any::<u8>(), 1usize..100_000).prop_map(|(b, n)| vec![b; n]),
    ]
    .prop_map(Bytes::from)
}

fn msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        bytes(256).prop_map(Msg::new),
        bytes(256).prop_map(Msg::keyed_by_payload),
        (bytes(32), bytes(256)).prop_map(|(k, p)| Msg::new(p).with_key(k)),
        // A key equal to the payload, in a buffer of its own.
        bytes(32).prop_map(|p| Msg::new(p.clone()).with_key(Bytes::from(p.to_vec()))),
    ]
}

fn delivery() -> impl Strategy<Value = Delivery> {
    (any::<u64>(), any::<u64>(), msg()).prop_map(|(root, edge, msg)| Delivery {
        root: RootId(root),
        edge,
        msg,
    })
}

fn slot_ref() -> impl Strategy<Value = SlotRef> {
    any::<(u32, u32, u32)>().prop_map(|(t, i, n)| slot(t, i, n))
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![
        (
            text(),
            proptest::option::of(any::<u32>()),
            any::<u32>(),
            any::<u64>(),
            text()
        )
            .prop_map(|(task, instance, instances, layout, peer)| {
                Role::Worker(WorkerHello {
                    task,
                    instance,
                    instances,
                    layout,
                    peer,
                })
            }),
        (any::<u64>(), proptest::option::of(slot_ref()), slot_ref())
            .prop_map(|(session, from, to)| Role::Peer(PeerHello { session, from, to })),
    ]
}

fn members() -> impl Strategy<Value = Members> {
    let slot_info = (any::<u32>(), proptest::option::of(text()))
        .prop_map(|(incarnation, peer)| SlotInfo { incarnation, peer });
    let task = (
        any::<u32>(),
        any::<u64>(),
        proptest::collection::vec(slot_info, 0..4),
    )
        .prop_map(|(instances, layout, slots)| TaskMembers {
            instances,
            layout,
            slots,
        });
    (any::<u64>(), proptest::collection::vec(task, 0..4))
        .prop_map(|(epoch, tasks)| Members { epoch, tasks })
}

fn dag() -> impl Strategy<Value = WireDag> {
    let grouping = proptest::sample::select(vec![Grouping::Shuffle, Grouping::Key, Grouping::All]);
    let edge = (any::<u32>(), grouping).prop_map(|(to, grouping)| WireEdge { to, grouping });
    let task = (text(), proptest::collection::vec(edge, 0..3))
        .prop_map(|(name, edges)| WireTask { name, edges });
    (proptest::collection::vec(task, 0..4), any::<u32>())
        .prop_map(|(tasks, root)| WireDag { tasks, root })
}

fn report() -> impl Strategy<Value = Report> {
    let ack = any::<(u64, u64, u64)>().prop_map(|(r, x, slots)| Ack {
        root: Fixed(r),
        xor: Fixed(x),
        slots,
    });
    let fail = (any::<u64>(), text(), any::<bool>()).prop_map(|(r, message, retryable)| Fail {
        root: Fixed(r),
        message,
        retryable,
    });
    (
        proptest::collection::vec(slot_ref(), 0..5),
        proptest::collection::vec(ack, 0..12),
        proptest::collection::vec(fail, 0..4),
    )
        .prop_map(|(dests, acks, fails)| Report { dests, acks, fails })
}

/// A random frame of any variant.
fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (text(), any::<[u8; 16]>(), role()).prop_map(|(topology, nonce, role)| {
            Frame::Hello(Hello {
                nonce,
                ..Hello::new(topology, role)
            })
        }),
        (any::<(u32, u32, u64, u32, u32)>(), dag(), members()).prop_map(
            |((instance, incarnation, session, heartbeat_ms, batch_size), dag, members)| {
                Frame::Welcome(Welcome {
                    instance,
                    incarnation,
                    session,
                    heartbeat_ms,
                    batch_size,
                    dag,
                    members,
                })
            }
        ),
        members().prop_map(Frame::Members),
        any::<(u32, u32)>().prop_map(|(credit, heartbeat_ms)| Frame::PeerWelcome(PeerWelcome {
            credit,
            heartbeat_ms
        })),
        proptest::collection::vec(delivery(), 0..6).prop_map(|ds| Frame::Batch(Deliveries(ds))),
        any::<u32>().prop_map(|batches| Frame::Credit { batches }),
        report().prop_map(Frame::Report),
        slot_ref().prop_map(Frame::LinkLost),
        (proptest::sample::select(ErrorCode::ALL.to_vec()), text())
            .prop_map(|(code, message)| Frame::Error { code, message }),
        any::<u64>().prop_map(|seq| Frame::Heartbeat { seq }),
        any::<u64>().prop_map(|seq| Frame::HeartbeatAck { seq }),
        Just(Frame::Goodbye),
        text().prop_map(|reason| Frame::Shutdown { reason }),
        any::<[u8; 16]>().prop_map(|nonce| Frame::Challenge { nonce }),
        any::<[u8; 32]>().prop_map(|mac| Frame::Proof { mac }),
    ]
}

/// A small frame of every variant, in variant order.
fn one_of_each() -> Vec<Frame> {
    vec![
        Frame::Hello(Hello {
            nonce: [7; 16],
            ..Hello::new(
                "wc",
                Role::Worker(WorkerHello {
                    task: "count".into(),
                    instance: Some(1),
                    instances: 2,
                    layout: 3,
                    peer: "h:1".into(),
                }),
            )
        }),
        Frame::Welcome(Welcome {
            instance: 0,
            incarnation: 1,
            session: 2,
            heartbeat_ms: 3,
            batch_size: 4,
            dag: WireDag {
                tasks: vec![WireTask {
                    name: "a".into(),
                    edges: vec![WireEdge {
                        to: 0,
                        grouping: Grouping::All,
                    }],
                }],
                root: 0,
            },
            members: Members::default(),
        }),
        Frame::Members(Members {
            epoch: 9,
            tasks: vec![TaskMembers {
                instances: 1,
                layout: 0,
                slots: vec![SlotInfo {
                    incarnation: 0,
                    peer: None,
                }],
            }],
        }),
        Frame::PeerWelcome(PeerWelcome {
            credit: 4,
            heartbeat_ms: 1000,
        }),
        Frame::Batch(Deliveries(vec![Delivery {
            root: RootId(1),
            edge: 2,
            msg: Msg::new("x").with_key("k"),
        }])),
        Frame::Credit { batches: 3 },
        Frame::Report(Report {
            dests: vec![slot(1, 0, 0)],
            acks: vec![Ack {
                root: Fixed(1),
                xor: Fixed(2),
                slots: 3,
            }],
            fails: vec![Fail {
                root: Fixed(4),
                message: "no".into(),
                retryable: true,
            }],
        }),
        Frame::LinkLost(slot(1, 2, 3)),
        Frame::error(ErrorCode::WrongPeer, "not me"),
        Frame::Heartbeat { seq: 7 },
        Frame::HeartbeatAck { seq: 7 },
        Frame::Goodbye,
        Frame::Shutdown {
            reason: "bye".into(),
        },
        Frame::Challenge { nonce: [0xa5; 16] },
        Frame::Proof { mac: [0x5a; 32] },
    ]
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// Frames of every variant, several in one buffer, come back equal, each
    /// behind a length prefix that counts its body.
    #[test]
    fn frames_round_trip(frames in proptest::collection::vec(frame(), 1..5)) {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        for f in &frames {
            let before = buf.len();
            codec.encode(f.clone(), &mut buf).expect("encode");
            let len = u32::from_be_bytes(buf[before..before + 4].try_into().expect("4 bytes"));
            prop_assert_eq!(len as usize, buf.len() - before - 4);
            prop_assert_eq!(len as usize, frame_size(f));
        }
        for f in &frames {
            prop_assert_eq!(codec.decode(&mut buf).expect("decode"), Some(f.clone()));
        }
        prop_assert!(buf.is_empty());
        prop_assert!(codec.decode_eof(&mut buf).expect("eof").is_none());
    }

    /// However the stream is cut into chunks, the same frames come out.
    #[test]
    fn frames_survive_arbitrary_chunks(
        frames in proptest::collection::vec(frame(), 1..5),
        cuts in proptest::collection::vec(1usize..4096, 0..64),
    ) {
        let mut codec = FrameCodec::default();
        let mut wire = BytesMut::new();
        for f in &frames {
            codec.encode_ref(f, &mut wire).expect("encode");
        }
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut rest = &wire[..];
        let mut cuts = cuts.into_iter();
        while !rest.is_empty() {
            let n = cuts.next().unwrap_or(rest.len()).min(rest.len());
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            while let Some(f) = codec.decode(&mut buf).expect("decode") {
                got.push(f);
            }
        }
        prop_assert!(codec.decode_eof(&mut buf).expect("eof").is_none());
        prop_assert_eq!(got, frames);
    }

    /// Random bytes in random chunks, under any maximum: frames or errors,
    /// never a panic.
    #[test]
    fn the_decoder_survives_arbitrary_bytes_in_arbitrary_chunks(
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

    /// A complete frame of garbage is decoded or refused at once: never a
    /// panic, never a wait for more. The body starts with every variant
    /// index, so the batch and report fast paths get garbage too.
    #[test]
    fn garbage_bodies_never_panic_and_never_hang(
        tag in 0u8..16,
        rest in proptest::collection::vec(
            prop_oneof![Just(0u8), Just(1), Just(2), Just(0x80), Just(0xff), any::<u8>()],
            0..512,
        ),
    ) {
        let mut body = vec![tag];
        body.extend_from_slice(&rest);
        let mut buf = framed_body(&body);
        let decoded = FrameCodec::default().decode(&mut buf);
        prop_assert!(!matches!(decoded, Ok(None)), "a complete frame was not decoded");
        if let Ok(Some(f)) = decoded {
            prop_assert!(buf.is_empty());
            // Whatever garbage decodes to, it encodes back to a valid frame.
            let again = encode(&f);
            prop_assert_eq!(decode_body(&again[4..]).expect("decode"), Some(f));
        }
    }

    /// Valid frames with bytes changed: decoded or refused, never a panic,
    /// never a wait.
    #[test]
    fn damaged_frames_never_panic_and_never_hang(
        f in frame(),
        damage in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut body = encode(&f).split_off(4);
        for (at, b) in damage {
            let i = at.index(body.len());
            body[i] = b;
        }
        prop_assert!(!matches!(decode_body(&body), Ok(None)));
    }

    /// A frame cut anywhere inside is a truncated frame at the end of the
    /// stream, and a body cut short is malformed.
    #[test]
    fn cut_frames_are_truncated_or_malformed(f in frame(), cut in any::<proptest::sample::Index>()) {
        let full = encode(&f);
        let at = cut.index(full.len() - 1) + 1; // 1..len: a strict prefix
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&full[..full.len() - at]);
        if !buf.is_empty() {
            prop_assert!(codec.decode(&mut buf).expect("decode").is_none());
            let cut_len = buf.len();
            match codec.decode_eof(&mut buf) {
                Err(WireError::Truncated(n)) => prop_assert_eq!(n, cut_len),
                other => prop_assert!(false, "{:?}", other),
            }
        }
        // The body alone, shortened, with a length prefix that says so.
        let body = &full[4..];
        let short = &body[..body.len() - at.min(body.len())];
        prop_assert!(matches!(decode_body(short), Err(WireError::Malformed(_))));
    }

    /// One byte after any frame makes it malformed.
    #[test]
    fn trailing_bytes_are_malformed(f in frame(), extra in any::<u8>()) {
        let mut body = encode(&f).split_off(4).to_vec();
        body.push(extra);
        match decode_body(&body) {
            Err(e @ WireError::Malformed(_)) => {
                prop_assert_eq!(e.code(), ErrorCode::Malformed);
                prop_assert!(e.to_string().contains("unexpected bytes"), "{}", e);
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }

    /// `delivery_size` is what a delivery takes in a batch.
    #[test]
    fn delivery_size_is_exact(ds in proptest::collection::vec(delivery(), 1..6)) {
        let sizes: usize = ds.iter().map(delivery_size).sum();
        let n = ds.len();
        let body = encode(&Frame::Batch(Deliveries(ds))).len() - 4;
        prop_assert_eq!(body, 1 + 1 + sizes, "{} messages", n);
    }
}

// ---------------------------------------------------------------------------
// Edge cases
// ---------------------------------------------------------------------------

#[test]
fn every_variant_round_trips_through_both_encoders() {
    let frames = one_of_each();
    assert_eq!(frames.len(), 15);
    for (i, f) in frames.iter().enumerate() {
        let by_ref = encode(f);
        let mut by_value = BytesMut::new();
        FrameCodec::default()
            .encode(f.clone(), &mut by_value)
            .expect("encode");
        assert_eq!(by_ref, by_value, "{}", f.name());
        assert_eq!(usize::from(by_ref[4]), i, "{} is variant {i}", f.name());
        assert_eq!(decode_body(&by_ref[4..]).expect("decode"), Some(f.clone()));
    }
    // Error is variant 8, as in version 1.
    assert_eq!(frames[8].name(), "Error");
    assert_eq!(ERROR_TAG, 8);
    // The nonce and the MAC are their bytes as they are, no length.
    assert_eq!(encode(&frames[13]).len(), 4 + 1 + 16);
    assert_eq!(encode(&frames[14]).len(), 4 + 1 + 32);
    assert_eq!(&encode(&frames[0])[4 + 1 + 5 + 1 + 3..][..16], &[7; 16]);
    // A variant past the last is malformed.
    assert!(matches!(decode_body(&[15]), Err(WireError::Malformed(_))));
}

#[test]
fn an_oversized_length_is_refused_before_the_body_arrives() {
    let mut codec = FrameCodec::new(1024);
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&[0, 0]);
    assert!(codec.decode(&mut buf).expect("half a prefix").is_none());
    buf.extend_from_slice(&[4, 1]); // 1025
    match codec.decode(&mut buf) {
        Err(
            e @ WireError::FrameTooLarge {
                len: 1025,
                max: 1024,
            },
        ) => {
            assert_eq!(e.code(), ErrorCode::FrameTooLarge);
            assert_eq!(
                e.frame(),
                Frame::error(
                    ErrorCode::FrameTooLarge,
                    "frame of 1025 bytes exceeds the maximum of 1024 bytes"
                )
            );
        }
        other => panic!("{other:?}"),
    }
    // At the limit is fine: the decoder waits for the body.
    let mut buf = BytesMut::from(&[0, 0, 4, 0][..]);
    assert!(codec.decode(&mut buf).expect("at the limit").is_none());
}

#[test]
fn a_4_gib_length_allocates_nothing() {
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
    let (result, largest) = largest_allocation(|| codec.decode(&mut buf));
    assert!(
        matches!(
            result,
            Err(WireError::FrameTooLarge {
                len: 0xffff_ffff,
                max: DEFAULT_MAX_FRAME
            })
        ),
        "{result:?}"
    );
    assert!(buf.capacity() < 1024, "{} bytes buffered", buf.capacity());
    assert!(largest < 1024, "an allocation of {largest} bytes");
    // A maximum beyond what the prefix can say is clamped to it.
    assert_eq!(FrameCodec::new(usize::MAX).max_frame(), u32::MAX as usize);
}

#[test]
fn an_oversized_frame_is_not_encoded_and_leaves_the_buffer_alone() {
    let big = Bytes::from(vec![7u8; 5000]);
    let frames = [
        // The batch fast path.
        Frame::Batch(Deliveries(vec![Delivery {
            root: RootId(1),
            edge: 2,
            msg: Msg::new(big.clone()),
        }])),
        // The report fast path.
        Frame::Report(Report {
            fails: vec![Fail {
                root: Fixed(1),
                message: "x".repeat(5000),
                retryable: false,
            }],
            ..Report::default()
        }),
        // Postcard.
        Frame::Shutdown {
            reason: "y".repeat(5000),
        },
    ];
    for frame in frames {
        let name = frame.name();
        let codec = FrameCodec::new(1000);
        let mut buf = BytesMut::from(&b"keep"[..]);
        match codec.encode_ref(&frame, &mut buf) {
            Err(WireError::FrameTooLarge { len, max: 1000 }) => {
                assert_eq!(len, frame_size(&frame), "{name}: the size it would have")
            }
            other => panic!("{name}: {other:?}"),
        }
        assert_eq!(&buf[..], b"keep", "{name}: nothing of it is left behind");
        // Exactly at the limit encodes; one byte less does not.
        let size = frame_size(&frame);
        let mut codec = FrameCodec::new(size);
        let mut buf = BytesMut::new();
        codec.encode(frame.clone(), &mut buf).expect("at the limit");
        assert_eq!(buf.len(), size + 4, "{name}");
        assert_eq!(codec.decode(&mut buf).expect("decode"), Some(frame.clone()));
        let codec = FrameCodec::new(size - 1);
        let mut buf = BytesMut::from(&b"keep"[..]);
        assert!(
            matches!(
                codec.encode_ref(&frame, &mut buf),
                Err(WireError::FrameTooLarge { .. })
            ),
            "{name}"
        );
        assert_eq!(&buf[..], b"keep", "{name}");
    }
}

#[test]
fn a_truncated_frame_is_reported_at_the_end_of_the_stream() {
    let mut codec = FrameCodec::default();
    for frame in one_of_each() {
        let full = encode(&frame);
        for cut in 1..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert!(
                codec.decode(&mut buf).expect("partial").is_none(),
                "cut {cut}"
            );
            match codec.decode_eof(&mut buf) {
                Err(e @ WireError::Truncated(n)) => {
                    assert_eq!(n, cut);
                    assert_eq!(e.code(), ErrorCode::Malformed);
                }
                other => panic!("{} cut at {cut}: {other:?}", frame.name()),
            }
        }
        let mut buf = full.clone();
        assert_eq!(codec.decode_eof(&mut buf).expect("whole"), Some(frame));
        assert!(codec.decode_eof(&mut buf).expect("empty").is_none());
    }
}

#[test]
fn garbage_is_malformed() {
    let cat = |parts: &[&[u8]]| parts.concat();
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("empty body", vec![]),
        (
            "variant varint too long",
            vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ),
        ("unknown variant", vec![15]),
        ("unknown variant, far", vec![99]),
        ("Heartbeat without seq", vec![9]),
        (
            "Heartbeat seq varint overflows u64",
            cat(&[&[9], &[0xff; 9], &[0x02]]),
        ),
        ("Heartbeat and a trailing byte", vec![9, 7, 7]),
        ("Goodbye and a trailing byte", vec![11, 0]),
        ("Shutdown with invalid UTF-8", vec![12, 1, 0xff]),
        ("Shutdown longer than its body", vec![12, 5, b'a']),
        ("Error with an unknown code", vec![8, 18, 0]),
        ("Challenge without a nonce", vec![13]),
        ("Challenge with a short nonce", cat(&[&[13], &[0; 15]])),
        ("Challenge and a trailing byte", cat(&[&[13], &[0; 17]])),
        ("Proof with a short MAC", cat(&[&[14], &[0; 31]])),
        ("Proof and a trailing byte", cat(&[&[14], &[0; 33]])),
        ("Error without a message", vec![8, 1]),
        ("Error with invalid UTF-8", vec![8, 1, 1, 0xff]),
        (
            "Credit overflowing u32",
            vec![5, 0xff, 0xff, 0xff, 0xff, 0x10],
        ),
        ("LinkLost cut short", vec![7, 1, 2]),
        (
            "Members with a bad Option tag",
            vec![2, 0, 1, 1, 0, 1, 0, 2],
        ),
        ("Batch without a count", vec![4]),
        (
            "Batch with a bad key tag",
            cat(&[&[4, 1], &[0; 16], &[3, 0]]),
        ),
        (
            "Batch payload longer than the body",
            cat(&[&[4, 1], &[0; 16], &[0, 9, 1]]),
        ),
        (
            "Batch key longer than the body",
            cat(&[&[4, 1], &[0; 16], &[1, 9, 1, 0]]),
        ),
        ("Report without counts", vec![6]),
        (
            "Report with a bad bool",
            cat(&[&[6, 0, 0, 1], &[0; 8], &[0, 2]]),
        ),
        (
            "Report with invalid UTF-8",
            cat(&[&[6, 0, 0, 1], &[0; 8], &[1, 0xff, 0]]),
        ),
        (
            "Report dest overflowing u32",
            vec![6, 1, 0xff, 0xff, 0xff, 0xff, 0x10, 0, 0, 0, 0],
        ),
        (
            "Report dest u32 varint longer than 5 bytes",
            vec![6, 1, 0x80, 0x80, 0x80, 0x80, 0x80, 0, 0, 0, 0, 0],
        ),
        (
            "Report incarnation u32 varint longer than 5 bytes",
            vec![6, 1, 0, 0, 0x81, 0x80, 0x80, 0x80, 0x80, 0, 0, 0],
        ),
        (
            "Report slots varint overflowing u64",
            cat(&[&[6, 0, 1], &[0; 16], &[0xff; 9], &[0x02, 0]]),
        ),
        (
            "Hello cut after the version",
            vec![0, 0xd0, 0x9a, 0x95, 0xa2, 0x05, 0x02],
        ),
        (
            "Hello with a bad role",
            vec![0, 0xd0, 0x9a, 0x95, 0xa2, 0x05, 0x02, 0, 0, 2],
        ),
    ];
    for (what, body) in &bodies {
        match decode_body(body) {
            Err(e @ WireError::Malformed(_)) => {
                assert_eq!(e.code(), ErrorCode::Malformed, "{what}");
                assert!(
                    e.to_string().starts_with("malformed frame: "),
                    "{what}: {e}"
                );
            }
            other => panic!("{what}: {body:02x?}: {other:?}"),
        }
    }
}

#[test]
fn report_dests_read_u32_varints_as_postcard_does() {
    // Task 0 in 6 bytes: a value that fits, in a form longer than a u32's
    // 5 bytes. Postcard refuses it, and so does the fast path (it used to
    // read it as a u64 and take the 0).
    let long = [6, 1, 0x80, 0x80, 0x80, 0x80, 0x80, 0, 0, 0, 0, 0];
    assert!(postcard::from_bytes::<Frame>(&long).is_err());
    match decode_body(&long) {
        Err(WireError::Malformed(m)) => assert!(m.contains("varint"), "{m}"),
        other => panic!("{other:?}"),
    }
    // In 5 bytes, a longer form than needed but within a u32's: both read 0.
    let five = [6, 1, 0x80, 0x80, 0x80, 0x80, 0, 0, 0, 0, 0];
    let zero = Frame::Report(Report {
        dests: vec![slot(0, 0, 0)],
        ..Report::default()
    });
    assert_eq!(
        postcard::from_bytes::<Frame>(&five).ok(),
        Some(zero.clone())
    );
    assert_eq!(decode_body(&five).expect("decode"), Some(zero));
    // u32::MAX is the largest: its fifth byte is 0x0f, one more overflows.
    let max = [6, 1, 0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0, 0, 0];
    let expect = Frame::Report(Report {
        dests: vec![slot(u32::MAX, 0, 0)],
        ..Report::default()
    });
    assert_eq!(
        postcard::from_bytes::<Frame>(&max).ok(),
        Some(expect.clone())
    );
    assert_eq!(decode_body(&max).expect("decode"), Some(expect));
    let over = [6, 1, 0x80, 0x80, 0x80, 0x80, 0x10, 0, 0, 0, 0];
    assert!(postcard::from_bytes::<Frame>(&over).is_err());
    assert!(matches!(decode_body(&over), Err(WireError::Malformed(_))));
}

#[test]
fn a_connection_reads_under_the_pre_handshake_limit_until_accepted() {
    assert_eq!(PRE_AUTH_MAX_FRAME, 16 * 1024);
    // A Hello fits well within it.
    let hello = Frame::Hello(Hello::new(
        "wordcount",
        Role::Worker(WorkerHello {
            task: "count".into(),
            instance: Some(3),
            instances: 8,
            layout: 2,
            peer: format!("{}:7001", "h".repeat(250)),
        }),
    ));
    let mut codec = FrameCodec::new(PRE_AUTH_MAX_FRAME);
    let mut buf = encode(&hello);
    assert_eq!(codec.decode(&mut buf).expect("decode"), Some(hello));
    // A longer first frame is refused from its length alone, before its
    // body arrives, with nothing allocated for it.
    let mut buf = BytesMut::from(&(PRE_AUTH_MAX_FRAME as u32 + 1).to_be_bytes()[..]);
    let (result, largest) = largest_allocation(|| codec.decode(&mut buf));
    match result {
        Err(e @ WireError::FrameTooLarge { len, max }) => {
            assert_eq!((len, max), (PRE_AUTH_MAX_FRAME + 1, PRE_AUTH_MAX_FRAME));
            assert_eq!(e.code(), ErrorCode::FrameTooLarge);
        }
        other => panic!("{other:?}"),
    }
    assert!(largest < 1024, "an allocation of {largest} bytes");
    // At the limit, the decoder waits for the body.
    let mut buf = BytesMut::from(&(PRE_AUTH_MAX_FRAME as u32).to_be_bytes()[..]);
    assert!(codec.decode(&mut buf).expect("at the limit").is_none());
    // Once the Hello is accepted, the configured maximum applies, both ways.
    codec.set_max_frame(DEFAULT_MAX_FRAME);
    assert_eq!(codec.max_frame(), DEFAULT_MAX_FRAME);
    let big = Frame::Batch(Deliveries(vec![Delivery {
        root: RootId(1),
        edge: 2,
        msg: Msg::new(Bytes::from(vec![0u8; 4 * PRE_AUTH_MAX_FRAME])),
    }]));
    let mut buf = BytesMut::new();
    codec.encode_ref(&big, &mut buf).expect("encode");
    assert_eq!(codec.decode(&mut buf).expect("decode"), Some(big.clone()));
    // The limit held for writing too: the big frame was not encodable.
    let before = FrameCodec::new(PRE_AUTH_MAX_FRAME);
    assert!(matches!(
        before.encode_ref(&big, &mut BytesMut::new()),
        Err(WireError::FrameTooLarge { .. })
    ));
    // set_max_frame clamps like new.
    codec.set_max_frame(usize::MAX);
    assert_eq!(codec.max_frame(), u32::MAX as usize);
}

#[test]
fn a_batch_claiming_more_messages_than_its_body_holds_is_refused_without_allocating() {
    // Variant 4, then a claim of 2^40 messages in a few bytes.
    let body = [4, 0x80, 0x80, 0x80, 0x80, 0x80, 0x20];
    let mut buf = framed_body(&body);
    let (result, largest) = largest_allocation(|| FrameCodec::default().decode(&mut buf));
    match result {
        Err(WireError::Malformed(m)) => assert!(m.contains("claims"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(largest < 1024, "an allocation of {largest} bytes");
    // The largest count a body could hold at 18 bytes a message is not
    // refused for its count, only for what is missing.
    let one = [&[4u8, 2][..], &[0; 16], &[0, 0], &[0; 16]].concat();
    match decode_body(&one) {
        Err(WireError::Malformed(m)) => assert!(m.contains("ends early"), "{m}"),
        other => panic!("{other:?}"),
    }
    let two = [&[4u8, 2][..], &[0; 16], &[0, 0], &[0; 16], &[2, 0]].concat();
    assert!(matches!(decode_body(&two), Ok(Some(Frame::Batch(Deliveries(ds)))) if ds.len() == 2));
    // A count one over what the body can hold is refused for its count.
    let over = [&[4u8, 3][..], &[0; 16], &[0, 0], &[0; 16], &[2, 0]].concat();
    match decode_body(&over) {
        Err(WireError::Malformed(m)) => assert!(m.contains("claims"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_report_claiming_more_than_its_body_holds_is_refused_without_allocating() {
    let claims: [(&str, &[u8]); 3] = [
        ("destinations", &[6, 0x80, 0x80, 0x80, 0x80, 0x80, 0x20]),
        ("acks", &[6, 0, 0x80, 0x80, 0x80, 0x80, 0x80, 0x20]),
        ("failures", &[6, 0, 0, 0x80, 0x80, 0x80, 0x80, 0x80, 0x20]),
    ];
    for (what, body) in claims {
        let mut buf = framed_body(body);
        let (result, largest) = largest_allocation(|| FrameCodec::default().decode(&mut buf));
        match result {
            Err(WireError::Malformed(m)) => assert!(m.contains(what), "{what}: {m}"),
            other => panic!("{what}: {other:?}"),
        }
        assert!(largest < 1024, "{what}: an allocation of {largest} bytes");
    }
}

#[test]
fn a_batch_is_read_without_copying_its_messages() {
    let payload = Bytes::from(vec![b'p'; 4096]);
    let frame = Frame::Batch(Deliveries(vec![
        Delivery {
            root: RootId(1),
            edge: 2,
            msg: Msg::keyed_by_payload(payload.clone()),
        },
        Delivery {
            root: RootId(3),
            edge: 4,
            msg: Msg::new(payload.clone()).with_key("key"),
        },
    ]));
    let mut buf = encode(&frame);
    let range = buf.as_ptr_range();
    let within = |b: &Bytes| {
        let r = b.as_ptr_range();
        range.start <= r.start && r.end <= range.end
    };
    let (decoded, largest) = largest_allocation(|| FrameCodec::default().decode(&mut buf));
    let Ok(Some(Frame::Batch(Deliveries(ds)))) = decoded else {
        panic!("{decoded:?}")
    };
    assert_eq!(Frame::Batch(Deliveries(ds.clone())), frame);
    for d in &ds {
        assert!(
            within(d.msg.payload()),
            "the payload is a slice of the frame"
        );
        assert!(d.msg.key().is_some_and(within), "so is the key");
    }
    assert_eq!(
        ds[0].msg.key().map(|k| k.as_ptr()),
        Some(ds[0].msg.payload().as_ptr())
    );
    assert!(largest < 1024, "an allocation of {largest} bytes");
}

/// A version 1 worker's `Hello`: variant 0, magic, version 1, then
/// version 1's fields (topology, task, instance, token).
fn v1_hello(topology: &str, task: &str, instance: Option<u32>, token: Option<&str>) -> Vec<u8> {
    #[derive(Serialize)]
    enum V1Frame<'a> {
        Hello {
            magic: u32,
            version: u16,
            topology: &'a str,
            task: &'a str,
            instance: Option<u32>,
            token: Option<&'a str>,
        },
    }
    postcard::to_stdvec(&V1Frame::Hello {
        magic: MAGIC,
        version: 1,
        topology,
        task,
        instance,
        token,
    })
    .expect("postcard")
}

#[test]
fn a_version_1_hello_is_a_version_mismatch_naming_both_versions() {
    let v1 = v1_hello("wc", "split", None, None);
    assert_eq!(
        v1,
        [
            0, 0xd0, 0x9a, 0x95, 0xa2, 0x05, 1, 2, b'w', b'c', 5, b's', b'p', b'l', b'i', b't', 0,
            0
        ],
        "version 1's pinned bytes"
    );
    for body in [
        v1,
        v1_hello("wordcount", "count", Some(3), Some("s3cret")),
        v1_hello("t", "k", Some(0), None),
        v1_hello("", "", None, Some("x")),
    ] {
        assert_eq!(peek_hello_version(&body), Some((MAGIC, 1)));
        let err = decode_body(&body).expect_err("refused");
        assert!(
            matches!(err, WireError::Version { theirs: 1, ours: 2 }),
            "{body:02x?}: {err:?}"
        );
        assert_eq!(err.code(), ErrorCode::VersionMismatch);
        let msg = err.to_string();
        assert!(
            msg.contains("version 1") && msg.contains("version 2"),
            "{msg}"
        );
        assert_eq!(
            err.frame(),
            Frame::error(ErrorCode::VersionMismatch, msg.clone())
        );
    }
}

#[test]
fn a_version_1_hello_that_parses_as_version_2_is_still_refused_by_its_version() {
    // A task of 15 bytes (16 with its length: a nonce), instance Some(1)
    // and token "abcde" happen to read as a version 2 peer Hello: the
    // version check, not the parser, refuses it.
    let body = v1_hello("wc", "fifteen bytes!!", Some(1), Some("abcde"));
    let Ok(Some(Frame::Hello(h))) = decode_body(&body) else {
        panic!("it parses")
    };
    assert_eq!((h.magic, h.version), (MAGIC, 1));
    assert_eq!(&h.nonce, b"\x0ffifteen bytes!!");
    assert!(matches!(
        check_magic_version(h.magic, h.version),
        Err(WireError::Version { theirs: 1, ours: 2 })
    ));
}

/// A `Hello` as a later version might send it: other fields after
/// `version`.
#[derive(Serialize)]
enum FutureFrame {
    Hello {
        magic: u32,
        version: u16,
        cluster: u64,
        labels: Vec<(String, String)>,
    },
}

#[test]
fn a_later_versions_hello_is_a_version_mismatch() {
    let future = FutureFrame::Hello {
        magic: MAGIC,
        version: 3,
        cluster: u64::MAX,
        labels: vec![("zone".into(), "b".into())],
    };
    let body = postcard::to_stdvec(&future).expect("postcard");
    assert_eq!(peek_hello_version(&body), Some((MAGIC, 3)));
    let err = decode_body(&body).expect_err("refused");
    assert!(
        matches!(err, WireError::Version { theirs: 3, ours: 2 }),
        "{err:?}"
    );
    // A version 2 Hello with fields appended: the trailing bytes make it
    // unparseable, its own version makes it malformed rather than a mismatch.
    let mut body = encode(&Frame::Hello(Hello::new(
        "t",
        Role::Peer(PeerHello {
            session: 1,
            from: None,
            to: SlotRef {
                task: 0,
                instance: 0,
                incarnation: 0,
            },
        }),
    )))
    .split_off(4)
    .to_vec();
    body.extend_from_slice(&[3, b'x', b'y', b'z']);
    assert!(matches!(decode_body(&body), Err(WireError::Malformed(_))));
    // The same, claiming version 3.
    body[6] = 3;
    assert!(matches!(
        decode_body(&body),
        Err(WireError::Version { theirs: 3, ours: 2 })
    ));
}

#[test]
fn bad_magic() {
    let other = FutureFrame::Hello {
        magic: 0x4854_5450, // "HTTP"
        version: 2,
        cluster: 0,
        labels: vec![],
    };
    let body = postcard::to_stdvec(&other).expect("postcard");
    let err = decode_body(&body).expect_err("refused");
    assert!(matches!(err, WireError::BadMagic(0x4854_5450)), "{err:?}");
    assert_eq!(err.code(), ErrorCode::BadMagic);
    assert!(err.to_string().contains("not a Tempest peer"), "{err}");
    // Bad magic wins over a bad version.
    let body = postcard::to_stdvec(&FutureFrame::Hello {
        magic: 1,
        version: 1,
        cluster: 0,
        labels: vec![],
    })
    .expect("postcard");
    assert!(matches!(decode_body(&body), Err(WireError::BadMagic(1))));
    // A well-formed Hello with the wrong magic decodes; the check refuses it.
    let mut hello = Hello::new("t", role_worker());
    hello.magic = 1;
    let Ok(Some(Frame::Hello(h))) = decode_body(&encode(&Frame::Hello(hello)).split_off(4)) else {
        panic!("decodes")
    };
    assert!(matches!(
        check_magic_version(h.magic, h.version),
        Err(WireError::BadMagic(1))
    ));
    // An HTTP request is not a Tempest peer either: "GET " is a length of
    // 1.2 GB, over the maximum.
    let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\n\r\n"[..]);
    assert!(matches!(
        FrameCodec::default().decode(&mut buf),
        Err(WireError::FrameTooLarge { .. })
    ));
}

fn role_worker() -> Role {
    Role::Worker(WorkerHello {
        task: "k".into(),
        instance: None,
        instances: 1,
        layout: 0,
        peer: "h:1".into(),
    })
}

#[test]
fn peek_hello_version_needs_a_hello() {
    assert_eq!(peek_hello_version(&[]), None);
    assert_eq!(peek_hello_version(&[0]), None);
    assert_eq!(peek_hello_version(&[0, 0xd0, 0x9a]), None);
    assert_eq!(
        peek_hello_version(&[1, 0xd0, 0x9a, 0x95, 0xa2, 0x05, 2]),
        None
    );
    assert_eq!(
        peek_hello_version(&[0, 0xd0, 0x9a, 0x95, 0xa2, 0x05, 2]),
        Some((MAGIC, PROTOCOL_VERSION))
    );
}

#[test]
fn a_batch_of_words_is_compact() {
    // 256 words of 6 bytes keyed by themselves: 8 + 8 + 1 + 1 + 6 each.
    let ds: Vec<Delivery> = (0..256u64)
        .map(|i| Delivery {
            root: RootId((i << 32) | (1000 + i)),
            edge: i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            msg: Msg::keyed_by_payload(format!("word{:02}", i % 100)),
        })
        .collect();
    let bytes = encode(&Frame::Batch(Deliveries(ds)));
    assert_eq!(bytes.len(), 4 + 1 + 2 + 256 * 24);
}

#[tokio::test]
async fn a_peer_link_conversation_over_a_duplex_stream() {
    let (a, b) = tokio::io::duplex(64);
    let mut sender = Framed::new(a, FrameCodec::default());
    let mut receiver = Framed::new(b, FrameCodec::default());
    let big = Bytes::from(vec![1u8; 100_000]);
    let batch = Frame::Batch(Deliveries(vec![
        Delivery {
            root: RootId(1),
            edge: 11,
            msg: Msg::new(big.clone()).with_key("k"),
        },
        Delivery {
            root: RootId(2),
            edge: 12,
            msg: Msg::keyed_by_payload("cow"),
        },
    ]));
    let hello = Frame::Hello(Hello::new(
        "wc",
        Role::Peer(PeerHello {
            session: 5,
            from: Some(SlotRef {
                task: 0,
                instance: 0,
                incarnation: 0,
            }),
            to: SlotRef {
                task: 1,
                instance: 0,
                incarnation: 2,
            },
        }),
    ));
    let sent = batch.clone();
    let sent_hello = hello.clone();
    let upstream = tokio::spawn(async move {
        sender.send(sent_hello).await.expect("send Hello");
        let Some(Ok(Frame::PeerWelcome(w))) = sender.next().await else {
            panic!("no PeerWelcome")
        };
        assert_eq!(w.credit, 1);
        sender.send(sent).await.expect("send Batch");
        let Some(Ok(Frame::Credit { batches: 1 })) = sender.next().await else {
            panic!("no Credit")
        };
        sender
            .send(Frame::Heartbeat { seq: 1 })
            .await
            .expect("send");
        let Some(Ok(Frame::HeartbeatAck { seq: 1 })) = sender.next().await else {
            panic!("no HeartbeatAck")
        };
    });
    let Some(Ok(got)) = receiver.next().await else {
        panic!("no Hello")
    };
    assert_eq!(got, hello);
    receiver
        .send(Frame::PeerWelcome(PeerWelcome {
            credit: 1,
            heartbeat_ms: 1000,
        }))
        .await
        .expect("send");
    let Some(Ok(got)) = receiver.next().await else {
        panic!("no Batch")
    };
    assert_eq!(got, batch);
    receiver
        .send(Frame::Credit { batches: 1 })
        .await
        .expect("send");
    let Some(Ok(Frame::Heartbeat { seq })) = receiver.next().await else {
        panic!("no Heartbeat")
    };
    receiver
        .send(Frame::HeartbeatAck { seq })
        .await
        .expect("send");
    upstream.await.expect("the sender's side");
    drop(receiver);
}
