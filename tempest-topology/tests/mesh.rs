//! The mesh data plane, in process: a real `TopologyServer` and real
//! `run_worker`s on one tokio runtime, talking over loopback TCP, with
//! hand-written peers where a test needs a worker that misbehaves.
//!
//! - a worker that leaves (its connection closes, or it falls silent) has
//!   every root it held replayed at once, not after `message_timeout`;
//! - bad peers on a worker's peer port and bad workers on the server's port
//!   are each refused with an `Error` naming the problem, and the flow goes
//!   on;
//! - key grouping holds across upstream instances (split ×3 → count ×3);
//! - a rebalance (count 2 → 3 → 1) while the stream runs loses nothing.
//!
//! Nothing waits on a sleep: every wait is for an observable event and is
//! bounded, so a bug fails the test instead of hanging it.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use tempest_core::metrics::Registry;
use tempest_core::msg::key_instance;
use tempest_core::sources::{GeneratorSource, MemorySource};
use tempest_core::{Dag, Grouping, Msg, Pipeline, Task, TaskContext, TaskResult, Topology};
use tempest_task::worker::{run_worker, WorkerConfig, WorkerError, WorkerReport};
use tempest_topology::{RunError, RunReport, ServerConfig, TopologyServer};
use tempest_transport::auth::{self, Secret, Side};
use tempest_transport::link;
use tempest_transport::wire::{
    ErrorCode, Frame, Hello, PeerHello, PeerWelcome, Role, SlotRef, WorkerHello,
};
use tempest_transport::{FrameCodec, WireError};

/// The bound on any single wait: far longer than a healthy run needs.
const WAIT: Duration = Duration::from_secs(30);

/// The deployment's data-plane secret in the tests that have one.
const SECRET: &str = "0123456789abcdef-the-data-plane-secret";

fn secret() -> Secret {
    Secret::new(SECRET).expect("a valid secret")
}

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

/// A topology server running on the test's runtime.
struct Server {
    addr: SocketAddr,
    registry: Registry,
    stop: watch::Sender<bool>,
    run: JoinHandle<Result<RunReport, RunError>>,
}

async fn start_server(topology: Topology, f: impl FnOnce(&mut ServerConfig)) -> Server {
    let mut config = ServerConfig::default();
    f(&mut config);
    let server = TopologyServer::bind(topology, config)
        .await
        .expect("the server binds");
    let addr = server.local_addr().expect("the listener has an address");
    let registry = server.registry();
    let (stop, shutdown) = watch::channel(false);
    let run = tokio::spawn(server.run(shutdown));
    Server {
        addr,
        registry,
        stop,
        run,
    }
}

impl Server {
    /// Waits (bounded) for a finite source's run to end and returns its report.
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

/// A real task worker on the test's runtime.
struct Worker {
    stop: watch::Sender<bool>,
    handle: JoinHandle<Result<WorkerReport, WorkerError>>,
}

fn spawn_worker(dag: Arc<Dag>, config: WorkerConfig, registry: Registry) -> Worker {
    let (stop, shutdown) = watch::channel(false);
    let handle = tokio::spawn(run_worker(dag, config, registry, shutdown));
    Worker { stop, handle }
}

impl Worker {
    /// Stops the worker through its shutdown watch; it must return `Ok`.
    async fn stop(self) -> WorkerReport {
        assert!(
            !self.handle.is_finished(),
            "the worker stopped on its own: {:?}",
            self.handle.await
        );
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

fn worker(
    addr: SocketAddr,
    topology: &str,
    task: &str,
    instance: u32,
    instances: u32,
) -> WorkerConfig {
    let mut c = WorkerConfig::new(addr.to_string(), topology, task);
    c.instance = Some(instance);
    c.instances = instances;
    c
}

/// Waits (bounded) until `cond` holds.
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

/// How many times each payload reached a task, and where.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<HashMap<String, Vec<u32>>>>);

impl Seen {
    fn record(&self, payload: &str, instance: u32) {
        self.0
            .lock()
            .entry(payload.to_owned())
            .or_default()
            .push(instance);
    }
    fn distinct(&self) -> usize {
        self.0.lock().len()
    }
    fn total(&self) -> usize {
        self.0.lock().values().map(Vec::len).sum()
    }
    fn count(&self, payload: &str) -> usize {
        self.0.lock().get(payload).map_or(0, Vec::len)
    }
}

/// A sink that records each payload with its instance.
struct Record {
    seen: Seen,
    instance: u32,
}

impl Task for Record {
    fn started(&mut self, ctx: &TaskContext) {
        self.instance = ctx.instance;
    }
    fn handle(&mut self, m: Msg) -> TaskResult {
        self.seen
            .record(m.payload_str().unwrap_or("?"), self.instance);
        Ok(None)
    }
}

fn record(seen: &Seen) -> impl Fn() -> Record + Send + Sync + 'static {
    let seen = seen.clone();
    move || Record {
        seen: seen.clone(),
        instance: 0,
    }
}

fn dag_of(mut topology: Topology) -> Arc<Dag> {
    Arc::new(topology.dag().expect("a valid pipeline"))
}

type Raw = link::Conn;

async fn raw(addr: SocketAddr) -> Raw {
    let s = timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    link::framed(s, tempest_transport::DEFAULT_MAX_FRAME)
}

/// The next frame, or `None` once the other side closed.
async fn recv(c: &mut Raw) -> Option<Frame> {
    match timeout(WAIT, c.next())
        .await
        .expect("a frame or a close in time")
    {
        None => None,
        Some(Ok(f)) => Some(f),
        Some(Err(WireError::Io(e))) if e.kind() == ErrorKind::ConnectionReset => None,
        Some(Err(e)) => panic!("a bad frame: {e}"),
    }
}

/// Sends raw `bytes`, and returns the frames received until the close.
async fn bad_peer(addr: SocketAddr, bytes: &[u8]) -> Vec<Frame> {
    let mut s = timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = timeout(WAIT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
                Err(e) => panic!("reading: {e}"),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection was not closed");
    let mut codec = FrameCodec::default();
    let mut bytes = bytes::BytesMut::from(&out[..]);
    let mut frames = Vec::new();
    while let Some(f) = tokio_util::codec::Decoder::decode_eof(&mut codec, &mut bytes)
        .unwrap_or_else(|e| panic!("not frames: {e}"))
    {
        frames.push(f);
    }
    frames
}

fn encode(frame: &Frame) -> Vec<u8> {
    let mut buf = bytes::BytesMut::new();
    FrameCodec::default()
        .encode_ref(frame, &mut buf)
        .expect("encodes");
    buf.to_vec()
}

/// How a hand-written connector answers a `Challenge`.
#[derive(Copy, Clone, Debug)]
enum Answer {
    /// With a proof made with the deployment's secret.
    Right,
    /// With a proof made of nothing.
    Wrong,
    /// Not at all.
    Silent,
}

/// Connects to `addr`, says `hello`, answers a `Challenge` as told (and
/// checks the acceptor's own proof after a right answer), and returns every
/// other frame received until the close.
async fn probe(addr: SocketAddr, hello: Hello, answer: Answer) -> Vec<Frame> {
    let transcript = hello.transcript();
    let connector = hello.nonce;
    let mut c = raw(addr).await;
    c.send(Frame::Hello(hello)).await.expect("send Hello");
    let mut frames = Vec::new();
    let mut acceptor = None;
    while let Some(f) = recv(&mut c).await {
        match f {
            Frame::Challenge { nonce } => {
                acceptor = Some(nonce);
                let mac = match answer {
                    Answer::Right => {
                        auth::proof(&secret(), Side::Connector, &connector, &nonce, &transcript)
                    }
                    Answer::Wrong => [7; 32],
                    Answer::Silent => continue,
                };
                c.send(Frame::Proof { mac }).await.expect("send Proof");
            }
            Frame::Proof { mac } => {
                let nonce = acceptor.expect("a Proof answers a Challenge");
                assert!(
                    auth::verify(
                        &secret(),
                        Side::Acceptor,
                        &connector,
                        &nonce,
                        &transcript,
                        &mac
                    ),
                    "the acceptor proves the secret too"
                );
            }
            other => frames.push(other),
        }
    }
    frames
}

fn assert_refused(what: &str, frames: &[Frame], want: ErrorCode) {
    let frames: Vec<&Frame> = frames
        .iter()
        .filter(|f| !matches!(f, Frame::Challenge { .. }))
        .collect();
    match &frames[..] {
        [Frame::Error { code, message }] => {
            assert_eq!(*code, want, "{what}: {message}");
            assert!(!message.is_empty(), "{what}: an Error names the problem");
        }
        other => panic!("{what}: expected one Error {want} and a close, got {other:?}"),
    }
}

/// A version-1 worker's Hello, as PROTOCOL.md version 1 pinned it.
const V1_HELLO: &[u8] = &[
    0, 0, 0, 18, 0, 0xd0, 0x9a, 0x95, 0xa2, 0x05, 1, 2, b'w', b'c', 5, b's', b'p', b'l', b'i',
    b't', 0, 0,
];

// ---------------------------------------------------------------------------
// 1. A lost worker's roots are replayed at once.
// ---------------------------------------------------------------------------

/// A hand-written worker of instance 1 of `t`: joins, accepts the server's
/// peer link, takes one batch of roots and then either leaves (closes
/// everything) or falls silent (keeps its sockets open, reads and sends
/// nothing).
struct FakeWorker {
    control: Raw,
    peer_link: Raw,
    got: Vec<String>,
}

async fn fake_worker(server: SocketAddr, topology: &str) -> FakeWorker {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let peer = listener.local_addr().expect("addr").to_string();
    let mut control = raw(server).await;
    control
        .send(Frame::Hello(Hello::new(
            topology,
            Role::Worker(WorkerHello {
                task: "t".into(),
                instance: Some(1),
                instances: 2,
                layout: 0,
                peer,
            }),
        )))
        .await
        .expect("send Hello");
    let Some(Frame::Welcome(w)) = recv(&mut control).await else {
        panic!("the fake worker was not welcomed");
    };
    let (s, _) = timeout(WAIT, listener.accept())
        .await
        .expect("the server opens a peer link in time")
        .expect("accept");
    let mut peer_link = link::framed(s, tempest_transport::DEFAULT_MAX_FRAME);
    let Some(Frame::Hello(h)) = recv(&mut peer_link).await else {
        panic!("the peer link opens with Hello");
    };
    let Role::Peer(p) = h.role else {
        panic!("a peer Hello")
    };
    assert_eq!(p.session, w.session);
    assert_eq!(p.from, None, "roots come from the server");
    assert_eq!((p.to.task, p.to.instance), (0, 1));
    peer_link
        .send(Frame::PeerWelcome(PeerWelcome {
            credit: 1,
            heartbeat_ms: 60_000,
        }))
        .await
        .expect("send PeerWelcome");
    let got = loop {
        match recv(&mut peer_link).await {
            Some(Frame::Batch(b)) => {
                break b
                    .0
                    .iter()
                    .map(|d| d.msg.payload_str().unwrap_or("?").to_owned())
                    .collect::<Vec<_>>()
            }
            Some(Frame::Heartbeat { .. } | Frame::HeartbeatAck { .. }) => continue,
            other => panic!("expected a batch of roots, got {other:?}"),
        }
    };
    assert!(!got.is_empty());
    FakeWorker {
        control,
        peer_link,
        got,
    }
}

async fn lost_worker(silent: bool) {
    const N: usize = 3_000;
    let name = if silent { "lost-silent" } else { "lost-closed" };
    let seen = Seen::default();
    let topology = || {
        Topology::builder(name)
            .source(MemorySource::new((0..N).map(|i| i.to_string())))
            // Far beyond the test's bound: a replay must come from the loss.
            .message_timeout(Duration::from_secs(120))
            .max_pending(400)
            .batch_size(50)
            .pipeline(Pipeline::new().task_with_workers("t", 2, record(&seen)))
            .build()
            .unwrap()
    };
    let server = start_server(topology(), |c| c.heartbeat = Duration::from_millis(100)).await;
    let fake = fake_worker(server.addr, name).await;
    let real = spawn_worker(
        dag_of(topology()),
        worker(server.addr, name, "t", 0, 2),
        Registry::default(),
    );
    wait_until("the real worker handles roots", || seen.distinct() > 100).await;
    let lost_at = Instant::now();
    let FakeWorker {
        control,
        peer_link,
        got,
    } = fake;
    let _keep = if silent {
        // Sockets open, nothing read or sent: only heartbeats can tell.
        Some((control, peer_link))
    } else {
        drop((control, peer_link));
        None
    };
    wait_until(
        "every root the lost worker held is handled by another",
        || got.iter().all(|p| seen.count(p) > 0),
    )
    .await;
    let replayed_in = lost_at.elapsed();
    // The bound the issue sets: within 2 s of the loss being noticed (a
    // close at once; silence after 3 heartbeats, 300 ms).
    assert!(
        replayed_in < Duration::from_secs(2) + Duration::from_millis(if silent { 300 } else { 0 }),
        "the lost worker's {} roots were handled again only after {replayed_in:?}",
        got.len()
    );
    let report = server.finish(WAIT).await;
    real.stop().await;
    assert_eq!(report.acked(), N as u64, "every root acked");
    assert_eq!(seen.distinct(), N, "nothing lost");
    let lost = report.metrics.counter("tempest_roots_lost", &[]);
    assert!(
        lost >= got.len() as u64,
        "tempest_roots_lost is {lost}, the lost worker held {}",
        got.len()
    );
    let duplicates = seen.total() - seen.distinct();
    assert!(
        duplicates <= 400,
        "{duplicates} duplicates, max_pending is 400"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roots_of_a_worker_that_leaves_are_replayed_at_once() {
    lost_worker(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roots_of_a_silent_worker_are_replayed_after_three_heartbeats() {
    lost_worker(true).await;
}

// ---------------------------------------------------------------------------
// 2. Bad peers.
// ---------------------------------------------------------------------------

/// a → b, where b's handle waits until `go` turns true, so the stream is
/// still running while the bad peers knock.
fn two_step(name: &str, n: u64, seen: &Seen, go: Arc<std::sync::atomic::AtomicBool>) -> Topology {
    let seen = seen.clone();
    Topology::builder(name)
        .source(GeneratorSource::new().count(n))
        .batch_size(64)
        .pipeline(
            Pipeline::new()
                .task("a", || |m: Msg| -> TaskResult { Ok(Some(vec![m])) })
                .task("b", move || {
                    let (seen, go) = (seen.clone(), go.clone());
                    move |m: Msg| -> TaskResult {
                        let deadline = Instant::now() + WAIT;
                        while !go.load(std::sync::atomic::Ordering::Relaxed)
                            && Instant::now() < deadline
                        {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        seen.record(m.payload_str().unwrap_or("?"), 0);
                        Ok(None)
                    }
                })
                .edge("a", "b"),
        )
        .build()
        .unwrap()
}

/// A running a → b over a server with a data-plane secret, b held back until
/// [`Gated::finish`]: the stage the bad peers and workers knock on.
struct Gated {
    name: &'static str,
    n: u64,
    server: Server,
    a: Worker,
    b: Worker,
    b_metrics: Registry,
    /// b's peer port.
    peer: SocketAddr,
    seen: Seen,
    go: Arc<std::sync::atomic::AtomicBool>,
}

impl Gated {
    async fn start(name: &'static str, n: u64) -> Gated {
        let seen = Seen::default();
        let go = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let server = start_server(two_step(name, n, &seen, go.clone()), |c| {
            c.secret = Some(secret());
            c.handshake_timeout = Duration::from_millis(300);
        })
        .await;
        let dag = dag_of(two_step(name, n, &seen, go.clone()));
        let mut a = worker(server.addr, name, "a", 0, 1);
        a.secret = Some(secret());
        let peer = SocketAddr::from((
            [127, 0, 0, 1],
            tempest_testkit::free_port().expect("a free port"),
        ));
        let mut b = worker(server.addr, name, "b", 0, 1);
        b.secret = Some(secret());
        b.peer_listen = peer;
        b.handshake_timeout = Duration::from_millis(300);
        let b_metrics = Registry::default();
        let (a, b) = (
            spawn_worker(dag.clone(), a, Registry::default()),
            spawn_worker(dag.clone(), b, b_metrics.clone()),
        );
        wait_until("both workers joined and a's peer link to b is up", || {
            b_metrics
                .snapshot()
                .gauge("tempest_peer_links", &[("direction", "in")])
                .is_some_and(|n| n >= 1.0)
        })
        .await;
        Gated {
            name,
            n,
            server,
            a,
            b,
            b_metrics,
            peer,
            seen,
            go,
        }
    }

    /// Lets b go, and checks the stream went on to its last root.
    async fn finish(self) -> RunReport {
        self.go.store(true, std::sync::atomic::Ordering::Relaxed);
        let report = self.server.finish(WAIT).await;
        self.a.stop().await;
        self.b.stop().await;
        assert_eq!(report.acked(), self.n, "{}: the flow went on", self.name);
        assert_eq!(self.seen.distinct(), self.n as usize);
        report
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peers_are_refused_and_the_flow_goes_on() {
    const NAME: &str = "bad-peers";
    let g = Gated::start(NAME, 5_000).await;
    let (peer, b_metrics) = (g.peer, g.b_metrics.clone());

    let peer_hello = |topology: &str, session: u64| {
        Hello::new(
            topology,
            Role::Peer(PeerHello {
                session,
                from: None,
                to: SlotRef {
                    task: 1,
                    instance: 0,
                    incarnation: 0,
                },
            }),
        )
    };
    // Links refused before this (a's first tries, before b had joined) are
    // not the probes'.
    let rejected = || b_metrics.snapshot().counter("tempest_peer_rejected", &[]);
    let before = rejected();
    let mut refused = 0;
    let mut check = |what: &str, frames: Vec<Frame>, code: ErrorCode| {
        assert_refused(what, &frames, code);
        refused += 1;
    };
    check(
        "HTTP on the peer port",
        bad_peer(peer, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await,
        ErrorCode::FrameTooLarge,
    );
    let started = Instant::now();
    let mut huge = vec![1, 0, 0, 0];
    huge.extend_from_slice(&[0; 64]);
    check(
        "a 16 MiB frame before the handshake",
        bad_peer(peer, &huge).await,
        ErrorCode::FrameTooLarge,
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "closed at once, not after a deadline"
    );
    check(
        "a garbage body",
        bad_peer(peer, &[0, 0, 0, 3, 0xff, 0xff, 0xff]).await,
        ErrorCode::Malformed,
    );
    check(
        "a version-1 Hello",
        bad_peer(peer, V1_HELLO).await,
        ErrorCode::VersionMismatch,
    );
    check(
        "a wrong proof of the secret",
        probe(peer, peer_hello(NAME, 1), Answer::Wrong).await,
        ErrorCode::BadToken,
    );
    check(
        "no proof of the secret",
        probe(peer, peer_hello(NAME, 1), Answer::Silent).await,
        ErrorCode::HandshakeTimeout,
    );
    check(
        "another topology",
        probe(peer, peer_hello("other", 1), Answer::Right).await,
        ErrorCode::UnknownTopology,
    );
    check(
        "another session",
        probe(peer, peer_hello(NAME, 1), Answer::Right).await,
        ErrorCode::WrongPeer,
    );
    let worker_hello = Hello::new(
        NAME,
        Role::Worker(WorkerHello {
            task: "b".into(),
            instance: None,
            instances: 1,
            layout: 0,
            peer: "127.0.0.1:1".into(),
        }),
    );
    check(
        "a worker Hello on a peer port",
        probe(peer, worker_hello, Answer::Right).await,
        ErrorCode::UnexpectedFrame,
    );
    check(
        "a Credit before Hello",
        bad_peer(peer, &encode(&Frame::Credit { batches: 1 })).await,
        ErrorCode::UnexpectedFrame,
    );
    check(
        "a silent peer",
        bad_peer(peer, &[]).await,
        ErrorCode::HandshakeTimeout,
    );
    // Each refusal is counted before its Error is sent.
    assert_eq!(rejected() - before, refused, "each refusal counted once");

    g.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_workers_are_refused_and_the_flow_goes_on() {
    const NAME: &str = "bad-workers";
    let g = Gated::start(NAME, 3_000).await;
    let addr = g.server.addr;

    let hello = |topology: &str, task: &str, instance: Option<u32>, instances: u32, peer: &str| {
        Hello::new(
            topology,
            Role::Worker(WorkerHello {
                task: task.into(),
                instance,
                instances,
                layout: 0,
                peer: peer.into(),
            }),
        )
    };
    let p = "127.0.0.1:9";
    let right = |h| probe(addr, h, Answer::Right);
    let cases: Vec<(&str, Vec<Frame>, ErrorCode)> = vec![
        (
            "a version-1 worker",
            bad_peer(addr, V1_HELLO).await,
            ErrorCode::VersionMismatch,
        ),
        (
            "a wrong proof of the secret",
            probe(addr, hello(NAME, "b", None, 1, p), Answer::Wrong).await,
            ErrorCode::BadToken,
        ),
        (
            "no proof of the secret",
            probe(addr, hello(NAME, "b", None, 1, p), Answer::Silent).await,
            ErrorCode::HandshakeTimeout,
        ),
        (
            "another topology",
            right(hello("other", "b", None, 1, p)).await,
            ErrorCode::UnknownTopology,
        ),
        (
            "an unknown task",
            right(hello(NAME, "zz", None, 1, p)).await,
            ErrorCode::UnknownTask,
        ),
        (
            "an instance out of range",
            right(hello(NAME, "b", Some(3), 1, p)).await,
            ErrorCode::BadInstance,
        ),
        (
            "a taken instance",
            right(hello(NAME, "b", Some(0), 1, p)).await,
            ErrorCode::InstanceTaken,
        ),
        (
            "another count, same layout",
            right(hello(NAME, "b", None, 2, p)).await,
            ErrorCode::LayoutConflict,
        ),
        (
            "a bad peer address",
            right(hello(NAME, "a", None, 1, "nowhere")).await,
            ErrorCode::BadAddress,
        ),
        (
            "a peer Hello on the server",
            right(Hello::new(
                NAME,
                Role::Peer(PeerHello {
                    session: 0,
                    from: None,
                    to: SlotRef {
                        task: 0,
                        instance: 0,
                        incarnation: 0,
                    },
                }),
            ))
            .await,
            ErrorCode::UnexpectedFrame,
        ),
        (
            "a silent connection",
            bad_peer(addr, &[]).await,
            ErrorCode::HandshakeTimeout,
        ),
    ];
    let n = cases.len() as u64;
    for (what, frames, code) in cases {
        assert_refused(what, &frames, code);
    }
    let report = g.finish().await;
    let rejected = report.metrics.counter("tempest_worker_rejected", &[]);
    assert!(
        rejected == n || rejected == n + 2,
        "tempest_worker_rejected is {rejected}, expected {n} (or up to two more ShuttingDown for workers rejoining at the end)"
    );
}

// ---------------------------------------------------------------------------
// 3. Key grouping across upstream instances.
// ---------------------------------------------------------------------------

fn split_count(name: &str, sentences: Vec<String>, seen: &Seen, count: u32) -> Topology {
    Topology::builder(name)
        .source(MemorySource::new(sentences))
        .batch_size(32)
        .pipeline(
            Pipeline::new()
                .task_with_workers("split", 3, || {
                    |m: Msg| -> TaskResult {
                        Ok(Some(
                            m.payload_str()
                                .unwrap_or_default()
                                .split_whitespace()
                                .map(|w| Msg::keyed_by_payload(w.to_owned()))
                                .collect(),
                        ))
                    }
                })
                .task_with_workers("count", count, record(seen))
                .edge_grouped("split", "count", Grouping::Key),
        )
        .build()
        .unwrap()
}

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4))]

    /// Split ×3 feeding count ×3: every word reaches exactly one count
    /// instance, the one its key names, whichever split instance emitted it.
    #[test]
    fn key_grouping_holds_across_upstream_instances(
        sentences in proptest::collection::vec(
            proptest::collection::vec("[a-h]{1,3}", 1..8).prop_map(|w| w.join(" ")),
            200..400,
        )
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let seen = Seen::default();
            let name = "keys";
            let server = start_server(split_count(name, sentences.clone(), &seen, 3), |_| {}).await;
            let dag = dag_of(split_count(name, Vec::new(), &seen, 3));
            let mut workers = Vec::new();
            for (task, n) in [("split", 3), ("count", 3)] {
                for i in 0..n {
                    workers.push(spawn_worker(dag.clone(), worker(server.addr, name, task, i, n), Registry::default()));
                }
            }
            let report = server.finish(WAIT).await;
            for w in workers {
                w.stop().await;
            }
            prop_assert_eq!(report.acked(), sentences.len() as u64);
            let mut expected: HashMap<String, usize> = HashMap::new();
            for s in &sentences {
                for w in s.split_whitespace() {
                    *expected.entry(w.to_owned()).or_default() += 1;
                }
            }
            let got = seen.0.lock().clone();
            prop_assert_eq!(got.len(), expected.len());
            for (word, instances) in got {
                let want = key_instance(word.as_bytes(), 3);
                prop_assert!(instances.iter().all(|&i| i == want), "{} went to {:?}, its key names {}", word, instances, want);
                prop_assert!(instances.len() >= expected[&word], "{} counted {} times of {}", word, instances.len(), expected[&word]);
            }
            Ok(())
        })?;
    }
}

// ---------------------------------------------------------------------------
// 4. Rebalance while the stream runs.
// ---------------------------------------------------------------------------

/// Count 2 → 3 → 1 while sentences flow, as the director does it: workers
/// of the new layout join (a higher layout version brings the new count),
/// those of the old one are stopped. Every word of every sentence is
/// counted, and every root acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_two_three_one_while_running_loses_nothing() {
    const NAME: &str = "rebalance";
    const N: u64 = 30_000;
    let seen = Seen::default();
    let sentence = |i: u64| format!("w{} w{} w{}", i % 97, i % 13, i);
    let topology = |seen: &Seen| {
        let seen = seen.clone();
        Topology::builder(NAME)
            .source(
                GeneratorSource::new()
                    .count(N)
                    .rate(6_000.0)
                    .cycle((0..N).map(|i| bytes::Bytes::from(sentence(i))).collect()),
            )
            .message_timeout(Duration::from_secs(120))
            .batch_size(64)
            .pipeline(
                Pipeline::new()
                    .task("split", || {
                        |m: Msg| -> TaskResult {
                            Ok(Some(
                                m.payload_str()
                                    .unwrap_or_default()
                                    .split_whitespace()
                                    .map(|w| Msg::keyed_by_payload(w.to_owned()))
                                    .collect(),
                            ))
                        }
                    })
                    .task_with_workers("count", 2, record(&seen))
                    .edge_grouped("split", "count", Grouping::Key),
            )
            .build()
            .unwrap()
    };
    let server = start_server(topology(&seen), |_| {}).await;
    let addr = server.addr;
    let dag = dag_of(topology(&seen));
    let counted = || seen.total();
    let count = |i: u32, n: u32, layout: u64| {
        let mut c = worker(addr, NAME, "count", i, n);
        c.layout = layout;
        spawn_worker(dag.clone(), c, Registry::default())
    };
    let split = spawn_worker(
        dag.clone(),
        worker(addr, NAME, "split", 0, 1),
        Registry::default(),
    );
    let (c0, c1) = (count(0, 2, 0), count(1, 2, 0));
    wait_until("a quarter counted", || counted() as u64 > N * 3 / 4).await;
    // 2 → 3: the new instance joins with layout 1, then the old ones are replaced.
    let c2 = count(2, 3, 1);
    c0.stop().await;
    let c0 = count(0, 3, 1);
    c1.stop().await;
    let c1 = count(1, 3, 1);
    wait_until("half counted", || counted() as u64 > N * 3 / 2).await;
    // 3 → 1.
    c1.stop().await;
    c2.stop().await;
    c0.stop().await;
    let c0 = count(0, 1, 2);
    let report = server.finish(WAIT * 2).await;
    split.stop().await;
    let last = c0.stop().await;
    assert!(last.handled > 0, "the layout-2 worker took part");
    assert_eq!(report.acked(), N, "every root acked");
    assert_eq!(
        report.failed(),
        0,
        "no root failed: leaving workers only replay"
    );
    let mut expected: HashMap<String, usize> = HashMap::new();
    for i in 0..N {
        for w in sentence(i).split_whitespace() {
            *expected.entry(w.to_owned()).or_default() += 1;
        }
    }
    for (w, n) in &expected {
        let got = seen.count(w);
        assert!(got >= *n, "`{w}` counted {got} times of {n}");
    }
    // Duplicates come only from roots in flight when an instance left.
    let words = N as usize * 3;
    assert!(counted() >= words, "{} words counted of {words}", counted());
}

// ---------------------------------------------------------------------------
// 5. The data-plane secret on the wire, and floods.
// ---------------------------------------------------------------------------

fn one_task(name: &str, n: usize, seen: &Seen) -> Topology {
    Topology::builder(name)
        .source(MemorySource::new((0..n).map(|i| i.to_string())))
        .pipeline(Pipeline::new().task("t", record(seen)))
        .build()
        .unwrap()
}

/// Forwards one connection from `listener` to `to`, recording what the
/// connector sent.
async fn recording_proxy(listener: TcpListener, to: SocketAddr, sent: Arc<Mutex<Vec<u8>>>) {
    let Ok((mut inbound, _)) = listener.accept().await else {
        return;
    };
    let Ok(mut outbound) = TcpStream::connect(to).await else {
        return;
    };
    let (mut ir, mut iw) = inbound.split();
    let (mut or, mut ow) = outbound.split();
    let up = async {
        let mut buf = [0u8; 8192];
        loop {
            match ir.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    sent.lock().extend_from_slice(&buf[..n]);
                    if ow.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let down = tokio::io::copy(&mut or, &mut iw);
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// What a worker sends when it joins carries no reusable secret: the bytes
/// on the wire never hold the secret, and replaying them on a new
/// connection is refused (the server's nonce differs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sniffed_handshake_gives_away_nothing_reusable() {
    const NAME: &str = "sniffed";
    const N: usize = 2_000;
    let seen = Seen::default();
    let server = start_server(one_task(NAME, N, &seen), |c| c.secret = Some(secret())).await;
    let proxy = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let via = proxy.local_addr().expect("addr");
    let sent = Arc::new(Mutex::new(Vec::new()));
    let recorder = tokio::spawn(recording_proxy(proxy, server.addr, sent.clone()));
    let mut config = worker(via, NAME, "t", 0, 1);
    config.secret = Some(secret());
    let w = spawn_worker(
        dag_of(one_task(NAME, 0, &seen)),
        config,
        Registry::default(),
    );
    let report = server.finish(WAIT).await;
    assert_eq!(
        report.acked(),
        N as u64,
        "the worker joined through the proxy"
    );
    w.stop().await;
    recorder.abort();
    let wire = sent.lock().clone();
    assert!(
        wire.len() > 40,
        "the handshake was recorded: {} bytes",
        wire.len()
    );
    assert!(
        !wire.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
        "the secret crossed the wire"
    );

    // Replayed word for word to a server with the same secret: refused.
    let again = start_server(one_task("sniffed", 1, &seen), |c| c.secret = Some(secret())).await;
    let frames = bad_peer(again.addr, &wire).await;
    assert_refused("a replayed handshake", &frames, ErrorCode::BadToken);
    drop(again);
}

/// A worker with another secret is refused, and stops (an operator must
/// fix it); a worker with a secret refuses a server that does not ask for
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrong_secret_is_refused_both_ways() {
    const NAME: &str = "wrong-secret";
    let seen = Seen::default();
    let server = start_server(one_task(NAME, 10, &seen), |c| c.secret = Some(secret())).await;
    let mut config = worker(server.addr, NAME, "t", 0, 1);
    config.secret = Some(Secret::new("another-secret-of-enough-bytes").unwrap());
    let (_stop, shutdown) = watch::channel(false);
    let outcome = timeout(
        WAIT,
        run_worker(
            dag_of(one_task(NAME, 0, &seen)),
            config,
            Registry::default(),
            shutdown,
        ),
    )
    .await
    .expect("the refused worker stops");
    match outcome {
        Err(WorkerError::Refused {
            code: ErrorCode::BadToken,
            message,
        }) => {
            assert!(message.contains("secret"), "{message}")
        }
        other => panic!("expected a BadToken refusal, got {other:?}"),
    }
    drop(server);

    // No secret at the server: a worker with one will not join it.
    let open = start_server(one_task("open", 10, &seen), |_| {}).await;
    let mut config = worker(open.addr, "open", "t", 0, 1);
    config.secret = Some(secret());
    let metrics = Registry::default();
    let w = spawn_worker(dag_of(one_task("open", 0, &seen)), config, metrics.clone());
    // It tries (and says why) but never joins: the run cannot end.
    let ended = timeout(Duration::from_secs(2), open.run).await;
    assert!(
        ended.is_err(),
        "the source was drained by a worker that should not have joined"
    );
    assert_eq!(seen.distinct(), 0);
    w.stop().await;
}

/// Silent connections flooding the server cannot keep a real worker out:
/// the oldest handshakes give way to new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_does_not_keep_workers_out() {
    const NAME: &str = "flood";
    const N: usize = 1_000;
    let seen = Seen::default();
    let server = start_server(one_task(NAME, N, &seen), |c| {
        c.secret = Some(secret());
        c.gate.max_handshakes = 16;
    })
    .await;
    let mut flood = Vec::new();
    for _ in 0..200 {
        flood.push(TcpStream::connect(server.addr).await.expect("connect"));
    }
    let mut config = worker(server.addr, NAME, "t", 0, 1);
    config.secret = Some(secret());
    let w = spawn_worker(
        dag_of(one_task(NAME, 0, &seen)),
        config,
        Registry::default(),
    );
    let report = server.finish(WAIT).await;
    assert_eq!(report.acked(), N as u64, "the worker got in");
    w.stop().await;
    // The flood's oldest connections were closed to make room.
    let mut closed = 0;
    for mut s in flood {
        let mut b = [0u8; 64];
        if let Ok(Ok(_)) = timeout(Duration::from_millis(50), s.read(&mut b)).await {
            closed += 1;
        }
    }
    assert!(closed >= 200 - 16, "only {closed} of the flood were closed");
}

// ---------------------------------------------------------------------------
// 6. TLS on the data plane.
// ---------------------------------------------------------------------------

#[path = "../../tempest-transport/tests/common/certs.rs"]
mod certs;
use certs::Ca;
use tempest_transport::tls::DataTls;

/// The `Hello`'s magic as it crosses the wire (postcard's varint of
/// `wire::MAGIC`), which a version-1 Hello pins.
const MAGIC_ON_THE_WIRE: [u8; 5] = [0xd0, 0x9a, 0x95, 0xa2, 0x05];

/// What this test binary logged at warn and above, to look for the lines
/// an operator would see. (One subscriber for the whole binary: tests look
/// for lines only they cause.)
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: std::sync::OnceLock<Mutex<Vec<u8>>> = std::sync::OnceLock::new();
    static INIT: std::sync::Once = std::sync::Once::new();
    let buffer = LOGS.get_or_init(|| Mutex::new(Vec::new()));
    INIT.call_once(|| {
        struct Capture;
        impl std::io::Write for Capture {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                logs().lock().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(|| Capture)
            .try_init();
    });
    buffer
}

fn logged(needle: &str) -> usize {
    String::from_utf8_lossy(&logs().lock())
        .matches(needle)
        .count()
}

/// Forwards every connection from `listener` to `to`, recording both
/// directions of all of them in `wire`, and counting them.
async fn recording_relay(
    listener: TcpListener,
    to: SocketAddr,
    wire: Arc<Mutex<Vec<u8>>>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
) {
    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        wire: Arc<Mutex<Vec<u8>>>,
    ) {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    wire.lock().extend_from_slice(&buf[..n]);
                    if to.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown().await;
    }
    while let Ok((inbound, _)) = listener.accept().await {
        let Ok(outbound) = TcpStream::connect(to).await else {
            continue;
        };
        connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (ir, iw) = inbound.into_split();
        let (or, ow) = outbound.into_split();
        tokio::spawn(pump(ir, ow, wire.clone()));
        tokio::spawn(pump(or, iw, wire.clone()));
    }
}

/// A free loopback port (for a worker's peer port that a relay must know
/// before the worker starts).
fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

fn worker_rejected(server: &Server) -> u64 {
    server
        .registry
        .snapshot()
        .counter("tempest_worker_rejected", &[])
}

/// Split ×3 feeding count ×3 with TLS and the secret on every link (the
/// server's control links and root links, the workers' peer links): every
/// root is acked, every word counted at least once, at the instance its
/// key names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_flow_end_to_end_over_tls() {
    const NAME: &str = "tls-keys";
    let ca = Ca::new("the cluster");
    let sentences: Vec<String> = (0..1_500)
        .map(|i| format!("w{} w{} w{}", i % 7, i % 11, i % 13))
        .collect();
    let seen = Seen::default();
    let server = start_server(split_count(NAME, sentences.clone(), &seen, 3), |c| {
        c.secret = Some(secret());
        c.tls = Some(ca.data_tls());
    })
    .await;
    let dag = dag_of(split_count(NAME, Vec::new(), &seen, 3));
    let mut workers = Vec::new();
    for (task, n) in [("split", 3), ("count", 3)] {
        for i in 0..n {
            let mut config = worker(server.addr, NAME, task, i, n);
            config.secret = Some(secret());
            config.tls = Some(ca.data_tls());
            workers.push(spawn_worker(dag.clone(), config, Registry::default()));
        }
    }
    let registry = server.registry.clone();
    let report = server.finish(WAIT).await;
    for w in workers {
        let r = w.stop().await;
        assert!(r.connections >= 1, "a worker joined over TLS");
    }
    assert_eq!(report.acked(), sentences.len() as u64, "every root acked");
    let mut expected: HashMap<String, usize> = HashMap::new();
    for s in &sentences {
        for w in s.split_whitespace() {
            *expected.entry(w.to_owned()).or_default() += 1;
        }
    }
    let got = seen.0.lock().clone();
    assert_eq!(got.len(), expected.len());
    for (word, instances) in got {
        let want = key_instance(word.as_bytes(), 3);
        assert!(
            instances.iter().all(|&i| i == want),
            "{word} went to {instances:?}, its key names {want}"
        );
        assert!(
            instances.len() >= expected[&word],
            "{word} counted {} times of {}",
            instances.len(),
            expected[&word]
        );
    }
    assert_eq!(
        registry.snapshot().counter("tempest_worker_rejected", &[]),
        0,
        "no worker was refused"
    );
}

/// Runs one worker of `one_task` with `n` canary payloads, its control link
/// and the server's peer link to it both through a relay that records both
/// directions; returns what crossed the wire and how many connections.
async fn captured_run(tls: Option<DataTls>, n: usize) -> (Vec<u8>, usize) {
    let name = if tls.is_some() {
        "captured-tls"
    } else {
        "captured-plain"
    };
    let seen = Seen::default();
    let canaries = |n: usize| {
        Topology::builder(name)
            .source(MemorySource::new(
                (0..n).map(|i| format!("plaintext-canary-{i}")),
            ))
            .pipeline(Pipeline::new().task("t", record(&seen)))
            .build()
            .unwrap()
    };
    let server = start_server(canaries(n), |c| {
        c.secret = Some(secret());
        c.tls = tls.clone();
    })
    .await;
    let wire = Arc::new(Mutex::new(Vec::new()));
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // The control link, through a relay.
    let control = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let control_addr = control.local_addr().expect("addr");
    let mut relays = vec![tokio::spawn(recording_relay(
        control,
        server.addr,
        wire.clone(),
        connections.clone(),
    ))];
    // The server's peer link to the worker, through another: the worker
    // advertises the relay.
    let peer_port = free_port();
    let peer_relay = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let advertised = peer_relay.local_addr().expect("addr");
    relays.push(tokio::spawn(recording_relay(
        peer_relay,
        peer_port,
        wire.clone(),
        connections.clone(),
    )));
    let mut config = worker(control_addr, name, "t", 0, 1);
    config.secret = Some(secret());
    config.tls = tls;
    config.peer_listen = peer_port;
    config.peer_advertise = Some(advertised.to_string());
    let w = spawn_worker(dag_of(canaries(0)), config, Registry::default());
    let report = server.finish(WAIT).await;
    assert_eq!(
        report.acked(),
        n as u64,
        "every root acked through the relays"
    );
    assert_eq!(seen.distinct(), n);
    w.stop().await;
    for r in relays {
        r.abort();
    }
    let wire = wire.lock().clone();
    (wire, connections.load(std::sync::atomic::Ordering::Relaxed))
}

fn holds(wire: &[u8], needle: &[u8]) -> bool {
    wire.windows(needle.len()).any(|w| w == needle)
}

/// Under TLS, neither the secret, nor the Hello's magic, nor any payload
/// crosses the wire in clear; the same run in plain text shows all but the
/// secret (so the capture would see them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_crosses_the_wire_in_clear_under_tls() {
    const N: usize = 500;
    let ca = Ca::new("the cluster");

    let (plain, links) = captured_run(None, N).await;
    assert!(links >= 2, "both links went through the relays: {links}");
    assert!(
        holds(&plain, &MAGIC_ON_THE_WIRE),
        "the capture sees a plain Hello"
    );
    assert!(
        holds(&plain, b"plaintext-canary-"),
        "the capture sees plain payloads"
    );
    assert!(
        !holds(&plain, SECRET.as_bytes()),
        "the secret never crosses"
    );

    let (tls, links) = captured_run(Some(ca.data_tls()), N).await;
    assert!(links >= 2, "both links went through the relays: {links}");
    assert!(
        tls.len() > N * "plaintext-canary-".len(),
        "the messages crossed the relays: {} bytes",
        tls.len()
    );
    assert_eq!(tls.first(), Some(&0x16), "a TLS handshake record first");
    assert!(
        !holds(&tls, SECRET.as_bytes()),
        "the secret crossed the wire"
    );
    assert!(
        !holds(&tls, &MAGIC_ON_THE_WIRE),
        "the Hello's magic crossed the wire in clear"
    );
    assert!(
        !holds(&tls, b"plaintext-canary-"),
        "a payload crossed the wire in clear"
    );
    assert!(
        !holds(&tls, NAME_ON_THE_WIRE),
        "the topology's name crossed in clear"
    );
}

/// The topology name of the TLS capture, which a plain Hello carries.
const NAME_ON_THE_WIRE: &[u8] = b"captured-tls";

/// A TLS server refuses, and says why in its log: a connector whose
/// certificate is of another CA; a worker in plain text (which stops:
/// only an operator can fix it); a worker of another CA, again and again
/// (it never joins), until its address is shut out for failed handshakes,
/// which then keeps out even a good certificate from that address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_server_refuses_other_cas_and_plain_text() {
    const NAME: &str = "tls-refusals";
    logs();
    let ca = Ca::new("the cluster");
    let intruder = Ca::new("another cluster");
    let seen = Seen::default();
    let server = start_server(one_task(NAME, 100, &seen), |c| {
        c.secret = Some(secret());
        c.tls = Some(ca.data_tls());
        c.gate.max_failures = 3;
    })
    .await;
    let addr = server.addr.to_string();
    let hello = || {
        Hello::new(
            NAME,
            Role::Worker(WorkerHello {
                task: "t".into(),
                instance: Some(0),
                instances: 1,
                layout: 0,
                peer: "127.0.0.1:9".into(),
            }),
        )
    };
    let failed_before = logged("TLS handshake with 127.0.0.1:");

    // A certificate of another CA (trusting ours): the server refuses it.
    let bad = intruder.data_tls_trusting(&ca);
    let e = match link::connect(&addr, 1 << 20, hello(), Some(&secret()), Some(&bad)).await {
        Err(e) => e,
        Ok((_, answer)) => panic!("a certificate of another CA got an answer: {answer:?}"),
    };
    assert!(e.contains(&addr), "{e}");
    wait_until("the refusal is counted", || worker_rejected(&server) >= 1).await;
    assert!(
        logged("TLS handshake with 127.0.0.1:") > failed_before,
        "the server logs the failed TLS handshake"
    );

    // A worker in plain text (with the right secret): refused, told why.
    let plain_before = logged("refused a plain-text connection from 127.0.0.1:");
    let mut config = worker(server.addr, NAME, "t", 0, 1);
    config.secret = Some(secret());
    let (_stop, shutdown) = watch::channel(false);
    let outcome = timeout(
        WAIT,
        run_worker(
            dag_of(one_task(NAME, 0, &seen)),
            config,
            Registry::default(),
            shutdown,
        ),
    )
    .await
    .expect("the plain-text worker stops");
    match outcome {
        Err(WorkerError::Refused {
            code: ErrorCode::BadToken,
            message,
        }) => assert!(message.contains(link::TLS_REQUIRED), "{message}"),
        other => panic!("expected a refusal for plain text, got {other:?}"),
    }
    wait_until("the plain-text refusal is counted", || {
        worker_rejected(&server) >= 2
    })
    .await;
    let line = String::from_utf8_lossy(&logs().lock())
        .lines()
        .find(|l| l.contains("refused a plain-text connection from 127.0.0.1:"))
        .map(str::to_owned);
    assert!(
        logged("refused a plain-text connection from 127.0.0.1:") > plain_before,
        "the server logs the plain-text connection"
    );
    let line = line.expect("the line");
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("TEMPEST_DATA_TLS_*"), "{line}");

    // A real worker of another CA: it tries and is refused until the gate
    // shuts its address out (three failed handshakes in all); it never
    // joins.
    let mut config = worker(server.addr, NAME, "t", 0, 1);
    config.secret = Some(secret());
    config.tls = Some(bad);
    config.reconnect_max = Duration::from_millis(100);
    let w = spawn_worker(
        dag_of(one_task(NAME, 0, &seen)),
        config,
        Registry::default(),
    );
    wait_until("the other CA's worker is refused twice more", || {
        worker_rejected(&server) >= 4
    })
    .await;
    let report = w.stop().await;
    assert_eq!(report.connections, 0, "the other CA's worker joined");
    assert_eq!(seen.distinct(), 0, "a refused worker handled roots");

    // The address is shut out: even our own certificate is closed at once.
    let e = match link::connect(
        &addr,
        1 << 20,
        hello(),
        Some(&secret()),
        Some(&ca.data_tls()),
    )
    .await
    {
        Err(e) => e,
        Ok((_, answer)) => panic!("a shut-out address got an answer: {answer:?}"),
    };
    assert!(e.contains("TLS handshake with"), "{e}");
    drop(server);
}

/// A worker's peer port under TLS refuses a sender in plain text, telling
/// it why, and counts it; the worker goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_peer_port_refuses_plain_text() {
    const NAME: &str = "tls-peer-port";
    const N: usize = 200;
    let ca = Ca::new("the cluster");
    let seen = Seen::default();
    let server = start_server(one_task(NAME, N, &seen), |c| {
        c.secret = Some(secret());
        c.tls = Some(ca.data_tls());
    })
    .await;
    let peer_port = free_port();
    let mut config = worker(server.addr, NAME, "t", 0, 1);
    config.secret = Some(secret());
    config.tls = Some(ca.data_tls());
    config.peer_listen = peer_port;
    let metrics = Registry::default();
    let w = spawn_worker(dag_of(one_task(NAME, 0, &seen)), config, metrics.clone());
    let report = server.finish(WAIT).await;
    assert_eq!(
        report.acked(),
        N as u64,
        "the roots came over a TLS peer link"
    );

    let hello = Hello::new(
        NAME,
        Role::Peer(PeerHello {
            session: 1,
            from: None,
            to: SlotRef {
                task: 0,
                instance: 0,
                incarnation: 0,
            },
        }),
    );
    // Other closes (the server's link, gone with it) may be counted too:
    // the refusal is the one on top of what was counted before it.
    let before = metrics.snapshot().counter("tempest_peer_rejected", &[]);
    let frames = bad_peer(peer_port, &encode(&Frame::Hello(hello))).await;
    assert_refused(
        "plain text on a TLS peer port",
        &frames,
        ErrorCode::BadToken,
    );
    let Some(Frame::Error { message, .. }) = frames.first() else {
        unreachable!("assert_refused saw one Error")
    };
    assert!(message.contains(link::TLS_REQUIRED), "{message}");
    // Counted once the connection is closed: wait for it.
    wait_until("the peer port counts the refusal", || {
        metrics.snapshot().counter("tempest_peer_rejected", &[]) > before
    })
    .await;
    w.stop().await;
}
