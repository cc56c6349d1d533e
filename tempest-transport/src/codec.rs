//! Framing: every frame is a 4-byte big-endian body length, then the body,
//! one [`Frame`] in [postcard] encoding.
//!
//! [`FrameCodec`] frames for [`tokio_util::codec::Framed`]. It enforces a
//! maximum body size both ways, refusing an oversized length as soon as it is
//! read (before buffering anything), and never truncates a frame. Batches of
//! messages, the data plane's bulk, take a fast path that produces the same
//! bytes as postcard would: [`FrameCodec::encode_batch`] writes straight from
//! the deliveries, and decoding hands out keys and payloads as slices of the
//! received frame, without copying them.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use tempest_core::{Delivery, Msg, RootId};

use crate::wire::{
    Ack, Deliveries, ErrorCode, Fail, Fixed, Frame, Report, SlotRef, BATCH_TAG, DEFAULT_MAX_FRAME,
    MAGIC, PROTOCOL_VERSION, REPORT_TAG,
};

/// Bytes of the length prefix in front of every frame body.
const LEN_PREFIX: usize = 4;

/// The largest frame an accepted connection may send before its handshake
/// is accepted: a `Hello` is a few hundred bytes, and nobody unauthenticated
/// gets to make a daemon reserve more.
pub const PRE_AUTH_MAX_FRAME: usize = 16 * 1024;

/// The fewest bytes one delivery takes in a batch: root, edge, key tag,
/// empty payload.
const MIN_DELIVERY: usize = 8 + 8 + 1 + 1;

/// What can go wrong reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// A frame body over the maximum frame size, read or written.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// The body's length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// A frame body that is not a valid frame.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The stream ended inside a frame.
    #[error("connection closed in the middle of a frame ({0} bytes buffered)")]
    Truncated(usize),
    /// The transport failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A frame could not be encoded.
    #[error("cannot encode frame: {0}")]
    Encode(String),
    /// A `Hello` of another protocol version.
    #[error("the peer speaks protocol version {theirs}, this side speaks version {ours}")]
    Version {
        /// The peer's version.
        theirs: u16,
        /// This build's, [`PROTOCOL_VERSION`].
        ours: u16,
    },
    /// A `Hello` whose magic is not [`MAGIC`]: not a Tempest peer.
    #[error("bad magic {0:#010x} (expected {MAGIC:#010x}): not a Tempest peer")]
    BadMagic(u32),
}

impl WireError {
    /// The [`ErrorCode`] to send the peer in a [`Frame::Error`].
    ///
    /// `Truncated`, `Io` and `Encode` map to `Malformed`; after them the
    /// connection is usually beyond sending anything.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            WireError::Version { .. } => ErrorCode::VersionMismatch,
            WireError::BadMagic(_) => ErrorCode::BadMagic,
            WireError::Malformed(_)
            | WireError::Truncated(_)
            | WireError::Io(_)
            | WireError::Encode(_) => ErrorCode::Malformed,
        }
    }

    /// The `Error` frame to send the peer for this error, before closing.
    pub fn frame(&self) -> Frame {
        Frame::error(self.code(), self.to_string())
    }
}

/// Checks a `Hello`'s magic and version against this build's.
pub fn check_magic_version(magic: u32, version: u16) -> Result<(), WireError> {
    if magic != MAGIC {
        Err(WireError::BadMagic(magic))
    } else if version != PROTOCOL_VERSION {
        Err(WireError::Version {
            theirs: version,
            ours: PROTOCOL_VERSION,
        })
    } else {
        Ok(())
    }
}

/// Reads only the magic and version at the front of a `Hello` frame body, so
/// another version's `Hello` whose later fields differ still yields a clear
/// version mismatch. Returns `(magic, version)`, or `None` when `body` is not
/// a `Hello` (its variant tag is not 0) or too short.
pub fn peek_hello_version(body: &[u8]) -> Option<(u32, u16)> {
    // Variant 0 is the single varint byte 0.
    let rest = body.strip_prefix(&[0u8])?;
    let ((magic, version), _) = postcard::take_from_bytes::<(u32, u16)>(rest).ok()?;
    Some((magic, version))
}

/// The bytes a delivery takes in a batch body.
pub fn delivery_size(d: &Delivery) -> usize {
    let payload = d.msg.payload().len();
    let key = match d.msg.key() {
        None => 1,
        Some(k) if k == d.msg.payload() => 1,
        Some(k) => 1 + varint_len(k.len() as u64) + k.len(),
    };
    16 + key + varint_len(payload as u64) + payload
}

/// Length-prefixed frames; see the module docs.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct FrameCodec {
    max_frame: usize,
}

impl FrameCodec {
    /// A codec with this maximum body size, in bytes. Values over
    /// `u32::MAX` are clamped to it: the length prefix cannot say more.
    pub fn new(max_frame: usize) -> Self {
        FrameCodec {
            max_frame: max_frame.min(u32::MAX as usize),
        }
    }

    /// The maximum body size, in bytes.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Changes the maximum body size (clamped like [`FrameCodec::new`]): a
    /// connection reads its `Hello` under [`PRE_AUTH_MAX_FRAME`] and gets
    /// its full limit once the handshake accepted it.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame.min(u32::MAX as usize);
    }

    /// Appends `frame`, length prefix and body, to `dst`: what
    /// [`Encoder::encode`] does, without taking the frame.
    ///
    /// On error `dst` is left as it was.
    pub fn encode_ref(&self, frame: &Frame, dst: &mut BytesMut) -> Result<(), WireError> {
        match frame {
            Frame::Batch(Deliveries(ds)) => return self.encode_batch(ds.iter(), dst),
            Frame::Report(r) => return self.encode_report(r, dst),
            _ => {}
        }
        let start = dst.len();
        dst.put_u32(0); // patched below
        let flavor = CappedBytesMut {
            buf: dst,
            written: 0,
            max: self.max_frame,
        };
        let len = match postcard::serialize_with_flavor(frame, flavor) {
            Ok(len) => len,
            Err(e) => {
                dst.truncate(start);
                return Err(match e {
                    postcard::Error::SerializeBufferFull => WireError::FrameTooLarge {
                        len: postcard::serialize_with_flavor(frame, Counter::default())
                            .unwrap_or(usize::MAX),
                        max: self.max_frame,
                    },
                    e => WireError::Encode(e.to_string()),
                });
            }
        };
        patch_len(dst, start, len);
        Ok(())
    }

    /// Appends a [`Frame::Batch`] of `deliveries` to `dst`, writing straight
    /// from them. On error (the batch is over the maximum) `dst` is left as
    /// it was.
    pub fn encode_batch<'a>(
        &self,
        deliveries: impl ExactSizeIterator<Item = &'a Delivery> + Clone,
        dst: &mut BytesMut,
    ) -> Result<(), WireError> {
        let n = deliveries.len();
        let len = 1 + varint_len(n as u64) + deliveries.clone().map(delivery_size).sum::<usize>();
        if len > self.max_frame {
            return Err(WireError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        dst.reserve(LEN_PREFIX + len);
        let start = dst.len();
        dst.put_u32(len as u32);
        dst.put_u8(BATCH_TAG);
        put_varint(dst, n as u64);
        for d in deliveries {
            dst.put_u64_le(d.root.0);
            dst.put_u64_le(d.edge);
            let payload = d.msg.payload();
            match d.msg.key() {
                None => dst.put_u8(0),
                Some(k) if k == payload => dst.put_u8(2),
                Some(k) => {
                    dst.put_u8(1);
                    put_varint(dst, k.len() as u64);
                    dst.extend_from_slice(k);
                }
            }
            put_varint(dst, payload.len() as u64);
            dst.extend_from_slice(payload);
        }
        debug_assert_eq!(dst.len() - start, LEN_PREFIX + len);
        Ok(())
    }
}

impl FrameCodec {
    /// Appends a [`Frame::Report`] to `dst`, field by field as postcard
    /// would. On error (over the maximum) `dst` is left as it was.
    pub fn encode_report(&self, r: &Report, dst: &mut BytesMut) -> Result<(), WireError> {
        let len = report_size(r);
        if len > self.max_frame {
            return Err(WireError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        dst.reserve(LEN_PREFIX + len);
        dst.put_u32(len as u32);
        dst.put_u8(REPORT_TAG);
        put_varint(dst, r.dests.len() as u64);
        for d in &r.dests {
            put_varint(dst, u64::from(d.task));
            put_varint(dst, u64::from(d.instance));
            put_varint(dst, u64::from(d.incarnation));
        }
        put_varint(dst, r.acks.len() as u64);
        for a in &r.acks {
            dst.put_u64_le(a.root.0);
            dst.put_u64_le(a.xor.0);
            put_varint(dst, a.slots);
        }
        put_varint(dst, r.fails.len() as u64);
        for f in &r.fails {
            dst.put_u64_le(f.root.0);
            put_varint(dst, f.message.len() as u64);
            dst.extend_from_slice(f.message.as_bytes());
            dst.put_u8(u8::from(f.retryable));
        }
        Ok(())
    }
}

/// At least [`report_size`], in O(failures): every varint at its widest.
pub fn report_size_bound(r: &Report) -> usize {
    1 + 10
        + r.dests.len() * 15
        + 10
        + r.acks.len() * (16 + 10)
        + 10
        + r.fails
            .iter()
            .map(|f| 8 + 10 + f.message.len() + 1)
            .sum::<usize>()
}

/// The body size of a [`Frame::Report`] of `r`, in bytes.
pub fn report_size(r: &Report) -> usize {
    let dest_len = |d: &SlotRef| {
        varint_len(u64::from(d.task))
            + varint_len(u64::from(d.instance))
            + varint_len(u64::from(d.incarnation))
    };
    1 + varint_len(r.dests.len() as u64)
        + r.dests.iter().map(dest_len).sum::<usize>()
        + varint_len(r.acks.len() as u64)
        + r.acks
            .iter()
            .map(|a| 16 + varint_len(a.slots))
            .sum::<usize>()
        + varint_len(r.fails.len() as u64)
        + r.fails
            .iter()
            .map(|f| 8 + varint_len(f.message.len() as u64) + f.message.len() + 1)
            .sum::<usize>()
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_FRAME)
    }
}

fn patch_len(dst: &mut BytesMut, start: usize, len: usize) {
    // len <= max_frame <= u32::MAX, checked by the callers.
    dst[start..start + LEN_PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
}

fn decode_body(body: Bytes) -> Result<Frame, WireError> {
    match body.first() {
        Some(&BATCH_TAG) => return decode_batch(body).map(|ds| Frame::Batch(Deliveries(ds))),
        Some(&REPORT_TAG) => return decode_report(&body).map(Frame::Report),
        _ => {}
    }
    let err = match postcard::take_from_bytes::<Frame>(&body) {
        Ok((frame, [])) => return Ok(frame),
        Ok((frame, rest)) => format!(
            "{} frame followed by {} unexpected bytes",
            frame.name(),
            rest.len()
        ),
        Err(e) => e.to_string(),
    };
    // A Hello this build cannot parse may come from another version: say so
    // rather than "malformed".
    if let Some((magic, version)) = peek_hello_version(&body) {
        check_magic_version(magic, version)?;
    }
    Err(WireError::Malformed(format!(
        "{err} ({} byte body)",
        body.len()
    )))
}

/// Reads a batch body (after its tag) as slices of `body`.
fn decode_batch(body: Bytes) -> Result<Vec<Delivery>, WireError> {
    let mut r = Reader { buf: &body, at: 1 };
    let n = r.varint()?;
    // Each delivery takes at least MIN_DELIVERY bytes: a count the body
    // cannot hold is refused before anything is allocated for it.
    if n > (body.len() / MIN_DELIVERY) as u64 {
        return Err(malformed(format!(
            "batch claims {n} messages in {} bytes",
            body.len()
        )));
    }
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let root = RootId(r.fixed()?);
        let edge = r.fixed()?;
        let key = match r.byte()? {
            0 => KeyOf::None,
            1 => KeyOf::Bytes(r.bytes()?),
            2 => KeyOf::Payload,
            t => return Err(malformed(format!("bad key tag {t}"))),
        };
        let (a, b) = r.bytes()?;
        let payload = body.slice(a..b);
        let key = match key {
            KeyOf::None => None,
            KeyOf::Bytes((a, b)) => Some(body.slice(a..b)),
            KeyOf::Payload => Some(payload.clone()),
        };
        out.push(Delivery {
            root,
            edge,
            msg: Msg::from_parts(key, payload),
        });
    }
    if r.at != body.len() {
        return Err(malformed(format!(
            "Batch frame followed by {} unexpected bytes",
            body.len() - r.at
        )));
    }
    Ok(out)
}

/// Reads a report body (after its tag), refusing counts its body cannot
/// hold before allocating for them.
fn decode_report(body: &[u8]) -> Result<Report, WireError> {
    let mut r = Reader { buf: body, at: 1 };
    let count = |r: &mut Reader<'_>, min: usize, what: &str| -> Result<usize, WireError> {
        let n = r.varint()?;
        let left = (body.len() - r.at) / min;
        if n > left as u64 {
            return Err(malformed(format!(
                "a report claims {n} {what} in {} bytes",
                body.len()
            )));
        }
        Ok(n as usize)
    };
    let n = count(&mut r, 3, "destinations")?;
    let mut dests = Vec::with_capacity(n);
    for _ in 0..n {
        dests.push(SlotRef {
            task: r.varint32()?,
            instance: r.varint32()?,
            incarnation: r.varint32()?,
        });
    }
    let n = count(&mut r, 17, "acks")?;
    let mut acks = Vec::with_capacity(n);
    for _ in 0..n {
        acks.push(Ack {
            root: Fixed(r.fixed()?),
            xor: Fixed(r.fixed()?),
            slots: r.varint()?,
        });
    }
    let n = count(&mut r, 10, "failures")?;
    let mut fails = Vec::with_capacity(n);
    for _ in 0..n {
        let root = Fixed(r.fixed()?);
        let (a, b) = r.bytes()?;
        let message = std::str::from_utf8(&body[a..b])
            .map_err(|_| malformed("a failure's message is not UTF-8".into()))?
            .to_owned();
        let retryable = match r.byte()? {
            0 => false,
            1 => true,
            b => return Err(malformed(format!("bad bool {b}"))),
        };
        fails.push(Fail {
            root,
            message,
            retryable,
        });
    }
    if r.at != body.len() {
        return Err(malformed(format!(
            "Report frame followed by {} unexpected bytes",
            body.len() - r.at
        )));
    }
    Ok(Report { dests, acks, fails })
}

enum KeyOf {
    None,
    Bytes((usize, usize)),
    Payload,
}

fn malformed(why: String) -> WireError {
    WireError::Malformed(why)
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, WireError> {
        let b = *self
            .buf
            .get(self.at)
            .ok_or_else(|| malformed("frame ends early".into()))?;
        self.at += 1;
        Ok(b)
    }

    fn fixed(&mut self) -> Result<u64, WireError> {
        let end = self.at + 8;
        let bytes = self
            .buf
            .get(self.at..end)
            .ok_or_else(|| malformed("frame ends early".into()))?;
        self.at = end;
        let mut b = [0u8; 8];
        b.copy_from_slice(bytes);
        Ok(u64::from_le_bytes(b))
    }

    fn varint(&mut self) -> Result<u64, WireError> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.byte()?;
            let part = u64::from(b & 0x7f);
            if i == 9 && b > 1 {
                return Err(malformed("varint overflows 64 bits".into()));
            }
            v |= part << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(malformed("varint longer than 10 bytes".into()))
    }

    /// A `u32` varint as postcard reads it: at most 5 bytes, no overflow.
    fn varint32(&mut self) -> Result<u32, WireError> {
        let mut v = 0u32;
        for i in 0..5 {
            let b = self.byte()?;
            if i == 4 && b > 0x0f {
                return Err(malformed("varint overflows 32 bits".into()));
            }
            v |= u32::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(malformed("varint longer than 5 bytes".into()))
    }

    /// A length-prefixed byte string: its range in the buffer.
    fn bytes(&mut self) -> Result<(usize, usize), WireError> {
        let len = self.varint()?;
        let left = (self.buf.len() - self.at) as u64;
        if len > left {
            return Err(malformed(format!(
                "a field of {len} bytes with {left} left in the frame"
            )));
        }
        let a = self.at;
        self.at += len as usize;
        Ok((a, self.at))
    }
}

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn put_varint(dst: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        dst.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    dst.put_u8(v as u8);
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        let Some(prefix) = src.get(..LEN_PREFIX) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        // u32 -> usize is lossless on every platform Tempest runs on; saturate
        // anyway so a 16-bit target would refuse rather than wrap.
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > self.max_frame {
            return Err(WireError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        let total = LEN_PREFIX + len;
        if src.len() < total {
            // Bounded by max_frame, checked above.
            src.reserve(total - src.len());
            return Ok(None);
        }
        src.advance(LEN_PREFIX);
        let body = src.split_to(len).freeze();
        decode_body(body).map(Some)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if buf.is_empty() => Ok(None),
            None => Err(WireError::Truncated(buf.len())),
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = WireError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), WireError> {
        self.encode_ref(&frame, dst)
    }
}

/// A postcard flavor that appends to a `BytesMut` and fails once the body
/// would pass `max` bytes, so an oversized frame is never buffered whole.
struct CappedBytesMut<'a> {
    buf: &'a mut BytesMut,
    written: usize,
    max: usize,
}

impl CappedBytesMut<'_> {
    fn room(&mut self, n: usize) -> postcard::Result<()> {
        match self.written.checked_add(n) {
            Some(w) if w <= self.max => {
                self.written = w;
                Ok(())
            }
            _ => Err(postcard::Error::SerializeBufferFull),
        }
    }
}

impl postcard::ser_flavors::Flavor for CappedBytesMut<'_> {
    type Output = usize;

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.room(data.len())?;
        self.buf.extend_from_slice(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.room(1)?;
        self.buf.put_u8(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<usize> {
        Ok(self.written)
    }
}

/// A postcard flavor that only counts bytes.
#[derive(Default)]
pub(crate) struct Counter(usize);

impl postcard::ser_flavors::Flavor for Counter {
    type Output = usize;

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0 = self.0.saturating_add(data.len());
        Ok(())
    }

    fn try_push(&mut self, _data: u8) -> postcard::Result<()> {
        self.0 = self.0.saturating_add(1);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<usize> {
        Ok(self.0)
    }
}

/// The body size of `frame` in bytes (as postcard encodes it).
pub fn frame_size<T: serde::Serialize>(frame: &T) -> usize {
    postcard::serialize_with_flavor(frame, Counter::default()).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn report() -> impl Strategy<Value = Report> {
        let dest = any::<(u32, u32, u32)>().prop_map(|(task, instance, incarnation)| SlotRef {
            task,
            instance,
            incarnation,
        });
        let ack = any::<(u64, u64, u64)>().prop_map(|(r, x, slots)| Ack {
            root: Fixed(r),
            xor: Fixed(x),
            slots,
        });
        let fail =
            (any::<u64>(), ".{0,40}", any::<bool>()).prop_map(|(r, message, retryable)| Fail {
                root: Fixed(r),
                message,
                retryable,
            });
        (
            proptest::collection::vec(dest, 0..5),
            proptest::collection::vec(ack, 0..40),
            proptest::collection::vec(fail, 0..4),
        )
            .prop_map(|(dests, acks, fails)| Report { dests, acks, fails })
    }

    proptest! {
        /// The report fast path writes exactly postcard's bytes, and reads
        /// them back.
        #[test]
        fn report_fast_path_is_postcard(r in report()) {
            let frame = Frame::Report(r);
            let mut fast = BytesMut::new();
            FrameCodec::default().encode_ref(&frame, &mut fast).unwrap();
            let slow = postcard::to_stdvec(&frame).unwrap();
            prop_assert_eq!(&fast[4..], &slow[..]);
            let mut codec = FrameCodec::default();
            prop_assert_eq!(codec.decode(&mut fast).unwrap(), Some(frame));
        }

        /// Truncating a report anywhere is malformed, never a panic.
        #[test]
        fn cut_reports_are_malformed(r in report(), cut in any::<proptest::sample::Index>()) {
            let body = postcard::to_stdvec(&Frame::Report(r)).unwrap();
            let at = cut.index(body.len()).max(1);
            prop_assume!(at < body.len());
            prop_assert!(matches!(decode_report(&body[..at]), Err(WireError::Malformed(_))));
        }
    }

    #[test]
    fn a_report_claiming_more_than_its_body_holds_is_refused() {
        // Tag, no dests, then a claim of 2^40 acks in a few bytes.
        let body = [REPORT_TAG, 0, 0x80, 0x80, 0x80, 0x80, 0x80, 0x20];
        match decode_report(&body) {
            Err(WireError::Malformed(m)) => assert!(m.contains("acks"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
