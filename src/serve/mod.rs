//! `sd3 serve`: the model loaded once behind an HTTP API (axum on tokio) and
//! a web page. One GPU worker thread runs jobs first in, first out; the
//! handlers only check requests, queue them and report.
//!
//! Routes: `GET /` (the page), `GET /health`, `GET /devices`; `POST /jobs`
//! (queue, answer at once), `GET /jobs/{id}`, `DELETE /jobs/{id}` (cancel),
//! `GET /jobs/{id}/events` (server-sent events: queued, started, stage,
//! progress, profile, done/failed/cancelled), `GET /jobs/{id}/images/{n}`;
//! A1111's `POST /sdapi/v1/txt2img`, `POST /sdapi/v1/img2img`,
//! `POST /sdapi/v1/interrupt`, `GET /sdapi/v1/progress`; OpenAI's
//! `POST /v1/images/generations`. Errors are JSON `{"error": {"message",
//! "type", "code"}}` with a 4xx status for requests at fault.

pub mod api;
pub mod jobs;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::pipeline::{GenerateRequest, Pipeline};
use api::{ApiError, ResponseFormat};
use jobs::{Queue, Status, SubmitError};

/// The page and its script, served as they are (no build step).
const INDEX_HTML: &str = include_str!("../../assets/web/index.html");
const APP_JS: &str = include_str!("../../assets/web/app.js");

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Address to listen on (loopback unless told otherwise).
    pub listen: SocketAddr,
    /// Jobs that may wait at once; more are refused with 503.
    pub max_queued: usize,
    /// Finished jobs (and their images) kept for `GET /jobs/{id}`.
    pub keep_finished: usize,
    /// At most this many bytes of their PNGs (the oldest go first).
    pub keep_bytes: u64,
    /// The largest request body, bytes.
    pub max_body: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7860)),
            max_queued: 256,
            keep_finished: 64,
            keep_bytes: 1 << 30,
            max_body: 64 << 20,
        }
    }
}

struct App {
    queue: Arc<Queue>,
    pipe: Arc<Pipeline>,
    /// Request checks (decoding images, recording graphs) run at most this
    /// many at once.
    checks: tokio::sync::Semaphore,
    max_body: usize,
    health: Value,
    devices: Value,
}

type Shared = State<Arc<App>>;

/// A running server.
pub struct Server {
    /// The address it listens on (the port chosen when 0 was asked for).
    pub addr: SocketAddr,
    queue: Arc<Queue>,
    runtime: Option<tokio::runtime::Runtime>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Binds `config.listen` and starts serving `pipe` (the worker thread
    /// and the HTTP runtime); returns once the socket listens.
    pub fn start(pipe: Pipeline, config: &ServeConfig) -> Result<Server> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sd3-http")
            .enable_all()
            .build()
            .map_err(|e| Error::Io(format!("cannot start the HTTP runtime: {e}")))?;
        let listen_error =
            |e: std::io::Error| Error::Io(format!("cannot listen on {}: {e}", config.listen));
        let std_listener = std::net::TcpListener::bind(config.listen).map_err(listen_error)?;
        std_listener.set_nonblocking(true).map_err(listen_error)?;
        let listener = {
            let _inside = runtime.enter();
            tokio::net::TcpListener::from_std(std_listener).map_err(listen_error)?
        };
        let addr = listener.local_addr().map_err(listen_error)?;
        let info = &pipe.gpu.info;
        let adapter = json!({
            "name": info.name,
            "backend": format!("{:?}", info.backend),
            "type": format!("{:?}", info.device_type),
            "driver": format!("{} {}", info.driver, info.driver_info),
            "activations": pipe.gpu.activation.name(),
            "cooperative_matrix": !pipe.gpu.coop.is_empty(),
        });
        let adapters: Vec<Value> = crate::gpu::list_adapters(None)
            .unwrap_or_default()
            .iter()
            .map(|a| {
                json!({
                    "index": a.index,
                    "name": a.info.name,
                    "backend": format!("{:?}", a.info.backend),
                    "type": format!("{:?}", a.info.device_type),
                    "driver": format!("{} {}", a.info.driver, a.info.driver_info),
                    "max_buffer_size": a.limits.max_buffer_size,
                    "shader_f16": a.features.contains(wgpu::Features::SHADER_F16),
                    "subgroup": a.features.contains(wgpu::Features::SUBGROUP),
                    "timestamps": a.features.contains(wgpu::Features::TIMESTAMP_QUERY),
                    "cooperative_matrix": !a.coop.is_empty(),
                })
            })
            .collect();
        let c = pipe.config();
        let health = json!({
            "model": pipe.model_path().display().to_string(),
            "variant": c.variant_name(),
            "adapter": adapter,
            "version": env!("CARGO_PKG_VERSION"),
        });
        let queue = Arc::new(Queue::new(
            config.max_queued,
            config.keep_finished,
            config.keep_bytes,
        ));
        let pipe = Arc::new(pipe);
        let app = Arc::new(App {
            queue: queue.clone(),
            pipe: pipe.clone(),
            checks: tokio::sync::Semaphore::new(2),
            max_body: config.max_body,
            health,
            devices: json!({"in_use": adapter, "adapters": adapters}),
        });
        let worker = {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name("sd3-gpu".into())
                .spawn(move || jobs::work(&queue, &pipe))
                .map_err(|e| Error::Io(format!("cannot start the GPU worker: {e}")))?
        };
        let router = router(app);
        runtime.spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                eprintln!("error: the HTTP server stopped: {e}");
            }
        });
        Ok(Server {
            addr,
            queue,
            runtime: Some(runtime),
            worker: Some(worker),
        })
    }

    /// Serves until Ctrl-C, then stops (waiting for the running job to
    /// reach its next step; a second Ctrl-C exits at once).
    pub fn run_until_interrupted(mut self) -> Result<()> {
        if let Some(rt) = &self.runtime {
            rt.block_on(async {
                let _ = tokio::signal::ctrl_c().await;
            });
            eprintln!("stopping (Ctrl-C again to exit at once)");
            rt.spawn(async {
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            });
        }
        self.stop();
        Ok(())
    }

    /// Stops: waiting jobs are cancelled, the running one stops at its next
    /// step, connections are closed.
    pub fn stop(&mut self) {
        self.queue.shut_down();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { page(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/app.js",
            get(|| async { page(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route("/health", get(health))
        .route("/devices", get(devices))
        .route("/jobs", post(submit_job))
        .route("/jobs/{id}", get(job_status).delete(cancel_job))
        .route("/jobs/{id}/events", get(job_events))
        .route("/jobs/{id}/images/{n}", get(job_image))
        .route("/sdapi/v1/txt2img", post(a1111_txt2img))
        .route("/sdapi/v1/img2img", post(a1111_img2img))
        .route("/sdapi/v1/interrupt", post(a1111_interrupt))
        .route("/sdapi/v1/progress", get(a1111_progress))
        .route("/v1/images/generations", post(openai_generations))
        .fallback(|| async {
            error(ApiError {
                status: 404,
                message: "no such route".into(),
            })
        })
        .method_not_allowed_fallback(|| async {
            error(ApiError {
                status: 405,
                message: "this route does not take that method".into(),
            })
        })
        .with_state(app)
}

fn page(body: &'static str, kind: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

fn error(e: ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let kind = match e.status {
        400..=499 => "invalid_request_error",
        503 => "server_busy",
        _ => "server_error",
    };
    (
        status,
        Json(json!({"error": {"message": e.message, "type": kind, "code": e.status}})),
    )
        .into_response()
}

async fn read_body(app: &App, body: Body) -> std::result::Result<Vec<u8>, ApiError> {
    axum::body::to_bytes(body, app.max_body)
        .await
        .map(|b| b.to_vec())
        .map_err(|e| {
            if e.to_string().contains("length limit") {
                ApiError {
                    status: 413,
                    message: format!("the request body is larger than {} bytes", app.max_body),
                }
            } else {
                ApiError {
                    status: 400,
                    message: format!("the request body could not be read: {e}"),
                }
            }
        })
}

/// Parses a body and checks the request against the model (sizes, limits,
/// images) off the async threads, then queues it; returns the job's id and
/// what `parse` gave beside the request.
async fn accept<T: Send + 'static>(
    app: &Arc<App>,
    api: &'static str,
    body: Vec<u8>,
    parse: impl FnOnce(&[u8]) -> std::result::Result<(GenerateRequest, T), ApiError> + Send + 'static,
) -> std::result::Result<(u64, T), ApiError> {
    let busy = || ApiError {
        status: 503,
        message: "the queue is full or the server is stopping; try again later".into(),
    };
    if app.queue.is_full() {
        return Err(busy());
    }
    let _permit = app.checks.acquire().await.map_err(|_| busy())?;
    let pipe = app.pipe.clone();
    let (mut req, extra) = tokio::task::spawn_blocking(move || {
        let (mut req, extra) = parse(&body)?;
        // Every job times one step per op for the page's chart.
        req.profile = true;
        match pipe.check(&req) {
            Ok(_) => Ok((req, extra)),
            Err(e @ Error::Gpu(_)) => Err(ApiError {
                status: 503,
                message: e.to_string(),
            }),
            Err(e) => Err(ApiError::invalid(e.to_string())),
        }
    })
    .await
    .map_err(|e| ApiError {
        status: 500,
        message: format!("the request check stopped: {e}"),
    })??;
    req.profile = true;
    let id = app.queue.submit(api, req).map_err(|e| match e {
        SubmitError::Full(n) => ApiError {
            status: 503,
            message: format!("the queue is full ({n} jobs waiting); try again later"),
        },
        SubmitError::ShuttingDown => ApiError {
            status: 503,
            message: "the server is shutting down".into(),
        },
    })?;
    Ok((id, extra))
}

fn parse_id(id: &str) -> std::result::Result<u64, ApiError> {
    id.parse().map_err(|_| ApiError {
        status: 404,
        message: format!("no job {id:?}"),
    })
}

fn no_job(id: u64) -> ApiError {
    ApiError {
        status: 404,
        message: format!("no job {id} (finished jobs are kept for a while, then dropped)"),
    }
}

/// Waits until job `id` is final; then its images, PNG infotexts and
/// settings, or the error that ended it.
async fn results(
    app: &App,
    id: u64,
) -> std::result::Result<(Vec<Arc<Vec<u8>>>, Vec<String>, Value), ApiError> {
    let mut rx = app
        .queue
        .with_job(id, |j, _| j.subscribe())
        .ok_or_else(|| no_job(id))?;
    loop {
        let got = app
            .queue
            .with_job(id, |j, _| {
                j.status.is_final().then(|| {
                    (
                        j.status,
                        j.images.clone(),
                        j.infotexts.clone(),
                        j.settings.clone().unwrap_or(Value::Null),
                        j.error.clone(),
                    )
                })
            })
            .ok_or_else(|| no_job(id))?;
        match got {
            Some((Status::Done, images, infotexts, settings, _)) => {
                return Ok((images, infotexts, settings))
            }
            Some((Status::Cancelled, ..)) => {
                return Err(ApiError {
                    status: 409,
                    message: format!("job {id} was cancelled"),
                })
            }
            Some((_, _, _, _, e)) => {
                return Err(ApiError {
                    status: 500,
                    message: e.unwrap_or_else(|| format!("job {id} failed")),
                })
            }
            None => {
                if rx.changed().await.is_err() {
                    return Err(no_job(id));
                }
            }
        }
    }
}

/// Base64 of each PNG, encoded off the async threads.
async fn b64_all(images: Vec<Arc<Vec<u8>>>) -> std::result::Result<Vec<String>, ApiError> {
    tokio::task::spawn_blocking(move || images.iter().map(|p| b64(p)).collect())
        .await
        .map_err(|e| ApiError {
            status: 500,
            message: format!("encoding the images stopped: {e}"),
        })
}

fn b64(png: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(png)
}

async fn health(State(app): Shared) -> Response {
    let c = app.queue.counts();
    let mut v = app.health.clone();
    if let Value::Object(m) = &mut v {
        m.insert("status".into(), json!("ok"));
        m.insert("queued".into(), json!(c.queued));
        m.insert("running".into(), json!(c.running));
        m.insert("finished_kept".into(), json!(c.kept));
        m.insert("finished_kept_bytes".into(), json!(c.kept_bytes));
        m.insert("done".into(), json!(c.ended[0]));
        m.insert("failed".into(), json!(c.ended[1]));
        m.insert("cancelled".into(), json!(c.ended[2]));
        m.insert(
            "gpu_memory_bytes".into(),
            json!(app.pipe.gpu.memory.current()),
        );
    }
    Json(v).into_response()
}

async fn devices(State(app): Shared) -> Response {
    Json(app.devices.clone()).into_response()
}

async fn submit_job(State(app): Shared, body: Body) -> Response {
    let r = async {
        let body = read_body(&app, body).await?;
        accept(&app, "jobs", body, |b| Ok((api::job(b)?, ()))).await
    }
    .await;
    match r {
        Ok((id, ())) => (
            StatusCode::ACCEPTED,
            Json(json!({
                "id": id.to_string(),
                "status_url": format!("/jobs/{id}"),
                "events_url": format!("/jobs/{id}/events"),
            })),
        )
            .into_response(),
        Err(e) => error(e),
    }
}

async fn job_status(State(app): Shared, UrlPath(id): UrlPath<String>) -> Response {
    let r = parse_id(&id).and_then(|id| {
        app.queue
            .with_job(id, |j, pos| j.summary(pos))
            .ok_or_else(|| no_job(id))
    });
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => error(e),
    }
}

async fn cancel_job(State(app): Shared, UrlPath(id): UrlPath<String>) -> Response {
    match parse_id(&id).and_then(|id| app.queue.cancel(id).ok_or_else(|| no_job(id))) {
        Ok(s) => Json(json!({"id": id, "status": s.name(), "cancelling": s == Status::Running}))
            .into_response(),
        Err(e) => error(e),
    }
}

async fn job_image(State(app): Shared, UrlPath((id, n)): UrlPath<(String, String)>) -> Response {
    let r = parse_id(&id).and_then(|id| {
        let png = app
            .queue
            .with_job(id, |j, _| {
                n.parse::<usize>()
                    .ok()
                    .and_then(|n| j.images.get(n).cloned())
            })
            .ok_or_else(|| no_job(id))?;
        png.ok_or_else(|| ApiError {
            status: 404,
            message: format!("job {id} has no image {n:?} (yet)"),
        })
    });
    match r {
        Ok(png) => ([(header::CONTENT_TYPE, "image/png")], png.to_vec()).into_response(),
        Err(e) => error(e),
    }
}

async fn job_events(
    State(app): Shared,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(e) => return error(e),
    };
    // A reconnecting EventSource says which event it saw last.
    let start = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map_or(0, |n| n.saturating_add(1));
    let Some((rx, over)) = app.queue.with_job(id, |j, _| {
        (
            j.subscribe(),
            j.status.is_final() && start >= j.events.len(),
        )
    }) else {
        return error(no_job(id));
    };
    if over {
        // Nothing more will come: 204 tells an EventSource to stop.
        return StatusCode::NO_CONTENT.into_response();
    }
    // Every event of the job from `start`, then the new ones as they come;
    // the stream ends after the final one.
    let stream = futures_util::stream::unfold(
        (start, rx, app, false),
        move |(next, mut rx, app, ended)| async move {
            if ended {
                return None;
            }
            loop {
                let got = app.queue.with_job(id, |j, _| {
                    let e = j.events.get(next).cloned();
                    let last = next + 1 == j.events.len() && j.status.is_final();
                    (e, last)
                });
                match got {
                    None => return None,
                    Some((Some(e), last)) => {
                        let ev = SseEvent::default()
                            .id(next.to_string())
                            .event(e.name)
                            .data(e.data.to_string());
                        return Some((Ok::<_, Infallible>(ev), (next + 1, rx, app, last)));
                    }
                    Some((None, _)) => {
                        if rx.changed().await.is_err() {
                            return None;
                        }
                    }
                }
            }
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn a1111(app: Arc<App>, body: Body, img2img: bool) -> Response {
    let r = async {
        let body = read_body(&app, body).await?;
        let (id, (echo, prompt, negative, seed, batch)) = accept(&app, "a1111", body, move |b| {
            let req = api::a1111(b, img2img)?;
            // `parameters` echoes the request without its images (as
            // A1111 does unless include_init_images is set).
            let mut echo: Value = serde_json::from_slice(b).unwrap_or(Value::Null);
            if let Value::Object(m) = &mut echo {
                for k in ["init_images", "mask"] {
                    if m.contains_key(k) {
                        m.insert(k.into(), Value::Null);
                    }
                }
            }
            let extra = (
                echo,
                req.prompt.clone(),
                req.negative_prompt.clone(),
                req.seed,
                req.batch,
            );
            Ok((req, extra))
        })
        .await?;
        let (images, infotexts, settings) = results(&app, id).await?;
        let info = json!({
            "prompt": prompt,
            "all_prompts": vec![prompt.clone(); batch],
            "negative_prompt": negative,
            "all_negative_prompts": vec![negative.clone(); batch],
            "seed": seed,
            "all_seeds": vec![seed; batch],
            "width": settings["width"],
            "height": settings["height"],
            "steps": settings["steps"],
            "cfg_scale": settings["cfg_scale"],
            "sampler_name": "Euler",
            "batch_size": batch,
            "infotexts": infotexts,
            "job_timestamp": id.to_string(),
            "job": id.to_string(),
        });
        Ok(json!({
            "images": b64_all(images).await?,
            "parameters": echo,
            "info": info.to_string(),
        }))
    }
    .await;
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => error(e),
    }
}

async fn a1111_txt2img(State(app): Shared, body: Body) -> Response {
    a1111(app, body, false).await
}

async fn a1111_img2img(State(app): Shared, body: Body) -> Response {
    a1111(app, body, true).await
}

async fn a1111_interrupt(State(app): Shared) -> Response {
    if let Some(id) = app.queue.running() {
        app.queue.cancel(id);
    }
    Json(json!({})).into_response()
}

async fn a1111_progress(State(app): Shared) -> Response {
    let queued = app.queue.counts().queued;
    let running = app
        .queue
        .running()
        .and_then(|id| app.queue.with_job(id, |j, _| (j.step, j.rate.1, j.id)));
    let v = match running {
        Some(((step, total), eta, id)) => json!({
            "progress": if total > 0 { step as f64 / total as f64 } else { 0.0 },
            "eta_relative": eta,
            "state": {"job": id.to_string(), "job_count": queued + 1, "sampling_step": step, "sampling_steps": total, "interrupted": false},
            "current_image": null,
            "textinfo": null,
        }),
        None => json!({
            "progress": 0.0,
            "eta_relative": 0.0,
            "state": {"job": "", "job_count": queued, "sampling_step": 0, "sampling_steps": 0, "interrupted": false},
            "current_image": null,
            "textinfo": null,
        }),
    };
    Json(v).into_response()
}

async fn openai_generations(State(app): Shared, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        let body = read_body(&app, body).await?;
        let (id, (format, prompt)) = accept(&app, "openai", body, |b| {
            let (req, format) = api::openai(b)?;
            let prompt = req.prompt.clone();
            Ok((req, (format, prompt)))
        })
        .await?;
        let (images, _, _) = results(&app, id).await?;
        let encoded = match format {
            ResponseFormat::B64Json => b64_all(images.clone()).await?,
            ResponseFormat::Url => Vec::new(),
        };
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(|h| format!("http://{h}"))
            .unwrap_or_default();
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let data: Vec<Value> = images
            .iter()
            .enumerate()
            .map(|(i, _)| match format {
                ResponseFormat::B64Json => {
                    json!({"b64_json": encoded.get(i), "revised_prompt": prompt})
                }
                ResponseFormat::Url => {
                    json!({"url": format!("{host}/jobs/{id}/images/{i}"), "revised_prompt": prompt})
                }
            })
            .collect();
        Ok(json!({"created": created, "data": data, "output_format": "png"}))
    }
    .await;
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => error(e),
    }
}
