//! A statsd collector for tests: a UDP socket on loopback that keeps the
//! lines of every datagram sent to it.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{FixtureError, Result};

/// Collects the lines of every datagram sent to `127.0.0.1:PORT`, on its
/// own thread, for at most two minutes.
pub struct StatsdListener {
    addr: String,
    lines: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StatsdListener {
    /// Binds a free loopback port and starts collecting.
    pub fn start() -> Result<StatsdListener> {
        let err = |e: std::io::Error| FixtureError(format!("statsd listener: {e}"));
        let socket = UdpSocket::bind("127.0.0.1:0").map_err(err)?;
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .map_err(err)?;
        let addr = socket.local_addr().map_err(err)?.to_string();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (lines.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            let deadline = Instant::now() + Duration::from_secs(120);
            while Instant::now() < deadline && !s.load(Ordering::SeqCst) {
                if let Ok(n) = socket.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    l.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend(text.lines().map(str::to_owned));
                }
            }
        });
        Ok(StatsdListener {
            addr,
            lines,
            stop,
            thread: Some(thread),
        })
    }

    /// Its address, `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Waits (at most `limit`) until the lines received so far satisfy
    /// `done`; the caller asserts on what [`StatsdListener::finish`] gives.
    pub fn wait_until(&self, limit: Duration, done: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if done(&self.lines.lock().unwrap_or_else(|e| e.into_inner())) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops collecting and returns every line received.
    pub fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.lines.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Drop for StatsdListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
