//! `sdfix serve`: the model kept loaded behind AUTOMATIC1111's HTTP API, and a small web page.
//!
//! A front-end like `cli`: HTTP requests become engine [`Request`]s ([`api`]), are checked into
//! [`Job`]s against the chosen model's configs before they queue (so a bad request is answered
//! at once, not after the queue), run one run at a time by the [`worker`] thread that owns the
//! [`Engine`], and come back as PNGs carrying the same metadata as `generate`'s ([`crate::output`]).
//!
//! - [`routes`]: the axum router, basic auth, the handlers.
//! - [`api`]: A1111's request and response shapes, sampler and scheduler names.
//! - [`worker`]: the bounded FIFO queue, batching of equal settings, interrupt and cancel.
//! - [`models`]: models by name only (built-in, `--model`, `--models-dir`).
//! - [`error`]: the one JSON error shape.
//!
//! [`Request`]: crate::engine::Request
//! [`Job`]: crate::engine::Job
//! [`Engine`]: crate::engine::Engine

pub mod api;
pub mod error;
pub mod hires;
pub mod models;
pub mod names;
pub mod routes;
pub mod worker;

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use candle_core::{DType, Device};

use self::models::Models;
use self::worker::{Shared, WorkerConfig};
use crate::engine::preview::PreviewSettings;
use crate::engine::Engine;
use crate::output::png;

/// `--max-pixels` unless told: 1024 x 1024, A1111's largest common size.
pub const DEFAULT_MAX_PIXELS: usize = 1024 * 1024;
/// `--max-steps` unless told: the top of A1111's steps slider.
pub const DEFAULT_MAX_STEPS: usize = 150;
/// The largest request body: txt2img needs a few kB; img2img's base64 images will need more.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// HTTP basic auth credentials (`--api-auth USER:PASS`).
#[derive(Debug, Clone)]
pub struct Auth {
    pub user: String,
    pub password: String,
}

/// What one request may ask for, and how much may wait.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_pixels: usize,
    pub max_steps: usize,
    /// Images per UNet batch, and per request's `batch_size`.
    pub max_batch: usize,
    /// Requests that may wait behind the running one.
    pub queue: usize,
}

/// Everything `sdfix serve` was told, resolved.
pub struct ServeConfig {
    pub model: String,
    pub listen: SocketAddr,
    pub auth: Option<Auth>,
    pub models_dir: Option<PathBuf>,
    pub out_dir: PathBuf,
    pub limits: Limits,
    pub device: Device,
    pub dtype: DType,
    /// Live previews for `/progress`'s `current_image`.
    pub preview: PreviewSettings,
}

/// What every handler sees.
pub struct AppState {
    pub models: Models,
    /// The model new requests use (`sd_model_checkpoint`), by name.
    pub current_model: Mutex<String>,
    /// The server's `sd_noise_schedule` option: None follows each model's config.
    pub noise_schedule: Mutex<Option<bool>>,
    /// One engine per model, opened without weights, to check requests before they queue
    /// (opening reads the configs only).
    pub checkers: Mutex<HashMap<String, Engine>>,
    pub device: Device,
    pub dtype: DType,
    pub auth: Option<Auth>,
    pub limits: Limits,
    pub out_dir: PathBuf,
    /// The next "line" number of saved images' names (`<line:05>-<image:02>-<seed>-<slug>.png`):
    /// one per request, continuing after the names already in `--out-dir`.
    pub next_saved: AtomicU64,
    pub next_task: AtomicU64,
    pub worker: Arc<Shared>,
}

/// One past the largest line number of the sdfix image names in `dir` (0 when none).
fn next_line(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| png::parse_image_name(e.file_name().to_str()?))
        .map(|n| n.line as u64 + 1)
        .max()
        .unwrap_or(0)
}

/// Opens the startup model's configs, starts the worker, binds, prints
/// `sdfix serve: listening on http://ADDR` on stdout (tests and scripts read the port from it)
/// and serves until the process ends.
pub fn run(config: ServeConfig) -> Result<()> {
    let models = Models {
        startup: config.model.clone(),
        models_dir: config.models_dir.clone(),
    };
    let startup = models.startup_entry();
    let checker = Engine::open(&startup.location, None, &config.device, config.dtype)?;
    if config.preview.taesd.is_some() {
        // A --taesd that cannot serve the startup model is a mistake to report now, not a
        // fallback to find in the log (other models fall back to approx-cheap).
        let (_, warnings) = checker.previewer(&config.preview)?;
        for warning in warnings {
            eprintln!("{warning}");
        }
    }
    let worker = Arc::new(Shared::new(config.limits.queue));
    worker::spawn(
        worker.clone(),
        WorkerConfig {
            device: config.device.clone(),
            dtype: config.dtype,
            max_batch: config.limits.max_batch,
            preview: config.preview.clone(),
        },
    )
    .context("cannot start the worker thread")?;
    let state = Arc::new(AppState {
        current_model: Mutex::new(startup.name.clone()),
        noise_schedule: Mutex::new(None),
        checkers: Mutex::new(HashMap::from([(startup.name.clone(), checker)])),
        device: config.device,
        dtype: config.dtype,
        auth: config.auth,
        limits: config.limits,
        next_saved: AtomicU64::new(next_line(&config.out_dir)),
        out_dir: config.out_dir,
        next_task: AtomicU64::new(0),
        worker,
        models,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let address = listener.local_addr()?;
        println!("sdfix serve: listening on http://{address} (model {})", startup.name);
        std::io::stdout().flush()?;
        axum::serve(listener, routes::router(state))
            .await
            .context("the HTTP server stopped")
    })
}
