//! Hostile package archives, written byte by byte, and the daemon's memory
//! read from `/proc`: shared by the director's and the agent's archive
//! tests (`tests/archives.rs` of each), neither of which has a tar or gzip
//! crate among its dependencies.
//!
//! Tar headers are GNU headers of any type and any claimed size. Gzip is
//! one fixed-Huffman deflate block whose runs of zeros are back-references
//! of 258 bytes, 13 bits each: as an attacker sends them, so 1 MiB of
//! zeros costs about 6.5 KiB on the wire.

use tempest_control::package::{sha256_hex, MANIFEST_FILE};
use tempest_control::Manifest;

/// One piece of an archive's uncompressed bytes.
enum Piece {
    Bytes(Vec<u8>),
    Zeros(u64),
}

/// A tar stream being written.
#[derive(Default)]
pub struct Tar {
    pieces: Vec<Piece>,
}

/// The GNU sparse file entry type.
pub const SPARSE: u8 = b'S';
/// The regular file entry type.
pub const REGULAR: u8 = b'0';

impl Tar {
    /// An empty stream.
    pub fn new() -> Tar {
        Tar::default()
    }

    /// A regular file.
    pub fn file(mut self, name: &str, data: &[u8]) -> Tar {
        self.pieces.push(Piece::Bytes(
            header(name, REGULAR, data.len() as u64, 0).to_vec(),
        ));
        self.pieces.push(Piece::Bytes(data.to_vec()));
        self.pad(data.len() as u64)
    }

    /// A regular file of `n` zeros.
    pub fn zeros(mut self, name: &str, n: u64) -> Tar {
        self.pieces
            .push(Piece::Bytes(header(name, REGULAR, n, 0).to_vec()));
        self.pieces.push(Piece::Zeros(n));
        self.pad(n)
    }

    /// A GNU sparse file of `real_size` bytes, all of them a hole: no data
    /// in the archive, `real_size` zeros for a reader that expands it.
    pub fn sparse(mut self, name: &str, real_size: u64) -> Tar {
        self.pieces
            .push(Piece::Bytes(header(name, SPARSE, 0, real_size).to_vec()));
        self
    }

    /// A regular file whose header claims `claimed` bytes, followed by
    /// `data` and nothing else (the archive ends there).
    pub fn claiming(mut self, name: &str, claimed: u64, data: &[u8]) -> Tar {
        self.pieces
            .push(Piece::Bytes(header(name, REGULAR, claimed, 0).to_vec()));
        self.pieces.push(Piece::Bytes(data.to_vec()));
        self
    }

    /// The end-of-archive blocks.
    pub fn end(mut self) -> Tar {
        self.pieces.push(Piece::Zeros(1024));
        self
    }

    fn pad(mut self, n: u64) -> Tar {
        let rest = (512 - n % 512) % 512;
        if rest > 0 {
            self.pieces.push(Piece::Zeros(rest));
        }
        self
    }

    /// The stream, gzip-compressed.
    pub fn gzip(&self) -> Vec<u8> {
        let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
        let mut bits = Bits::default();
        let mut crc = Crc32::new();
        let mut size = 0u64;
        // One final block of fixed Huffman codes.
        bits.put(1, 1);
        bits.put(1, 2);
        for piece in &self.pieces {
            match piece {
                Piece::Bytes(b) => {
                    // Runs of zeros inside headers are copies too.
                    for run in b.chunk_by(|x, y| (*x == 0) == (*y == 0)) {
                        if run[0] == 0 {
                            bits.zeros(run.len() as u64);
                        } else {
                            for &byte in run {
                                bits.literal(u32::from(byte));
                            }
                        }
                    }
                    crc.update(b);
                    size += b.len() as u64;
                }
                Piece::Zeros(n) => {
                    bits.zeros(*n);
                    crc.zeros(*n);
                    size += n;
                }
            }
        }
        bits.literal(256);
        out.extend(bits.finish());
        out.extend_from_slice(&crc.value().to_le_bytes());
        out.extend_from_slice(&(size as u32).to_le_bytes());
        out
    }
}

/// A GNU tar header: `kind`, a size field claiming `size` (base-256 past
/// the octal field's range), and for a sparse file one empty map entry at
/// `real_size` and that real size.
pub fn header(name: &str, kind: u8, size: u64, real_size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut h[100..108], 0o755);
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    number(&mut h[124..136], size);
    octal(&mut h[136..148], 0);
    h[156] = kind;
    h[257..265].copy_from_slice(b"ustar  \0");
    if kind == SPARSE {
        // sparse[0]: offset real_size, 0 bytes of data; then the real size.
        octal(&mut h[386..398], real_size);
        octal(&mut h[398..410], 0);
        octal(&mut h[483..495], real_size);
    }
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// `v` in octal, zero-padded, NUL-terminated, filling `field`.
fn octal(field: &mut [u8], v: u64) {
    let text = format!("{v:0width$o}\0", width = field.len() - 1);
    assert_eq!(text.len(), field.len(), "{v} does not fit in octal");
    field.copy_from_slice(text.as_bytes());
}

/// A size field: octal when it fits, else GNU base-256.
fn number(field: &mut [u8], v: u64) {
    if v < 8u64.pow(field.len() as u32 - 1) {
        octal(field, v);
    } else {
        field.fill(0);
        field[0] = 0x80;
        let n = field.len();
        field[n - 8..].copy_from_slice(&v.to_be_bytes());
    }
}

/// A `manifest.json` naming `binary`, whose hash is that of `data`.
pub fn manifest_for(binary: &str, data: &[u8]) -> (String, Vec<u8>) {
    let m = Manifest {
        name: "hostile".into(),
        version: "0.1.0".into(),
        binary: binary.into(),
        sha256: sha256_hex(data),
        target: "x86_64-unknown-linux-gnu".into(),
        tempest_version: "0.1.0".into(),
    };
    (
        MANIFEST_FILE.to_owned(),
        serde_json::to_vec(&m).expect("a manifest as JSON"),
    )
}

/// A well-formed package (a shell script and a Topology.toml) written
/// with this module's tar and gzip, which the daemons must accept: the
/// proof the hostile ones are refused for what they hold, not for how
/// they are encoded.
pub fn valid_package() -> Vec<u8> {
    let script = b"#!/bin/sh\nexit 0\n";
    let (name, manifest) = manifest_for("hostile", script);
    Tar::new()
        .file(&name, &manifest)
        .file("hostile", script)
        .file("Topology.toml", b"")
        .end()
        .gzip()
}

/// Sparse files of `each` bytes under the names `names`: a few hundred
/// bytes that a reader expanding sparse maps makes `names.len() * each`.
pub fn sparse_archive(names: &[&str], each: u64) -> Vec<u8> {
    let mut tar = Tar::new();
    for name in names {
        tar = tar.sparse(name, each);
    }
    tar.end().gzip()
}

/// A whole package (manifest, binary, Topology.toml) followed by `extra`
/// entries of `each` zeros: what a reader keeping every entry in memory
/// holds `extra * each` bytes of.
pub fn many_entry_archive(extra: usize, each: u64) -> Vec<u8> {
    let script = b"#!/bin/sh\nexit 0\n";
    let (name, manifest) = manifest_for("hostile", script);
    let mut tar = Tar::new()
        .file(&name, &manifest)
        .file("hostile", script)
        .file("Topology.toml", b"");
    for i in 0..extra {
        tar = tar.zeros(&format!("extra-{i}"), each);
    }
    tar.end().gzip()
}

/// The archive that aborted an agent: a manifest, then the binary's header
/// claiming 1 TiB, then a few bytes and the end of the stream.
pub fn tebibyte_claim_archive() -> Vec<u8> {
    let script = b"#!/bin/sh\nexit 0\n";
    let (name, manifest) = manifest_for("hostile", script);
    Tar::new()
        .file(&name, &manifest)
        .claiming("hostile", 1 << 40, script)
        .gzip()
}

#[derive(Default)]
struct Bits {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

/// The deflate length codes' base lengths (codes 257 to 285).
const LENGTH_BASE: [u32; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
/// Their extra bits.
const LENGTH_EXTRA: [u32; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];

impl Bits {
    /// `n` bits of `v`, least significant first.
    fn put(&mut self, v: u32, n: u32) {
        self.acc |= u64::from(v) << self.n;
        self.n += n;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    /// A Huffman code of `len` bits, most significant first.
    fn code(&mut self, code: u32, len: u32) {
        let reversed = (0..len).fold(0, |r, i| r | ((code >> i) & 1) << (len - 1 - i));
        self.put(reversed, len);
    }

    /// A literal/length symbol in the fixed code.
    fn literal(&mut self, sym: u32) {
        match sym {
            0..=143 => self.code(0x30 + sym, 8),
            144..=255 => self.code(0x190 + sym - 144, 9),
            256..=279 => self.code(sym - 256, 7),
            _ => self.code(0xc0 + sym - 280, 8),
        }
    }

    /// `n` zeros: a literal zero, then copies of the byte before.
    fn zeros(&mut self, n: u64) {
        let mut left = n;
        if left > 0 {
            self.literal(0);
            left -= 1;
        }
        while left >= 3 {
            let len = left.min(258) as u32;
            // A run of 259 or 260 would leave 1 or 2: split it.
            let len = if (1..3).contains(&(left - u64::from(len))) {
                len - 3
            } else {
                len
            };
            self.copy_previous(len);
            left -= u64::from(len);
        }
        for _ in 0..left {
            self.literal(0);
        }
    }

    /// A copy of `len` (3 to 258) bytes from 1 byte back.
    fn copy_previous(&mut self, len: u32) {
        let i = LENGTH_BASE
            .iter()
            .rposition(|&b| b <= len)
            .expect("a length of at least 3");
        self.literal(257 + i as u32);
        self.put(len - LENGTH_BASE[i], LENGTH_EXTRA[i]);
        // Distance code 0 (distance 1), 5 bits, no extra bits.
        self.code(0, 5);
    }

    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

struct Crc32 {
    table: [u32; 256],
    value: u32,
}

impl Crc32 {
    fn new() -> Crc32 {
        let mut table = [0u32; 256];
        for (i, t) in table.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *t = c;
        }
        Crc32 {
            table,
            value: 0xffff_ffff,
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.value =
                self.table[((self.value ^ u32::from(b)) & 0xff) as usize] ^ (self.value >> 8);
        }
    }

    fn zeros(&mut self, n: u64) {
        for _ in 0..n {
            self.value = self.table[(self.value & 0xff) as usize] ^ (self.value >> 8);
        }
    }

    fn value(&self) -> u32 {
        !self.value
    }
}

/// A field of `/proc/PID/status`, in bytes (`VmRSS`, `VmHWM`); None once
/// the process is gone (a zombie has no memory fields).
pub fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()
    })?;
    Some(kib * 1024)
}

/// How far `pid`'s resident memory peaks above what it was before `f`:
/// its peak (`VmHWM`) is reset first where the kernel allows it
/// (`clear_refs` 5), and the baseline is the resident size (`VmRSS`) then,
/// so a peak from before `f` can only make the figure larger, never hide
/// one. Returns `f`'s result and the growth in bytes, None if the process
/// did not outlive `f`.
pub fn peak_growth<T>(pid: u32, f: impl FnOnce() -> T) -> (T, Option<u64>) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    let baseline = status_bytes(pid, "VmRSS").expect("the daemon's VmRSS before the upload");
    let out = f();
    let growth = status_bytes(pid, "VmHWM").map(|peak| peak.saturating_sub(baseline));
    (out, growth)
}

/// The bound the issue sets on a daemon's peak over its baseline.
pub const MAX_GROWTH: u64 = 64 << 20;
