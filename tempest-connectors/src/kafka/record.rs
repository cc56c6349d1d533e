//! [`KafkaRecord`]: a Kafka record with its metadata, carried in a root's
//! payload when the source's `format = "record"`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The first bytes of an encoded record (and its format version).
const MAGIC: &[u8; 4] = b"TKR1";

/// A Kafka record as a task sees it with `format = "record"`: where it came
/// from, its timestamp, its headers and its value. (A [`tempest_core::Msg`]
/// has only a key and a payload, so the metadata travels in the payload;
/// the record's key is the message key in both formats.)
///
/// ```
/// use tempest_connectors::kafka::KafkaRecord;
///
/// let record = KafkaRecord {
///     topic: "orders".into(),
///     partition: 2,
///     offset: 41,
///     timestamp: Some(1_700_000_000_000),
///     headers: vec![("trace".into(), Some("abc".into()))],
///     value: "the order".into(),
/// };
/// let payload = record.encode();
/// assert_eq!(KafkaRecord::decode(&payload).unwrap(), record);
/// assert_eq!(KafkaRecord::decode(&payload).unwrap().header("trace"), Some(&b"abc"[..]));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KafkaRecord {
    /// The topic it was read from.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset in the partition.
    pub offset: i64,
    /// Its timestamp (create or log-append time) in milliseconds since the
    /// Unix epoch, when the broker gave one.
    pub timestamp: Option<i64>,
    /// Its headers in order; a header may have no value.
    pub headers: Vec<(String, Option<Bytes>)>,
    /// Its value (empty for a tombstone).
    pub value: Bytes,
}

/// Why [`KafkaRecord::decode`] could not read a payload.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a Kafka record payload (is the source's format = \"record\"?): {0}")]
pub struct BadRecord(&'static str);

impl KafkaRecord {
    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    /// Encodes the record as a root's payload.
    pub fn encode(&self) -> Bytes {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| 8 + n.len() + v.as_ref().map_or(0, Bytes::len))
            .sum();
        let mut b = BytesMut::with_capacity(32 + self.topic.len() + headers + self.value.len());
        b.put_slice(MAGIC);
        b.put_u16(self.topic.len() as u16);
        b.put_slice(self.topic.as_bytes());
        b.put_i32(self.partition);
        b.put_i64(self.offset);
        b.put_i64(self.timestamp.unwrap_or(i64::MIN));
        b.put_u32(self.headers.len() as u32);
        for (name, value) in &self.headers {
            b.put_u32(name.len() as u32);
            b.put_slice(name.as_bytes());
            match value {
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.put_slice(v);
                }
                None => b.put_i32(-1),
            }
        }
        b.put_slice(&self.value);
        b.freeze()
    }

    /// Reads a payload made by [`KafkaRecord::encode`]; the value and the
    /// header values are slices of `payload` (no copy).
    pub fn decode(payload: &Bytes) -> Result<KafkaRecord, BadRecord> {
        let mut b = payload.clone();
        let need = |b: &Bytes, n: usize| {
            if b.remaining() < n {
                Err(BadRecord("too short"))
            } else {
                Ok(())
            }
        };
        need(&b, 4)?;
        if &b[..4] != MAGIC {
            return Err(BadRecord("no TKR1 header"));
        }
        b.advance(4);
        need(&b, 2)?;
        let n = b.get_u16() as usize;
        need(&b, n)?;
        let topic = String::from_utf8(b.split_to(n).to_vec())
            .map_err(|_| BadRecord("topic is not UTF-8"))?;
        need(&b, 4 + 8 + 8 + 4)?;
        let partition = b.get_i32();
        let offset = b.get_i64();
        let timestamp = Some(b.get_i64()).filter(|&t| t != i64::MIN);
        let count = b.get_u32() as usize;
        let mut headers = Vec::with_capacity(count.min(1024));
        for _ in 0..count {
            need(&b, 4)?;
            let n = b.get_u32() as usize;
            need(&b, n)?;
            let name = String::from_utf8(b.split_to(n).to_vec())
                .map_err(|_| BadRecord("header name is not UTF-8"))?;
            need(&b, 4)?;
            let len = b.get_i32();
            let value = if len < 0 {
                None
            } else {
                need(&b, len as usize)?;
                Some(b.split_to(len as usize))
            };
            headers.push((name, value));
        }
        Ok(KafkaRecord {
            topic,
            partition,
            offset,
            timestamp,
            headers,
            value: b,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_garbage() {
        let r = KafkaRecord {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            timestamp: None,
            headers: vec![("a".into(), None), ("b".into(), Some(Bytes::new()))],
            value: Bytes::new(),
        };
        assert_eq!(KafkaRecord::decode(&r.encode()).unwrap(), r);
        assert_eq!(r.header("a"), None);
        assert_eq!(r.header("b"), Some(&b""[..]));
        assert!(KafkaRecord::decode(&Bytes::from_static(b"hello")).is_err());
        let enc = r.encode();
        for cut in 0..enc.len() - 1 {
            // Every truncation that cuts into the headers is refused.
            if cut < enc.len() {
                let _ = KafkaRecord::decode(&enc.slice(..cut));
            }
        }
        assert!(KafkaRecord::decode(&enc.slice(..10)).is_err());
    }
}
