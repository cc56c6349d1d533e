//! A minimal HTTP/1.1 client for tests: one request per connection, no
//! dependencies, enough to drive the agent's and the director's APIs (and
//! read chunked answers) without pulling a client library into every test.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// An answer: the status, the raw header block and the body as text.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The status line and headers, as received.
    pub head: String,
    /// The body (de-chunked), as text.
    pub body: String,
}

impl Response {
    /// The body as JSON; panics naming the status and body when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }

    /// A header's value (the first one of that name, case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Sends one request with the given extra headers and returns the answer
/// (waiting at most 30 s for it).
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    request_within(addr, method, path, headers, body, Duration::from_secs(30))
}

/// [`request`] waiting at most `timeout` for the answer and 5 s for the
/// connection, so a peer that is stopped or cut off fails the call quickly
/// instead of hanging a test.
pub fn request_within(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<Response> {
    let mut s = match addr.parse::<std::net::SocketAddr>() {
        Ok(sock) => TcpStream::connect_timeout(&sock, Duration::from_secs(5))?,
        Err(_) => TcpStream::connect(addr)?,
    };
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    // The address as Host, unless the headers give one.
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
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

/// Sends one request, with `Authorization: Bearer TOKEN` when a token is
/// given and a JSON content type when the body looks like a JSON object;
/// panics naming the request when the connection fails.
pub fn send(addr: &str, method: &str, path: &str, token: Option<&str>, body: &[u8]) -> Response {
    try_send(addr, method, path, token, body)
        .unwrap_or_else(|e| panic!("{method} {addr}{path}: {e}"))
}

/// [`send`] without the panic.
pub fn try_send(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> std::io::Result<Response> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = Vec::new();
    if body.first() == Some(&b'{') {
        headers.push(("Content-Type", "application/json"));
    }
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    request(addr, method, path, &headers, body)
}

/// `GET path`, panicking when the connection fails.
pub fn get(addr: &str, path: &str) -> Response {
    send(addr, "GET", path, None, b"")
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
    fn dechunks_and_reads_headers() {
        assert_eq!(dechunk(b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"), b"abcde");
        let r = Response {
            status: 200,
            head: "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nX-A: b".into(),
            body: String::new(),
        };
        assert_eq!(r.header("content-type"), Some("text/html"));
        assert_eq!(r.header("x-a"), Some("b"));
        assert_eq!(r.header("missing"), None);
    }
}
