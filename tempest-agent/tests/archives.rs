//! Hostile package archives against a real `tempest-agent` (issue 14,
//! item 5), through `PUT /api/v1/packages/{hash}`: the path a download from
//! the director takes too (both end in the same install, and unpack). A
//! header claiming 1 TiB, sparse entries and many entries are refused with
//! a 4xx; the agent's peak resident memory, read from `/proc`, stays within
//! 64 MiB of what it was before each upload; and the agent is still alive
//! and answering afterwards. Before the archive reader was bounded, the
//! first archive aborted the agent (an allocation of 1 TiB, SIGABRT), the
//! second made it hold 384 MiB of zeros and the third 96 MiB.

#![cfg(target_os = "linux")]

#[path = "../../tempest-director/tests/hostile/mod.rs"]
mod hostile;

use std::time::Duration;
use tempest_control::package::sha256_hex;

use tempest_testkit::cluster::{alive, port_range, tempdir, try_wait_for, AgentProcess};
use tempest_testkit::http::{request, Response};

use hostile::{
    many_entry_archive, peak_growth, sparse_archive, tebibyte_claim_archive, valid_package,
    MAX_GROWTH,
};

const TOKEN: &str = "archives-test-token";

/// An agent without a director (packages are uploaded to it), and a
/// hand-written package uploaded once: the upload path is warm, and the
/// hostile archives' encoding is known to be sound.
fn agent(tmp: &tempfile::TempDir) -> AgentProcess {
    // The token in its environment, never on its command line.
    let agent = AgentProcess::start_with_token(
        &tmp.path().join("agent"),
        &["--port-range", &port_range(4)],
        Some(TOKEN),
    );
    let r = put(&agent, &valid_package()).expect("the agent answers");
    assert_eq!(r.status, 200, "a well-formed package: {}", r.body);
    agent
}

/// `PUT /api/v1/packages/{its hash}`; an error if the connection fails
/// (as it does when the agent dies handling it).
fn put(agent: &AgentProcess, archive: &[u8]) -> std::io::Result<Response> {
    let auth = format!("Bearer {TOKEN}");
    request(
        &agent.addr,
        "PUT",
        &format!("/api/v1/packages/{}", sha256_hex(archive)),
        &[
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/gzip"),
        ],
        archive,
    )
}

/// Uploads `archive`; it must be refused with a 4xx whose error contains
/// `why`, the agent must not grow past the bound meanwhile, and it must be
/// alive and answering afterwards.
fn refused(agent: &AgentProcess, what: &str, archive: &[u8], why: &str) {
    let pid = agent.daemon.pid();
    let (r, growth) = peak_growth(pid, || put(agent, archive));
    let r = r.unwrap_or_else(|e| {
        // A process dying closes its sockets before it is a zombie.
        let died = try_wait_for(Duration::from_secs(10), || (!alive(pid)).then_some(())).is_some();
        panic!(
            "{what}: the upload failed ({e}){}",
            if died {
                ": the agent died handling it"
            } else {
                ""
            }
        )
    });
    let growth = growth.unwrap_or_else(|| panic!("{what}: the agent is gone"));
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
        "{what}: the agent's peak RSS grew by {growth} bytes (the bound is {MAX_GROWTH})"
    );
    assert!(r.body.contains(why), "{what}: {}", r.body);
    let health = agent.get("/api/v1/health");
    assert_eq!(health.status, 200, "{what}: {}", health.body);
    assert!(alive(pid), "{what}: the agent is gone");
    // Nothing of the refused package is left in the store.
    let hash = sha256_hex(archive);
    assert!(
        !agent.data_dir.join("packages").join(&hash).exists(),
        "{what}: {hash} was installed"
    );
}

#[test]
fn a_header_claiming_a_tebibyte_does_not_abort_the_agent() {
    let tmp = tempdir("tempest-archives");
    let agent = agent(&tmp);
    let archive = tebibyte_claim_archive();
    assert!(archive.len() < 512, "{} bytes", archive.len());
    refused(
        &agent,
        "a 1 TiB claim",
        &archive,
        "`hostile` is larger than its limit of 8589934592 bytes",
    );
}

#[test]
fn sparse_entries_are_refused_without_being_expanded() {
    let tmp = tempdir("tempest-archives");
    let agent = agent(&tmp);
    let archive = sparse_archive(&["hostile", "hostile-2", "hostile-3"], 128 << 20);
    assert!(archive.len() < 1024, "{} bytes", archive.len());
    refused(&agent, "sparse entries", &archive, "GNU sparse file");
}

#[test]
fn many_entries_are_refused_past_the_limit() {
    let tmp = tempdir("tempest-archives");
    let agent = agent(&tmp);
    let archive = many_entry_archive(96, 1 << 20);
    assert!(archive.len() < 1 << 20, "{} bytes", archive.len());
    refused(&agent, "many entries", &archive, "more than 3 entries");
}
