//! The suite's HTTPS client of the director: one request per connection
//! (`Connection: close`), the director's certificate verified against the
//! cluster CA the suite made (rustls on ring, as the CLI does), and the
//! answer read as [`tempest_testkit::http::Response`] reads a plain one.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tempest_testkit::http::Response;

/// A client of one `https://HOST:PORT`.
pub struct Https {
    config: Arc<rustls::ClientConfig>,
    addr: String,
    name: ServerName<'static>,
}

impl Https {
    /// A client of `addr` (`127.0.0.1:PORT`) trusting the CA in `ca` only.
    pub fn new(addr: &str, ca: &Path) -> Https {
        let config = tempest_control::tls::client_verifying(ca)
            .unwrap_or_else(|e| panic!("the client's TLS configuration: {e}"));
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        let name = ServerName::try_from(host.to_owned())
            .unwrap_or_else(|e| panic!("{host} as a TLS server name: {e}"));
        Https {
            config: Arc::new(config),
            addr: addr.to_owned(),
            name,
        }
    }

    /// Sends one request; waits at most 5 s for the connection and
    /// `timeout` for the answer.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Duration,
    ) -> std::io::Result<Response> {
        let sock: std::net::SocketAddr = self
            .addr
            .parse()
            .map_err(|e| std::io::Error::other(format!("{}: {e}", self.addr)))?;
        let tcp = TcpStream::connect_timeout(&sock, Duration::from_secs(5))?;
        tcp.set_read_timeout(Some(timeout))?;
        tcp.set_write_timeout(Some(timeout))?;
        let conn = rustls::ClientConnection::new(self.config.clone(), self.name.clone())
            .map_err(std::io::Error::other)?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nConnection: close\r\nHost: {}\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        tls.write_all(req.as_bytes())?;
        tls.write_all(body)?;
        tls.flush()?;
        let mut raw = Vec::new();
        match tls.read_to_end(&mut raw) {
            Ok(_) => {}
            // A server that closes the connection without TLS's
            // close_notify once the answer is complete.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof && complete(&raw) => {}
            Err(e) => return Err(e),
        }
        parse(&raw)
    }
}

/// Whether `raw` holds a whole answer: its headers and the body they
/// announce.
fn complete(raw: &[u8]) -> bool {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let body = &raw[split + 4..];
    if head.contains("transfer-encoding: chunked") {
        return body.ends_with(b"0\r\n\r\n");
    }
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|n| n.trim().parse::<usize>().ok())
        .is_some_and(|n| body.len() >= n)
}

fn parse(raw: &[u8]) -> std::io::Result<Response> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Ok(Response {
        status,
        head,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&b[..end])
                .split(';')
                .next()
                .unwrap_or("0")
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 {
            return out;
        }
        let start = end + 2;
        out.extend_from_slice(&b[start..(start + size).min(b.len())]);
        b = &b[(start + size + 2).min(b.len())..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_whole_answers() {
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        assert!(complete(chunked));
        assert_eq!(parse(chunked).unwrap().body, "abc");
        assert!(!complete(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc"
        ));
        let sized = b"HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\n\r\nabc";
        assert!(complete(sized));
        let r = parse(sized).unwrap();
        assert_eq!((r.status, r.body.as_str()), (404, "abc"));
        assert!(!complete(b"\x15\x03\x03\x00\x02\x02\x50"));
    }
}
