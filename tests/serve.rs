//! `sd3 serve` as clients use it: the HTTP APIs (A1111, OpenAI, jobs, events)
//! against the tiny fixture pipeline, bad requests, cancelling, a client
//! that goes away, a bounded load test, and the page in headless Chromium
//! through WebDriver (skipped without chromedriver unless
//! `SD3_REQUIRE_BROWSER=1`, as CI sets).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine;
use sd3_wgpu::pipeline::{GenerateRequest, Pipeline, PipelineOptions};
use sd3_wgpu::serve::{ServeConfig, Server};
use serde_json::{json, Value};

/// The tiny SD3 fixture as a diffusers folder.
fn model() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| common::pipeline_folder("sd3"))
}

fn options() -> PipelineOptions {
    PipelineOptions {
        keep_loaded: true,
        keep_text: true,
        ..PipelineOptions::default()
    }
}

/// One server for the tests of this file, on a free loopback port.
fn server() -> SocketAddr {
    static SERVER: OnceLock<SocketAddr> = OnceLock::new();
    *SERVER.get_or_init(|| {
        let pipe = Pipeline::load(model(), options()).unwrap();
        let config = ServeConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            max_body: 4 << 20,
            keep_finished: 64,
            ..ServeConfig::default()
        };
        let server = Server::start(pipe, &config).unwrap();
        let addr = server.addr;
        // Serves until the test process ends.
        std::mem::forget(server);
        addr
    })
}

thread_local! {
    /// The server this thread's requests go to (the shared one when unset).
    static TARGET: std::cell::Cell<Option<SocketAddr>> = const { std::cell::Cell::new(None) };
}

fn addr() -> SocketAddr {
    TARGET.with(|t| t.get()).unwrap_or_else(server)
}

/// A server of its own for a test that counts or measures (other tests
/// share the common one), with `config` changes; this thread's requests go
/// to it.
fn own_server(edit: impl FnOnce(&mut ServeConfig)) -> Server {
    let pipe = Pipeline::load(model(), options()).unwrap();
    let mut config = ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..ServeConfig::default()
    };
    edit(&mut config);
    let server = Server::start(pipe, &config).unwrap();
    TARGET.with(|t| t.set(Some(server.addr)));
    server
}

/// A small, fast request: 16×16, 2 steps, no CFG.
fn small(prompt: &str, seed: u64) -> Value {
    json!({"prompt": prompt, "width": 16, "height": 16, "steps": 2, "cfg_scale": 1, "seed": seed})
}

struct Reply {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "HTTP {}: not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn error(&self) -> String {
        self.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// One HTTP/1.1 request on a fresh connection (closed after the reply).
fn http(method: &str, path: &str, body: &[u8]) -> Reply {
    http_with(method, path, body, "")
}

/// [`http`] with extra header lines (each ending in \r\n).
fn http_with(method: &str, path: &str, body: &[u8], extra: &str) -> Reply {
    let mut s = TcpStream::connect(addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
        addr(),
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    // A server may answer (413) before reading all of a large body.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP reply: {}", String::from_utf8_lossy(raw)));
    let headers = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
    out
}

fn post(path: &str, body: &Value) -> Reply {
    http("POST", path, body.to_string().as_bytes())
}

fn get(path: &str) -> Reply {
    http("GET", path, b"")
}

/// The server-sent events of a job, read until the stream ends.
fn events(id: &str) -> Vec<(String, Value)> {
    let r = get(&format!("/jobs/{id}/events"));
    assert_eq!(r.status, 200);
    assert!(r.headers.contains("text/event-stream"), "{}", r.headers);
    let text = String::from_utf8(r.body).unwrap();
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let mut name = None;
        let mut data = None;
        for line in block.lines() {
            if let Some(n) = line.strip_prefix("event: ") {
                name = Some(n.to_string());
            } else if let Some(d) = line.strip_prefix("data: ") {
                data = Some(serde_json::from_str::<Value>(d).unwrap());
            }
        }
        if let (Some(n), Some(d)) = (name, data) {
            out.push((n, d));
        }
    }
    out
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A base64 PNG's RGB pixels and size.
fn decode_png(b64png: &str) -> (Vec<u8>, u32, u32) {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64png)
        .unwrap();
    let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
    let (w, h) = img.dimensions();
    (img.into_raw(), w, h)
}

fn wait_done(id: &str) -> Value {
    let t0 = Instant::now();
    loop {
        let j = get(&format!("/jobs/{id}")).json();
        let s = j["status"].as_str().unwrap().to_string();
        if s != "queued" && s != "running" {
            return j;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "job {id} never ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn health_devices_and_page() {
    let h = get("/health");
    assert_eq!(h.status, 200);
    let h = h.json();
    assert_eq!(h["status"], "ok");
    assert!(!h["adapter"]["name"].as_str().unwrap().is_empty());
    let d = get("/devices").json();
    assert!(!d["adapters"].as_array().unwrap().is_empty(), "{d}");
    assert_eq!(d["in_use"]["name"], h["adapter"]["name"]);
    let page = get("/");
    assert_eq!(page.status, 200);
    let html = String::from_utf8(page.body).unwrap();
    assert!(html.contains("<canvas id=\"chart\""));
    let js = get("/app.js");
    assert!(js.headers.contains("text/javascript"), "{}", js.headers);
    assert!(String::from_utf8(js.body).unwrap().contains("EventSource"));
    let nf = get("/no/such/route");
    assert_eq!(nf.status, 404);
    assert!(!nf.error().is_empty());
    // Loopback unless told otherwise, on the CLI too.
    assert!(ServeConfig::default().listen.ip().is_loopback());
    use clap::Parser;
    let cli = sd3_wgpu::cli::Cli::try_parse_from(["sd3", "serve", "--model", "m"]).unwrap();
    match cli.command {
        sd3_wgpu::cli::Command::Serve(a) => assert_eq!(a.listen.to_string(), "127.0.0.1:7860"),
        _ => panic!("not serve"),
    }
}

#[test]
fn a1111_txt2img_is_the_library_image() {
    let req = json!({
        "prompt": "a photo of a cat 🐈 猫",
        "negative_prompt": "blurry",
        "width": 32, "height": 16, "steps": 3, "cfg_scale": 4.5, "seed": 7,
        "batch_size": 2, "sampler_name": "Euler", "n_iter": 1,
        "save_images": false, "send_images": true, "restore_faces": false,
        "override_settings": {}, "alwayson_scripts": {},
    });
    let r = post("/sdapi/v1/txt2img", &req);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["parameters"], req, "parameters echo the request");
    let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["seed"], 7);
    assert_eq!(info["all_seeds"], json!([7, 7]));
    assert!(info["infotexts"][0]
        .as_str()
        .unwrap()
        .contains("Steps: 3, Sampler: Euler"));
    let images = v["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    // The same request through the library gives the same pixels.
    let pipe = Pipeline::load(model(), PipelineOptions::default()).unwrap();
    let mut lib = GenerateRequest::new("a photo of a cat 🐈 猫");
    lib.negative_prompt = "blurry".into();
    (
        lib.width, lib.height, lib.steps, lib.cfg, lib.seed, lib.batch,
    ) = (Some(32), Some(16), Some(3), Some(4.5), 7, 2);
    let want = pipe.generate(&lib, &mut |_, _| {}).unwrap();
    for (i, img) in images.iter().enumerate() {
        let (rgb, w, h) = decode_png(img.as_str().unwrap());
        assert_eq!((w, h), (32, 16));
        assert_eq!(rgb, want.images[i], "image {i} differs from the library's");
    }
    // The PNG carries its parameters.
    let png = base64::engine::general_purpose::STANDARD
        .decode(images[0].as_str().unwrap())
        .unwrap();
    assert!(png.windows(10).any(|w| w == b"parameters"));
}

#[test]
fn a1111_img2img_and_inpainting() {
    let dir = common::fixtures_dir().join("pipeline");
    let init = b64(&std::fs::read(dir.join("init.png")).unwrap());
    let mask = b64(&std::fs::read(dir.join("mask.png")).unwrap());
    let (_, w, h) = decode_png(&init);
    let req = json!({
        "prompt": "a cat", "init_images": [format!("data:image/png;base64,{init}")],
        "denoising_strength": 0.75, "steps": 4, "cfg_scale": 1, "seed": 3,
        "mask_blur": 4, "inpainting_fill": 1, "resize_mode": 0, "inpaint_full_res": false,
    });
    let r = post("/sdapi/v1/img2img", &req);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let (_, w2, h2) = decode_png(r.json()["images"][0].as_str().unwrap());
    // The fixture's sides are multiples of its 4-pixel grid already.
    assert_eq!((w2, h2), (w, h));
    let mut inpaint = req.clone();
    inpaint["mask"] = json!(mask);
    let r = post("/sdapi/v1/img2img", &inpaint);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert!(v["parameters"]["init_images"].is_null() && v["parameters"]["mask"].is_null());
    assert_eq!(v["parameters"]["denoising_strength"], 0.75);
    // The library, given the files, makes the same pixels.
    let pipe = Pipeline::load(model(), PipelineOptions::default()).unwrap();
    let mut lib = GenerateRequest::new("a cat");
    lib.init_image = Some(dir.join("init.png").into());
    lib.mask = Some(dir.join("mask.png").into());
    (lib.strength, lib.steps, lib.cfg, lib.seed, lib.mask_blur) =
        (0.75, Some(4), Some(1.0), 3, 4.0);
    let want = pipe.generate(&lib, &mut |_, _| {}).unwrap();
    let (rgb, _, _) = decode_png(v["images"][0].as_str().unwrap());
    assert_eq!(
        rgb, want.images[0],
        "the inpainted image differs from the library's"
    );
    // Inpainting modes this engine does not have are refused, not ignored.
    for (k, val) in [
        ("inpaint_full_res", json!(true)),
        ("inpainting_fill", json!(0)),
        ("mask_round", json!(false)),
        ("mask_blur_x", json!(9)),
    ] {
        let mut bad = inpaint.clone();
        bad[k] = val;
        let r = post("/sdapi/v1/img2img", &bad);
        assert_eq!(r.status, 422, "{k}");
        assert!(r.error().contains(k), "{k}: {}", r.error());
    }
    // Bad images are the client's fault, named.
    let mut bad = req.clone();
    bad["init_images"] = json!(["not base64!"]);
    let r = post("/sdapi/v1/img2img", &bad);
    assert_eq!(r.status, 422);
    assert!(r.error().contains("init_images[0]"), "{}", r.error());
    bad["init_images"] = json!([b64(b"GIF89a but not really")]);
    let r = post("/sdapi/v1/img2img", &bad);
    assert_eq!(r.status, 422);
    assert!(r.error().contains("init_images[0]"), "{}", r.error());
    bad["init_images"] = json!([]);
    assert_eq!(post("/sdapi/v1/img2img", &bad).status, 422);
}

#[test]
fn openai_generations() {
    let r = post(
        "/v1/images/generations",
        &json!({"prompt": "a red fox", "n": 2, "size": "32x16", "model": "sd3", "steps": 2, "cfg_scale": 1, "seed": 1}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert!(v["created"].as_u64().unwrap() > 1_700_000_000);
    let (_, w, h) = decode_png(data[0]["b64_json"].as_str().unwrap());
    assert_eq!((w, h), (32, 16));
    let r = post(
        "/v1/images/generations",
        &json!({"prompt": "a red fox", "size": "16x16", "response_format": "url", "steps": 1}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let url = r.json()["data"][0]["url"].as_str().unwrap().to_string();
    let path = &url[url.find("/jobs/").unwrap()..];
    let png = get(path);
    assert_eq!(png.status, 200);
    assert!(png.headers.contains("image/png"));
    assert_eq!(&png.body[1..4], b"PNG");
    for (body, field) in [
        (json!({"prompt": "x", "size": "huge"}), "size"),
        (
            json!({"prompt": "x", "response_format": "gif"}),
            "response_format",
        ),
        (json!({"prompt": "x", "n": 0}), "n"),
        (json!({"n": 1}), "prompt"),
    ] {
        let r = post("/v1/images/generations", &body);
        assert_eq!(r.status, 422, "{body}");
        assert!(r.error().contains(field), "{body}: {}", r.error());
    }
}

#[test]
fn bad_requests_are_4xx_with_a_message() {
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("/sdapi/v1/txt2img", b"{not json".to_vec(), 400, "JSON"),
        ("/sdapi/v1/txt2img", b"[1, 2]".to_vec(), 400, "object"),
        ("/jobs", b"".to_vec(), 400, "JSON"),
        (
            "/sdapi/v1/txt2img",
            br#"{"prompt": "x", "stepz": 3}"#.to_vec(),
            422,
            "stepz",
        ),
        (
            "/sdapi/v1/txt2img",
            br#"{"prompt": "x", "steps": 0}"#.to_vec(),
            422,
            "steps",
        ),
        (
            "/sdapi/v1/txt2img",
            br#"{"prompt": "x", "steps": 1e9}"#.to_vec(),
            422,
            "steps",
        ),
        (
            "/sdapi/v1/txt2img",
            br#"{"prompt": "x", "width": -16}"#.to_vec(),
            422,
            "width",
        ),
        (
            "/sdapi/v1/txt2img",
            br#"{"prompt": "x", "width": 17, "height": 16}"#.to_vec(),
            422,
            "multiples of",
        ),
        (
            "/sdapi/v1/txt2img",
            br#"{"prompt": "x", "width": 8192, "height": 8192}"#.to_vec(),
            422,
            "grid",
        ),
        (
            "/sdapi/v1/txt2img",
            br#"{"prompt": "x", "cfg_scale": "high"}"#.to_vec(),
            422,
            "cfg_scale",
        ),
        (
            "/sdapi/v1/txt2img",
            br#"{"prompt": "x", "cfg_scale": 1000}"#.to_vec(),
            422,
            "cfg_scale",
        ),
        (
            "/sdapi/v1/txt2img",
            br#"{"prompt": "x", "seed": -5}"#.to_vec(),
            422,
            "seed",
        ),
        (
            "/sdapi/v1/txt2img",
            br#"{"prompt": "x", "sampler_name": "DPM++ 2M"}"#.to_vec(),
            422,
            "sampler_name",
        ),
        (
            "/sdapi/v1/txt2img",
            br#"{"prompt": "x", "enable_hr": true}"#.to_vec(),
            422,
            "enable_hr",
        ),
        (
            "/sdapi/v1/txt2img",
            br#"{"prompt": "x", "n_iter": 2}"#.to_vec(),
            422,
            "n_iter",
        ),
        (
            "/sdapi/v1/txt2img",
            br#"{"prompt": "x", "batch_size": 100000}"#.to_vec(),
            422,
            "batch_size",
        ),
        (
            "/sdapi/v1/txt2img",
            br#"{"prompt": 5}"#.to_vec(),
            422,
            "prompt",
        ),
        (
            "/sdapi/v1/txt2img",
            br#"{"prompt": "x", "width": 18446744073709551615}"#.to_vec(),
            422,
            "width",
        ),
        (
            "/sdapi/v1/txt2img",
            br#"{"prompt": "x", "seed": 1e400}"#.to_vec(),
            400,
            "JSON",
        ),
        (
            "/sdapi/v1/txt2img",
            br#"{"prompt": "x", "styles": ["cinematic"]}"#.to_vec(),
            422,
            "styles",
        ),
        (
            "/sdapi/v1/txt2img",
            br#"{"prompt": "x", "s_churn": 0.5}"#.to_vec(),
            422,
            "s_churn",
        ),
        (
            "/jobs",
            br#"{"prompt": "x", "init_images": []}"#.to_vec(),
            422,
            "init_images",
        ),
    ];
    for (path, body, status, needle) in cases {
        let r = http("POST", path, &body);
        let shown = String::from_utf8_lossy(&body);
        assert_eq!(
            r.status,
            status,
            "{path} {shown}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let msg = r.error();
        assert!(
            msg.contains(needle),
            "{path} {shown}: {msg:?} should name {needle:?}"
        );
    }
    // Oversize bodies: 413 (the server's limit here is 4 MiB).
    let big = json!({"prompt": "x".repeat(5 << 20)}).to_string();
    let r = http("POST", "/jobs", big.as_bytes());
    assert_eq!(r.status, 413);
    assert!(r.error().contains("larger than"), "{}", r.error());
    for path in [
        "/jobs/999999",
        "/jobs/abc",
        "/jobs/999999/events",
        "/jobs/1/images/x",
    ] {
        assert_eq!(get(path).status, 404, "{path}");
    }
    assert_eq!(http("DELETE", "/jobs/999999", b"").status, 404);
    // The server still serves.
    assert_eq!(get("/health").status, 200);
}

#[test]
fn job_events_report_progress_then_profile() {
    let r = post(
        "/jobs",
        &json!({"prompt": "a cat", "width": 16, "height": 16, "steps": 3, "seed": 5}),
    );
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_string();
    let ev = events(&id);
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"queued"), "{names:?}");
    assert_eq!(names.last(), Some(&"done"), "{names:?}");
    let steps: Vec<u64> = ev
        .iter()
        .filter(|(n, _)| n == "progress")
        .map(|(_, d)| d["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3]);
    let stages: Vec<&str> = ev
        .iter()
        .filter(|(n, _)| n == "stage")
        .map(|(_, d)| d["stage"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["text", "load", "denoise", "decode"]);
    let (_, profile) = ev.iter().find(|(n, _)| n == "profile").unwrap();
    assert_eq!(profile["stages"].as_array().unwrap().len(), 4);
    let ops = profile["step"]["ops"].as_array().unwrap();
    assert!(ops.len() > 10, "{} ops", ops.len());
    assert!(ops
        .iter()
        .any(|o| o["label"].as_str().unwrap().starts_with("mmdit.")));
    let j = get(&format!("/jobs/{id}")).json();
    assert_eq!(j["status"], "done");
    assert_eq!(j["settings"]["steps"], 3);
    let png = get(j["images"][0].as_str().unwrap());
    assert_eq!(png.status, 200);
    // A late subscriber gets the whole history again.
    assert_eq!(events(&id).len(), ev.len());
}

#[test]
fn cancel_queued_and_running_jobs() {
    let long = json!({"prompt": "slow", "width": 16, "height": 16, "steps": 400, "cfg_scale": 1, "seed": 1});
    let a = post("/jobs", &long).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let b = post("/jobs", &long).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // b waits behind a: cancelled at once.
    let r = http("DELETE", &format!("/jobs/{b}"), b"");
    assert_eq!(r.status, 200);
    assert_eq!(wait_done(&b)["status"], "cancelled");
    // a stops at its next step once running.
    let t0 = Instant::now();
    while get(&format!("/jobs/{a}")).json()["status"] == "queued" {
        assert!(t0.elapsed() < Duration::from_secs(300));
        std::thread::sleep(Duration::from_millis(20));
    }
    http("DELETE", &format!("/jobs/{a}"), b"");
    let j = wait_done(&a);
    assert_eq!(j["status"], "cancelled", "{j}");
    assert!(j["step"].as_u64().unwrap() < 400, "{j}");
    let names: Vec<String> = events(&a).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.last().map(String::as_str), Some("cancelled"));
    // The next job runs normally.
    let r = post("/sdapi/v1/txt2img", &small("after", 2));
    assert_eq!(r.status, 200);
}

#[test]
fn a_client_that_disconnects_does_not_kill_its_job() {
    let _server = own_server(|_| {});
    let body = small("left early", 9).to_string();
    {
        let mut s = TcpStream::connect(addr()).unwrap();
        let head = format!(
            "POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        // Hang up once the job (this server's first) exists.
        let t0 = Instant::now();
        while get("/jobs/1").status != 200 {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the job was never queued"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let j = wait_done("1");
    assert_eq!(j["status"], "done", "{j}");
    assert_eq!(get("/health").json()["done"], 1);
    assert_eq!(
        post("/sdapi/v1/txt2img", &small("still here", 1)).status,
        200
    );
}

/// `/health` once no job is queued or running (other tests share the server).
fn idle_health() -> Value {
    let t0 = Instant::now();
    loop {
        let h = get("/health").json();
        if h["queued"] == 0 && h["running"] == 0 {
            return h;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "the server never went idle"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// 8 clients queue 5 jobs each at once: every job finishes, in the order
/// queued, and neither GPU memory nor the process grows with the jobs.
#[test]
fn load_40_jobs_from_8_clients() {
    let _server = own_server(|c| c.keep_finished = 16);
    let target = addr();
    let round = || -> Vec<(u64, u64)> {
        let clients: Vec<_> = (0..8)
            .map(|c| {
                std::thread::spawn(move || {
                    TARGET.with(|t| t.set(Some(target)));
                    let ids: Vec<String> = (0..5)
                        .map(|k| {
                            let r =
                                post("/jobs", &small(&format!("client {c} job {k}"), c * 10 + k));
                            assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
                            r.json()["id"].as_str().unwrap().to_string()
                        })
                        .collect();
                    ids.iter()
                        .map(|id| {
                            let j = wait_done(id);
                            assert_eq!(j["status"], "done", "{j}");
                            assert_eq!(get(j["images"][0].as_str().unwrap()).status, 200);
                            (id.parse().unwrap(), j["started"].as_u64().unwrap())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<(u64, u64)> = clients
            .into_iter()
            .flat_map(|c| c.join().unwrap())
            .collect();
        all.sort();
        all
    };
    let first = round();
    assert_eq!(first.len(), 40);
    // First in, first out: started in the order of the ids (submission).
    for w in first.windows(2) {
        assert!(
            w[0].1 < w[1].1,
            "job {} started after job {}",
            w[0].0,
            w[1].0
        );
    }
    let h1 = idle_health();
    let rss1 = rss_kib();
    let second = round();
    assert_eq!(second.len(), 40);
    let h2 = idle_health();
    let rss2 = rss_kib();
    assert_eq!(
        h1["gpu_memory_bytes"], h2["gpu_memory_bytes"],
        "GPU memory grew"
    );
    assert!(h2["finished_kept"].as_u64().unwrap() <= 64, "{h2}");
    eprintln!("RSS after 40 jobs {rss1} KiB, after 80 {rss2} KiB");
    assert!(
        rss2 < rss1 + 64 * 1024,
        "the process grew by {} KiB over 40 more jobs",
        rss2 - rss1
    );
}

#[test]
fn a_full_queue_is_503_and_interrupt_cancels_the_running_job() {
    let _server = own_server(|c| c.max_queued = 1);
    let long = json!({"prompt": "slow", "width": 16, "height": 16, "steps": 400, "cfg_scale": 1, "seed": 1});
    // An A1111 request that blocks until its job ends.
    let target = addr();
    let blocked = std::thread::spawn(move || {
        TARGET.with(|t| t.set(Some(target)));
        post("/sdapi/v1/txt2img", &long)
    });
    let t0 = Instant::now();
    while get("/health").json()["running"] != 1 {
        assert!(t0.elapsed() < Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(10));
    }
    let t0 = Instant::now();
    loop {
        let p = get("/sdapi/v1/progress").json();
        if p["state"]["sampling_steps"] == 400 {
            assert!(p["progress"].as_f64().unwrap() > 0.0, "{p}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "{p}");
        std::thread::sleep(Duration::from_millis(10));
    }
    // One may wait; the next is refused.
    let queued = post("/jobs", &small("waits", 1));
    assert_eq!(queued.status, 202);
    let full = post("/jobs", &small("refused", 2));
    assert_eq!(full.status, 503, "{}", String::from_utf8_lossy(&full.body));
    assert!(full.error().contains("full"), "{}", full.error());
    // The waiting job, cancelled while queued: its stream ends with `cancelled`.
    let qid = queued.json()["id"].as_str().unwrap().to_string();
    assert_eq!(http("DELETE", &format!("/jobs/{qid}"), b"").status, 200);
    let names: Vec<String> = events(&qid).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["queued", "cancelled"]);
    // Interrupt stops the running job; its blocked client gets a 409.
    assert_eq!(post("/sdapi/v1/interrupt", &json!({})).status, 200);
    let r = blocked.join().unwrap();
    assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.body));
    let h = get("/health").json();
    assert_eq!(
        (h["cancelled"].as_u64(), h["done"].as_u64()),
        (Some(2), Some(0)),
        "{h}"
    );
}

#[test]
fn wrong_methods_and_event_stream_resumption() {
    let r = get("/sdapi/v1/txt2img");
    assert_eq!(r.status, 405);
    assert!(!r.error().is_empty());
    let id = post("/jobs", &small("resume", 4)).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let all = events(&id);
    // Resuming after event 2 gives the rest; after the last, 204 (an
    // EventSource stops reconnecting).
    let r = http_with(
        "GET",
        &format!("/jobs/{id}/events"),
        b"",
        "Last-Event-ID: 2\r\n",
    );
    assert_eq!(r.status, 200);
    let rest = String::from_utf8(r.body).unwrap();
    assert_eq!(rest.matches("event: ").count(), all.len() - 3, "{rest}");
    assert!(rest.starts_with("id: 3\n"), "{rest}");
    let last = format!("Last-Event-ID: {}\r\n", all.len() - 1);
    let r = http_with("GET", &format!("/jobs/{id}/events"), b"", &last);
    assert_eq!(r.status, 204);
}

/// The page in a real browser: type a prompt, generate, see the image and the chart.
#[test]
fn page_in_headless_chromium() {
    let driver = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let required = std::env::var("SD3_REQUIRE_BROWSER").is_ok_and(|v| v == "1");
    let Some(driver) = driver else {
        assert!(
            !required,
            "SD3_REQUIRE_BROWSER=1 but chromedriver is not installed"
        );
        eprintln!("skipped: no chromedriver (apt install chromium chromium-driver)");
        return;
    };
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let profile = std::env::temp_dir().join(format!("sd3-chromium-{}", std::process::id()));
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _driver = Kill(
        std::process::Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = server();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let user_dir = profile.clone();
    rt.block_on(async move {
        use fantoccini::{ClientBuilder, Locator};
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--disable-quic", "--no-first-run", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                         format!("--user-data-dir={}", user_dir.display())],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let url = format!("http://127.0.0.1:{port}");
        let t0 = Instant::now();
        let c = loop {
            match ClientBuilder::new(connector.clone())
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => break c,
                Err(e) if t0.elapsed() < Duration::from_secs(30) => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("chromedriver: {e}"),
            }
        };
        c.goto(&format!("http://{addr}/")).await.unwrap();
        let prompt = c.find(Locator::Id("prompt")).await.unwrap();
        prompt.clear().await.unwrap();
        prompt.send_keys("a watercolour fox 🦊").await.unwrap();
        for (id, v) in [("width", "64"), ("height", "48"), ("steps", "3"), ("seed", "11")] {
            let e = c.find(Locator::Id(id)).await.unwrap();
            e.clear().await.unwrap();
            e.send_keys(v).await.unwrap();
        }
        c.find(Locator::Id("generate")).await.unwrap().click().await.unwrap();
        // Wait for the image and the chart.
        let t0 = Instant::now();
        let state = loop {
            let v = c
                .execute(
                    "const i = document.getElementById('image');\
                     return {done: i.complete && i.naturalWidth > 0, w: i.naturalWidth, h: i.naturalHeight,\
                             ops: Number(document.getElementById('chart').dataset.ops || 0),\
                             stages: Number(document.getElementById('stages').dataset.stages || 0),\
                             status: document.getElementById('status').textContent,\
                             adapter: document.getElementById('adapter').textContent,\
                             progress: document.getElementById('progress').value};",
                    vec![],
                )
                .await
                .unwrap();
            if v["done"] == true && v["ops"].as_u64().unwrap_or(0) > 0 {
                break v;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(300),
                "the page never showed the image and chart: {v}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!((state["w"].as_u64(), state["h"].as_u64()), (Some(64), Some(48)), "{state}");
        assert_eq!(state["stages"], 4, "{state}");
        assert_eq!(state["progress"], 1, "{state}");
        assert!(state["status"].as_str().unwrap().starts_with("done"), "{state}");
        assert!(!state["adapter"].as_str().unwrap().contains('…'), "{state}");
        // The chart has pixels drawn (not a blank canvas).
        let painted = c
            .execute(
                "const c = document.getElementById('chart');\
                 const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;\
                 let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n;",
                vec![],
            )
            .await
            .unwrap();
        assert!(painted.as_u64().unwrap() > 1000, "chart pixels: {painted}");
        if let Ok(path) = std::env::var("SD3_SCREENSHOT") {
            std::fs::write(path, c.screenshot().await.unwrap()).unwrap();
        }
        c.close().await.unwrap();
    });
    let _ = std::fs::remove_dir_all(profile);
}
