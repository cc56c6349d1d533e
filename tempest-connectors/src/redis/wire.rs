//! Stream ids and replies: parsing Redis's raw replies into messages without
//! the generic (hash-map based) reply types, so field order is kept and
//! values move into [`Bytes`] without a copy.

use bytes::Bytes;
use redis::Value;
use tempest_core::{Msg, SourceId};

/// The longest `ms-seq` id: two 20-digit numbers and a dash.
pub(crate) const MAX_ID_LEN: usize = 41;

/// A Redis stream id `ms-seq` as a [`SourceId`]: the milliseconds in the high
/// half, the sequence in the low half.
pub(crate) fn parse_id(id: &[u8]) -> Option<SourceId> {
    let dash = id.iter().position(|&b| b == b'-')?;
    let ms = parse_u64(&id[..dash])?;
    let seq = parse_u64(&id[dash + 1..])?;
    Some(SourceId::from_parts(ms, seq))
}

fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 20 {
        return None;
    }
    let mut n: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    Some(n)
}

/// Writes `id` as the Redis id `ms-seq` into `buf` and returns its length.
pub(crate) fn write_id(id: SourceId, buf: &mut [u8; MAX_ID_LEN]) -> usize {
    let (ms, seq) = id.parts();
    let mut len = write_u64(ms, buf, 0);
    buf[len] = b'-';
    len += 1;
    write_u64(seq, buf, len)
}

/// The Redis id of `id`, as a string (for fields and log lines).
pub(crate) fn id_string(id: SourceId) -> String {
    let (ms, seq) = id.parts();
    format!("{ms}-{seq}")
}

fn write_u64(mut n: u64, buf: &mut [u8; MAX_ID_LEN], at: usize) -> usize {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let d = &digits[i..];
    buf[at..at + d.len()].copy_from_slice(d);
    at + d.len()
}

/// A stream entry as read: its id and its fields in order (`None` for an
/// entry deleted from the stream while pending).
pub(crate) struct Entry {
    pub id: SourceId,
    pub fields: Option<Vec<(Bytes, Bytes)>>,
}

/// A reply that is not the shape the command returns.
#[derive(Debug)]
pub(crate) struct BadReply(pub String);

impl std::fmt::Display for BadReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn bad(what: &str, v: &Value) -> BadReply {
    let mut shown = format!("{v:?}");
    if shown.len() > 200 {
        let mut end = 200;
        while !shown.is_char_boundary(end) {
            end -= 1;
        }
        shown.truncate(end);
        shown.push_str("...");
    }
    BadReply(format!("unexpected {what} reply: {shown}"))
}

/// The entries of an `XREADGROUP` (or `XREAD`) reply for one stream: nil
/// (nothing), `[[stream, entries]]` (RESP2) or `{stream: entries}` (RESP3).
pub(crate) fn read_reply(reply: Value) -> Result<Vec<Entry>, BadReply> {
    let entries = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(streams) => {
            let mut all = Vec::new();
            for s in streams {
                match s {
                    Value::Array(pair) if pair.len() == 2 => {
                        let mut pair = pair.into_iter();
                        let _name = pair.next();
                        all.extend(entries(pair.next().unwrap_or_default())?);
                    }
                    other => return Err(bad("XREADGROUP", &other)),
                }
            }
            return Ok(all);
        }
        Value::Map(streams) => {
            let mut all = Vec::new();
            for (_name, e) in streams {
                all.extend(entries(e)?);
            }
            all
        }
        other => return Err(bad("XREADGROUP", &other)),
    };
    Ok(entries)
}

/// An `XAUTOCLAIM` reply: the next cursor and the claimed entries (ids
/// deleted from the stream are dropped from the pending list by Redis 7 and
/// not returned as entries).
pub(crate) fn autoclaim_reply(reply: Value) -> Result<(Bytes, Vec<Entry>), BadReply> {
    let Value::Array(parts) = reply else {
        return Err(bad("XAUTOCLAIM", &reply));
    };
    if parts.len() < 2 {
        return Err(bad("XAUTOCLAIM", &Value::Array(parts)));
    }
    let mut parts = parts.into_iter();
    let cursor = bytes(parts.next().unwrap_or_default())
        .ok_or_else(|| BadReply("XAUTOCLAIM reply without a cursor".into()))?;
    // Redis 6.2 returns nil for deleted entries; skip them (they are not in
    // the stream any more, so there is nothing to process).
    let claimed = entries(parts.next().unwrap_or_default())?
        .into_iter()
        .filter(|e| e.fields.is_some())
        .collect();
    Ok((cursor, claimed))
}

/// An `XRANGE` reply: the entries.
pub(crate) fn range_reply(reply: Value) -> Result<Vec<Entry>, BadReply> {
    entries(reply)
}

fn entries(v: Value) -> Result<Vec<Entry>, BadReply> {
    let list = match v {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(list) => list,
        other => return Err(bad("stream entries", &other)),
    };
    let mut out = Vec::with_capacity(list.len());
    for e in list {
        match e {
            Value::Array(pair) if pair.len() == 2 => {
                let mut pair = pair.into_iter();
                let id_value = pair.next().unwrap_or_default();
                let id = bytes(id_value.clone())
                    .as_deref()
                    .and_then(parse_id)
                    .ok_or_else(|| bad("stream id", &id_value))?;
                let fields = match pair.next().unwrap_or_default() {
                    Value::Nil => None,
                    Value::Array(flat) => {
                        let mut fields = Vec::with_capacity(flat.len() / 2);
                        let mut it = flat.into_iter();
                        while let (Some(f), Some(v)) = (it.next(), it.next()) {
                            fields.push((to_bytes(f), to_bytes(v)));
                        }
                        Some(fields)
                    }
                    Value::Map(pairs) => Some(
                        pairs
                            .into_iter()
                            .map(|(f, v)| (to_bytes(f), to_bytes(v)))
                            .collect(),
                    ),
                    other => return Err(bad("stream entry fields", &other)),
                };
                out.push(Entry { id, fields });
            }
            // Redis 6.2's XAUTOCLAIM: nil in place of a deleted entry.
            Value::Nil => {}
            other => return Err(bad("stream entry", &other)),
        }
    }
    Ok(out)
}

fn bytes(v: Value) -> Option<Bytes> {
    match v {
        Value::BulkString(b) => Some(Bytes::from(b)),
        Value::SimpleString(s) => Some(Bytes::from(s)),
        Value::Int(i) => Some(Bytes::from(i.to_string())),
        Value::VerbatimString { text, .. } => Some(Bytes::from(text)),
        Value::Okay => Some(Bytes::from_static(b"OK")),
        _ => None,
    }
}

fn to_bytes(v: Value) -> Bytes {
    bytes(v).unwrap_or_default()
}

/// The message of an entry's fields:
///
/// - the payload is the field `payload`, else the field `data`, else the
///   value of the first field that is not `key`;
/// - the key is the field `key`, if there is one.
pub(crate) fn entry_msg(fields: Vec<(Bytes, Bytes)>) -> Msg {
    let mut payload = None;
    let mut data = None;
    let mut first = None;
    let mut key = None;
    for (name, value) in fields {
        match &name[..] {
            b"payload" if payload.is_none() => payload = Some(value),
            b"data" if data.is_none() => data = Some(value),
            b"key" if key.is_none() => key = Some(value),
            b"payload" | b"data" | b"key" => {}
            _ if first.is_none() => first = Some(value),
            _ => {}
        }
    }
    let payload = payload.or(data).or(first).unwrap_or_default();
    Msg::from_parts(key, payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn entry(id: &str, fields: &[&str]) -> Value {
        Value::Array(vec![
            bulk(id),
            Value::Array(fields.iter().map(|f| bulk(f)).collect()),
        ])
    }

    #[test]
    fn ids_round_trip() {
        for (text, ms, seq) in [
            ("0-0", 0, 0),
            ("1-2", 1, 2),
            ("1700000000000-15", 1_700_000_000_000, 15),
            (
                "18446744073709551615-18446744073709551615",
                u64::MAX,
                u64::MAX,
            ),
        ] {
            let id = parse_id(text.as_bytes()).unwrap();
            assert_eq!(id, SourceId::from_parts(ms, seq));
            let mut buf = [0; MAX_ID_LEN];
            let n = write_id(id, &mut buf);
            assert_eq!(&buf[..n], text.as_bytes());
            assert_eq!(id_string(id), text);
        }
        for bad in [
            "",
            "5",
            "-1",
            "1-",
            "a-1",
            "1-2-3",
            "18446744073709551616-0",
            "1 -2",
        ] {
            assert_eq!(parse_id(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn payload_and_key_fields() {
        let f = |pairs: &[(&str, &str)]| -> Vec<(Bytes, Bytes)> {
            pairs
                .iter()
                .map(|(a, b)| (Bytes::from(a.to_string()), Bytes::from(b.to_string())))
                .collect()
        };
        let m = entry_msg(f(&[("key", "k"), ("other", "o"), ("payload", "p")]));
        assert_eq!(
            (m.payload_str(), m.key().map(|k| &k[..])),
            (Some("p"), Some(&b"k"[..]))
        );
        let m = entry_msg(f(&[("data", "d"), ("x", "y")]));
        assert_eq!((m.payload_str(), m.key()), (Some("d"), None));
        let m = entry_msg(f(&[("data", "d"), ("payload", "p")]));
        assert_eq!(m.payload_str(), Some("p"));
        let m = entry_msg(f(&[("key", "k"), ("value", "v"), ("more", "m")]));
        assert_eq!(
            (m.payload_str(), m.key().map(|k| &k[..])),
            (Some("v"), Some(&b"k"[..]))
        );
        let m = entry_msg(f(&[("word", "cow")]));
        assert_eq!((m.payload_str(), m.key()), (Some("cow"), None));
        let m = entry_msg(Vec::new());
        assert!(m.is_empty());
    }

    #[test]
    fn read_replies_in_both_protocols() {
        let entries = || {
            Value::Array(vec![
                entry("1-1", &["payload", "a"]),
                entry("1-2", &["b", "c"]),
            ])
        };
        let resp2 = Value::Array(vec![Value::Array(vec![bulk("s"), entries()])]);
        let resp3 = Value::Map(vec![(bulk("s"), entries())]);
        for reply in [resp2, resp3] {
            let got = read_reply(reply).unwrap();
            assert_eq!(got.len(), 2);
            assert_eq!(got[1].id, SourceId::from_parts(1, 2));
            assert_eq!(
                entry_msg(got[1].fields.clone().unwrap()).payload_str(),
                Some("c")
            );
        }
        assert!(read_reply(Value::Nil).unwrap().is_empty());
        assert!(read_reply(Value::Int(3)).is_err());
        // A deleted entry in a consumer's own history.
        let deleted = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![Value::Array(vec![bulk("2-0"), Value::Nil])]),
        ])]);
        let got = read_reply(deleted).unwrap();
        assert!(got[0].fields.is_none());
    }

    #[test]
    fn autoclaim_replies() {
        let reply = Value::Array(vec![
            bulk("5-0"),
            Value::Array(vec![entry("3-0", &["payload", "x"]), Value::Nil]),
            Value::Array(vec![bulk("4-0")]),
        ]);
        let (cursor, claimed) = autoclaim_reply(reply).unwrap();
        assert_eq!(&cursor[..], b"5-0");
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].id, SourceId::from_parts(3, 0));
        assert!(autoclaim_reply(Value::Array(vec![bulk("0-0")])).is_err());
    }
}
