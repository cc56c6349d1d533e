//! [`Msg`]: the unit of data that flows through a pipeline.
//!
//! A message is a payload plus an optional key. Both are [`Bytes`], so a task
//! that splits a payload into parts (a sentence into words) can hand out
//! zero-copy slices of its input instead of allocating new buffers.

use bytes::Bytes;

/// One message: a payload and, for key grouping, an optional key.
///
/// ```
/// use tempest_core::Msg;
///
/// let m = Msg::new("the cow jumped").with_key("cow");
/// assert_eq!(m.payload_str(), Some("the cow jumped"));
/// assert_eq!(m.key().map(|k| &k[..]), Some(&b"cow"[..]));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Msg {
    key: Option<Bytes>,
    payload: Bytes,
}

impl Msg {
    /// A message with this payload and no key.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Msg {
            key: None,
            payload: payload.into(),
        }
    }

    /// A message whose key is its payload: the common case for counting.
    pub fn keyed_by_payload(payload: impl Into<Bytes>) -> Self {
        let payload = payload.into();
        Msg {
            key: Some(payload.clone()),
            payload,
        }
    }

    /// Sets the key used by key-grouped edges: equal keys reach the same task instance.
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// The payload bytes.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The payload as UTF-8, if it is.
    pub fn payload_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.payload).ok()
    }

    /// The key, if the message has one.
    pub fn key(&self) -> Option<&Bytes> {
        self.key.as_ref()
    }

    /// Takes the message apart into its key and payload.
    pub fn into_parts(self) -> (Option<Bytes>, Bytes) {
        (self.key, self.payload)
    }

    /// Builds a message from a key and payload.
    pub fn from_parts(key: Option<Bytes>, payload: Bytes) -> Self {
        Msg { key, payload }
    }

    /// The size of key and payload in bytes.
    pub fn len(&self) -> usize {
        self.payload.len() + self.key.as_ref().map_or(0, Bytes::len)
    }

    /// True when both key and payload are empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<&'static str> for Msg {
    fn from(s: &'static str) -> Self {
        Msg::new(Bytes::from_static(s.as_bytes()))
    }
}

impl From<String> for Msg {
    fn from(s: String) -> Self {
        Msg::new(s)
    }
}

impl From<Vec<u8>> for Msg {
    fn from(v: Vec<u8>) -> Self {
        Msg::new(v)
    }
}

impl From<Bytes> for Msg {
    fn from(b: Bytes) -> Self {
        Msg::new(b)
    }
}

/// The stable hash that key grouping uses to pick an instance.
///
/// It is FNV-1a, fixed here rather than taken from `std`, because every
/// process of a topology (server and workers, across machines and builds) must
/// map a key to the same instance.
pub fn key_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The instance (of `instances`) that owns `key`.
pub fn key_instance(key: &[u8], instances: u32) -> u32 {
    debug_assert!(instances > 0);
    // FNV-1a moves a change in the last bytes of a key into the high bits
    // only through carries, and multiply-shift reads the high bits: mix
    // first (murmur3's finaliser), or `key-1`, `key-2`, ... pile onto one
    // instance.
    let mut h = key_hash(key);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    // Multiply-shift maps the hash onto 0..instances without modulo bias.
    ((u128::from(h) * u128::from(instances)) >> 64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_instance_is_stable_and_in_range() {
        for n in 1..9 {
            for w in ["a", "cow", "moon", "the", ""] {
                let i = key_instance(w.as_bytes(), n);
                assert!(i < n);
                assert_eq!(i, key_instance(w.as_bytes(), n));
            }
        }
        // Pinned values: a change here would re-shard every running key-grouped task.
        assert_eq!(key_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(key_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    /// Regression: similar keys (`key-0`, `key-1`, ...) all landed on one
    /// instance before the hash was mixed.
    #[test]
    fn similar_keys_spread_over_instances() {
        for n in [2u32, 3, 4] {
            let mut seen = vec![0u32; n as usize];
            for i in 0..600 {
                seen[key_instance(format!("key-{i}").as_bytes(), n) as usize] += 1;
            }
            let fair = 600 / n;
            assert!(
                seen.iter().all(|&c| c > fair * 3 / 4),
                "{n} instances: {seen:?}"
            );
        }
    }

    #[test]
    fn keys_spread_over_instances() {
        let mut seen = [0u32; 4];
        for i in 0..4000 {
            seen[key_instance(format!("word{i}").as_bytes(), 4) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 700), "{seen:?}");
    }
}
