//! The director's calls to agents' APIs: metrics scrapes and log tails,
//! over reqwest (as the agents call the director), with the agent token,
//! a timeout and a bound on how much of an answer is read.
//!
//! An agent's address comes from its heartbeat and is checked there
//! ([`check_address`]) to be `host:port`, so it cannot smuggle a path, a
//! user or another scheme into the URLs built here. Redirects are not
//! followed: an agent's answer is its own.

use std::time::Duration;

use tempest_control::Secret;

/// How long connecting to an agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a call to an agent failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// It could not be reached, or the connection failed mid-answer.
    #[error("{0}")]
    Transport(String),
    /// It did not answer within the time allowed.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Its answer is larger than the call reads.
    #[error("its answer is larger than {0} bytes")]
    TooLarge(usize),
    /// The client could not be built.
    #[error("building the HTTP client: {0}")]
    Client(String),
}

/// An agent's answer.
#[derive(Debug)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The body, whole.
    pub body: Vec<u8>,
}

/// The client of the agents' APIs.
#[derive(Clone, Debug)]
pub struct AgentClient {
    http: reqwest::Client,
    token: Option<Secret>,
    scheme: &'static str,
}

impl AgentClient {
    /// A client sending `token` (the agent token) with every call; with
    /// `identity`, over https: the agents are checked against the cluster
    /// CA and shown the director's certificate (mutual TLS).
    pub fn new(
        token: Option<Secret>,
        identity: Option<&tempest_control::tls::Identity>,
    ) -> Result<AgentClient, CallError> {
        let tls = match identity {
            Some(id) => id.client_config(),
            None => tempest_control::tls::client_trusting_nothing(),
        }
        .map_err(|e| CallError::Client(e.to_string()))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tempest-director/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CallError::Client(chain(&e)))?;
        Ok(AgentClient {
            http,
            token,
            scheme: if identity.is_some() { "https" } else { "http" },
        })
    }

    /// `GET http(s)://{addr}{path}`, reading at most `limit` bytes of the
    /// answer, all within `timeout`.
    pub async fn get(
        &self,
        addr: &str,
        path: &str,
        limit: usize,
        timeout: Duration,
    ) -> Result<Answer, CallError> {
        let url = format!("{}://{addr}{path}", self.scheme);
        let mut req = self.http.get(&url).timeout(timeout);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t.expose());
        }
        let read = async {
            let mut res = req.send().await.map_err(|e| transport(e, timeout))?;
            let status = res.status().as_u16();
            if res.content_length().is_some_and(|n| n > limit as u64) {
                return Err(CallError::TooLarge(limit));
            }
            let mut body = Vec::new();
            while let Some(chunk) = res.chunk().await.map_err(|e| transport(e, timeout))? {
                if body.len() + chunk.len() > limit {
                    return Err(CallError::TooLarge(limit));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Answer { status, body })
        };
        tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| CallError::Timeout(timeout))?
    }
}

fn transport(e: reqwest::Error, timeout: Duration) -> CallError {
    if e.is_timeout() {
        CallError::Timeout(timeout)
    } else {
        CallError::Transport(chain(&e))
    }
}

/// An error with its sources, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

/// Checks an agent's API address from its heartbeat: `HOST:PORT`, the
/// host a name (letters, digits, `-`, `_`, `.`), an IPv4 address or an
/// IPv6 address in brackets, the port from 1 to 65535.
pub fn check_address(addr: &str) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "the agent address `{addr}` is not HOST:PORT: {why}"
        ))
    };
    if addr.len() > 300 {
        return bad("it is too long");
    }
    let port = if let Some(rest) = addr.strip_prefix('[') {
        match rest.split_once("]:") {
            Some((v6, port)) => {
                if v6.parse::<std::net::Ipv6Addr>().is_err() {
                    return bad("the bracketed host is not an IPv6 address");
                }
                port
            }
            None => return bad("an IPv6 address needs brackets and a port, as [::1]:7400"),
        }
    } else {
        match addr.rsplit_once(':') {
            Some((host, port)) => {
                let name_ok = !host.is_empty()
                    && host.len() <= 253
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
                    && !host.starts_with(['-', '.']);
                if !name_ok {
                    return bad("the host must be a name or an IP address");
                }
                port
            }
            None => return bad("there is no port"),
        }
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => Ok(()),
        _ => bad("the port must be a number from 1 to 65535"),
    }
}

/// Percent-encodes a query or path value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_addresses_are_host_and_port() {
        for ok in [
            "agent1:7400",
            "10.0.0.1:7400",
            "[::1]:7400",
            "node-1.example.internal:1",
            "agent_2:65535",
        ] {
            assert_eq!(check_address(ok), Ok(()), "{ok}");
        }
        for bad in [
            "agent1",
            "agent1:0",
            "agent1:65536",
            "agent1:+80",
            "a b:7400",
            "evil.example/x?:7400",
            "user@host:7400",
            "host:7400/path",
            "::1:7400",
            "[::1]",
            "[nope]:7400",
            ":7400",
            "-x:1",
            "",
        ] {
            assert!(check_address(bad).is_err(), "{bad}");
        }
        assert_eq!(encode("wc/split/0"), "wc/split/0");
        assert_eq!(encode("a b"), "a%20b");
    }
}
