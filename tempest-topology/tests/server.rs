//! The TCP topology server, in process: bad peers are refused without
//! disturbing real workers, leases come back at once when a connection drops
//! or goes silent, key grouping waits for a missing instance, an instance
//! cannot be claimed twice, and shutdown drains and sends workers away.
//!
//! Each test runs a `TopologyServer` and real `run_worker`s on one tokio
//! runtime; hand-written peers speak the wire protocol through `FrameCodec`.
//! Nothing waits on a sleep: every wait is for an observable event (acks at
//! the source, a run's end, a read hitting EOF) and is bounded, so a bug
//! fails the test instead of hanging it.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::codec::{Decoder, Framed};

use tempest_core::metrics::Registry;
use tempest_core::msg::key_instance;
use tempest_core::sources::{GeneratorSource, MemorySource};
use tempest_core::wire::{ErrorCode, Frame, FrameCodec, Hello, WireDelivery};
use tempest_core::{
    Grouping, Msg, Pipeline, Source, Task, TaskContext, TaskFactory, TaskResult, Topology,
};
use tempest_task::worker::{run_worker, WorkerConfig, WorkerError, WorkerReport};
use tempest_topology::{DriveEnd, RunError, RunReport, ServerConfig, TopologyServer};

/// The bound on any single wait: far longer than a healthy run needs.
const WAIT: Duration = Duration::from_secs(20);

const TOKEN: &str = "s3cret";

// ---------------------------------------------------------------------------
// Helpers: the server, real workers, raw peers.
// ---------------------------------------------------------------------------

/// A topology server running on the test's runtime.
struct Server {
    addr: SocketAddr,
    /// Kept alive (and sent `true`) by the test: the server's shutdown watch.
    stop: watch::Sender<bool>,
    run: JoinHandle<Result<RunReport, RunError>>,
}

async fn start_server(topology: Topology, config: ServerConfig) -> Server {
    let server = TopologyServer::bind(topology, config)
        .await
        .expect("the server binds");
    let addr = server.local_addr().expect("the listener has an address");
    let (stop, shutdown) = watch::channel(false);
    let run = tokio::spawn(server.run(shutdown));
    Server { addr, stop, run }
}

impl Server {
    /// Waits (bounded) for the run to end and returns its report.
    async fn finish(self, bound: Duration) -> RunReport {
        let Server { stop, run, .. } = self;
        let report = timeout(bound, run)
            .await
            .unwrap_or_else(|_| panic!("the server's run did not end within {bound:?}"))
            .expect("the server's run task panicked")
            .expect("the server's run failed");
        drop(stop);
        report
    }
}

fn config(f: impl FnOnce(&mut ServerConfig)) -> ServerConfig {
    let mut c = ServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..ServerConfig::default()
    };
    f(&mut c);
    c
}

/// The factory and instance count of `task`, from a second copy of the
/// topology (the server owns the first).
fn factory(mut topology: Topology, task: &str) -> (TaskFactory, u32) {
    let dag = topology.dag().expect("a valid pipeline");
    let t = dag.task(dag.find(task).expect("the task exists"));
    (t.factory.clone(), t.workers)
}

/// A real task worker (`run_worker`) on the test's runtime.
struct Worker {
    stop: watch::Sender<bool>,
    handle: JoinHandle<Result<WorkerReport, WorkerError>>,
}

fn spawn_worker((factory, instances): (TaskFactory, u32), config: WorkerConfig) -> Worker {
    let (stop, shutdown) = watch::channel(false);
    let handle = tokio::spawn(run_worker(
        factory,
        instances,
        config,
        Registry::default(),
        shutdown,
    ));
    Worker { stop, handle }
}

impl Worker {
    /// Stops the worker through its shutdown watch; it must return `Ok`.
    async fn stop(self) -> WorkerReport {
        if self.handle.is_finished() {
            panic!("the worker stopped on its own: {:?}", self.handle.await);
        }
        self.stop
            .send(true)
            .expect("the worker watches its shutdown");
        timeout(WAIT, self.handle)
            .await
            .expect("the worker stops when told to")
            .expect("the worker task panicked")
            .expect("the worker returns Ok")
    }
}

fn worker_config(addr: SocketAddr, topology: &str, task: &str) -> WorkerConfig {
    WorkerConfig::new(addr.to_string(), topology, task)
}

/// Waits (bounded) until `cond` holds; `cond` reads counters the run updates.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let waited = timeout(WAIT, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "timed out after {WAIT:?} waiting for {what}"
    );
}

/// Blocks a task's `handle` until opened, to hold part of a run back.
#[derive(Clone, Default)]
struct Gate(Arc<(std::sync::Mutex<bool>, Condvar)>);

impl Gate {
    fn wait(&self) {
        let (lock, cv) = &*self.0;
        let guard = lock.lock().unwrap();
        // Bounded so that a failing test cannot wedge the handler thread.
        let _ = cv.wait_timeout_while(guard, Duration::from_secs(30), |open| !*open);
    }
    fn open(&self) {
        let (lock, cv) = &*self.0;
        *lock.lock().unwrap() = true;
        cv.notify_all();
    }
}

/// One task `t`: payloads are sequence numbers; numbers from `from` on wait
/// for `gate`.
fn gated(name: &str, source: impl Source, gate: Gate, from: u64) -> Topology {
    Topology::builder(name)
        .source(source)
        .pipeline(Pipeline::new().task("t", move || {
            let gate = gate.clone();
            move |m: Msg| -> TaskResult {
                let n: u64 = m
                    .payload_str()
                    .and_then(|s| s.parse().ok())
                    .expect("a sequence number");
                if n >= from {
                    gate.wait();
                }
                Ok(None)
            }
        }))
        .build()
        .unwrap()
}

fn encode(frame: &Frame) -> Vec<u8> {
    let mut buf = BytesMut::new();
    FrameCodec::default().encode_ref(frame, &mut buf).unwrap();
    buf.to_vec()
}

fn hello(topology: &str, task: &str, instance: Option<u32>, token: Option<&str>) -> Hello {
    Hello::new(topology, task, instance, token.map(str::to_owned))
}

/// Reads until the peer closes (EOF or reset), bounded.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = timeout(WAIT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
                Err(e) => panic!("reading from the server: {e}"),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server did not close the connection");
    out
}

/// Every frame in `bytes` (which must hold whole frames only).
fn decode_all(bytes: &[u8]) -> Vec<Frame> {
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::from(bytes);
    let mut frames = Vec::new();
    while let Some(f) = codec
        .decode_eof(&mut buf)
        .unwrap_or_else(|e| panic!("the server sent bytes that are not frames: {e}"))
    {
        frames.push(f);
    }
    frames
}

/// Connects, sends `bytes` (then half-closes if asked), and returns what the
/// server sent before closing the connection.
async fn bad_peer(addr: SocketAddr, bytes: &[u8], half_close: bool) -> Vec<Frame> {
    let mut s = timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    s.write_all(bytes).await.expect("write");
    if half_close {
        s.shutdown().await.expect("half-close");
    }
    decode_all(&read_until_closed(&mut s).await)
}

/// Asserts the server answered with exactly one `Error{want}` and closed.
fn assert_refused(what: &str, frames: &[Frame], want: ErrorCode) {
    match frames {
        [Frame::Error { code, message }] => {
            assert_eq!(*code, want, "{what}: {message}");
            assert!(!message.is_empty(), "{what}: an Error names the problem");
        }
        other => panic!("{what}: expected one Error{{{want:?}}} frame and a close, got {other:?}"),
    }
}

/// The refusals the report counts: `expected`, plus at most one
/// `ShuttingDown`. (A real worker reconnects as soon as the server sends it
/// away; if the acceptor has not yet seen the stop, that reconnect is
/// accepted and refused with `ShuttingDown`, legitimately counted.)
fn assert_rejected(report: &RunReport, expected: u64) {
    let rejected = report.metrics.counter("tempest_worker_rejected", &[]);
    assert!(
        rejected == expected || rejected == expected + 1,
        "tempest_worker_rejected is {rejected}, expected {expected} (or one more for a \
         ShuttingDown at the end)"
    );
}

type Client = Framed<TcpStream, FrameCodec>;

/// A hand-written worker: connects and says Hello.
async fn raw_client(addr: SocketAddr, hello: Hello) -> Client {
    let s = timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    let mut c = Framed::new(s, FrameCodec::default());
    c.send(Frame::Hello(hello)).await.expect("send Hello");
    c
}

/// The next frame, or `None` once the server closed the connection.
async fn recv(c: &mut Client) -> Option<Frame> {
    match timeout(WAIT, c.next())
        .await
        .expect("a frame or a close in time")
    {
        None => None,
        Some(Ok(f)) => Some(f),
        Some(Err(tempest_core::wire::WireError::Io(e)))
            if e.kind() == ErrorKind::ConnectionReset =>
        {
            None
        }
        Some(Err(e)) => panic!("a bad frame from the server: {e}"),
    }
}

// ---------------------------------------------------------------------------
// 1. Bad peers.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peers_are_refused_and_a_real_worker_keeps_working() {
    const NAME: &str = "bad-peers";
    const TOTAL: u64 = 20_000;
    const HALF: u64 = TOTAL / 2;
    const MAX_FRAME: usize = 64 * 1024;
    let gate = Gate::default();
    let source = GeneratorSource::new().count(TOTAL).track_acks(true);
    let stats = source.stats();
    let server = start_server(
        gated(NAME, source, gate.clone(), HALF),
        config(|c| {
            c.token = Some(TOKEN.into());
            c.max_frame = MAX_FRAME;
            c.handshake_timeout = Duration::from_millis(300);
        }),
    )
    .await;
    let addr = server.addr;
    let mut wc = worker_config(addr, NAME, "t");
    wc.token = Some(TOKEN.into());
    let worker = spawn_worker(
        factory(
            gated(
                NAME,
                MemorySource::new(Vec::<String>::new()),
                gate.clone(),
                HALF,
            ),
            "t",
        ),
        wc,
    );
    wait_until("the real worker's first acks", || stats.acked() > 0).await;

    let tok = Some(TOKEN);
    let mut refused = 0u64;

    // Not a Tempest peer: "GET " read as a length is ~1.2 GB, over the maximum.
    let frames = bad_peer(addr, b"GET / HTTP/1.1\r\n\r\n", false).await;
    assert_refused("HTTP request", &frames, ErrorCode::FrameTooLarge);
    refused += 1;

    // A body that is no frame (variant 99).
    let frames = bad_peer(addr, &[0, 0, 0, 3, 99, 1, 2], false).await;
    assert_refused("malformed body", &frames, ErrorCode::Malformed);
    refused += 1;

    // Truncated: 10 of 100 announced bytes, then the write side closes. Handled
    // like a drop: an Error{Malformed} is allowed, the close is required.
    let mut truncated = 100u32.to_be_bytes().to_vec();
    truncated.extend_from_slice(&[7; 10]);
    let frames = bad_peer(addr, &truncated, true).await;
    match &frames[..] {
        [] => {}
        [Frame::Error { code, .. }] => assert_eq!(*code, ErrorCode::Malformed),
        other => panic!("truncated frame: unexpected answer {other:?}"),
    }
    refused += 1;

    // Oversized: refused on the length alone; the body never comes and the
    // connection stays open, so a server waiting for it would time out instead.
    let len = u32::try_from(MAX_FRAME + 1).unwrap();
    let frames = bad_peer(addr, &len.to_be_bytes(), false).await;
    assert_refused("oversized frame", &frames, ErrorCode::FrameTooLarge);
    refused += 1;

    // A version-2 Hello in today's layout.
    let mut h = hello(NAME, "t", None, tok);
    h.version = 2;
    let frames = bad_peer(addr, &encode(&Frame::Hello(h)), false).await;
    assert_refused("Hello v2", &frames, ErrorCode::VersionMismatch);
    refused += 1;

    // A version-2 Hello whose fields after `version` are not v1's: still a
    // version mismatch, not "malformed".
    let body = [
        0u8, // Hello
        0xd0, 0x9a, 0x95, 0xa2, 0x05, // MAGIC
        2,    // version 2
        0xff, 0xff, 0xff, 0x7f, // a field v1 cannot read as a string
    ];
    let mut future = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
    future.extend_from_slice(&body);
    let frames = bad_peer(addr, &future, false).await;
    assert_refused("future Hello", &frames, ErrorCode::VersionMismatch);
    refused += 1;

    let mut h = hello(NAME, "t", None, tok);
    h.magic = 0x4854_5450; // "HTTP"
    let frames = bad_peer(addr, &encode(&Frame::Hello(h)), false).await;
    assert_refused("bad magic", &frames, ErrorCode::BadMagic);
    refused += 1;

    let frames = bad_peer(
        addr,
        &encode(&Frame::Hello(hello(NAME, "t", None, Some("wrong")))),
        false,
    )
    .await;
    assert_refused("wrong token", &frames, ErrorCode::BadToken);
    refused += 1;

    let frames = bad_peer(
        addr,
        &encode(&Frame::Hello(hello(NAME, "t", None, None))),
        false,
    )
    .await;
    assert_refused("missing token", &frames, ErrorCode::BadToken);
    refused += 1;

    let frames = bad_peer(
        addr,
        &encode(&Frame::Hello(hello("no-such-topology", "t", None, tok))),
        false,
    )
    .await;
    assert_refused("unknown topology", &frames, ErrorCode::UnknownTopology);
    refused += 1;

    let frames = bad_peer(
        addr,
        &encode(&Frame::Hello(hello(NAME, "no-such-task", None, tok))),
        false,
    )
    .await;
    assert_refused("unknown task", &frames, ErrorCode::UnknownTask);
    refused += 1;

    let frames = bad_peer(
        addr,
        &encode(&Frame::Hello(hello(NAME, "t", Some(7), tok))),
        false,
    )
    .await;
    assert_refused("bad instance", &frames, ErrorCode::BadInstance);
    refused += 1;

    let frames = bad_peer(
        addr,
        &encode(&Frame::Pull {
            max: 10,
            results: vec![],
        }),
        false,
    )
    .await;
    assert_refused("Pull before Hello", &frames, ErrorCode::UnexpectedFrame);
    refused += 1;

    // Connects and says nothing.
    let frames = bad_peer(addr, &[], false).await;
    assert_refused("silent peer", &frames, ErrorCode::HandshakeTimeout);
    refused += 1;

    // The real worker was not disturbed: everything below HALF can be acked,
    // nothing from HALF on yet. Let the rest through: the acks keep growing.
    let acked_during = stats.acked();
    assert!(acked_during <= HALF, "{acked_during} acked past the gate");
    gate.open();
    let report = server.finish(WAIT).await;
    assert_eq!(report.end, DriveEnd::Exhausted);
    assert_eq!(
        stats.acked(),
        TOTAL,
        "acked before the gate: {acked_during}"
    );
    assert!(stats.missing(TOTAL).is_empty());
    assert_eq!(stats.duplicate_acks(), 0);
    assert_eq!(report.acked(), TOTAL);
    assert_eq!(report.failed(), 0);
    assert_rejected(&report, refused);

    let w = worker.stop().await;
    assert_eq!(
        w.connections, 1,
        "the real worker never lost its connection"
    );
    assert_eq!(w.handled, TOTAL);
}

// ---------------------------------------------------------------------------
// 2, 3. Leases come back at once.
// ---------------------------------------------------------------------------

/// Two instances of `t`, doing nothing: a raw client takes one, a real
/// worker the other.
fn two_instances(name: &str, source: impl Source) -> Topology {
    Topology::builder(name)
        .source(source)
        .pipeline(Pipeline::new().task_with_workers("t", 2, || |_: Msg| -> TaskResult { Ok(None) }))
        .message_timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// A raw client that joins as instance 0 of `t` and pulls one non-empty batch
/// of at most 50 deliveries, which it never answers. Returns the client, the
/// number of deliveries it holds, and when it sent the Pull they answer (the
/// last frame the server heard from it).
async fn take_a_batch(
    addr: SocketAddr,
    name: &str,
    heartbeat: Duration,
) -> (Client, usize, Instant) {
    let mut c = raw_client(addr, hello(name, "t", None, None)).await;
    match recv(&mut c).await {
        Some(Frame::Welcome(w)) => {
            assert_eq!(w.instance, 0);
            assert_eq!(w.instances, 2);
            assert_eq!(w.batch_size, 256);
            assert_eq!(u128::from(w.heartbeat_ms), heartbeat.as_millis());
        }
        other => panic!("expected Welcome, got {other:?}"),
    }
    // The source may not have been polled yet: an empty batch is a long-poll
    // timeout; pull again.
    for _ in 0..20 {
        let sent = Instant::now();
        c.send(Frame::Pull {
            max: 50,
            results: vec![],
        })
        .await
        .expect("send Pull");
        match recv(&mut c).await {
            Some(Frame::Batch { deliveries }) if deliveries.is_empty() => continue,
            Some(Frame::Batch { deliveries }) => {
                assert!(deliveries.len() <= 50, "{} > max 50", deliveries.len());
                let roots: std::collections::HashSet<u64> =
                    deliveries.iter().map(|d: &WireDelivery| d.root).collect();
                assert_eq!(roots.len(), deliveries.len(), "one delivery per root");
                return (c, deliveries.len(), sent);
            }
            other => panic!("expected Batch, got {other:?}"),
        }
    }
    panic!("no work for the raw client after 20 pulls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_of_a_dropped_connection_are_requeued_at_once() {
    const NAME: &str = "dropped";
    const TOTAL: u64 = 2_000;
    // Silence would only be noticed after 30 s, the message timeout is 60 s:
    // only noticing the close finishes the run within WAIT.
    let heartbeat = Duration::from_secs(10);
    let source = GeneratorSource::new().count(TOTAL).track_acks(true);
    let stats = source.stats();
    let server = start_server(
        two_instances(NAME, source),
        config(|c| c.heartbeat = heartbeat),
    )
    .await;
    let (client, held, _) = take_a_batch(server.addr, NAME, heartbeat).await;

    let worker = spawn_worker(
        factory(
            two_instances(NAME, MemorySource::new(Vec::<String>::new())),
            "t",
        ),
        worker_config(server.addr, NAME, "t"),
    );
    // The worker does everything but what the client holds...
    let rest = TOTAL - held as u64;
    wait_until("the worker to ack all it can", || stats.acked() >= rest).await;
    assert_eq!(
        stats.acked(),
        rest,
        "messages leased to the client were handed out again"
    );
    // ...until the client vanishes without a word.
    drop(client);
    let report = server.finish(WAIT).await;
    assert_eq!(report.end, DriveEnd::Exhausted);
    assert_eq!(stats.acked(), TOTAL);
    assert!(stats.missing(TOTAL).is_empty());
    assert_eq!(stats.duplicate_acks(), 0);
    assert_eq!(report.metrics.counter("tempest_source_timed_out", &[]), 0);
    assert_eq!(report.failed(), 0);
    let requeued = report.metrics.counter("tempest_leases_requeued", &[]);
    assert!(requeued >= held as u64, "requeued {requeued} < held {held}");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_of_a_silent_connection_are_requeued_after_three_heartbeats() {
    const NAME: &str = "half-open";
    const TOTAL: u64 = 2_000;
    let heartbeat = Duration::from_millis(100);
    let source = GeneratorSource::new().count(TOTAL).track_acks(true);
    let stats = source.stats();
    let server = start_server(
        two_instances(NAME, source),
        config(|c| c.heartbeat = heartbeat),
    )
    .await;
    // The client keeps its socket open and says nothing more: no results, no
    // heartbeats.
    let (mut client, held, last_sent) = take_a_batch(server.addr, NAME, heartbeat).await;
    // Watch for the server closing it, but keep the socket open until the
    // run has ended.
    let watch_close = tokio::spawn(async move {
        // The server may show it is alive with heartbeats; anything else is
        // returned for the assertion below.
        let frame = loop {
            match recv(&mut client).await {
                Some(Frame::Heartbeat { .. }) => continue,
                other => break other,
            }
        };
        (frame, last_sent.elapsed(), client)
    });
    let worker = spawn_worker(
        factory(
            two_instances(NAME, MemorySource::new(Vec::<String>::new())),
            "t",
        ),
        worker_config(server.addr, NAME, "t"),
    );
    let report = server.finish(WAIT).await;
    assert_eq!(report.end, DriveEnd::Exhausted);
    assert_eq!(stats.acked(), TOTAL);
    assert!(stats.missing(TOTAL).is_empty());
    assert_eq!(stats.duplicate_acks(), 0);
    assert_eq!(report.metrics.counter("tempest_source_timed_out", &[]), 0);
    assert_eq!(report.failed(), 0);
    let requeued = report.metrics.counter("tempest_leases_requeued", &[]);
    assert!(requeued >= held as u64, "requeued {requeued} < held {held}");
    // The server closed the silent connection, sending nothing but
    // heartbeats on it, no sooner than three heartbeats after it last heard from it.
    let (frame, after, client) = timeout(WAIT, watch_close)
        .await
        .expect("the silent peer is closed")
        .expect("the watching task panicked");
    assert_eq!(frame, None, "the server closed the silent peer");
    assert!(
        after >= heartbeat * 3 && after < Duration::from_secs(5),
        "the silent peer was closed {after:?} after its last frame"
    );
    drop(client);
    worker.stop().await;
}

// ---------------------------------------------------------------------------
// 4. Key grouping with a missing instance.
// ---------------------------------------------------------------------------

/// (instance, key) of every message `b` handled.
type Seen = Arc<Mutex<Vec<(u32, String)>>>;

struct RecordKeys {
    instance: Option<u32>,
    seen: Seen,
}

impl Task for RecordKeys {
    fn started(&mut self, ctx: &TaskContext) {
        self.instance = Some(ctx.instance);
    }

    fn handle(&mut self, msg: Msg) -> TaskResult {
        let key = String::from_utf8(msg.key().expect("keyed").to_vec()).unwrap();
        let instance = self.instance.expect("started before handle");
        self.seen.lock().push((instance, key));
        Ok(None)
    }
}

fn keyed(name: &str, source: impl Source, seen: Seen) -> Topology {
    Topology::builder(name)
        .source(source)
        .pipeline(
            Pipeline::new()
                .task("a", || {
                    |m: Msg| -> TaskResult {
                        Ok(Some(vec![Msg::keyed_by_payload(m.payload().clone())]))
                    }
                })
                .task_with_workers("b", 2, move || RecordKeys {
                    instance: None,
                    seen: seen.clone(),
                })
                .edge_grouped("a", "b", Grouping::Key),
        )
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_grouped_work_waits_for_its_instance() {
    const NAME: &str = "keyed";
    // (Keys that differ only in their last characters, like `key-{i}`, all
    // land on one instance: see the report on `key_instance`.)
    let mut keys: Vec<String> = (0..200).map(|i| format!("{i}-key")).collect();
    let owner = |k: &str| key_instance(k.as_bytes(), 2);
    // The last root's key belongs to instance 0: once instance 0 has handled
    // it, `a`'s results for every root have reached the server (they come
    // back in delivery order on a's one connection), so every message for
    // instance 1 is queued.
    let last0 = keys.iter().rposition(|k| owner(k) == 0).unwrap();
    let last = keys.remove(last0);
    keys.push(last.clone());
    let n0 = keys.iter().filter(|k| owner(k) == 0).count();
    let n1 = keys.len() - n0;
    assert!(n0 > 0 && n1 > 0, "both instances own keys");

    let seen: Seen = Arc::default();
    let source = MemorySource::new(keys.clone());
    let log = source.log();
    let server = start_server(keyed(NAME, source, seen.clone()), config(|_| {})).await;
    let copy = || keyed(NAME, MemorySource::new(Vec::<String>::new()), seen.clone());
    let a = spawn_worker(factory(copy(), "a"), worker_config(server.addr, NAME, "a"));
    let mut b0_config = worker_config(server.addr, NAME, "b");
    b0_config.instance = Some(0);
    let b0 = spawn_worker(factory(copy(), "b"), b0_config);

    wait_until("instance 0 to finish its keys", || {
        log.ack_count() >= n0 && seen.lock().iter().any(|(_, k)| *k == last)
    })
    .await;
    assert_eq!(
        log.ack_count(),
        n0,
        "only instance 0's roots can complete without instance 1"
    );
    for (instance, key) in seen.lock().iter() {
        assert_eq!(*instance, 0);
        assert_eq!(
            owner(key),
            0,
            "instance 0 was given {key}, a key of instance 1"
        );
    }

    let mut b1_config = worker_config(server.addr, NAME, "b");
    b1_config.instance = Some(1);
    let b1 = spawn_worker(factory(copy(), "b"), b1_config);
    let report = server.finish(WAIT).await;
    assert_eq!(report.end, DriveEnd::Exhausted);
    assert_eq!(log.acked().len(), keys.len());
    assert_eq!(log.ack_count(), keys.len(), "no root acked twice");

    let mut by_key: HashMap<String, Vec<u32>> = HashMap::new();
    for (instance, key) in seen.lock().iter() {
        by_key.entry(key.clone()).or_default().push(*instance);
    }
    assert_eq!(by_key.len(), keys.len(), "every key reached b");
    for (key, instances) in &by_key {
        assert_eq!(
            instances,
            &[owner(key)],
            "{key} must be handled once, by instance {}",
            owner(key)
        );
    }
    let by_1 = by_key.values().filter(|i| i[0] == 1).count();
    assert_eq!(by_1, n1);

    for w in [a, b0, b1] {
        assert_eq!(w.stop().await.connections, 1);
    }
}

// ---------------------------------------------------------------------------
// 5. An instance cannot be claimed twice.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_claim_on_an_instance_is_refused() {
    const NAME: &str = "taken";
    const TOTAL: u64 = 4_000;
    const HALF: u64 = TOTAL / 2;
    let gate = Gate::default();
    let source = GeneratorSource::new().count(TOTAL).track_acks(true);
    let stats = source.stats();
    let server = start_server(gated(NAME, source, gate.clone(), HALF), config(|_| {})).await;
    let worker = spawn_worker(
        factory(
            gated(
                NAME,
                MemorySource::new(Vec::<String>::new()),
                gate.clone(),
                HALF,
            ),
            "t",
        ),
        worker_config(server.addr, NAME, "t"),
    );
    // Acks mean the worker holds instance 0 (the task's only one).
    wait_until("the first worker's acks", || stats.acked() > 0).await;

    for (what, instance) in [("instance 0", Some(0)), ("any instance", None)] {
        let mut c = raw_client(server.addr, hello(NAME, "t", instance, None)).await;
        match recv(&mut c).await {
            Some(Frame::Error { code, message }) => {
                assert_eq!(code, ErrorCode::InstanceTaken, "{what}: {message}")
            }
            other => panic!("{what}: expected Error{{InstanceTaken}}, got {other:?}"),
        }
        assert_eq!(recv(&mut c).await, None, "{what}: closed after the Error");
    }

    let acked_during = stats.acked();
    assert!(acked_during <= HALF);
    gate.open();
    let report = server.finish(WAIT).await;
    assert_eq!(report.end, DriveEnd::Exhausted);
    assert_eq!(stats.acked(), TOTAL, "the first worker kept working");
    assert!(stats.missing(TOTAL).is_empty());
    assert_eq!(report.failed(), 0);
    assert_rejected(&report, 2);
    let w = worker.stop().await;
    assert_eq!(w.connections, 1, "the first worker kept its connection");
    assert_eq!(w.handled, TOTAL);
}

// ---------------------------------------------------------------------------
// 6. Server shutdown.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_and_sends_the_worker_away_to_reconnect() {
    const NAME: &str = "going-away";
    let source = GeneratorSource::new().track_acks(true); // endless
    let stats = source.stats();
    let topology = |source| {
        Topology::builder(NAME)
            .source(source)
            .pipeline(Pipeline::new().task("t", || |_: Msg| -> TaskResult { Ok(None) }))
            .max_pending(1_000)
            .grace_period(Duration::from_secs(10))
            .build()
            .unwrap()
    };
    let server = start_server(topology(source), config(|c| c.token = Some(TOKEN.into()))).await;
    let addr = server.addr;
    let mut wc = worker_config(addr, NAME, "t");
    wc.token = Some(TOKEN.into());
    wc.reconnect_min = Duration::from_millis(20);
    wc.reconnect_max = Duration::from_millis(200);
    let worker = spawn_worker(factory(topology(GeneratorSource::new().count(0)), "t"), wc);
    wait_until("the run to be under way", || stats.acked() >= 2_000).await;

    server.stop.send(true).unwrap();
    // The server waits up to 5 s for goodbyes: a run that ends well before
    // that was answered by the worker's Goodbye, not by the deadline.
    let report = server.finish(Duration::from_secs(4)).await;
    assert_eq!(report.end, DriveEnd::Shutdown { left: 0 });
    let emitted = stats.emitted();
    assert_eq!(stats.acked(), emitted, "everything in flight was drained");
    assert!(stats.missing(emitted).is_empty());
    assert_eq!(report.acked(), emitted);
    assert_eq!(report.polled(), emitted);
    assert_eq!(report.failed(), 0);

    // The worker keeps trying: a successor listening on the same address
    // gets its Hello, for the same instance.
    let listener = TcpListener::bind(addr)
        .await
        .expect("rebind the server's address");
    let (stream, _) = timeout(WAIT, listener.accept())
        .await
        .expect("the worker reconnects")
        .expect("accept");
    let mut successor = Framed::new(stream, FrameCodec::default());
    match recv(&mut successor).await {
        Some(Frame::Hello(h)) => {
            assert!(h.check().is_ok());
            assert_eq!(h.topology, NAME);
            assert_eq!(h.task, "t");
            assert_eq!(h.instance, Some(0), "the worker asks for its instance back");
            assert_eq!(h.token.as_deref(), Some(TOKEN));
        }
        other => panic!("expected the worker's Hello, got {other:?}"),
    }
    successor
        .send(Frame::Error {
            code: ErrorCode::ShuttingDown,
            message: "not yet".into(),
        })
        .await
        .unwrap();
    drop(successor);
    drop(listener);

    let w = worker.stop().await;
    assert_eq!(w.connections, 1);
    assert_eq!(
        w.handled, emitted,
        "every root was handled once, by this worker"
    );
}
