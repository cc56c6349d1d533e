//! Redis: [`RedisStreamSource`], a consumer group on a Redis stream, and
//! [`RedisOutput`], buffered writes from a task.
//!
//! Several topology servers that consume the same stream with the same
//! group split its entries between them: Redis hands each entry to one
//! consumer, and entries a crashed consumer left pending are taken over by
//! the others after `claim_idle_ms`. A topology server launched by an agent
//! is named after its slot in the deployment
//! ([`tempest_core::source::SOURCE_CONSUMER_ENV`]), so its replacement is the
//! same consumer and resumes its predecessor's entries at once.
//!
//! In `Topology.toml` (after [`crate::register`]):
//!
//! ```toml
//! [source]
//! kind = "redis"
//! [source.config]
//! url = "redis://127.0.0.1:6379"
//! stream = "sentences"
//! group = "wordcount"
//! ```
//!
//! See [`RedisSourceConfig`] for every key.
//!
//! # Draining a stream fast
//!
//! A poll reads at most `min(batch_size, the topology's batch_size,
//! max_pending - in flight)` entries, so the topology's `batch_size`
//! (default 256) caps this source's `batch_size` (default 512): raise both.
//! Each read and each ack is one round trip and (with an append-only file)
//! one write to it, so small reads are slow: on two cores with the server on
//! the same machine (`appendfsync everysec`, 100-byte entries), 64 entries
//! per read drained about 80,000 entries/s, 512 and more about 150,000 to
//! 200,000 entries/s, flat from there. `batch_size = 1024` to `2048` for
//! both, with `max_pending` ten batches or more (10,000 to 20,000), is the
//! fastest setting found (`tests/redis_drain.rs` measures it).

mod output;
mod source;
mod wire;

pub use output::RedisOutput;
pub use source::{RedisSourceConfig, RedisStats, RedisStreamSource, MAX_BATCH_SIZE, MAX_BLOCK_MS};
/// Re-exported from `tempest-core`, where it is defined for the agent too.
pub use tempest_core::source::SOURCE_CONSUMER_ENV;

use redis::RedisError;

/// True when trying again (on a new connection, after a back-off) can help:
/// the connection failed or dropped, a reply timed out, or the server is
/// loading its data or fails over. A missing group (`NOGROUP`) is retryable
/// when the reconnect re-creates it.
fn is_retryable(e: &RedisError, group_recreated: bool) -> bool {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        return true;
    }
    match e.code() {
        Some("LOADING" | "BUSY" | "TRYAGAIN" | "MASTERDOWN" | "CLUSTERDOWN" | "READONLY")
        | Some("NOREPLICAS") => true,
        Some("NOGROUP") => group_recreated,
        _ => matches!(e.kind(), redis::ErrorKind::Parse),
    }
}

/// `url` with its password (if any) hidden, for messages and logs.
fn shown_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or_default();
            let hidden = if rest[..at].contains(':') {
                format!("{user}:***")
            } else {
                "***".to_owned()
            };
            format!("{scheme}://{hidden}@{}", &rest[at + 1..])
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            shown_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            shown_url("redis://user:secret@host:6379/2"),
            "redis://user:***@host:6379/2"
        );
        assert_eq!(shown_url("redis://:secret@host"), "redis://:***@host");
        assert_eq!(shown_url("redis://token@host"), "redis://***@host");
        assert_eq!(shown_url("not a url"), "not a url");
    }
}
