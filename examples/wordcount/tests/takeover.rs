//! A replaced topology server resumes at once: the Redis source's default
//! consumer name comes from [`SOURCE_CONSUMER_ENV`] (which the agent sets to
//! the server's slot in its deployment), so a server killed with SIGKILL
//! and started again with the same identity is the same consumer, and reads
//! the entries its predecessor left pending at its first poll instead of
//! waiting `claim_idle_ms` (30 s by default) for an `XAUTOCLAIM`.
//!
//! Real processes (`wordcount standalone`, which runs the same Redis source
//! as a topology server) and a real redis-server; sentences from a Redis
//! stream, counts into a Redis hash ([`wordcount::REDIS_ENV`]).

#![cfg(unix)]

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{command_info, sentence, words, Id, Proc, Run, Summary, SENTENCES};
use redis::Value;
use tempest_connectors::redis::SOURCE_CONSUMER_ENV;
use tempest_testkit::RedisServer;
use wordcount::REDIS_ENV;

/// The longest any single wait may take.
const LIMIT: Duration = Duration::from_secs(180);
/// How often a bounded wait looks at its condition again (a Redis query).
const POLL: Duration = Duration::from_millis(20);
/// The bound on the takeover: from the restarted process's start until its
/// predecessor's pending entries are all acked.
const TAKEOVER: Duration = Duration::from_secs(5);

const STREAM: &str = "sentences";
const GROUP: &str = "wordcount";
const HASH: &str = "wordcount";
/// The identity the agent would give the server of deployment `wordcount`.
const IDENTITY: &str = "wordcount/server";
const MAX_PENDING: u64 = 2_000;
const BATCH_SIZE: u64 = 512;

/// Reads `STREAM` in `GROUP` with the source's defaults for `consumer`
/// (none given) and `claim_idle_ms` (30000, above `message_timeout`).
fn config(url: &str) -> String {
    format!(
        "name = \"wordcount\"\n\
         max_pending = {MAX_PENDING}\n\
         batch_size = {BATCH_SIZE}\n\
         message_timeout = \"10s\"\n\
         grace_period = \"10s\"\n\
         [failure]\n\
         policy = \"retry\"\n\
         max_attempts = 20\n\
         backoff = \"100ms\"\n\
         max_backoff = \"1s\"\n\
         [metric]\n\
         targets = []\n\
         [source]\n\
         kind = \"redis\"\n\
         [source.config]\n\
         url = \"{url}\"\n\
         stream = \"{STREAM}\"\n\
         group = \"{GROUP}\"\n\
         batch_size = {BATCH_SIZE}\n\
         block_ms = 100\n"
    )
}

/// Starts `wordcount standalone` counting into the hash at `redis`, with
/// `identity` in [`SOURCE_CONSUMER_ENV`] as the agent would set it.
fn standalone(run: &mut Run, label: &str, config: &Path, redis: &str, identity: &str) -> Id {
    let mut cmd = command_info(&["standalone", "--config", config.to_str().unwrap()]);
    cmd.env(REDIS_ENV, redis).env(SOURCE_CONSUMER_ENV, identity);
    run.procs.push(Proc::spawn(label, cmd));
    Id(run.procs.len() - 1)
}

// ------------------------------------------------------------------ Redis

struct Redis(redis::Connection);

/// What `XINFO GROUPS` says of [`GROUP`].
#[derive(Clone, Copy, Debug)]
struct Group {
    /// Entries delivered and not acked.
    pending: u64,
    entries_read: Option<u64>,
    /// Entries not yet delivered.
    lag: Option<u64>,
}

impl Group {
    fn done(&self, n: u64) -> bool {
        self.pending == 0 && self.lag == Some(0) && self.entries_read == Some(n)
    }
}

impl Redis {
    fn new(url: &str) -> Redis {
        let client = redis::Client::open(url).expect("a Redis URL");
        Redis(client.get_connection().expect("connecting to Redis"))
    }

    fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> Result<T, String> {
        cmd.query(&mut self.0).map_err(|e| e.to_string())
    }

    fn add_sentences(&mut self, n: u64) {
        let mut i = 0;
        while i < n {
            let mut pipe = redis::pipe();
            for j in i..n.min(i + 10_000) {
                pipe.cmd("XADD")
                    .arg(STREAM)
                    .arg("*")
                    .arg("payload")
                    .arg(sentence(j))
                    .ignore();
            }
            pipe.query::<()>(&mut self.0).expect("XADD");
            i += 10_000;
        }
    }

    fn count(&mut self, word: &str) -> Result<u64, String> {
        self.query::<Option<u64>>(redis::cmd("HGET").arg(HASH).arg(word))
            .map(Option::unwrap_or_default)
    }

    fn counts(&mut self) -> Result<HashMap<String, u64>, String> {
        self.query(redis::cmd("HGETALL").arg(HASH))
    }

    fn group(&mut self) -> Result<Option<Group>, String> {
        let groups: Value = match self.query(redis::cmd("XINFO").arg("GROUPS").arg(STREAM)) {
            Ok(v) => v,
            Err(e) if e.contains("no such key") => return Ok(None),
            Err(e) => return Err(e),
        };
        for g in items(&groups) {
            let f = fields(g);
            if f.get("name").and_then(|v| text(v)).as_deref() != Some(GROUP) {
                continue;
            }
            let int = |k: &str| f.get(k).and_then(|v| int(v));
            return Ok(Some(Group {
                pending: int("pending").ok_or("XINFO GROUPS: no pending")?,
                entries_read: int("entries-read"),
                lag: int("lag"),
            }));
        }
        Ok(None)
    }

    /// `XPENDING <stream> <group> <start> <end> <count>`: the pending
    /// entries' ids with their consumers.
    fn pending(
        &mut self,
        start: &str,
        end: &str,
        count: u64,
    ) -> Result<Vec<(String, String)>, String> {
        let reply: Value = self.query(
            redis::cmd("XPENDING")
                .arg(STREAM)
                .arg(GROUP)
                .arg(start)
                .arg(end)
                .arg(count),
        )?;
        items(&reply)
            .iter()
            .map(|e| match items(e) {
                [id, consumer, ..] => Ok((
                    text(id).ok_or("XPENDING: an id")?,
                    text(consumer).ok_or("XPENDING: a consumer")?,
                )),
                _ => Err(format!("XPENDING: {e:?}")),
            })
            .collect()
    }

    /// The consumers of [`GROUP`] by name, with their pending entries.
    fn consumers(&mut self) -> Result<HashMap<String, u64>, String> {
        let reply: Value =
            self.query(redis::cmd("XINFO").arg("CONSUMERS").arg(STREAM).arg(GROUP))?;
        Ok(items(&reply)
            .iter()
            .filter_map(|c| {
                let f = fields(c);
                Some((text(f.get("name")?)?, int(f.get("pending")?)?))
            })
            .collect())
    }
}

fn items(v: &Value) -> &[Value] {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => &[],
    }
}

fn fields(v: &Value) -> HashMap<String, &Value> {
    match v {
        Value::Map(pairs) => pairs
            .iter()
            .filter_map(|(k, v)| Some((text(k)?, v)))
            .collect(),
        Value::Array(flat) => flat
            .chunks_exact(2)
            .filter_map(|kv| Some((text(&kv[0])?, &kv[1])))
            .collect(),
        _ => HashMap::new(),
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        other => text(other)?.parse().ok(),
    }
}

/// Checks the hash against the counts of the sentences `0..n`: every word
/// counted at least as often as it occurs (zero lost) and no other word.
/// Returns the fewest sentences handled twice that explain the hash (each
/// sentence has words no other has; a sentence handled once more adds 1
/// to each of them).
fn sentences_twice(counts: &HashMap<String, u64>, n: u64) -> Result<u64, String> {
    let expected = common::cycled_counts(&SENTENCES, n);
    let mut problems = Vec::new();
    for (w, &e) in &expected {
        let got = counts.get(w).copied().unwrap_or(0);
        if got < e {
            problems.push(format!("`{w}`: {got} of {e} counted, {} lost", e - got));
        }
    }
    problems.extend(
        counts
            .keys()
            .filter(|w| !expected.contains_key(*w))
            .map(|w| format!("`{w}`: not a word of the input")),
    );
    if !problems.is_empty() {
        problems.sort();
        return Err(problems.join("\n"));
    }
    let mut twice = 0;
    for (i, s) in SENTENCES.iter().enumerate() {
        let others: HashSet<String> = SENTENCES
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .flat_map(|(_, o)| words(o))
            .collect();
        twice += words(s)
            .filter(|w| !others.contains(w))
            .map(|w| counts[&w] - expected[&w])
            .max()
            .expect("every sentence has a word of its own");
    }
    Ok(twice)
}

// ------------------------------------------------------------------ test

/// A server (standalone run) with the agent's identity is killed with
/// SIGKILL mid-stream, with entries in flight, and started again with the
/// same identity under the default `claim_idle_ms` (30 s): its
/// predecessor's pending entries are acked within 5 s of its start, every
/// entry is counted, and no more sentences are handled twice than were in
/// flight.
#[test]
fn a_replaced_server_takes_over_its_predecessors_entries_at_once() {
    const COUNT: u64 = 50_000;
    let started = Instant::now();
    let broker = RedisServer::start().expect("redis-server");
    let url = broker.url();
    let mut redis = Redis::new(&url);
    redis.add_sentences(COUNT);

    let mut run = Run::new(LIMIT, POLL);
    let config = run.file("Topology.toml", &config(&url));
    let first = standalone(&mut run, "server", &config, &url, IDENTITY);
    let the = common::cycled_counts(&SENTENCES, COUNT)["the"];
    run.wait_until("a fifth of the sentences are counted", LIMIT, |_| {
        Ok(redis.count("the")? > the / 5)
    });
    run.kill_9(first);

    // What the dead server held: delivered to its consumer, not acked.
    let at_kill = match redis.group() {
        Ok(Some(g)) => g,
        Ok(None) => run.fail("no consumer group"),
        Err(e) => run.fail(&e),
    };
    let held = at_kill.pending;
    let unread = at_kill
        .lag
        .unwrap_or_else(|| run.fail("XINFO GROUPS: no lag"));
    if held == 0 || unread == 0 {
        run.fail(&format!("not mid-stream when killed: {at_kill:?}"));
    }
    assert!(held <= MAX_PENDING, "{held} entries un-acked at the kill");
    let consumers = redis.consumers().unwrap_or_else(|e| run.fail(&e));
    assert_eq!(
        consumers,
        HashMap::from([(IDENTITY.to_owned(), held)]),
        "the dead server's consumer is named after its identity, not its host and pid"
    );
    let inherited = redis
        .pending("-", "+", held + 1)
        .unwrap_or_else(|e| run.fail(&e));
    assert_eq!(inherited.len() as u64, held);
    // Entries are delivered in stream order and `>` only hands out ids past
    // the last delivered one, so any id pending in this range later is one
    // of the dead server's.
    let (first_id, last_id) = (
        inherited[0].0.clone(),
        inherited[inherited.len() - 1].0.clone(),
    );

    let restarted = Instant::now();
    let second = standalone(&mut run, "server (restarted)", &config, &url, IDENTITY);
    run.wait_until("the predecessor's pending entries are acked", LIMIT, |_| {
        Ok(redis
            .pending(&first_id, &last_id, MAX_PENDING + 1)?
            .is_empty())
    });
    let takeover = restarted.elapsed();
    let group_at_takeover = redis.group().unwrap_or_else(|e| run.fail(&e));

    run.wait_until("every entry is acked", LIMIT, |_| {
        Ok(redis.group()?.is_some_and(|g| g.done(COUNT)))
    });
    let drained = restarted.elapsed();
    let stderr = run.proc(second).stderr.text();
    run.proc(second).signal(libc::SIGTERM);
    let line = run.summary(second);
    let summary = Summary::parse(&line).unwrap_or_else(|| run.fail("a summary line"));
    let counts = redis.counts().unwrap_or_else(|e| run.fail(&e));
    let twice = sentences_twice(&counts, COUNT)
        .unwrap_or_else(|e| run.fail(&format!("lost or wrong counts:\n{e}")));
    let consumers = redis.consumers().unwrap_or_else(|e| run.fail(&e));
    eprintln!(
        "a_replaced_server_takes_over_its_predecessors_entries_at_once: at the kill {held} \
         entries pending at `{IDENTITY}`, {unread} unread; the restarted server acked them all \
         {takeover:.2?} after its start (group then: {group_at_takeover:?}) and the whole stream \
         {drained:.2?} after it; {}; at least {twice} sentences handled twice; took {:.1?}",
        summary.line,
        started.elapsed()
    );
    assert!(
        takeover < TAKEOVER,
        "the predecessor's entries were acked {takeover:?} after the restart, not within {TAKEOVER:?}"
    );
    // Read back as its own pending entries, not taken over by XAUTOCLAIM
    // (which would have waited for claim_idle_ms).
    assert!(
        stderr.contains(&format!("consumer={IDENTITY}")),
        "the restarted source is not `{IDENTITY}`:\n{stderr}"
    );
    assert!(
        !stderr.contains("took over entries idle for"),
        "entries were taken over by XAUTOCLAIM:\n{stderr}"
    );
    // Exactly what was left: the held entries and the unread ones, once.
    assert_eq!(summary.acked, held + unread, "{}", summary.line);
    assert_eq!(summary.dead_lettered, 0, "{}", summary.line);
    assert!(
        twice <= held,
        "at least {twice} sentences handled twice, more than the {held} in flight at the kill"
    );
    // One consumer, kept at shutdown for the next incarnation: restarts do
    // not pile up consumers.
    assert_eq!(consumers, HashMap::from([(IDENTITY.to_owned(), 0)]));
}
