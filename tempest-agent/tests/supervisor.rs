//! The supervisor against real processes (`/bin/sh`, `sleep`). Every wait is
//! bounded polling of observable state: statuses, `/proc`, files.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tempest_agent::supervisor::{
    Converged, Launch, Stream, Supervisor, SupervisorOptions, ENV_AGENT_DIR, STATE_FILE,
};
use tempest_control::{ProcessSpec, ProcessState, ProcessStatus, Role};

const WAIT: Duration = Duration::from_secs(30);

/// A temporary data directory. Dropped (also when a test fails), it first
/// SIGKILLs every process group started for it, so no test leaves a
/// process behind.
struct TestDir(tempfile::TempDir);

impl TestDir {
    fn new() -> TestDir {
        TestDir(tempfile::tempdir().unwrap())
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let Ok(dir) = fs::canonicalize(self.path()) else {
            return;
        };
        let entry = format!("{ENV_AGENT_DIR}={}", dir.display()).into_bytes();
        let own_group = unsafe { libc::getpgrp() };
        let Ok(procs) = fs::read_dir("/proc") else {
            return;
        };
        for proc_entry in procs.flatten() {
            let Ok(pid) = proc_entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(environ) = fs::read(format!("/proc/{pid}/environ")) else {
                continue;
            };
            if !environ.split(|&b| b == 0).any(|e| e == entry.as_slice()) {
                continue;
            }
            let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some(close) = stat.rfind(')') else {
                continue;
            };
            let pgrp: i32 = stat[close + 1..]
                .split_whitespace()
                .nth(2)
                .and_then(|f| f.parse().ok())
                .unwrap_or(0);
            if pgrp > 1 && pgrp != own_group {
                unsafe { libc::kill(-pgrp, libc::SIGKILL) };
            }
        }
    }
}

fn options() -> SupervisorOptions {
    SupervisorOptions {
        stop_grace: Duration::from_secs(5),
        restart_min: Duration::from_millis(50),
        restart_max: Duration::from_millis(400),
        log_max_bytes: 1024 * 1024,
        log_keep: 2,
    }
}

fn spec(id: &str, generation: u64) -> ProcessSpec {
    ProcessSpec {
        id: id.into(),
        topology: "t".into(),
        package: "ab".repeat(32),
        role: Role::Task,
        task: Some("count".into()),
        instance: Some(1),
        instances: Some(2),
        topology_addr: None,
        config: None,
        env: BTreeMap::new(),
        data_secret: None,
        data_tls: None,
        generation,
    }
}

/// `/bin/sh -c script`; extra args become `$0`, `$1`, ...
fn sh(id: &str, generation: u64, script: &str, extra: &[&str]) -> Launch {
    let mut args = vec!["-c".to_string(), script.to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    Launch {
        spec: spec(id, generation),
        program: PathBuf::from("/bin/sh"),
        args,
        env: BTreeMap::new(),
        address: None,
        metrics_address: None,
    }
}

fn sleeper(id: &str) -> Launch {
    sh(id, 1, "exec sleep 1000", &[])
}

/// Polls `check` every 10 ms until it answers, for at most [`WAIT`].
fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// State and start time from `/proc/<pid>/stat`.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest: Vec<&str> = text[text.rfind(')')? + 1..].split_whitespace().collect();
    Some((rest[0].chars().next()?, rest[19].parse().ok()?))
}

/// A process, pinned by its start time so pid reuse cannot fool a test.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Pid(u32, u64);

impl Pid {
    fn of(pid: u32) -> Pid {
        let (_, start) = proc_stat(pid).unwrap_or_else(|| panic!("no process {pid}"));
        Pid(pid, start)
    }

    fn alive(self) -> bool {
        matches!(proc_stat(self.0), Some((state, start)) if start == self.1 && state != 'Z' && state != 'X')
    }

    fn wait_dead(self) {
        wait_for(&format!("pid {} to die", self.0), || {
            (!self.alive()).then_some(())
        });
    }
}

fn running(sup: &Supervisor, id: &str) -> ProcessStatus {
    wait_for(&format!("{id} running"), || {
        sup.status(id)
            .filter(|s| s.state == ProcessState::Running && s.pid.is_some())
    })
}

fn running_pid(sup: &Supervisor, id: &str) -> Pid {
    Pid::of(running(sup, id).pid.unwrap())
}

/// Live processes whose command line holds `needle`.
fn processes_with(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let live = matches!(proc_stat(pid), Some((state, _)) if state != 'Z' && state != 'X');
        if live && String::from_utf8_lossy(&cmdline).contains(needle) {
            found.push(pid);
        }
    }
    found.sort();
    found
}

fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn state_file(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(dir.join(STATE_FILE)).unwrap()).unwrap()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn converge_starts_stops_and_reports() {
    let dir = TestDir::new();
    let sup = Supervisor::open(dir.path(), options()).unwrap();
    let mut a = sleeper("t/a");
    a.address = Some("127.0.0.1:7311".into());
    let b = sleeper("t/b");

    let done = sup.converge(vec![a.clone(), b.clone()]);
    assert_eq!(done.started, ids(&["t/a", "t/b"]));
    assert!(done.stopped.is_empty() && done.replaced.is_empty());
    let pa = running_pid(&sup, "t/a");
    let pb = running_pid(&sup, "t/b");
    let status = sup.status("t/a").unwrap();
    assert_eq!(status.topology, "t");
    assert_eq!(status.role, Role::Task);
    assert_eq!(status.task.as_deref(), Some("count"));
    assert_eq!(status.instance, Some(1));
    assert_eq!(status.address.as_deref(), Some("127.0.0.1:7311"));
    assert_eq!(status.generation, 1);
    assert_eq!(status.restarts, 0);
    assert_eq!(status.error, None);
    assert_eq!(sup.statuses().len(), 2);
    assert_eq!(sup.launches(), vec![a.clone(), b.clone()]);

    // Recorded, with pids and start times.
    let state = state_file(sup.data_dir());
    let recorded: Vec<u64> = state["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["running"]["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(recorded, vec![u64::from(pa.0), u64::from(pb.0)]);

    // Each runs in its own process group and session, and knows who it is.
    let environ = fs::read(format!("/proc/{}/environ", pa.0)).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(environ.contains("TEMPEST_PROCESS_ID=t/a"));
    assert!(environ.contains(&format!("{ENV_AGENT_DIR}={}", sup.data_dir().display())));
    let stat = fs::read_to_string(format!("/proc/{}/stat", pa.0)).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .collect();
    assert_eq!(fields[2], pa.0.to_string(), "pgid = pid");
    assert_eq!(fields[3], pa.0.to_string(), "sid = pid");

    // b is no longer assigned: stopped in the background, then forgotten.
    let done = sup.converge(vec![a.clone()]);
    assert_eq!(
        done,
        Converged {
            stopped: ids(&["t/b"]),
            ..Converged::default()
        }
    );
    pb.wait_dead();
    wait_for("t/b to be forgotten", || {
        sup.status("t/b").is_none().then_some(())
    });
    assert_eq!(running_pid(&sup, "t/a"), pa);
    assert!(pa.alive());

    let done = sup.converge(Vec::new());
    assert_eq!(done.stopped, ids(&["t/a"]));
    pa.wait_dead();
    wait_for("no processes", || sup.statuses().is_empty().then_some(()));
    wait_for("an empty state file", || {
        state_file(sup.data_dir())["processes"]
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    });
}

#[test]
fn the_same_assignment_twice_changes_nothing() {
    let dir = TestDir::new();
    let sup = Supervisor::open(dir.path(), options()).unwrap();
    let set = vec![sleeper("t/a"), sleeper("t/b")];
    assert_eq!(sup.converge(set.clone()).started.len(), 2);
    let before = [running_pid(&sup, "t/a"), running_pid(&sup, "t/b")];
    assert_eq!(sup.converge(set.clone()), Converged::default());
    // Let the supervision loop run for a while: nothing restarts.
    wait_for("a second of uptime", || {
        sup.statuses()
            .iter()
            .all(|s| s.uptime_secs >= 1)
            .then_some(())
    });
    assert_eq!(sup.converge(set), Converged::default());
    let after = [running_pid(&sup, "t/a"), running_pid(&sup, "t/b")];
    assert_eq!(before, after);
    assert!(sup.statuses().iter().all(|s| s.restarts == 0));
    // Duplicates in one assignment: the first wins.
    let mut other = sleeper("t/a");
    other.args.push("ignored".into());
    assert_eq!(
        sup.converge(vec![sleeper("t/a"), other, sleeper("t/b")]),
        Converged::default()
    );
    block_on(sup.stop_all());
}

#[test]
fn a_changed_launch_is_replaced_after_the_old_process_is_gone() {
    let dir = TestDir::new();
    let sup = Supervisor::open(dir.path(), options()).unwrap();
    let v1 = sh("t/a", 1, "exec sleep 1000", &[]);
    sup.converge(vec![v1.clone(), sleeper("t/b")]);
    let p1 = running_pid(&sup, "t/a");
    let pb = running_pid(&sup, "t/b");

    // A new generation.
    let v2 = sh("t/a", 2, "exec sleep 1000", &[]);
    let done = sup.converge(vec![v2.clone(), sleeper("t/b")]);
    assert_eq!(
        done,
        Converged {
            replaced: ids(&["t/a"]),
            ..Converged::default()
        }
    );
    let s2 = wait_for("generation 2 running", || {
        sup.status("t/a")
            .filter(|s| s.generation == 2 && s.state == ProcessState::Running)
    });
    assert!(
        !p1.alive(),
        "the old process is gone before the new one runs"
    );
    let p2 = Pid::of(s2.pid.unwrap());
    assert_ne!(p1, p2);
    assert_eq!(s2.restarts, 0);

    // Different args, then different env: replaced each time.
    let v3 = sh("t/a", 2, "exec sleep 1001", &[]);
    assert_eq!(
        sup.converge(vec![v3.clone(), sleeper("t/b")]).replaced,
        ids(&["t/a"])
    );
    p2.wait_dead();
    let p3 = running_pid(&sup, "t/a");
    assert_ne!(p3, p2);
    let mut v4 = v3.clone();
    v4.env.insert("COLOUR".into(), "blue".into());
    assert_eq!(
        sup.converge(vec![v4.clone(), sleeper("t/b")]).replaced,
        ids(&["t/a"])
    );
    p3.wait_dead();
    let p4 = running_pid(&sup, "t/a");
    let environ =
        String::from_utf8_lossy(&fs::read(format!("/proc/{}/environ", p4.0)).unwrap()).into_owned();
    assert!(environ.contains("COLOUR=blue"));
    assert!(environ.contains("TEMPEST_PROCESS_GENERATION=2"));

    // b was left alone throughout.
    assert_eq!(running_pid(&sup, "t/b"), pb);
    assert_eq!(sup.launches(), vec![v4, sleeper("t/b")]);
    block_on(sup.stop_all());
    assert!(!p4.alive() && !pb.alive());
}

#[test]
fn a_killed_process_is_restarted_with_backoff_and_counted() {
    let dir = TestDir::new();
    let mut opts = options();
    opts.restart_min = Duration::from_millis(500);
    opts.restart_max = Duration::from_secs(2);
    let sup = Supervisor::open(dir.path(), opts).unwrap();
    sup.converge(vec![sleeper("t/a")]);
    let mut pid = running_pid(&sup, "t/a");
    for round in 1..=2u32 {
        unsafe { libc::kill(pid.0 as i32, libc::SIGKILL) };
        let backoff = wait_for("back-off", || {
            sup.status("t/a")
                .filter(|s| s.state == ProcessState::Backoff)
        });
        assert_eq!(backoff.pid, None);
        assert_eq!(
            backoff.error.as_deref(),
            Some("killed by signal 9 (SIGKILL)")
        );
        let status = wait_for("the restart", || {
            sup.status("t/a").filter(|s| {
                s.state == ProcessState::Running && s.pid.is_some() && s.pid != Some(pid.0)
            })
        });
        assert_eq!(status.restarts, round);
        assert_eq!(status.error, None);
        pid = Pid::of(status.pid.unwrap());
    }
    // The count survives in the state file.
    let state = state_file(sup.data_dir());
    assert_eq!(state["processes"][0]["restarts"], 2);
    block_on(sup.stop_all());
    assert!(!pid.alive());
}

#[test]
fn a_child_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let dir = TestDir::new();
    let grace = Duration::from_millis(600);
    let mut opts = options();
    opts.stop_grace = grace;
    let sup = Supervisor::open(dir.path(), opts).unwrap();
    sup.converge(vec![sh(
        "t/stubborn",
        1,
        "trap '' TERM; echo ready; sleep 1000; echo not-reached",
        &[],
    )]);
    let pid = running_pid(&sup, "t/stubborn");
    wait_for("the trap to be set", || {
        sup.log_tail("t/stubborn", Stream::Stdout, 1)
            .filter(|t| t == "ready\n")
    });
    let t0 = Instant::now();
    let done = sup.converge(Vec::new());
    assert!(
        t0.elapsed() < grace / 2,
        "converge does not wait for the stop"
    );
    assert_eq!(done.stopped, ids(&["t/stubborn"]));
    assert_eq!(
        sup.status("t/stubborn").unwrap().state,
        ProcessState::Stopping
    );
    assert_eq!(sup.status("t/stubborn").unwrap().pid, Some(pid.0));
    pid.wait_dead();
    assert!(t0.elapsed() >= grace, "killed only after the grace period");
    wait_for("forgotten", || {
        sup.status("t/stubborn").is_none().then_some(())
    });
}

#[test]
fn stopping_kills_the_whole_process_group() {
    let dir = TestDir::new();
    let sup = Supervisor::open(dir.path(), options()).unwrap();
    let file = dir.path().join("grandchild");
    let script = r#"sleep 1000 & echo $! > "$0.tmp"; mv "$0.tmp" "$0"; wait"#;
    sup.converge(vec![sh("t/family", 1, script, &[file.to_str().unwrap()])]);
    let leader = running_pid(&sup, "t/family");
    let grandchild = wait_for("the grandchild's pid", || {
        read(&file).trim().parse::<u32>().ok()
    });
    let grandchild = Pid::of(grandchild);
    assert!(grandchild.alive());
    sup.converge(Vec::new());
    leader.wait_dead();
    grandchild.wait_dead();
}

#[test]
fn a_leader_that_exits_takes_its_group_with_it() {
    let dir = TestDir::new();
    let sup = Supervisor::open(dir.path(), options()).unwrap();
    let file = dir.path().join("grandchild");
    // First run: leave a grandchild behind and exit 3. Later runs: sleep.
    let script = r#"if [ -e "$0" ]; then exec sleep 1000; fi
sleep 1000 & echo $! > "$0.tmp"; mv "$0.tmp" "$0"; exit 3"#;
    sup.converge(vec![sh("t/leaver", 1, script, &[file.to_str().unwrap()])]);
    let grandchild = wait_for("the grandchild's pid", || {
        read(&file).trim().parse::<u32>().ok()
    });
    // It may already be dead; if not, it dies.
    if let Some((_, start)) = proc_stat(grandchild) {
        Pid(grandchild, start).wait_dead();
    }
    let status = wait_for("the restart", || {
        sup.status("t/leaver")
            .filter(|s| s.state == ProcessState::Running && s.restarts == 1)
    });
    assert_eq!(status.error, None);
    block_on(sup.stop_all());
}

#[test]
fn a_restarted_agent_adopts_its_processes_without_orphans_or_duplicates() {
    let dir = TestDir::new();
    // A marker only this test's processes carry on their command line ($0).
    let tag = format!("adoption-{}", dir.path().display());
    let launch = |id: &str| {
        let name = format!("{tag}-{}", id.replace('/', "-"));
        sh(id, 1, "sleep 1000; :", &[name.as_str()])
    };
    let count = |id: &str| processes_with(&format!("{tag}-{}", id.replace('/', "-")));
    let all = vec![launch("t/a"), launch("t/b"), launch("t/c"), launch("t/d")];

    let first = Supervisor::open(dir.path(), options()).unwrap();
    assert_eq!(first.converge(all.clone()).started.len(), 4);
    let before: Vec<Pid> = ["t/a", "t/b", "t/c", "t/d"]
        .iter()
        .map(|id| running_pid(&first, id))
        .collect();
    // The agent dies: nothing is stopped.
    drop(first);
    assert!(before.iter().all(|p| p.alive()));
    // While it is away, d dies.
    unsafe { libc::kill(before[3].0 as i32, libc::SIGKILL) };
    before[3].wait_dead();

    let second = Supervisor::open(dir.path(), options()).unwrap();
    // a, b, c adopted: same pids, Running.
    for (i, id) in ["t/a", "t/b", "t/c"].iter().enumerate() {
        let status = second.status(id).unwrap();
        assert_eq!(status.state, ProcessState::Running, "{id}");
        assert_eq!(status.pid, Some(before[i].0), "{id}");
    }
    // d is restarted.
    let d = wait_for("d restarted", || {
        second
            .status("t/d")
            .filter(|s| s.state == ProcessState::Running && s.pid != Some(before[3].0))
    });
    assert_eq!(d.restarts, 1);
    assert_eq!(second.launches(), all);

    // The director still wants a, b, d: c is stopped, nothing else changes.
    let wanted = vec![all[0].clone(), all[1].clone(), all[3].clone()];
    assert_eq!(
        second.converge(wanted.clone()),
        Converged {
            stopped: ids(&["t/c"]),
            ..Converged::default()
        }
    );
    before[2].wait_dead();
    assert_eq!(second.converge(wanted), Converged::default());
    assert_eq!(count("t/a"), vec![before[0].0]);
    assert_eq!(count("t/b"), vec![before[1].0]);
    wait_for("c gone", || count("t/c").is_empty().then_some(()));
    assert_eq!(count("t/d"), vec![d.pid.unwrap()]);
    assert_eq!(running_pid(&second, "t/a"), before[0]);

    // An adopted process that exits is noticed by polling and restarted.
    unsafe { libc::kill(before[0].0 as i32, libc::SIGKILL) };
    let a = wait_for("a restarted", || {
        second
            .status("t/a")
            .filter(|s| s.state == ProcessState::Running && s.pid != Some(before[0].0))
    });
    assert_eq!(a.restarts, 1);
    assert_eq!(count("t/a"), vec![a.pid.unwrap()]);

    // Die again, come back, stop everything: no process is left.
    drop(second);
    let third = Supervisor::open(dir.path(), options()).unwrap();
    assert_eq!(third.status("t/b").unwrap().pid, Some(before[1].0));
    let done = third.converge(Vec::new());
    assert_eq!(done.stopped, ids(&["t/a", "t/b", "t/d"]));
    wait_for("everything stopped", || {
        (third.statuses().is_empty()
            && ["t/a", "t/b", "t/c", "t/d"]
                .iter()
                .all(|id| count(id).is_empty()))
        .then_some(())
    });
}

#[test]
fn unrecorded_processes_of_a_previous_run_are_killed() {
    use std::os::unix::process::CommandExt;
    let dir = TestDir::new();
    let canonical = fs::canonicalize(dir.path()).unwrap();
    // Started by an agent that died before it could record it.
    let mut stray = std::process::Command::new("sleep")
        .arg("1000")
        .env(ENV_AGENT_DIR, &canonical)
        .process_group(0)
        .spawn()
        .unwrap();
    // And one of another agent, which must survive.
    let other = TestDir::new();
    let mut foreign = std::process::Command::new("sleep")
        .arg("1000")
        .env(ENV_AGENT_DIR, other.path())
        .process_group(0)
        .spawn()
        .unwrap();
    // A state file that cannot be read is moved aside.
    fs::write(dir.path().join(STATE_FILE), b"{ broken").unwrap();
    let sup = Supervisor::open(dir.path(), options()).unwrap();
    assert!(dir.path().join(format!("{STATE_FILE}.bad")).exists());
    let status = wait_for("the stray to die", || stray.try_wait().unwrap());
    assert!(status.code().is_none());
    assert!(foreign.try_wait().unwrap().is_none());
    foreign.kill().unwrap();
    foreign.wait().unwrap();
    assert!(sup.statuses().is_empty());
}

#[test]
fn logs_go_to_files_rotate_by_size_and_tail_from_the_end() {
    let dir = TestDir::new();
    let mut opts = options();
    opts.log_max_bytes = 1024;
    opts.log_keep = 2;
    let sup = Supervisor::open(dir.path(), opts).unwrap();
    let work = dir.path().join("work");
    fs::create_dir(&work).unwrap();
    for burst in 1..=3 {
        let mut text: String = (0..200)
            .map(|i| format!("burst {burst} line {i}\n"))
            .collect();
        text.push_str(&format!("burst {burst} end\n"));
        assert!(text.len() > 1024 && text.len() < 4096);
        fs::write(work.join(format!("b{burst}")), text).unwrap();
    }
    // Each burst is one write; the next waits for the test's go-ahead.
    let script = r#"for b in 1 2 3; do
  cat "$0/b$b"
  while [ ! -e "$0/go$b" ]; do sleep 0.01; done
done
echo done
echo oops >&2
exec sleep 1000"#;
    let id = "t/logger";
    sup.converge(vec![sh(id, 1, script, &[work.to_str().unwrap()])]);
    let out = sup.log_path(id, Stream::Stdout);
    assert!(
        out.ends_with("logs/t_2Flogger/stdout.log"),
        "{}",
        out.display()
    );
    let rotated = |n: usize| PathBuf::from(format!("{}.{n}", out.display()));
    for burst in 1..=3 {
        wait_for(&format!("rotation {burst}"), || {
            read(&rotated(1))
                .contains(&format!("burst {burst} end"))
                .then_some(())
        });
        fs::write(work.join(format!("go{burst}")), b"").unwrap();
    }
    wait_for("the last line", || {
        read(&out).contains("done").then_some(())
    });
    // O_APPEND: after the truncation the child writes from offset 0.
    assert_eq!(read(&out), "done\n");
    assert!(read(&rotated(1)).starts_with("burst 3 line 0\n"));
    assert!(read(&rotated(2)).contains("burst 2 end"));
    assert!(!rotated(3).exists());
    // The tail runs from the current file back into the rotated ones.
    assert_eq!(
        sup.log_tail(id, Stream::Stdout, 3).unwrap(),
        "burst 3 line 199\nburst 3 end\ndone\n"
    );
    assert_eq!(sup.log_tail(id, Stream::Stdout, 1).unwrap(), "done\n");
    assert_eq!(sup.log_tail(id, Stream::Stdout, 0).unwrap(), "");
    let many = sup.log_tail(id, Stream::Stdout, 10_000).unwrap();
    assert!(many.starts_with("burst 2 line 0\n"));
    assert!(!many.contains("burst 1"));
    wait_for("stderr", || {
        sup.log_tail(id, Stream::Stderr, 10)
            .filter(|t| t == "oops\n")
    });
    assert_eq!(sup.log_tail("t/unknown", Stream::Stdout, 10), None);
    // A stopped process keeps its logs.
    block_on(sup.stop_all());
    assert_eq!(sup.log_tail(id, Stream::Stdout, 1).unwrap(), "done\n");
}

#[test]
fn bad_launches_fail_with_an_error_and_are_retried() {
    let dir = TestDir::new();
    let sup = Supervisor::open(dir.path(), options()).unwrap();
    let program = dir.path().join("later");
    let mut missing = sleeper("t/missing");
    missing.program = program.clone();
    missing.args.clear();
    let not_executable = dir.path().join("plain");
    fs::write(&not_executable, "#!/bin/sh\n").unwrap();
    let mut denied = sleeper("t/denied");
    denied.program = not_executable;
    let mut bad_env = sleeper("t/env");
    bad_env.env.insert("A=B".into(), "c".into());
    let mut nul = sleeper("t/nul");
    nul.args.push("a\0b".into());
    let odd_ids = [sleeper(""), sleeper("../../escape"), sleeper("t/ü ñ")];

    let mut all = vec![missing.clone(), denied, bad_env, nul];
    all.extend(odd_ids.iter().cloned());
    let done = sup.converge(all.clone());
    assert_eq!(done.started.len(), 7);
    for (id, reason) in [
        ("t/missing", "No such file"),
        ("t/denied", "Permission denied"),
        ("t/env", "invalid environment variable"),
        ("t/nul", "NUL"),
    ] {
        let status = sup.status(id).unwrap();
        assert_eq!(status.state, ProcessState::Failed, "{id}");
        let error = status.error.unwrap_or_default();
        assert!(error.contains(reason), "{id}: {error}");
    }
    for launch in &odd_ids {
        running(&sup, &launch.spec.id);
    }
    assert!(!dir.path().parent().unwrap().join("escape").exists());

    // The missing program appears: the retry starts it.
    let tmp = dir.path().join("later.tmp");
    fs::write(&tmp, "#!/bin/sh\nexec sleep 1000\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).unwrap();
    }
    fs::rename(&tmp, &program).unwrap();
    let status = running(&sup, "t/missing");
    assert_eq!(status.error, None);
    assert_eq!(status.restarts, 0);

    // A failed launch replaced by a good one runs at once.
    let mut fixed = sleeper("t/env");
    fixed.spec.generation = 2;
    all[2] = fixed;
    assert_eq!(sup.converge(all).replaced, ids(&["t/env"]));
    running(&sup, "t/env");
    block_on(sup.stop_all());
    assert!(sup.statuses().is_empty());
}

#[tokio::test]
async fn stop_all_terminates_then_kills_and_waits() {
    let dir = TestDir::new();
    let mut opts = options();
    opts.stop_grace = Duration::from_millis(500);
    let sup = Supervisor::open(dir.path(), opts).unwrap();
    sup.converge(vec![
        sleeper("t/polite"),
        sh("t/stubborn", 1, "trap '' TERM; echo ready; sleep 1000", &[]),
    ]);
    let polite = running_pid(&sup, "t/polite");
    let stubborn = running_pid(&sup, "t/stubborn");
    wait_for("the trap to be set", || {
        sup.log_tail("t/stubborn", Stream::Stdout, 1)
            .filter(|t| t == "ready\n")
    });
    let t0 = Instant::now();
    sup.stop_all().await;
    assert!(t0.elapsed() >= Duration::from_millis(500));
    assert!(!polite.alive() && !stubborn.alive());
    assert!(sup.statuses().is_empty());
    assert!(state_file(sup.data_dir())["processes"]
        .as_array()
        .unwrap()
        .is_empty());
    // Still usable.
    sup.converge(vec![sleeper("t/again")]);
    let again = running_pid(&sup, "t/again");
    sup.stop_all().await;
    assert!(!again.alive());
}

/// Drives a future to completion on a fresh current-thread runtime (for the
/// synchronous tests).
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(future)
}
