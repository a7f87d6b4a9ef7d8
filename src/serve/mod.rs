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
    /// The largest request body, bytes.
    pub max_body: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7860)),
            max_queued: 256,
            keep_finished: 64,
            max_body: 64 << 20,
        }
    }
}

struct App {
    queue: Arc<Queue>,
    pipe: Arc<Pipeline>,
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
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(config.listen))
            .map_err(|e| Error::Io(format!("cannot listen on {}: {e}", config.listen)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Io(format!("cannot listen on {}: {e}", config.listen)))?;
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
        let queue = Arc::new(Queue::new(config.max_queued, config.keep_finished));
        let pipe = Arc::new(pipe);
        let app = Arc::new(App {
            queue: queue.clone(),
            pipe: pipe.clone(),
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

    /// Serves until Ctrl-C, then stops.
    pub fn run_until_interrupted(mut self) -> Result<()> {
        if let Some(rt) = &self.runtime {
            rt.block_on(async {
                let _ = tokio::signal::ctrl_c().await;
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
        .map_err(|_| ApiError {
            status: 413,
            message: format!(
                "the request body is larger than {} bytes (or was cut off)",
                app.max_body
            ),
        })
}

/// Checks a request against the model (sizes, limits, images) off the
/// async threads, then queues it.
async fn submit(
    app: &Arc<App>,
    api: &'static str,
    mut req: GenerateRequest,
) -> std::result::Result<u64, ApiError> {
    // Every job times one step per op for the page's chart.
    req.profile = true;
    let pipe = app.pipe.clone();
    let (req, checked) = tokio::task::spawn_blocking(move || {
        let r = pipe.check(&req);
        (req, r)
    })
    .await
    .map_err(|e| ApiError {
        status: 500,
        message: format!("the request check stopped: {e}"),
    })?;
    checked.map_err(|e| ApiError::invalid(e.to_string()))?;
    app.queue.submit(api, req).map_err(|e| match e {
        SubmitError::Full(n) => ApiError {
            status: 503,
            message: format!("the queue is full ({n} jobs waiting); try again later"),
        },
        SubmitError::ShuttingDown => ApiError {
            status: 503,
            message: "the server is shutting down".into(),
        },
    })
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

/// Waits until job `id` is final; its status then.
async fn wait_final(app: &App, id: u64) -> std::result::Result<Status, ApiError> {
    let mut rx = app
        .queue
        .with_job(id, |j, _| j.subscribe())
        .ok_or_else(|| no_job(id))?;
    loop {
        let status = app
            .queue
            .with_job(id, |j, _| j.status)
            .ok_or_else(|| no_job(id))?;
        if status.is_final() {
            return Ok(status);
        }
        if rx.changed().await.is_err() {
            // The job was dropped meanwhile.
            return Err(no_job(id));
        }
    }
}

/// A finished job's images, PNG infotexts and settings, or the error that
/// ended it.
async fn results(
    app: &App,
    id: u64,
) -> std::result::Result<(Vec<Arc<Vec<u8>>>, Vec<String>, Value), ApiError> {
    let status = wait_final(app, id).await?;
    let got = app
        .queue
        .with_job(id, |j, _| {
            (
                j.images.clone(),
                j.infotexts.clone(),
                j.settings.clone().unwrap_or(Value::Null),
                j.error.clone(),
            )
        })
        .ok_or_else(|| no_job(id))?;
    match status {
        Status::Done => Ok((got.0, got.1, got.2)),
        Status::Cancelled => Err(ApiError {
            status: 409,
            message: format!("job {id} was cancelled"),
        }),
        _ => Err(ApiError {
            status: 500,
            message: got.3.unwrap_or_else(|| format!("job {id} failed")),
        }),
    }
}

fn b64(png: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(png)
}

async fn health(State(app): Shared) -> Response {
    let (queued, running, kept, completed) = app.queue.counts();
    let mut v = app.health.clone();
    if let Value::Object(m) = &mut v {
        m.insert("status".into(), json!("ok"));
        m.insert("queued".into(), json!(queued));
        m.insert("running".into(), json!(running));
        m.insert("finished_kept".into(), json!(kept));
        m.insert("completed".into(), json!(completed));
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
        let req = api::job(&body)?;
        submit(&app, "jobs", req).await
    }
    .await;
    match r {
        Ok(id) => (
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

async fn job_events(State(app): Shared, UrlPath(id): UrlPath<String>) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(e) => return error(e),
    };
    let Some(rx) = app.queue.with_job(id, |j, _| j.subscribe()) else {
        return error(no_job(id));
    };
    // Every event of the job from the first, then the new ones as they
    // come; the stream ends after the final one.
    let stream = futures_util::stream::unfold(
        (0usize, rx, app, false),
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
                        let ev = SseEvent::default().event(e.name).data(e.data.to_string());
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
        let req = api::a1111(&body, img2img)?;
        let echo: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let (prompt, negative, seed, batch) = (
            req.prompt.clone(),
            req.negative_prompt.clone(),
            req.seed,
            req.batch,
        );
        let id = submit(&app, "a1111", req).await?;
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
            "images": images.iter().map(|p| b64(p)).collect::<Vec<_>>(),
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
    let (queued, _, _, _) = app.queue.counts();
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
        let (req, format) = api::openai(&body)?;
        let prompt = req.prompt.clone();
        let id = submit(&app, "openai", req).await?;
        let (images, _, _) = results(&app, id).await?;
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
            .map(|(i, p)| match format {
                ResponseFormat::B64Json => json!({"b64_json": b64(p), "revised_prompt": prompt}),
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
