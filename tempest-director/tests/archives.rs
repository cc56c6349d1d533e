//! Hostile package uploads against a real `tempest-director` (issue 14,
//! item 5): sparse entries, many entries and a header claiming 1 TiB are
//! refused with a 4xx, and the director's peak resident memory, read from
//! `/proc`, stays within 64 MiB of what it was before each upload. Before
//! the archive reader was bounded, the sparse upload below (a few hundred
//! bytes) made the director hold 384 MiB of zeros, and the many-entry one
//! (under 1 MiB) 96 MiB.

#![cfg(target_os = "linux")]

#[path = "hostile/mod.rs"]
mod hostile;

use tempest_testkit::cluster::{free_addr, tempdir, DirectorProcess, Tokens};
use tempest_testkit::http::{self, Response};

use hostile::{
    many_entry_archive, peak_growth, sparse_archive, tebibyte_claim_archive, valid_package,
    MAX_GROWTH,
};

/// The admin token of [`tokens`].
const TOKEN: &str = "archives-test-admin-token";

/// The test director's credentials (in its environment, never on its
/// command line).
fn tokens() -> Tokens {
    Tokens::new("archives-test")
}

/// A director with the default upload limit (512 MiB, so binaries of up to
/// 2 GiB), and a hand-written package uploaded once: the upload path is
/// warm, and the hostile archives' encoding is known to be sound.
fn director(tmp: &tempfile::TempDir) -> DirectorProcess {
    let director =
        DirectorProcess::start_secured(&tmp.path().join("director"), &free_addr(), &[], &tokens());
    let r = upload(&director, &valid_package());
    assert_eq!(r.status, 201, "a well-formed package: {}", r.body);
    director
}

fn upload(director: &DirectorProcess, archive: &[u8]) -> Response {
    director.post("/api/v1/packages", Some(TOKEN), archive)
}

/// Uploads `archive`; it must be refused with a 4xx whose error contains
/// `why`, and the director must not grow past the bound meanwhile.
fn refused(director: &DirectorProcess, what: &str, archive: &[u8], why: &str) {
    let (r, growth) = peak_growth(director.daemon.pid(), || upload(director, archive));
    let growth = growth.unwrap_or_else(|| panic!("{what}: the director died handling it"));
    eprintln!(
        "{what}: {} bytes uploaded, answered {}, peak RSS {:.1} MiB over the baseline",
        archive.len(),
        r.status,
        growth as f64 / (1 << 20) as f64
    );
    assert!(
        (400..500).contains(&r.status),
        "{what}: answered {}: {}",
        r.status,
        r.body
    );
    assert!(
        growth < MAX_GROWTH,
        "{what}: the director's peak RSS grew by {growth} bytes (the bound is {MAX_GROWTH})"
    );
    assert!(r.body.contains(why), "{what}: {}", r.body);
    let health = director.get("/api/v1/health");
    assert_eq!(health.status, 200, "{what}: {}", health.body);
}

#[test]
fn sparse_entries_are_refused_without_being_expanded() {
    let tmp = tempdir("tempest-archives");
    let director = director(&tmp);
    // Three holes of 128 MiB, each under the default 2 GiB binary limit.
    let archive = sparse_archive(&["hostile", "hostile-2", "hostile-3"], 128 << 20);
    assert!(archive.len() < 1024, "{} bytes", archive.len());
    refused(&director, "sparse entries", &archive, "GNU sparse file");
    // Nothing was stored but the well-formed package.
    let r = http::send(&director.addr, "GET", "/api/v1/packages", Some(TOKEN), b"");
    assert_eq!(r.json().as_array().map(Vec::len), Some(1), "{}", r.body);
}

#[test]
fn many_entries_are_refused_past_the_limit() {
    let tmp = tempdir("tempest-archives");
    let director = director(&tmp);
    // A whole package, then 96 entries of 1 MiB of zeros.
    let archive = many_entry_archive(96, 1 << 20);
    assert!(archive.len() < 1 << 20, "{} bytes", archive.len());
    refused(&director, "many entries", &archive, "more than 3 entries");
}

#[test]
fn a_header_claiming_a_tebibyte_is_refused() {
    let tmp = tempdir("tempest-archives");
    let director = director(&tmp);
    let archive = tebibyte_claim_archive();
    refused(
        &director,
        "a 1 TiB claim",
        &archive,
        "larger than its limit of 2147483648 bytes",
    );
}
