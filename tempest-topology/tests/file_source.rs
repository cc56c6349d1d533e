//! The file source at runtime level: a topology stopped abruptly mid-stream
//! (grace period zero, so the roots in flight are not acked and the
//! checkpoint lags, as after a crash) and started again over the same input
//! resumes from its checkpoint: no line is lost, and only lines that were in
//! flight are handled twice.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use tempest_core::outputs::FileOutput;
use tempest_core::sources::{FileCheckpoint, FileSource};
use tempest_core::{Msg, Pipeline, Task, TaskContext, TaskError, TaskResult, Topology};
use tempest_topology::{DriveEnd, RunReport, Standalone};

/// Lines of input.
const LINES: usize = 50_000;
/// The stop is requested once the sinks have handled this many lines.
const STOP_AFTER: usize = 20_000;
const MAX_PENDING: usize = 1_000;
const BATCH: usize = 64;
/// The longest a run may take (a debug build on a busy machine).
const LIMIT: Duration = Duration::from_secs(120);

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("tempest-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Appends every line it gets to its own file, durable in `flush` (before
/// the batch's roots can be acked). Nothing is written at shutdown: lines
/// still buffered then belong to roots that were never acked, as in a crash.
///
/// Each line costs a little work, more on instance 1, so roots pile up to
/// `max_pending` and complete out of order.
struct Sink {
    outputs: PathBuf,
    run: u32,
    out: Option<FileOutput>,
    work: Duration,
    handled: Arc<AtomicUsize>,
    stop_after: usize,
    reached: Arc<Notify>,
}

impl Task for Sink {
    fn started(&mut self, ctx: &TaskContext) {
        self.work = Duration::from_micros(if ctx.instance == 0 { 5 } else { 25 });
        let path = self
            .outputs
            .join(format!("run{}-sink{}.txt", self.run, ctx.instance));
        self.out = Some(FileOutput::open(path).expect("open the output"));
    }

    fn handle(&mut self, msg: Msg) -> TaskResult {
        let t0 = Instant::now();
        while t0.elapsed() < self.work {
            std::hint::spin_loop();
        }
        self.out.as_mut().ok_or("no output")?.line(msg.payload());
        if self.handled.fetch_add(1, Ordering::SeqCst) + 1 == self.stop_after {
            self.reached.notify_one();
        }
        Ok(None)
    }

    fn flush(&mut self) -> Result<(), TaskError> {
        self.out.as_mut().map_or(Ok(()), FileOutput::flush)
    }
}

/// One run over `input`: parse (checks the line) -> sink (writes it).
struct Run {
    topology: Topology,
    handled: Arc<AtomicUsize>,
    reached: Arc<Notify>,
    source: tempest_core::sources::SourceStats,
}

fn run_over(input: &Path, outputs: &Path, run: u32, stop_after: usize) -> Run {
    let source = FileSource::new(input);
    let stats = source.stats();
    let handled = Arc::new(AtomicUsize::new(0));
    let reached = Arc::new(Notify::new());
    let (h, r, outputs) = (handled.clone(), reached.clone(), outputs.to_path_buf());
    let topology = Topology::builder("file-resume")
        .source(source)
        .pipeline(
            Pipeline::new()
                .task_with_workers("parse", 2, || {
                    |m: Msg| -> TaskResult {
                        let text = m.payload_str().ok_or("not UTF-8")?;
                        let _: u64 = text.parse().map_err(|_| format!("bad line {text:?}"))?;
                        Ok(Some(vec![m]))
                    }
                })
                .task_with_workers("sink", 2, move || Sink {
                    outputs: outputs.clone(),
                    run,
                    out: None,
                    work: Duration::ZERO,
                    handled: h.clone(),
                    stop_after,
                    reached: r.clone(),
                })
                .edge("parse", "sink"),
        )
        .max_pending(MAX_PENDING)
        .batch_size(BATCH)
        .grace_period(Duration::ZERO)
        .build()
        .unwrap();
    Run {
        topology,
        handled,
        reached,
        source: stats,
    }
}

/// How many times each line number appears in the outputs.
fn output_counts(outputs: &Path) -> Vec<u32> {
    let mut counts = vec![0u32; LINES];
    for entry in std::fs::read_dir(outputs).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for line in text.lines() {
            let i: usize = line
                .parse()
                .unwrap_or_else(|_| panic!("bad output {line:?}"));
            counts[i] += 1;
        }
    }
    counts
}

/// Writes lines `0..LINES` into `files` files named `part-NN.txt` (one file:
/// `input.txt`), returns the path to read.
fn write_input(dir: &Path, files: usize) -> PathBuf {
    let per_file = LINES / files;
    if files == 1 {
        let text: String = (0..LINES).map(|i| format!("{i}\n")).collect();
        let path = dir.join("input.txt");
        std::fs::write(&path, text).unwrap();
        return path;
    }
    let input = dir.join("input");
    std::fs::create_dir(&input).unwrap();
    for f in 0..files {
        let text: String = (f * per_file..(f + 1) * per_file)
            .map(|i| format!("{i}\n"))
            .collect();
        std::fs::write(input.join(format!("part-{f:02}.txt")), text).unwrap();
    }
    input
}

async fn run(topology: Topology, shutdown: watch::Receiver<bool>) -> RunReport {
    let run = Standalone::new(topology).run(shutdown);
    let (report, _) = tokio::time::timeout(LIMIT, run)
        .await
        .expect("the run ended in time")
        .expect("the run succeeded");
    report
}

async fn kill_and_resume(files: usize) {
    let scratch = Scratch::new("file-source");
    let input = write_input(scratch.path(), files);
    let outputs = scratch.path().join("outputs");
    std::fs::create_dir(&outputs).unwrap();
    let checkpoint = FileSource::new(&input).checkpoint_path();

    // Run 1: stopped abruptly once STOP_AFTER lines were handled.
    let first = run_over(&input, &outputs, 1, STOP_AFTER);
    let (stop, shutdown) = watch::channel(false);
    let reached = first.reached.clone();
    let running = tokio::spawn(run(first.topology, shutdown));
    tokio::time::timeout(LIMIT, reached.notified())
        .await
        .expect("the sinks handled STOP_AFTER lines in time");
    stop.send(true).unwrap();
    let report = running.await.unwrap();
    let DriveEnd::Shutdown { left } = report.end else {
        panic!("run 1 ended with {:?}", report.end);
    };
    assert!(left > 0, "roots must be in flight at the stop");
    assert!(left <= MAX_PENDING, "{left} in flight");
    let handled_1 = first.handled.load(Ordering::SeqCst);
    let acked_1 = first.source.acked();
    assert!(acked_1 < LINES as u64, "run 1 was not stopped mid-stream");
    let lagging = FileCheckpoint::load(&checkpoint)
        .unwrap()
        .expect("run 1 wrote a checkpoint");

    // Run 2: over the same input and checkpoint, to the end.
    let second = run_over(&input, &outputs, 2, usize::MAX);
    let (_keep, shutdown) = watch::channel(false);
    let report = run(second.topology, shutdown).await;
    assert_eq!(report.end, DriveEnd::Exhausted);
    let handled_2 = second.handled.load(Ordering::SeqCst);
    assert_eq!(report.acked(), second.source.emitted());

    let counts = output_counts(&outputs);
    let lost: Vec<usize> = (0..LINES).filter(|&i| counts[i] == 0).collect();
    let duplicates: u32 = counts.iter().map(|&c| c.saturating_sub(1)).sum();
    println!(
        "{files} file(s): run 1 handled {handled_1}, acked {acked_1}, left {left} in flight \
         (checkpoint {}@{} + {} done ranges); run 2 read {} and handled {handled_2}; \
         lost {}, duplicates {duplicates} (max_pending {MAX_PENDING})",
        lagging.file,
        lagging.offset,
        lagging.done.len(),
        second.source.emitted(),
        lost.len(),
    );
    assert!(
        lost.is_empty(),
        "{} lines lost, first {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(
        duplicates as usize <= MAX_PENDING,
        "{duplicates} duplicates, more than max_pending {MAX_PENDING}"
    );
    // Run 2 read again only what run 1 did not finish.
    assert_eq!(
        acked_1 + second.source.emitted(),
        LINES as u64,
        "run 2 repeated lines acked by run 1"
    );

    // The final checkpoint is at the end of the input, with nothing pending.
    let done = FileCheckpoint::load(&checkpoint).unwrap().unwrap();
    let last = if files == 1 {
        input.clone()
    } else {
        input.join(format!("part-{:02}.txt", files - 1))
    };
    assert_eq!(done.file, last.file_name().unwrap().to_str().unwrap());
    assert_eq!(done.offset, std::fs::metadata(&last).unwrap().len());
    assert!(done.done.is_empty(), "{:?}", done.done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_resume_a_file_with_zero_lost() {
    kill_and_resume(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_resume_a_directory_with_zero_lost() {
    kill_and_resume(5).await;
}
