//! The HTTP routes, AUTOMATIC1111's paths and shapes, and the web page at `/`.
//!
//! | route | what |
//! | --- | --- |
//! | `GET /` | the web page (`page.html`, in the binary) |
//! | `POST /sdapi/v1/txt2img` | images for a prompt: `{"images", "parameters", "info"}` |
//! | `GET /sdapi/v1/sd-models` | the models, by name |
//! | `GET /sdapi/v1/samplers`, `GET /sdapi/v1/schedulers` | the names `sampler_name` and `scheduler` take |
//! | `GET`, `POST /sdapi/v1/options` | `sd_model_checkpoint` (the model of later requests), `sd_noise_schedule`; `GET` also `sdfix_zero_snr_applies` |
//! | `GET /sdapi/v1/progress` | the running run: fraction, ETA, step, queued requests, live preview (`current_image`) |
//! | `POST /sdapi/v1/interrupt` | stops the running run at its next step |
//! | `GET /sdapi/v1/scripts` | none (clients ask which extensions exist) |
//! | `POST /sdapi/v1/png-info` | a PNG's `parameters` text, parsed, and its other text chunks |
//! | `POST /sdfix/v1/prompt` | sdfix's: `sdfix prompt --json` for a prompt (the page's token counter) |

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request as HttpRequest, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::api::{self, Img2Img, Resolved, Txt2Img, NOISE_SCHEDULE_DEFAULT, NOISE_SCHEDULE_ZERO_SNR};
use super::error::ApiError;
use super::models::ModelEntry;
use super::worker::{Finished, Shared, Task};
use super::{AppState, MAX_BODY_BYTES};
use crate::engine::{Engine, Job, Words};
use crate::output::metadata::{parse_parameters, PARAMETERS_CHUNK};
use crate::output::{manifest, png};
use crate::prompt::{tokenize_prompt, PromptReport};

type AppResult<T> = Result<T, ApiError>;

/// The web page: plain HTML and JS, no build step, no CDN.
const PAGE: &str = include_str!("page.html");

/// Locks a mutex of plain data whose holder may have panicked (the data stays usable).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/sdapi/v1/txt2img", post(txt2img))
        .route("/sdapi/v1/img2img", post(img2img))
        .route("/sdapi/v1/sd-models", get(sd_models))
        .route("/sdapi/v1/samplers", get(|| async { Json(api::samplers()) }))
        .route("/sdapi/v1/schedulers", get(|| async { Json(api::schedulers()) }))
        .route("/sdapi/v1/options", get(get_options).post(set_options))
        .route("/sdapi/v1/progress", get(progress))
        .route("/sdapi/v1/interrupt", post(interrupt))
        // No scripts or extensions: clients (webuiapi) ask at start which ones exist.
        .route(
            "/sdapi/v1/scripts",
            get(|| async { Json(json!({"txt2img": [], "img2img": []})) }),
        )
        .route("/sdapi/v1/png-info", post(png_info))
        .route("/sdfix/v1/prompt", post(prompt))
        .fallback(|| async { ApiError::not_found("no such route; the routes are listed in docs/serve.md") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), require_auth))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Compares in time that does not depend on where the first difference is.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// With `--api-auth`, every route needs `Authorization: Basic base64(USER:PASS)` (401 without).
async fn require_auth(State(state): State<Arc<AppState>>, request: HttpRequest, next: Next) -> Response {
    let Some(auth) = &state.auth else {
        return next.run(request).await;
    };
    let expected = format!("{}:{}", auth.user, auth.password);
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v.trim()).ok());
    match given {
        Some(given) if same_bytes(&given, expected.as_bytes()) => next.run(request).await,
        _ => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this server needs HTTP basic auth (--api-auth)",
        )
        .into_response(),
    }
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// A JSON body, its fields checked against `T` (a wrong type names its field).
fn parse_body<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> AppResult<(Value, T)> {
    let body = body?;
    let value: Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::invalid(format!("body: not valid JSON: {e}")))?;
    // serde would read an array into a struct field by field; a client never means that.
    if !value.is_object() {
        return Err(ApiError::invalid("body: expected a JSON object"));
    }
    let typed = serde_path_to_error::deserialize(&value)?;
    Ok((value, typed))
}

/// Runs blocking work (model configs, PNG encoding, files) off the async threads.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> AppResult<T> + Send + 'static) -> AppResult<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(&anyhow::anyhow!("a blocking task failed: {e}")))?
}

fn unknown_model(field: &str, name: &str) -> ApiError {
    ApiError::not_found(format!(
        "{field}: no model named {name:?}; GET /sdapi/v1/sd-models lists them"
    ))
}

/// Opens (once) the configs of model `entry` for checking requests, then runs `check` on it.
fn with_checker<T>(state: &AppState, entry: &ModelEntry, check: impl FnOnce(&Engine) -> AppResult<T>) -> AppResult<T> {
    let mut checkers = lock(&state.checkers);
    if !checkers.contains_key(&entry.name) {
        let engine = Engine::open(&entry.location, None, &state.device, state.dtype)
            .map_err(|e| ApiError::invalid(format!("sd_model_checkpoint: {e:#}")))?;
        checkers.insert(entry.name.clone(), engine);
    }
    check(&checkers[&entry.name])
}

/// A request checked against its model: the job, and the size it makes.
struct Checked {
    entry: ModelEntry,
    job: Job,
    /// The UNet's input channels (9 for an inpainting model).
    in_channels: usize,
    width: usize,
    height: usize,
}

fn check_request(state: &AppState, resolved: &Resolved) -> AppResult<Checked> {
    let (field, name) = match &resolved.model {
        Some(name) => ("override_settings.sd_model_checkpoint", name.clone()),
        None => ("sd_model_checkpoint", lock(&state.current_model).clone()),
    };
    let entry = state.models.find(&name).ok_or_else(|| unknown_model(field, &name))?;
    with_checker(state, &entry, |engine| {
        let job = engine.job(resolved.request.clone()).map_err(|e| api::invalid(&e))?;
        let factor = engine.configs().vae.downscale_factor();
        let (_, h, w) = job.latent_shape;
        Ok(Checked {
            entry: entry.clone(),
            in_channels: engine.configs().unet.in_channels,
            job,
            width: w * factor,
            height: h * factor,
        })
    })
}

/// Cancels a task when the handler's future is dropped before the answer came: the client hung
/// up (hyper drops the future when it reads EOF on a busy connection). Takes it out of the queue
/// if it still waits; a running one stops at the next step unless another client shares its run.
struct CancelOnDrop {
    worker: Arc<Shared>,
    id: u64,
    cancelled: Arc<AtomicBool>,
    answered: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.answered {
            self.cancelled.store(true, Ordering::SeqCst);
            self.worker.remove(self.id);
        }
    }
}

/// `POST /sdapi/v1/txt2img`: parsed and checked against the model first (a bad request is
/// answered at once, never queued), queued (503 when full), awaited (cancelled if the client
/// hangs up), then encoded and, with `save_images`, written.
async fn txt2img(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> AppResult<Json<Value>> {
    let (raw, mut request): (Value, Txt2Img) = parse_body(body)?;
    request.settings = api::settings_of(&raw)?;
    let noise_schedule = *lock(&state.noise_schedule);
    let resolved = request.resolve(&state.limits, noise_schedule, u64::from(rand::random::<u32>()))?;
    generate(state, raw, resolved).await
}

/// `POST /sdapi/v1/img2img`: txt2img's fields plus `init_images`, `denoising_strength`, `mask`,
/// `mask_blur`, `inpainting_mask_invert` and `resize_mode`, answered in txt2img's shape.
async fn img2img(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> AppResult<Json<Value>> {
    let (raw, mut request): (Value, Img2Img) = parse_body(body)?;
    request.base.settings = api::settings_of(&raw)?;
    let noise_schedule = *lock(&state.noise_schedule);
    let resolved = blocking({
        let limits = state.limits.clone();
        move || request.resolve(&limits, noise_schedule, u64::from(rand::random::<u32>()))
    })
    .await?;
    generate(state, raw, resolved).await
}

/// Checks a resolved request against its model, queues it, awaits it and answers with the images.
async fn generate(state: Arc<AppState>, raw: Value, resolved: Resolved) -> AppResult<Json<Value>> {
    let checked = {
        let (state, resolved) = (state.clone(), resolved.clone());
        blocking(move || check_request(&state, &resolved)).await?
    };

    let (reply, answer) = oneshot::channel();
    let id = state.next_task.fetch_add(1, Ordering::SeqCst);
    let cancelled = Arc::new(AtomicBool::new(false));
    let task = Task {
        id,
        location: checked.entry.location.clone(),
        job: checked.job.clone(),
        cancelled: cancelled.clone(),
        reply,
    };
    state
        .worker
        .push(task)
        .map_err(|_| ApiError::queue_full(state.limits.queue))?;
    let mut guard = CancelOnDrop {
        worker: state.worker.clone(),
        id,
        cancelled,
        answered: false,
    };
    let finished = answer
        .await
        .map_err(|_| ApiError::internal(&anyhow::anyhow!("the worker dropped the request")))?;
    guard.answered = true;
    let finished = finished.map_err(|e| ApiError::internal(&e))?;

    let state2 = state.clone();
    let save = resolved.save_images;
    let (interrupted, job_timestamp) = (finished.interrupted, finished.job_timestamp.clone());
    let (images, infotexts) = blocking(move || encode_and_save(&state2, &finished, save)).await?;
    let info = info(&resolved, &checked, &infotexts, interrupted, &job_timestamp);
    let mut parameters = match raw {
        Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    for key in [
        "prompt",
        "negative_prompt",
        "seed",
        "steps",
        "cfg_scale",
        "width",
        "height",
        "sampler_name",
        "scheduler",
        "batch_size",
        "n_iter",
        "guidance_rescale",
        "spacing",
        "zero_snr",
    ] {
        parameters.insert(key.to_string(), info[key].clone());
    }
    // The pictures are not echoed back (A1111 sets them to None in `parameters` too).
    for key in ["init_images", "mask"] {
        if parameters.contains_key(key) {
            parameters.insert(key.to_string(), Value::Null);
        }
    }
    if let Some(strength) = info.get("denoising_strength").filter(|v| !v.is_null()) {
        parameters.insert("denoising_strength".to_string(), strength.clone());
    }
    let images = if resolved.send_images { images } else { Vec::new() };
    Ok(Json(json!({
        "images": images,
        "parameters": parameters,
        "info": info.to_string(),
    })))
}

/// The images as base64 PNGs with `generate`'s metadata, their infotexts, and with
/// `save_images` the same PNGs and manifest lines in `--out-dir`.
fn encode_and_save(state: &AppState, finished: &Finished, save: bool) -> AppResult<(Vec<String>, Vec<String>)> {
    let internal = |e: anyhow::Error| ApiError::internal(&e);
    if save && !finished.images.is_empty() {
        std::fs::create_dir_all(&state.out_dir)
            .map_err(|e| internal(anyhow::anyhow!("cannot create {}: {e}", state.out_dir.display())))?;
        let line = state.next_saved.fetch_add(1, Ordering::SeqCst) as usize;
        for image in &finished.images {
            let name = png::image_name(line, image.index, image.settings.seed, &image.settings.prompt);
            png::write_image(&state.out_dir.join(&name), image).map_err(internal)?;
            manifest::append(&state.out_dir, &manifest::record(&name, line, image).map_err(internal)?)
                .map_err(internal)?;
        }
    }
    let mut images = Vec::new();
    let mut infotexts = Vec::new();
    for image in &finished.images {
        let bytes = png::image_png_bytes(image).map_err(internal)?;
        images.push(base64::engine::general_purpose::STANDARD.encode(bytes));
        infotexts.push(image.settings.a1111_parameters());
    }
    Ok((images, infotexts))
}

/// A1111's `info` (`Processed.js()` in modules/processing.py), with sdfix's fixes added.
fn info(resolved: &Resolved, checked: &Checked, infotexts: &[String], interrupted: bool, job_timestamp: &str) -> Value {
    let request = &checked.job.request;
    let seeds = &checked.job.seeds;
    let n = seeds.len();
    let noise_schedule = if checked.job.zero_snr {
        NOISE_SCHEDULE_ZERO_SNR
    } else {
        NOISE_SCHEDULE_DEFAULT
    };
    json!({
        "prompt": request.prompt,
        "all_prompts": vec![&request.prompt; n],
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": vec![&request.negative_prompt; n],
        "seed": seeds.first(),
        "all_seeds": seeds,
        "subseed": seeds.first(),
        "all_subseeds": seeds,
        "subseed_strength": 0,
        "width": checked.width,
        "height": checked.height,
        "sampler_name": resolved.sampler_label,
        "scheduler": resolved.scheduler_label,
        "cfg_scale": request.guidance,
        "steps": request.steps,
        "batch_size": resolved.batch_size,
        "n_iter": resolved.n_iter,
        "restore_faces": false,
        "face_restoration_model": null,
        "sd_model_name": checked.entry.name,
        "sd_model_hash": null,
        "sd_vae_name": null,
        "sd_vae_hash": null,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": checked.job.init.as_ref().map(|init| init.strength),
        "extra_generation_params": {
            "Rescale CFG": request.guidance_rescale,
            "Noise Schedule": noise_schedule,
            "Spacing": request.spacing.to_string(),
        },
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": job_timestamp,
        "clip_skip": 1,
        "is_using_inpainting_conditioning": checked.job.init.as_ref().is_some_and(|init| init.mask.is_some())
            && checked.job.latent_shape.0 != checked.in_channels,
        "version": format!("sdfix {}", env!("CARGO_PKG_VERSION")),
        "guidance_rescale": request.guidance_rescale,
        "spacing": request.spacing.to_string(),
        "zero_snr": checked.job.zero_snr,
        "interrupted": interrupted,
        "warnings": checked.job.warnings.iter().map(|w| w.render(Words::Api)).collect::<Vec<_>>(),
    })
}

async fn sd_models(State(state): State<Arc<AppState>>) -> Json<Value> {
    let models = blocking(move || Ok(state.models.list())).await.unwrap_or_default();
    Json(Value::Array(
        models
            .into_iter()
            .map(|m| {
                // Names only: a client never sees (or sends) a path.
                json!({"title": m.name, "model_name": m.name, "hash": null, "sha256": null,
                       "filename": m.name, "config": null})
            })
            .collect(),
    ))
}

async fn get_options(State(state): State<Arc<AppState>>) -> AppResult<Json<Value>> {
    let current = lock(&state.current_model).clone();
    let noise_schedule = *lock(&state.noise_schedule);
    let entry = state
        .models
        .find(&current)
        .ok_or_else(|| unknown_model("sd_model_checkpoint", &current))?;
    // The model's config, and whether zero SNR can be sampled with it at all (not with epsilon:
    // the page's "Compare fixes" then skips that column, as `sdfix ablate` does).
    let (config_zero_snr, zero_snr_applies) = blocking(move || {
        with_checker(&state, &entry, |e| {
            let applies = e.prediction(None).map(|(_, applies)| applies).unwrap_or(true);
            Ok((e.configs().scheduler.rescale_betas_zero_snr, applies))
        })
    })
    .await?;
    // Without the option set, what the current model's config says.
    let zero_snr = noise_schedule.unwrap_or(config_zero_snr);
    Ok(Json(json!({
        "sd_model_checkpoint": current,
        "sd_noise_schedule": if zero_snr { NOISE_SCHEDULE_ZERO_SNR } else { NOISE_SCHEDULE_DEFAULT },
        "sdfix_zero_snr_applies": zero_snr_applies,
    })))
}

/// The options sdfix reads; every other key is accepted and ignored, as a client sets many.
#[derive(serde::Deserialize)]
struct Options {
    sd_model_checkpoint: Option<String>,
    sd_noise_schedule: Option<Value>,
}

/// Sets `sd_model_checkpoint` (checked: the model's configs must open) and `sd_noise_schedule`.
/// The running run keeps its model; the worker switches before the next request's run.
async fn set_options(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> AppResult<Json<Value>> {
    let (_, options): (Value, Options) = parse_body(body)?;
    let noise_schedule = match &options.sd_noise_schedule {
        None | Some(Value::Null) => None,
        Some(v) => Some(api::parse_noise_schedule(v, "sd_noise_schedule")?),
    };
    if let Some(name) = options.sd_model_checkpoint {
        let entry = state
            .models
            .find(&name)
            .ok_or_else(|| unknown_model("sd_model_checkpoint", &name))?;
        let state2 = state.clone();
        blocking(move || with_checker(&state2, &entry, |_| Ok(()))).await?;
        *lock(&state.current_model) = name;
    }
    if noise_schedule.is_some() {
        *lock(&state.noise_schedule) = noise_schedule;
    }
    Ok(Json(Value::Null))
}

/// A query parameter read as pydantic reads a `bool` (what A1111's FastAPI `ProgressRequest`
/// does): `true`/`1`/`yes`/`on`/`t`/`y` or `false`/`0`/`no`/`off`/`f`/`n`, any case.
fn query_bool(query: Option<&str>, name: &str) -> AppResult<Option<bool>> {
    let Some(query) = query else {
        return Ok(None);
    };
    let mut found = None;
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key != name {
            continue;
        }
        found = Some(match value.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" | "t" | "y" => true,
            "false" | "0" | "no" | "off" | "f" | "n" => false,
            _ => {
                return Err(ApiError::invalid(format!(
                    "{name}: {value:?} is not a boolean (true or false)"
                )))
            }
        });
    }
    Ok(found)
}

/// A1111's `/sdapi/v1/progress`. `current_image` is the latest live preview of the running batch
/// (base64 PNG, no `data:` prefix, as A1111's `encode_pil_to_base64`), `null` when nothing runs or
/// no preview is drawn yet; `?skip_current_image=true` leaves it out and asks for none.
async fn progress(State(state): State<Arc<AppState>>, uri: axum::http::Uri) -> AppResult<Json<Value>> {
    let skip_image = query_bool(uri.query(), "skip_current_image")?.unwrap_or(false);
    if !skip_image {
        state.worker.request_preview();
    }
    let (p, queued) = state.worker.status();
    let running = p.running_tasks > 0;
    let current_image = match &p.current_image {
        Some(png) if running && !skip_image => {
            Value::from(base64::engine::general_purpose::STANDARD.encode(png.as_slice()))
        }
        _ => Value::Null,
    };
    Ok(Json(json!({
        "progress": p.fraction(),
        "eta_relative": p.eta_seconds(),
        "state": {
            "skipped": false,
            "interrupted": p.interrupted,
            "stopping_generation": false,
            "job": if running { "txt2img" } else { "" },
            "job_count": p.running_tasks + queued,
            "job_timestamp": if running { p.job_timestamp } else { "0".to_string() },
            "job_no": 0,
            "sampling_step": p.step,
            "sampling_steps": p.steps,
            // sdfix's: job_count split into the requests running together and those waiting.
            "running_requests": p.running_tasks,
            "queued_requests": queued,
        },
        "current_image": current_image,
        "textinfo": null,
    })))
}

/// The body of `POST /sdapi/v1/png-info` (A1111's `PNGInfoRequest`).
#[derive(serde::Deserialize)]
struct PngInfoBody {
    /// Base64 PNG bytes; a `data:image/png;base64,` prefix is stripped.
    image: String,
}

/// `POST /sdapi/v1/png-info`, A1111's PNG info (`api.py` `pnginfoapi`): `info` is the PNG's
/// `parameters` text ("" without one), `items` its other text chunks (sdfix's `sdfix` record among
/// them), `parameters` the text parsed as A1111's `parse_generation_parameters` does
/// ([`parse_parameters`]): `Prompt`, `Negative prompt`, each field, and a `WxH` value as
/// `Key-1`/`Key-2`. Departures: PNGs only (A1111 also reads JPEG and WebP EXIF), and no defaults
/// for fields the text lacks (A1111 adds some, e.g. `Clip skip: 1`). A body that is not a PNG
/// is a 422 naming `image`.
async fn png_info(body: Result<Bytes, BytesRejection>) -> AppResult<Json<Value>> {
    let (_, body): (Value, PngInfoBody) = parse_body(body)?;
    let text = blocking(move || {
        let bytes = api::decode_base64(&body.image).map_err(|e| ApiError::invalid(format!("image: {e:#}")))?;
        png::png_text(std::io::Cursor::new(bytes))
            .map_err(|e| ApiError::invalid(format!("image: not a readable PNG ({e:#})")))
    })
    .await?;
    let mut items: serde_json::Map<String, Value> = text.into_iter().map(|(k, v)| (k, Value::from(v))).collect();
    let info = match items.remove(PARAMETERS_CHUNK) {
        Some(Value::String(info)) => info,
        _ => String::new(),
    };
    let parsed = parse_parameters(&info);
    let mut parameters = serde_json::Map::new();
    parameters.insert("Prompt".into(), parsed.prompt.into());
    parameters.insert("Negative prompt".into(), parsed.negative_prompt.into());
    for (key, value) in parsed.fields {
        let size = value.split_once('x').filter(|(w, h)| {
            [w, h]
                .iter()
                .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        });
        match size {
            Some((w, h)) => {
                parameters.insert(format!("{key}-1"), w.into());
                parameters.insert(format!("{key}-2"), h.into());
            }
            None => {
                parameters.insert(key, value.into());
            }
        }
    }
    Ok(Json(json!({"info": info, "items": items, "parameters": parameters})))
}

/// The longest prompt `/sdfix/v1/prompt` tokenizes: far past any real prompt (A1111's
/// counter has no limit), short enough that a request costs milliseconds, not the body limit's
/// 16 MiB of BPE.
pub const MAX_PROMPT_CHARS: usize = 100_000;

/// The body of `POST /sdfix/v1/prompt`.
#[derive(serde::Deserialize)]
struct PromptBody {
    prompt: String,
    /// `original` unless told; A1111's spellings (`No norm`) too.
    #[serde(default, deserialize_with = "crate::engine::overrides::parsed")]
    emphasis: Option<crate::prompt::Emphasis>,
    /// Whose tokenizer, by name [default: `sd_model_checkpoint`].
    model: Option<String>,
}

/// `POST /sdfix/v1/prompt`: what `sdfix prompt --json` prints, for the page's token counter.
/// The model's tokenizer is read once, with its configs ([`Engine::tokenizer`]).
async fn prompt(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> AppResult<Json<Value>> {
    let (_, body): (Value, PromptBody) = parse_body(body)?;
    if body.prompt.chars().count() > MAX_PROMPT_CHARS {
        return Err(ApiError::invalid(format!(
            "prompt: longer than {MAX_PROMPT_CHARS} characters; a token counter needs no more"
        )));
    }
    let (field, name) = match body.model {
        Some(name) => ("model", name),
        None => ("sd_model_checkpoint", lock(&state.current_model).clone()),
    };
    let entry = state.models.find(&name).ok_or_else(|| unknown_model(field, &name))?;
    let report = blocking(move || {
        with_checker(&state, &entry, |engine| {
            let tokenizer = engine.tokenizer().map_err(|e| ApiError::internal(&e))?;
            let tokenized = tokenize_prompt(&body.prompt, body.emphasis.unwrap_or_default(), tokenizer)
                .map_err(|e| ApiError::invalid(format!("prompt: {e:#}")))?;
            Ok(PromptReport::new(&tokenized, tokenizer))
        })
    })
    .await?;
    Ok(Json(
        serde_json::to_value(report).map_err(|e| ApiError::internal(&e.into()))?,
    ))
}

async fn interrupt(State(state): State<Arc<AppState>>) -> Json<Value> {
    state.worker.interrupt();
    Json(Value::Null)
}
