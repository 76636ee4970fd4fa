//! The one worker: a std thread that owns the [`Engine`] and runs queued tasks in order.
//!
//! A1111 and stable-diffusion.cpp serialise jobs too: parallel jobs on one device do not raise
//! throughput, they only split memory. The queue is a bounded FIFO ([`Shared::push`] refuses past
//! `--queue`); the worker takes the oldest task and with it every later task of the same model
//! whose settings can share a UNet batch ([`BatchKey`]), up to `--max-batch` images, and runs
//! them as one [`Engine::run`]. A model switch happens between runs: the engine of the next
//! task's model is opened when the previous run is over.
//!
//! A task ends early when its client hangs up (the HTTP side sets its `cancelled` flag and takes
//! it out of the queue) or on `/interrupt`; the engine asks [`Observer::interrupted`] after
//! every step. A run whose tasks are all cancelled stops; one with a client still waiting goes on.
//!
//! Live previews (`/progress`'s `current_image`) are drawn as A1111 draws them since 1.6, on
//! request: a `/progress` call that wants the picture sets a flag ([`Shared::request_preview`]),
//! and the worker draws one at the next step at least `--preview-every` steps after its last
//! preview. Nobody polling costs nothing; a page polling once a second costs one preview a second
//! at most.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Result};
use candle_core::{DType, Device};
use tokio::sync::oneshot;

use crate::engine::batch::{plan_batches, BatchKey};
use crate::engine::preview::{PreviewSettings, Previewer};
use crate::engine::{Engine, Event, GeneratedImage, Interrupted, Job, Observer};
use crate::output::png;
use crate::pipeline::StepInfo;

/// What a task's client gets back.
#[derive(Debug)]
pub struct Finished {
    /// The images made, by image index (fewer than asked when interrupted).
    pub images: Vec<GeneratedImage>,
    pub interrupted: bool,
    /// When its run started (A1111's `job_timestamp`).
    pub job_timestamp: String,
}

/// One request waiting for, or in, the worker.
pub struct Task {
    pub id: u64,
    /// What [`Engine::open`] takes for the task's model.
    pub location: String,
    pub job: Job,
    /// Set by the HTTP side when the client has gone.
    pub cancelled: Arc<AtomicBool>,
    pub reply: oneshot::Sender<Result<Finished>>,
}

/// The queue and what the running task reports, shared by the HTTP handlers and the worker.
pub struct Shared {
    queue: Mutex<VecDeque<Task>>,
    wake: Condvar,
    capacity: usize,
    progress: Mutex<Progress>,
    /// `/interrupt`: stop the running run at its next step. Reset when a run starts.
    interrupt: AtomicBool,
    /// A `/progress` call asked for `current_image`: the next due step draws one.
    preview_requested: AtomicBool,
}

/// What `/progress` reports.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Tasks in the running run (0 when idle).
    pub running_tasks: usize,
    pub started: Option<Instant>,
    /// When the running run started, as A1111's `job_timestamp` (`YYYYmmddHHMMSS`, UTC).
    pub job_timestamp: String,
    pub batches: usize,
    pub batches_done: usize,
    /// 1-based step of the running batch, and its steps.
    pub step: usize,
    pub steps: usize,
    pub interrupted: bool,
    /// The latest live preview of the running batch, a PNG (A1111's `current_image`).
    pub current_image: Option<Arc<Vec<u8>>>,
}

impl Progress {
    /// Done fraction of the running run, 0..1 (0 when idle, as A1111).
    pub fn fraction(&self) -> f64 {
        if self.running_tasks == 0 || self.batches == 0 {
            return 0.0;
        }
        let step = if self.steps == 0 {
            0.0
        } else {
            self.step as f64 / self.steps as f64
        };
        ((self.batches_done as f64 + step) / self.batches as f64).clamp(0.0, 1.0)
    }

    /// Seconds still to go, from the time so far and the fraction done.
    pub fn eta_seconds(&self) -> f64 {
        let fraction = self.fraction();
        match self.started {
            Some(started) if fraction > 0.0 => {
                let elapsed = started.elapsed().as_secs_f64();
                elapsed / fraction - elapsed
            }
            _ => 0.0,
        }
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked (plain counters and a
/// queue of owned tasks), so one panic cannot wedge every later request.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    pub fn new(capacity: usize) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            capacity,
            progress: Mutex::new(Progress::default()),
            interrupt: AtomicBool::new(false),
            preview_requested: AtomicBool::new(false),
        }
    }

    /// `/progress` wants `current_image`: the worker draws a preview at its next due step.
    pub fn request_preview(&self) {
        self.preview_requested.store(true, Ordering::SeqCst);
    }

    /// Queues `task`, or gives it back when `capacity` tasks already wait.
    pub fn push(&self, task: Task) -> Result<(), Box<Task>> {
        let mut queue = lock(&self.queue);
        if queue.len() >= self.capacity {
            return Err(Box::new(task));
        }
        queue.push_back(task);
        self.wake.notify_one();
        Ok(())
    }

    /// Takes task `id` out of the queue, if it is still there (its client hung up).
    pub fn remove(&self, id: u64) {
        lock(&self.queue).retain(|t| t.id != id);
    }

    /// The running run's progress and how many requests wait, read together (a task moving
    /// from the queue to the run is counted once).
    pub fn status(&self) -> (Progress, usize) {
        let queue = lock(&self.queue);
        let progress = lock(&self.progress).clone();
        (progress, queue.len())
    }

    /// `/interrupt`: stops the running run at its next step; `false` when nothing runs.
    pub fn interrupt(&self) -> bool {
        let mut progress = lock(&self.progress);
        if progress.running_tasks == 0 {
            return false;
        }
        progress.interrupted = true;
        self.interrupt.store(true, Ordering::SeqCst);
        true
    }

    /// Blocks until a task waits, then takes it and the later tasks that can share its run.
    fn next_run(&self, max_images: usize) -> Vec<Task> {
        let mut queue = lock(&self.queue);
        while queue.is_empty() {
            queue = self.wake.wait(queue).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        let first = queue.pop_front().expect("the queue is not empty");
        let key = BatchKey::of(&first.job);
        let mut images = first.job.images.len();
        let mut run = vec![first];
        let mut i = 0;
        while i < queue.len() {
            let task = &queue[i];
            let fits = images + task.job.images.len() <= max_images;
            if fits && task.location == run[0].location && BatchKey::of(&task.job) == key {
                images += task.job.images.len();
                run.extend(queue.remove(i));
            } else {
                i += 1;
            }
        }
        // Marked running under the queue's lock: a task is always counted queued or running.
        let mut progress = lock(&self.progress);
        *progress = Progress {
            running_tasks: run.len(),
            started: Some(Instant::now()),
            job_timestamp: timestamp(),
            ..Progress::default()
        };
        self.interrupt.store(false, Ordering::SeqCst);
        run
    }
}

/// Now as `YYYYmmddHHMMSS` in UTC (A1111's `job_timestamp`), without a date library: days to a
/// civil date by Howard Hinnant's `civil_from_days`.
fn timestamp() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}{:02}{:02}{:02}",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// What the worker needs to open engines.
pub struct WorkerConfig {
    pub device: Device,
    pub dtype: DType,
    /// Images per UNet batch, and the most images one run takes from the queue.
    pub max_batch: usize,
    /// How live previews are drawn (`--taesd`, `--preview-method`) and how often.
    pub preview: PreviewSettings,
}

/// Collects a run's images per task and reports steps to `/progress`.
struct RunObserver<'a> {
    shared: &'a Shared,
    cancelled: Vec<Arc<AtomicBool>>,
    images: Vec<Vec<GeneratedImage>>,
    /// What draws previews for this model (none when it has no way to: see [`previewer`]).
    previewer: Option<&'a Previewer>,
    /// The 1-based step of the batch's last preview (0: none yet).
    last_preview: usize,
}

impl RunObserver<'_> {
    /// Draws a preview when one was asked for and `every` steps have passed since the last
    /// (A1111's `State.set_current_image`: `sampling_step - current_image_sampling_step >= N`).
    fn preview(&mut self, step: &StepInfo) {
        let Some(previewer) = self.previewer else {
            return;
        };
        let done = step.index + 1;
        if done - self.last_preview < previewer.every() || !self.shared.preview_requested.load(Ordering::SeqCst) {
            return;
        }
        self.shared.preview_requested.store(false, Ordering::SeqCst);
        self.last_preview = done;
        let drawn = previewer.render(step.x0).and_then(|image| {
            let mut bytes = Vec::new();
            png::encode_png(&mut bytes, &image.rgb, image.width as u32, image.height as u32, &[])?;
            Ok(bytes)
        });
        match drawn {
            Ok(bytes) => lock(&self.shared.progress).current_image = Some(Arc::new(bytes)),
            // A preview is not worth failing a request for; the log says why none came.
            Err(err) => eprintln!("warning: live preview failed: {err:#}"),
        }
    }
}

impl Observer for RunObserver<'_> {
    fn image(&mut self, image: GeneratedImage) -> Result<()> {
        self.images[image.job].push(image);
        Ok(())
    }

    fn step(&mut self, step: &StepInfo) {
        {
            let mut progress = lock(&self.shared.progress);
            progress.step = step.index + 1;
            progress.steps = step.steps;
        }
        self.preview(step);
    }

    fn event(&mut self, event: &Event) {
        let mut progress = lock(&self.shared.progress);
        match event {
            Event::BatchStarted { steps, .. } => {
                progress.step = 0;
                progress.steps = *steps;
                self.last_preview = 0;
            }
            Event::BatchDone { .. } => progress.batches_done += 1,
            _ => {}
        }
    }

    fn interrupted(&mut self) -> bool {
        self.shared.interrupt.load(Ordering::SeqCst) || self.cancelled.iter().all(|c| c.load(Ordering::SeqCst))
    }
}

/// Starts the worker thread; it runs until the process ends.
pub fn spawn(shared: Arc<Shared>, config: WorkerConfig) -> Result<()> {
    std::thread::Builder::new()
        .name("sdfix-worker".into())
        .spawn(move || work(&shared, &config))?;
    Ok(())
}

/// The engine of the last run, kept loaded for the next one of the same model.
struct Loaded {
    location: String,
    engine: Engine,
    previewer: Option<Previewer>,
}

/// The model's previewer: `--taesd`'s when it fits the model, else approx-cheap, else none (a
/// model whose latents neither fits); each fallback is logged.
fn previewer(engine: &Engine, settings: &PreviewSettings) -> Option<Previewer> {
    let made = engine.previewer(settings).or_else(|err| {
        if settings.taesd.is_none() {
            return Err(err);
        }
        eprintln!("warning: {err:#}; live previews use approx-cheap for this model");
        let approx = PreviewSettings {
            taesd: None,
            ..settings.clone()
        };
        engine.previewer(&approx)
    });
    match made {
        Ok((previewer, warnings)) => {
            for warning in warnings {
                eprintln!("{warning}");
            }
            Some(previewer)
        }
        Err(err) => {
            eprintln!("warning: no live previews for this model: {err:#}");
            None
        }
    }
}

fn work(shared: &Shared, config: &WorkerConfig) {
    let mut loaded: Option<Loaded> = None;
    loop {
        let mut tasks = shared.next_run(config.max_batch);
        tasks.retain(|t| !t.cancelled.load(Ordering::SeqCst));
        if !tasks.is_empty() {
            // A panic in the engine must not take the worker, and every later request, with it;
            // the engine it left is dropped, and the next run opens it afresh.
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| run(shared, config, &mut loaded, &tasks)));
            let results = outcome.unwrap_or_else(|panic| {
                loaded = None;
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                tasks
                    .iter()
                    .map(|_| Err(anyhow!("internal error: {message}")))
                    .collect()
            });
            for (task, result) in tasks.into_iter().zip(results) {
                // A client that hung up no longer listens; that is fine.
                let _ = task.reply.send(result);
            }
        }
        *lock(&shared.progress) = Progress::default();
        if lock(&shared.queue).is_empty() {
            // Idle: the last run's freed activations go back to the OS (milliseconds, outside the
            // queue's lock; a request arriving meanwhile waits that long).
            crate::engine::release_idle_memory();
        }
    }
}

/// One run of `tasks` (same model, settings that batch together): one result per task.
fn run(shared: &Shared, config: &WorkerConfig, loaded: &mut Option<Loaded>, tasks: &[Task]) -> Vec<Result<Finished>> {
    let location = &tasks[0].location;
    if loaded.as_ref().is_none_or(|l| &l.location != location) {
        // The old model's weights go before the new one's load.
        *loaded = None;
        match Engine::open(location, None, &config.device, config.dtype) {
            Ok(mut engine) => {
                // One run per request: reloading the encoder each time would dominate small ones.
                engine.keep_text_encoder(true);
                let previewer = previewer(&engine, &config.preview);
                *loaded = Some(Loaded {
                    location: location.clone(),
                    engine,
                    previewer,
                })
            }
            Err(err) => return tasks.iter().map(|_| Err(anyhow!("{err:#}"))).collect(),
        }
    }
    let Loaded { engine, previewer, .. } = loaded.as_mut().expect("opened above");
    let jobs: Vec<Job> = tasks.iter().map(|t| t.job.clone()).collect();
    lock(&shared.progress).batches = plan_batches(&jobs, config.max_batch).len();
    let mut observer = RunObserver {
        shared,
        cancelled: tasks.iter().map(|t| t.cancelled.clone()).collect(),
        images: vec![Vec::new(); tasks.len()],
        previewer: previewer.as_ref(),
        last_preview: 0,
    };
    let result = engine.run(&jobs, config.max_batch, &mut observer);
    let job_timestamp = lock(&shared.progress).job_timestamp.clone();
    let interrupted = match result {
        Ok(_) => false,
        Err(err) if err.is::<Interrupted>() => true,
        Err(err) => return tasks.iter().map(|_| Err(anyhow!("{err:#}"))).collect(),
    };
    observer
        .images
        .into_iter()
        .map(|mut images| {
            images.sort_by_key(|i| i.index);
            Ok(Finished {
                images,
                interrupted,
                job_timestamp: job_timestamp.clone(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_civil_dates() {
        let t = timestamp();
        assert_eq!(t.len(), 14, "{t}");
        assert!(t.starts_with("20"), "{t}");
    }

    #[test]
    fn progress_is_a_fraction_of_batches_and_steps() {
        let mut p = Progress::default();
        assert_eq!(p.fraction(), 0.0);
        p.running_tasks = 1;
        p.batches = 2;
        p.batches_done = 1;
        p.step = 5;
        p.steps = 10;
        assert_eq!(p.fraction(), 0.75);
    }
}
