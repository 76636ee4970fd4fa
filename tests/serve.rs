//! `sdfix serve`, black-box: the binary on an ephemeral loopback port with the demo models,
//! spoken to over plain HTTP/1.1 (a tiny client on `TcpStream`, so tests can also send broken
//! bodies and hang up mid-request).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

/// A running `sdfix serve`, killed when dropped.
struct Server {
    child: Child,
    address: String,
    dir: tempfile::TempDir,
}

impl Server {
    /// Starts `sdfix serve --listen 127.0.0.1:0` plus `extra` in a fresh folder and reads the
    /// bound address from its first line of output.
    fn start(extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_sdfix"))
            .args(["serve", "--listen", "127.0.0.1:0", "--out-dir", "out"])
            .args(extra)
            .current_dir(dir.path())
            .env("SDFIX_CACHE", dir.path().join("cache"))
            .env("HF_HUB_OFFLINE", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("sdfix serve starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let address = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        Server { child, address, dir }
    }

    /// Sends a request and leaves the connection open, unread (a client that may hang up).
    fn send(&self, method: &str, path: &str, body: &str, headers: &[(&str, &str)]) -> TcpStream {
        let mut stream = TcpStream::connect(&self.address).unwrap();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n",
            self.address,
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        // A server may answer (413) before reading all of a huge body, and close.
        let _ = stream.write_all(body.as_bytes());
        stream
    }

    fn request(&self, method: &str, path: &str, body: &str, headers: &[(&str, &str)]) -> Response {
        read_response(self.send(method, path, body, headers))
    }

    fn get(&self, path: &str) -> Response {
        self.request("GET", path, "", &[])
    }

    fn post(&self, path: &str, body: &Value) -> Response {
        self.request("POST", path, &body.to_string(), &[])
    }

    fn progress(&self) -> Value {
        self.get("/sdapi/v1/progress").json()
    }

    /// Polls /progress until `done` says so (or fails after `seconds`).
    fn wait_for(&self, seconds: u64, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let p = self.progress();
            if done(&p) {
                return p;
            }
            assert!(start.elapsed() < Duration::from_secs(seconds), "waited for {what}: {p}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Response {
    status: u16,
    headers: String,
    body: String,
}

impl Response {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {} {}", self.status, self.body))
    }
}

fn read_response(mut stream: TcpStream) -> Response {
    let mut bytes = Vec::new();
    // A server that closes after an early answer may reset the connection; keep what came.
    let _ = stream.read_to_end(&mut bytes);
    let text = String::from_utf8(bytes).unwrap();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response: {text:?}"));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    Response {
        status,
        headers: head.to_lowercase(),
        body: body.to_string(),
    }
}

/// The decoded PNG of a base64 image, and its text chunks.
fn decode_png(image: &Value) -> (Vec<u8>, std::collections::HashMap<String, String>) {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(image.as_str().unwrap())
        .unwrap();
    let file = std::env::temp_dir().join(format!("sdfix-serve-{}.png", std::process::id()));
    std::fs::write(&file, &bytes).unwrap();
    let text = sdfix::output::png::read_png_text(&file).unwrap();
    let _ = std::fs::remove_file(&file);
    let rgb = image::load_from_memory(&bytes).unwrap().to_rgb8().into_raw();
    (rgb, text)
}

/// A job long enough on the demo model to watch, interrupt and cancel (seconds unless stopped).
fn long_job() -> Value {
    json!({"prompt": "solid white background", "steps": 150, "width": 64, "height": 64, "n_iter": 8})
}

#[test]
fn txt2img_draws_black_with_a1111_info_and_ignores_unknown_fields() {
    let server = Server::start(&[]);
    // Fields webuiapi sends that sdfix does not read, and nulls, are ignored.
    let r = server.post(
        "/sdapi/v1/txt2img",
        &json!({
            "prompt": "solid black background", "seed": 7, "steps": 20, "batch_size": 2,
            "sampler_name": "DDIM", "width": null, "height": null, "restore_faces": false,
            "enable_hr": false, "styles": [], "alwayson_scripts": {}, "subseed": -1,
            "override_settings": {"CLIP_stop_at_last_layers": 1}, "save_images": true,
        }),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let body = r.json();
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["all_seeds"], json!([7, 8]));
    assert_eq!(info["seed"], 7);
    assert_eq!((info["width"].as_u64(), info["height"].as_u64()), (Some(32), Some(32)));
    assert_eq!(info["sampler_name"], "DDIM");
    assert_eq!(info["steps"], 20);
    assert_eq!(info["sd_model_name"], "demo");
    // The paper's fixes, the defaults.
    assert_eq!(info["zero_snr"], true);
    assert_eq!(info["spacing"], "trailing");
    assert_eq!(info["guidance_rescale"], 0.7);
    assert_eq!(body["parameters"]["seed"], 7);
    assert_eq!(body["parameters"]["restore_faces"], false);
    let images = body["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    for (k, image) in images.iter().enumerate() {
        let (rgb, text) = decode_png(image);
        let luminance = sdfix::cli::luminance::mean_luminance(&rgb);
        assert!(luminance <= 0.08, "image {k}: luminance {luminance}");
        // The same metadata as `generate` writes, and the infotext A1111 clients read.
        assert_eq!(text["parameters"], info["infotexts"][k].as_str().unwrap());
        assert!(
            text["parameters"].contains(&format!("Seed: {}", 7 + k)),
            "{}",
            text["parameters"]
        );
        assert!(text.contains_key("sdfix"));
    }
    // save_images: the same PNGs and a manifest in --out-dir.
    let out = server.dir.path().join("out");
    assert!(out.join("00000-00-7-solid-black-background.png").is_file());
    assert!(out.join("00000-01-8-solid-black-background.png").is_file());
    let manifest = std::fs::read_to_string(out.join("manifest.jsonl")).unwrap();
    assert_eq!(manifest.lines().count(), 2);
}

#[test]
fn the_listings_speak_a1111() {
    let server = Server::start(&[]);
    let samplers = server.get("/sdapi/v1/samplers").json();
    let names: Vec<&str> = samplers
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["DDIM", "Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE", "UniPC"]);
    let schedulers = server.get("/sdapi/v1/schedulers").json();
    assert!(schedulers.as_array().unwrap().iter().any(|s| s["label"] == "Karras"));
    let models = server.get("/sdapi/v1/sd-models").json();
    let titles: Vec<&str> = models
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles, ["demo", "demo-flawed"]);
    let page = server.get("/");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("Compare fixes"), "{}", page.body);
    // Idle progress is what webuiapi's util_wait_for_ready waits for.
    let p = server.progress();
    assert_eq!(
        (p["progress"].as_f64(), p["state"]["job_count"].as_u64()),
        (Some(0.0), Some(0))
    );
}

#[test]
fn bad_input_gets_a_json_error_naming_the_field() {
    let server = Server::start(&["--max-pixels", "16384", "--max-steps", "100"]);
    let cases: [(&str, u16, &str); 13] = [
        (r#"{"prompt": "#, 422, "body"),
        (r#"[1, 2]"#, 422, "body"),
        (r#"{"steps": "many"}"#, 422, "steps"),
        (r#"{"seed": 1.5}"#, 422, "seed"),
        (r#"{"width": 30}"#, 422, "width"),
        (r#"{"height": 12}"#, 422, "height: 12 must be a positive multiple of 8"),
        (r#"{"width": 256, "height": 256}"#, 422, "--max-pixels"),
        (r#"{"steps": 101}"#, 422, "steps"),
        // The engine's own checks, worded with the request's field names.
        (r#"{"cfg_scale": -1}"#, 422, "cfg_scale: -1 must not be negative"),
        (r#"{"guidance_rescale": 2}"#, 422, "guidance_rescale"),
        (r#"{"sampler_name": "LMS"}"#, 422, "sampler_name"),
        (
            r#"{"override_settings": {"sd_model_checkpoint": "../demo"}}"#,
            404,
            "sd_model_checkpoint",
        ),
        (
            r#"{"override_settings": {"sd_noise_schedule": "Zero"}}"#,
            422,
            "sd_noise_schedule",
        ),
    ];
    for (body, status, field) in cases {
        let r = server.request("POST", "/sdapi/v1/txt2img", body, &[]);
        assert_eq!(r.status, status, "{body}: {}", r.body);
        let error = r.json();
        assert!(error["error"].is_string(), "{body}: {error}");
        let detail = error["detail"].as_str().unwrap();
        assert!(detail.contains(field), "{body}: {detail}");
    }
    // Over the body limit: 413, in the same shape.
    let huge = format!(r#"{{"prompt": "{}"}}"#, "x".repeat(17 << 20));
    let r = server.request("POST", "/sdapi/v1/txt2img", &huge, &[]);
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.json()["error"], "payload_too_large");
    let r = server.get("/sdapi/v1/nothing");
    assert_eq!((r.status, r.json()["error"].as_str()), (404, Some("not_found")));
    let r = server.post("/sdapi/v1/options", &json!({"sd_model_checkpoint": "/etc"}));
    assert_eq!(r.status, 404, "{}", r.body);
    // Nothing wedged: a good request still works.
    let r = server.post("/sdapi/v1/txt2img", &json!({"prompt": "x", "steps": 2}));
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn auth_is_required_when_set() {
    let server = Server::start(&["--api-auth", "user:secret"]);
    let r = server.get("/sdapi/v1/samplers");
    assert_eq!(r.status, 401);
    assert!(r.headers.contains("www-authenticate: basic"), "{}", r.headers);
    assert_eq!(r.json()["error"], "unauthorized");
    let wrong = base64::engine::general_purpose::STANDARD.encode("user:guess");
    let r = server.request(
        "GET",
        "/sdapi/v1/samplers",
        "",
        &[("Authorization", &format!("Basic {wrong}"))],
    );
    assert_eq!(r.status, 401);
    let right = base64::engine::general_purpose::STANDARD.encode("user:secret");
    let r = server.request(
        "GET",
        "/sdapi/v1/samplers",
        "",
        &[("Authorization", &format!("Basic {right}"))],
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn options_switch_the_model_between_jobs() {
    let server = Server::start(&[]);
    let options = server.get("/sdapi/v1/options").json();
    assert_eq!(options["sd_model_checkpoint"], "demo");
    // What the page's "Compare fixes" builds its columns by (the rule of `sdfix ablate`).
    assert_eq!(options["sdfix_zero_snr_applies"], true);
    let r = server.post(
        "/sdapi/v1/options",
        &json!({"sd_model_checkpoint": "demo-flawed", "show_progressbar": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let options = server.get("/sdapi/v1/options").json();
    assert_eq!(options["sd_model_checkpoint"], "demo-flawed");
    // demo-flawed's config: epsilon, no zero SNR; and zero SNR cannot apply to it.
    assert_eq!(options["sd_noise_schedule"], "Default");
    assert_eq!(options["sdfix_zero_snr_applies"], false);
    let info = |r: Response| -> Value {
        assert_eq!(r.status, 200, "{}", r.body);
        serde_json::from_str(r.json()["info"].as_str().unwrap()).unwrap()
    };
    let flawed = info(server.post("/sdapi/v1/txt2img", &json!({"prompt": "x", "steps": 4, "seed": 1})));
    assert_eq!(flawed["sd_model_name"], "demo-flawed");
    assert_eq!(flawed["zero_snr"], false);
    assert!(flawed["infotexts"][0].as_str().unwrap().contains("Prediction: epsilon"));
    // Zero SNR on an epsilon model cannot work: refused, naming the field.
    let r = server.post("/sdapi/v1/txt2img", &json!({"zero_snr": true}));
    assert_eq!(r.status, 422);
    assert!(r.json()["detail"].as_str().unwrap().contains("zero_snr"), "{}", r.body);
    // One request on another model, without switching.
    let one = info(server.post(
        "/sdapi/v1/txt2img",
        &json!({"steps": 4, "override_settings": {"sd_model_checkpoint": "demo"}}),
    ));
    assert_eq!(one["sd_model_name"], "demo");
    assert_eq!(
        server.get("/sdapi/v1/options").json()["sd_model_checkpoint"],
        "demo-flawed"
    );
    let r = server.post("/sdapi/v1/options", &json!({"sd_model_checkpoint": "demo"}));
    assert_eq!(r.status, 200);
    let back = info(server.post("/sdapi/v1/txt2img", &json!({"prompt": "x", "steps": 4, "seed": 1})));
    assert_eq!(
        (back["sd_model_name"].as_str(), back["zero_snr"].as_bool()),
        (Some("demo"), Some(true))
    );
}

#[test]
fn progress_moves_and_interrupt_stops_the_run_at_the_next_step() {
    let server = Server::start(&[]);
    let job = server.send("POST", "/sdapi/v1/txt2img", &long_job().to_string(), &[]);
    let first = server.wait_for(60, "a step", |p| p["state"]["sampling_step"].as_u64() > Some(0));
    assert_eq!(first["state"]["job_count"], 1);
    assert_eq!(first["state"]["sampling_steps"], 150);
    let later = server.wait_for(60, "progress to move", |p| {
        p["progress"].as_f64() > first["progress"].as_f64()
    });
    assert!(later["eta_relative"].as_f64().unwrap() > 0.0, "{later}");
    let asked = Instant::now();
    let r = server.post("/sdapi/v1/interrupt", &json!({}));
    assert_eq!(r.status, 200);
    let r = read_response(job);
    let stopped = asked.elapsed();
    assert_eq!(r.status, 200, "{}", r.body);
    let info: Value = serde_json::from_str(r.json()["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["interrupted"], true);
    assert!(r.json()["images"].as_array().unwrap().len() < 8);
    // The next step comes within a fraction of a second on the demo model.
    assert!(stopped < Duration::from_secs(10), "{stopped:?}");
    server.wait_for(10, "idle", |p| p["state"]["job_count"] == 0 && p["progress"] == 0.0);
    // And the server goes on.
    let r = server.post("/sdapi/v1/txt2img", &json!({"steps": 2}));
    assert_eq!(r.status, 200, "{}", r.body);
}

/// `current_image` while a run goes on: a base64 PNG (no `data:` prefix) of the running batch's
/// preview, asked for by the polls themselves; `skip_current_image` leaves it out; `null` when
/// idle; TAESD draws at 8x the latent size.
#[test]
fn progress_carries_a_live_preview_while_a_picture_is_drawn() {
    let taesd = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-taesd");
    for (extra, side) in [
        (vec!["--preview-every", "1"], 16u32),
        (vec!["--taesd", taesd.to_str().unwrap()], 128),
    ] {
        let server = Server::start(&extra);
        assert_eq!(server.progress()["current_image"], Value::Null, "idle");
        // 32x32 on the demo (VAE downscale 2): 16x16 latents; 8 x 150 steps outlast the polls.
        let job = server.send(
            "POST",
            "/sdapi/v1/txt2img",
            &json!({"prompt": "a red circle", "steps": 150, "width": 32, "height": 32, "n_iter": 8}).to_string(),
            &[],
        );
        let p = server.wait_for(60, "a preview", |p| p["current_image"].is_string());
        let text = p["current_image"].as_str().unwrap();
        assert!(!text.starts_with("data:"), "A1111 sends bare base64");
        let bytes = base64::engine::general_purpose::STANDARD.decode(text).unwrap();
        let picture = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).unwrap();
        // The 8 images run 4 to a UNet batch (--max-batch 4): a 2 x 2 grid, as A1111's.
        assert_eq!((picture.width(), picture.height()), (2 * side, 2 * side), "{extra:?}");
        let skipped = server.get("/sdapi/v1/progress?skip_current_image=true").json();
        assert_eq!(skipped["current_image"], Value::Null);
        assert!(skipped["state"]["sampling_step"].as_u64() > Some(0));
        let bad = server.get("/sdapi/v1/progress?skip_current_image=maybe");
        assert_eq!(bad.status, 422, "{}", bad.body);
        assert!(bad.body.contains("skip_current_image"), "{}", bad.body);
        server.post("/sdapi/v1/interrupt", &json!({}));
        assert_eq!(read_response(job).status, 200);
        server.wait_for(10, "idle", |p| p["state"]["job_count"] == 0);
        assert_eq!(server.progress()["current_image"], Value::Null, "idle again");
    }
}

#[test]
fn a_taesd_that_cannot_serve_the_startup_model_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(&config, r#"{"latent_channels": 16}"#).unwrap();
    std::fs::write(dir.path().join("diffusion_pytorch_model.safetensors"), b"").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sdfix"))
        .args(["serve", "--listen", "127.0.0.1:0", "--taesd"])
        .arg(dir.path())
        .env("SDFIX_CACHE", dir.path().join("cache"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains("16 latent channels"),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

#[test]
fn a_full_queue_answers_503_and_clients_that_hang_up_are_cancelled() {
    let server = Server::start(&["--queue", "1"]);
    let running = server.send("POST", "/sdapi/v1/txt2img", &long_job().to_string(), &[]);
    server.wait_for(60, "the first job to run", |p| {
        p["state"]["sampling_step"].as_u64() > Some(0)
    });
    // Different settings, so it cannot join the running run: it waits.
    let waiting = server.send("POST", "/sdapi/v1/txt2img", &json!({"steps": 3}).to_string(), &[]);
    server.wait_for(10, "the second to queue", |p| p["state"]["job_count"] == 2);
    let r = server.post("/sdapi/v1/txt2img", &json!({"steps": 3}));
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.headers.contains("retry-after:"), "{}", r.headers);
    assert_eq!(r.json()["error"], "queue_full");
    // The waiting client hangs up: its request leaves the queue.
    drop(waiting);
    server.wait_for(10, "the hung-up request to leave the queue", |p| {
        p["state"]["job_count"] == 1
    });
    // The running client hangs up: its run stops at the next step (it had seconds to go).
    let hung_up = Instant::now();
    drop(running);
    server.wait_for(10, "the hung-up run to stop", |p| p["state"]["job_count"] == 0);
    assert!(hung_up.elapsed() < Duration::from_secs(10));
    let r = server.post("/sdapi/v1/txt2img", &json!({"steps": 2}));
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn equal_settings_share_a_run() {
    let server = Server::start(&["--max-batch", "4"]);
    let blocker = server.send("POST", "/sdapi/v1/txt2img", &long_job().to_string(), &[]);
    server.wait_for(60, "the first job to run", |p| {
        p["state"]["sampling_step"].as_u64() > Some(0)
    });
    // Three requests with equal settings (different prompts and seeds) queue behind it ...
    let queued: Vec<TcpStream> = (0..3)
        .map(|k| {
            let body = json!({"prompt": format!("p{k}"), "seed": k, "steps": 30});
            server.send("POST", "/sdapi/v1/txt2img", &body.to_string(), &[])
        })
        .collect();
    server.wait_for(10, "three to queue", |p| p["state"]["job_count"] == 4);
    server.post("/sdapi/v1/interrupt", &json!({}));
    drop(blocker);
    // ... and run as one: the worker reports them together.
    let together = server.wait_for(30, "the batched run", |p| p["state"]["sampling_steps"] == 30);
    assert_eq!(together["state"]["running_requests"], 3, "{together}");
    assert_eq!(together["state"]["queued_requests"], 0, "{together}");
    for (k, stream) in queued.into_iter().enumerate() {
        let r = read_response(stream);
        assert_eq!(r.status, 200, "{}", r.body);
        let info: Value = serde_json::from_str(r.json()["info"].as_str().unwrap()).unwrap();
        assert_eq!(
            (info["prompt"].as_str(), info["seed"].as_u64()),
            (Some(format!("p{k}").as_str()), Some(k as u64))
        );
    }
}

#[test]
fn models_dir_folders_are_offered_by_name() {
    let models = tempfile::tempdir().unwrap();
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo");
    std::os::unix::fs::symlink(&demo, models.path().join("my-demo")).unwrap();
    std::fs::create_dir(models.path().join("not-a-model")).unwrap();
    let server = Server::start(&["--models-dir", models.path().to_str().unwrap()]);
    let listed = server.get("/sdapi/v1/sd-models").json();
    let titles: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles, ["demo", "demo-flawed", "my-demo"]);
    // Names only: no entry shows where it lives.
    assert!(
        !listed.to_string().contains(models.path().to_str().unwrap()),
        "{listed}"
    );
    let r = server.post("/sdapi/v1/options", &json!({"sd_model_checkpoint": "my-demo"}));
    assert_eq!(r.status, 200, "{}", r.body);
    let r = server.post(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "solid black background", "steps": 10, "seed": 1}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let info: Value = serde_json::from_str(r.json()["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["sd_model_name"], "my-demo");
    for bad in ["not-a-model", "../my-demo", "my-demo/unet"] {
        let r = server.post("/sdapi/v1/options", &json!({"sd_model_checkpoint": bad}));
        assert_eq!(r.status, 404, "{bad}: {}", r.body);
    }
}

#[test]
fn a_non_loopback_address_without_auth_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sdfix"))
        .args(["serve", "--listen", "0.0.0.0:0"])
        .current_dir(dir.path())
        .env("SDFIX_CACHE", dir.path().join("cache"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("listening on http://0.0.0.0:"), "{line}");
    child.kill().unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("warning: listening on 0.0.0.0:0 without --api-auth"),
        "{stderr}"
    );
}

/// A PNG of `image`, base64, with a `data:` prefix as browsers send it.
fn png_base64(image: impl Into<image::DynamicImage>) -> String {
    let image: image::DynamicImage = image.into();
    let mut bytes = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .unwrap();
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// img2img in A1111's shape: a grey picture asked for "solid black background" at strength 1
/// comes back black (zero SNR starts from pure noise), with the strength in the info and the
/// picture not echoed; a mask repaints only its white part and keeps the rest byte-exact.
#[test]
fn img2img_and_inpainting_in_a1111_shape() {
    let server = Server::start(&[]);
    let grey = image::RgbImage::from_pixel(32, 32, image::Rgb([128, 128, 128]));
    let r = server.post(
        "/sdapi/v1/img2img",
        &json!({
            "prompt": "solid black background", "seed": 3, "steps": 10, "init_images": [png_base64(grey.clone())],
            "denoising_strength": 1.0, "width": 32, "height": 32, "resize_mode": 0, "mask": null,
            "inpainting_fill": 0, "inpaint_full_res": true, "include_init_images": false,
        }),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let body = r.json();
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["denoising_strength"], 1.0);
    assert_eq!(body["parameters"]["init_images"], Value::Null);
    let (rgb, text) = decode_png(&body["images"][0]);
    assert!(sdfix::cli::luminance::mean_luminance(&rgb) <= 0.08);
    assert!(
        text["parameters"].contains("Denoising strength: 1"),
        "{}",
        text["parameters"]
    );

    // Inpainting: repaint the right half black, keep the left half grey.
    let mask = image::GrayImage::from_fn(32, 32, |x, _| image::Luma([if x >= 16 { 255 } else { 0 }]));
    let r = server.post(
        "/sdapi/v1/img2img",
        &json!({
            "prompt": "solid black background", "seed": 3, "steps": 10, "init_images": [png_base64(grey.clone())],
            "mask": png_base64(mask.clone()), "mask_blur": 2, "denoising_strength": 1.0,
        }),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let (rgb, _) = decode_png(&r.json()["images"][0]);
    for (i, pixel) in rgb.chunks(3).enumerate() {
        let x = i % 32;
        if x < 11 {
            assert_eq!(pixel, [128, 128, 128], "kept pixel {i}");
        }
    }
    let right: Vec<u8> = rgb
        .chunks(3)
        .enumerate()
        .filter(|(i, _)| i % 32 >= 21)
        .map(|(_, p)| p[0])
        .collect();
    let mean = right.iter().map(|&v| v as f64).sum::<f64>() / right.len() as f64 / 255.0;
    assert!(mean < 0.2, "repainted half: {mean}");

    // Bad pictures and fields are 422s naming the field.
    for (body, field) in [
        (json!({"prompt": "x"}), "init_images"),
        (json!({"prompt": "x", "init_images": ["@@@"]}), "init_images[0]"),
        (json!({"prompt": "x", "init_images": ["aGVsbG8="]}), "init_images[0]"),
        (
            json!({"prompt": "x", "init_images": [png_base64(grey.clone())], "denoising_strength": 1.5}),
            "denoising_strength",
        ),
        (
            json!({"prompt": "x", "init_images": [png_base64(grey.clone())], "resize_mode": 3}),
            "resize_mode",
        ),
        (
            json!({"prompt": "x", "init_images": [png_base64(grey.clone())], "mask": "@@@"}),
            "mask",
        ),
    ] {
        let r = server.post("/sdapi/v1/img2img", &body);
        assert_eq!(r.status, 422, "{body}: {}", r.body);
        let detail = r.json()["detail"].as_str().unwrap().to_string();
        assert!(detail.contains(field), "{body}: {detail}");
    }
}

/// The worker runs queued requests that can share a UNet batch as one run (batched by the
/// engine's typed key); text to image, img2img and inpainting never share a batch, so every
/// request's images equal the ones it gets alone. Six requests of mixed modes queue behind a
/// long job on a `--max-batch 4` server and are compared with the same six, one at a time, on a
/// `--max-batch 1` server.
#[test]
fn concurrent_requests_of_mixed_modes_get_the_images_they_get_alone() {
    let grey = png_base64(image::RgbImage::from_pixel(32, 32, image::Rgb([128, 128, 128])));
    let mask = png_base64(image::GrayImage::from_fn(32, 32, |x, _| {
        image::Luma([if x >= 16 { 255 } else { 0 }])
    }));
    let base = |seed: u64| json!({"prompt": "solid white background", "seed": seed, "steps": 6});
    let with = |mut body: Value, fields: Value| {
        for (k, v) in fields.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let requests: Vec<(&str, Value)> = vec![
        ("/sdapi/v1/txt2img", base(1)),
        (
            "/sdapi/v1/img2img",
            with(base(1), json!({"init_images": [grey], "denoising_strength": 1.0})),
        ),
        (
            "/sdapi/v1/img2img",
            with(
                base(1),
                json!({"init_images": [grey], "mask": mask, "denoising_strength": 1.0}),
            ),
        ),
        (
            "/sdapi/v1/img2img",
            with(base(2), json!({"init_images": [grey], "denoising_strength": 0.5})),
        ),
        (
            "/sdapi/v1/img2img",
            with(
                base(2),
                json!({"init_images": [grey], "mask": mask, "denoising_strength": 0.5}),
            ),
        ),
        ("/sdapi/v1/txt2img", with(base(2), json!({"n_iter": 2}))),
    ];
    let images = |r: Response| -> Vec<Value> {
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["images"].as_array().unwrap().clone()
    };
    let alone: Vec<Vec<Value>> = {
        let server = Server::start(&["--max-batch", "1"]);
        requests
            .iter()
            .map(|(route, body)| images(server.post(route, body)))
            .collect()
    };
    let server = Server::start(&["--max-batch", "4", "--queue", "8"]);
    let blocker = server.send("POST", "/sdapi/v1/txt2img", &long_job().to_string(), &[]);
    server.wait_for(60, "the first job to run", |p| {
        p["state"]["sampling_step"].as_u64() > Some(0)
    });
    let queued: Vec<TcpStream> = requests
        .iter()
        .map(|(route, body)| server.send("POST", route, &body.to_string(), &[]))
        .collect();
    server.wait_for(10, "all to queue", |p| p["state"]["job_count"] == 1 + requests.len());
    server.post("/sdapi/v1/interrupt", &json!({}));
    drop(blocker);
    for ((route, body), (stream, expected)) in requests.iter().zip(queued.into_iter().zip(&alone)) {
        assert!(
            images(read_response(stream)) == *expected,
            "{route} {}: images differ from the request alone",
            body["denoising_strength"]
        );
    }
}

/// An SDXL model behind the API: listed, drawing with its micro-conditioning fields (the same
/// picture as the command line's flags), and a micro-conditioning field on an SD 2 model is a 422
/// naming it.
#[test]
fn sdxl_models_serve_txt2img_with_micro_conditioning() {
    let sdxl = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sdxl");
    let server = Server::start(&["--model", sdxl.to_str().unwrap()]);
    let models = server.get("/sdapi/v1/sd-models").json();
    assert_eq!(models[0]["model_name"], "tiny-sdxl", "{models}");
    let body = json!({
        "prompt": "solid black background", "seed": 5, "steps": 4, "width": 32, "height": 32,
        "cfg_scale": 5, "original_size": "64x48", "crop_top_left": "4,2",
    });
    let r = server.post("/sdapi/v1/txt2img", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let (served, text) = decode_png(&r.json()["images"][0]);
    let record: Value = serde_json::from_str(&text["sdfix"]).unwrap();
    assert_eq!(
        (record["original_size"].as_str(), record["crop_top_left"].as_str()),
        (Some("64x48"), Some("4,2"))
    );
    let dir = tempfile::tempdir().unwrap();
    let cli = Command::new(env!("CARGO_BIN_EXE_sdfix"))
        .args([
            "generate",
            "--model",
            sdxl.to_str().unwrap(),
            "--prompt",
            "solid black background",
            "--seed",
            "5",
        ])
        .args([
            "--steps",
            "4",
            "--width",
            "32",
            "--height",
            "32",
            "--guidance",
            "5",
            "--original-size",
            "64x48",
        ])
        .args([
            "--crop-top-left",
            "4,2",
            "--out-dir",
            dir.path().to_str().unwrap(),
            "-q",
        ])
        .output()
        .unwrap();
    assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
    let png = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "png"))
        .unwrap();
    let drawn = image::open(png).unwrap().to_rgb8().into_raw();
    assert!(drawn == served, "the API and the command line drew different pictures");

    let sd2 = Server::start(&[]);
    let r = sd2.post(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "x", "steps": 2, "target_size": "64x64"}),
    );
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(
        r.body.contains("target_size: applies to SDXL models only"),
        "{}",
        r.body
    );
}

/// The page at `/` carries its tools (issue 31 §5) and nothing from elsewhere: no address with a
/// scheme, so it works offline (no CDN); the browser checks are `scripts/page_check.mjs`.
#[test]
fn the_page_is_one_offline_file_with_its_tools() {
    let server = Server::start(&[]);
    let page = server.get("/");
    assert_eq!(page.status, 200);
    assert!(page.headers.contains("content-type: text/html"), "{}", page.headers);
    for needle in [
        // the form and its token counters
        "id=\"prompt\"",
        "id=\"prompt-count\"",
        "id=\"negative-count\"",
        "/sdfix/v1/prompt",
        // progress, live preview, results with their infotext, history
        "id=\"fill\"",
        "current_image",
        "live-figure",
        "id=\"results\"",
        "id=\"history\"",
        "id=\"clear-history\"",
        // PNG info: drop or choose a PNG
        "id=\"png-file\"",
        "\"drop\"",
        "parameters",
        // img2img and the mask canvas
        "id=\"init-file\"",
        "<canvas id=\"mask\"",
        "id=\"brush\"",
        "id=\"clear-mask\"",
        "init_images",
        "denoising_strength",
        // hires fix
        "id=\"enable_hr\"",
        "hr_scale",
        "hr_upscaler",
        "hr_second_pass_steps",
        // the compare-fixes grid
        "id=\"compare\"",
        "Compare fixes",
    ] {
        assert!(page.body.contains(needle), "the page has no {needle}");
    }
    assert!(
        !page.body.contains("://"),
        "the page must load nothing from elsewhere (offline, no CDN)"
    );
}

/// `sdfix prompt --json` for `text` with the extra flags.
fn prompt_cli(text: &str, extra: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_sdfix"))
        .args(["prompt", "--json"])
        .args(extra)
        .arg(text)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `POST /sdfix/v1/prompt` answers what `sdfix prompt --json` prints (the page's token
/// counter): a weighted prompt past one chunk, another emphasis, another model's tokenizer; a
/// bad body is a 4xx naming its field.
#[test]
fn the_prompt_endpoint_answers_as_sdfix_prompt_json() {
    let server = Server::start(&[]);
    let long = format!(
        "(best quality:1.2), [blurry], {} BREAK a house",
        "a red cat, ".repeat(30)
    );
    for (body, flags) in [
        (json!({"prompt": long}), vec![]),
        (
            json!({"prompt": "((a:1.3)) b", "emphasis": "comfy"}),
            vec!["--emphasis", "comfy"],
        ),
        (
            json!({"prompt": "((a:1.3)) b", "emphasis": "No norm"}),
            vec!["--emphasis", "no-norm"],
        ),
        (
            json!({"prompt": "", "model": "demo-flawed"}),
            vec!["--model", "demo-flawed"],
        ),
    ] {
        let r = server.post("/sdfix/v1/prompt", &body);
        assert_eq!(r.status, 200, "{body}: {}", r.body);
        let text = body["prompt"].as_str().unwrap();
        assert_eq!(r.json(), prompt_cli(text, &flags), "{body}");
    }
    let report = server.post("/sdfix/v1/prompt", &json!({"prompt": long})).json();
    assert_eq!(report["chunks"].as_array().unwrap().len(), 3, "{report}");
    assert!(report["token_count"].as_u64().unwrap() > 150, "{report}");
    assert_eq!(report["fragments"][0], json!(["best quality", 1.2]));

    for (body, status, field) in [
        ("{}".to_string(), 422, "prompt"),
        (json!({"prompt": 5}).to_string(), 422, "prompt"),
        (json!({"prompt": "a", "emphasis": "loud"}).to_string(), 422, "emphasis"),
        (json!({"prompt": "a", "model": "nope"}).to_string(), 404, "model"),
        (json!({"prompt": "a".repeat(100_001)}).to_string(), 422, "prompt"),
        ("[\"a\"]".to_string(), 422, "body"),
        ("{\"prompt\": ".to_string(), 422, "body"),
    ] {
        let r = server.request("POST", "/sdfix/v1/prompt", &body, &[]);
        assert_eq!(r.status, status, "{}: {}", &body[..body.len().min(40)], r.body);
        let error = r.json();
        assert!(
            error["detail"].as_str().unwrap().contains(field),
            "{}: {error}",
            &body[..body.len().min(40)]
        );
    }
    assert_eq!(server.get("/sdfix/v1/prompt").status, 405);
}

/// What the page sends with the hires fix and inpainting (A1111's field names) is taken by the
/// server, whichever of those fields it acts on.
#[test]
fn the_pages_hires_and_inpainting_fields_are_accepted() {
    let server = Server::start(&[]);
    let body = json!({
        "prompt": "solid black background", "negative_prompt": "", "sampler_name": "DDIM",
        "scheduler": "Automatic", "steps": 2, "cfg_scale": 7.5, "seed": 3, "width": null,
        "height": null, "zero_snr": null, "spacing": "trailing", "guidance_rescale": 0.7,
        "enable_hr": true, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0,
        "denoising_strength": 0.7,
    });
    let r = server.post("/sdapi/v1/txt2img", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let grey = png_base64(image::RgbImage::from_pixel(32, 32, image::Rgb([128, 128, 128])));
    let mask = png_base64(image::RgbImage::from_fn(32, 32, |x, _| {
        image::Rgb(if x < 16 { [255; 3] } else { [0; 3] })
    }));
    let body = json!({
        "prompt": "solid black background", "sampler_name": "DDIM", "steps": 2, "seed": 3,
        "init_images": [grey], "denoising_strength": 0.75,
        "resize_mode": 0, "mask": mask, "mask_blur": 4,
        "inpainting_mask_invert": 0, "inpainting_fill": 1, "inpaint_full_res": false,
    });
    let r = server.post("/sdapi/v1/img2img", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let info: Value = serde_json::from_str(r.json()["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["denoising_strength"], 0.75, "{info}");
}

/// `POST /sdapi/v1/png-info` as A1111's: a PNG the server made gives its infotext, the `sdfix`
/// record among the other chunks and the parsed fields (`Size` as `Size-1`/`Size-2`); an
/// A1111-style PNG with a quoted value keeps its commas; a body that is not a PNG is a 422.
#[test]
fn png_info_reads_parameters_as_a1111() {
    let server = Server::start(&[]);
    let made = server
        .post(
            "/sdapi/v1/txt2img",
            &json!({"prompt": "a lighthouse", "negative_prompt": "blurry", "seed": 42, "steps": 3}),
        )
        .json();
    let info: Value = serde_json::from_str(made["info"].as_str().unwrap()).unwrap();
    let r = server.post("/sdapi/v1/png-info", &json!({"image": made["images"][0]}));
    assert_eq!(r.status, 200, "{}", r.body);
    let answer = r.json();
    assert_eq!(answer["info"], info["infotexts"][0]);
    assert!(
        answer["items"]["sdfix"].as_str().unwrap().contains("\"seed\":42"),
        "{answer}"
    );
    let p = &answer["parameters"];
    assert_eq!(
        (
            &p["Prompt"],
            &p["Negative prompt"],
            &p["Seed"],
            &p["Size-1"],
            &p["Size-2"]
        ),
        (
            &json!("a lighthouse"),
            &json!("blurry"),
            &json!("42"),
            &json!("32"),
            &json!("32")
        ),
        "{answer}"
    );

    let text = "masterpiece, (a castle:1.2)\nNegative prompt: lowres\nSteps: 28, Sampler: DPM++ 2M Karras, \
                Lora hashes: \"detail: 1a2b, style: 3c4d\", Size: 64x48, Version: v1.6.0";
    let mut png = Vec::new();
    sdfix::output::png::encode_png(&mut png, &[0; 3 * 4], 2, 2, &[("parameters", text)]).unwrap();
    let image = base64::engine::general_purpose::STANDARD.encode(&png);
    let answer = server
        .post(
            "/sdapi/v1/png-info",
            &json!({"image": format!("data:image/png;base64,{image}")}),
        )
        .json();
    let p = &answer["parameters"];
    assert_eq!(p["Prompt"], "masterpiece, (a castle:1.2)", "{answer}");
    assert_eq!(p["Negative prompt"], "lowres");
    assert_eq!(p["Lora hashes"], "detail: 1a2b, style: 3c4d");
    assert_eq!(p["Sampler"], "DPM++ 2M Karras");
    assert_eq!((&p["Size-1"], &p["Size-2"]), (&json!("64"), &json!("48")));
    assert_eq!(answer["items"], json!({}));

    let hello = base64::engine::general_purpose::STANDARD.encode("hello");
    for body in [json!({}), json!({"image": "!!"}), json!({"image": hello})] {
        let r = server.post("/sdapi/v1/png-info", &body);
        assert_eq!(r.status, 422, "{body}: {}", r.body);
        assert!(r.json()["detail"].as_str().unwrap().contains("image"), "{}", r.body);
    }
}
