//! The job queue: one GPU worker thread takes jobs first in, first out; each
//! job keeps its events (queued, stages, steps, profile, done) so that a
//! client subscribing late still sees all of them.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use serde_json::{json, Value};
use tokio::sync::watch;

use crate::error::Error;
use crate::gpu::profile::Profile;
use crate::pipeline::{GenerateRequest, Pipeline, Progress};

/// Where a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Waiting for the GPU.
    Queued,
    /// Running.
    Running,
    /// Finished with images.
    Done,
    /// Stopped by an error.
    Failed,
    /// Cancelled before it finished.
    Cancelled,
}

impl Status {
    /// The name the API uses.
    pub fn name(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Done => "done",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    /// Whether the job will not change any more.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Done | Status::Failed | Status::Cancelled)
    }
}

/// One server-sent event: its name and JSON data.
#[derive(Clone, Debug)]
pub struct Event {
    /// `queued`, `started`, `stage`, `progress`, `profile`, `done`, `failed`, `cancelled`.
    pub name: &'static str,
    /// The data, a JSON object.
    pub data: Value,
}

/// A generation job.
pub struct Job {
    /// Its id (increasing in order of submission).
    pub id: u64,
    /// The API it came through (`a1111`, `openai`, `jobs`).
    pub api: &'static str,
    /// What to generate.
    pub request: GenerateRequest,
    /// Where it is.
    pub status: Status,
    /// The n-th job the worker started (1-based), once started.
    pub started_seq: Option<u64>,
    /// Steps done and to do.
    pub step: (usize, usize),
    /// The stage running.
    pub stage: Option<&'static str>,
    /// Steps per second so far, and the estimated seconds left.
    pub rate: (f64, f64),
    /// Wall-clock seconds of each stage that ran.
    pub stages: Vec<(&'static str, f64)>,
    /// The error of a failed job.
    pub error: Option<String>,
    /// PNG files, one per image.
    pub images: Vec<Arc<Vec<u8>>>,
    /// The A1111 `parameters` string of each image.
    pub infotexts: Vec<String>,
    /// Settings the generation used: steps, cfg, shift, width, height.
    pub settings: Option<Value>,
    /// Everything that happened, in order.
    pub events: Vec<Event>,
    created: Instant,
    cancel: Arc<AtomicBool>,
    notify: watch::Sender<usize>,
}

impl Job {
    fn push(&mut self, name: &'static str, mut data: Value) {
        if let Value::Object(m) = &mut data {
            m.insert("job".into(), json!(self.id.to_string()));
        }
        self.events.push(Event { name, data });
        self.notify.send_replace(self.events.len());
    }

    /// A watch on the number of events (changes with every event).
    pub fn subscribe(&self) -> watch::Receiver<usize> {
        self.notify.subscribe()
    }

    /// The job's status as the API shows it (`GET /jobs/{id}`).
    pub fn summary(&self, position: Option<usize>) -> Value {
        let images: Vec<String> = (0..self.images.len())
            .map(|i| format!("/jobs/{}/images/{i}", self.id))
            .collect();
        json!({
            "id": self.id.to_string(),
            "api": self.api,
            "status": self.status.name(),
            "position": position,
            "started": self.started_seq,
            "stage": self.stage,
            "step": self.step.0,
            "steps": self.step.1,
            "it_per_s": self.rate.0,
            "eta_s": self.rate.1,
            "stages": self.stages.iter().map(|(n, s)| json!({"name": n, "s": s})).collect::<Vec<_>>(),
            "error": self.error,
            "images": images,
            "settings": self.settings,
            "age_s": self.created.elapsed().as_secs_f64(),
        })
    }
}

/// Why a job was not queued.
#[derive(Debug)]
pub enum SubmitError {
    /// The queue holds its maximum.
    Full(usize),
    /// The server is stopping.
    ShuttingDown,
}

struct State {
    next_id: u64,
    queue: VecDeque<u64>,
    jobs: HashMap<u64, Job>,
    /// Finished jobs, oldest first (dropped beyond `keep_finished`).
    finished: VecDeque<u64>,
    started: u64,
    running: Option<u64>,
    /// Jobs ended: done, failed, cancelled.
    ended: [u64; 3],
    /// PNG bytes held by finished jobs.
    kept_bytes: u64,
    shutdown: bool,
}

/// Counts for `/health`.
#[derive(Clone, Copy, Debug)]
pub struct Counts {
    /// Jobs waiting.
    pub queued: usize,
    /// Jobs running (0 or 1).
    pub running: usize,
    /// Finished jobs still kept (with their images).
    pub kept: usize,
    /// PNG bytes they hold.
    pub kept_bytes: u64,
    /// Jobs ended done, failed, cancelled.
    pub ended: [u64; 3],
}

/// The queue shared by the HTTP handlers and the worker.
pub struct Queue {
    state: Mutex<State>,
    wake: Condvar,
    max_queued: usize,
    keep_finished: usize,
    keep_bytes: u64,
}

impl Queue {
    /// An empty queue taking at most `max_queued` waiting jobs and
    /// remembering the last `keep_finished` finished ones, as long as their
    /// images take at most `keep_bytes`.
    pub fn new(max_queued: usize, keep_finished: usize, keep_bytes: u64) -> Queue {
        Queue {
            state: Mutex::new(State {
                next_id: 1,
                queue: VecDeque::new(),
                jobs: HashMap::new(),
                finished: VecDeque::new(),
                started: 0,
                running: None,
                ended: [0; 3],
                kept_bytes: 0,
                shutdown: false,
            }),
            wake: Condvar::new(),
            max_queued,
            keep_finished,
            keep_bytes,
        }
    }

    /// Whether a job submitted now would be refused (queue full or stopping).
    pub fn is_full(&self) -> bool {
        let s = self.lock();
        s.shutdown || s.queue.len() >= self.max_queued
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data behind
        // (every update is a plain assignment), so keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a job; returns its id.
    pub fn submit(&self, api: &'static str, request: GenerateRequest) -> Result<u64, SubmitError> {
        let mut s = self.lock();
        if s.shutdown {
            return Err(SubmitError::ShuttingDown);
        }
        if s.queue.len() >= self.max_queued {
            return Err(SubmitError::Full(self.max_queued));
        }
        let id = s.next_id;
        s.next_id += 1;
        let (notify, _) = watch::channel(0);
        let mut job = Job {
            id,
            api,
            request,
            status: Status::Queued,
            started_seq: None,
            step: (0, 0),
            stage: None,
            rate: (0.0, 0.0),
            stages: Vec::new(),
            error: None,
            images: Vec::new(),
            infotexts: Vec::new(),
            settings: None,
            events: Vec::new(),
            created: Instant::now(),
            cancel: Arc::new(AtomicBool::new(false)),
            notify,
        };
        let position = s.queue.len() + usize::from(s.running.is_some());
        job.push("queued", json!({"position": position}));
        s.jobs.insert(id, job);
        s.queue.push_back(id);
        drop(s);
        self.wake.notify_all();
        Ok(id)
    }

    /// Runs `f` on job `id` (with its place in the queue), if it is known.
    pub fn with_job<T>(&self, id: u64, f: impl FnOnce(&Job, Option<usize>) -> T) -> Option<T> {
        let s = self.lock();
        let position = s.queue.iter().position(|&q| q == id);
        s.jobs.get(&id).map(|j| f(j, position))
    }

    /// Cancels job `id`: a queued job leaves the queue at once, a running
    /// one stops at its next step. Returns its status after, or `None` for
    /// an unknown job.
    pub fn cancel(&self, id: u64) -> Option<Status> {
        let mut s = self.lock();
        let status = s.jobs.get(&id)?.status;
        match status {
            Status::Queued => {
                s.queue.retain(|&q| q != id);
                self.finish(&mut s, id, Status::Cancelled, json!({}));
                Some(Status::Cancelled)
            }
            Status::Running => {
                if let Some(j) = s.jobs.get(&id) {
                    j.cancel.store(true, Ordering::SeqCst);
                }
                Some(Status::Running)
            }
            done => Some(done),
        }
    }

    /// The running job's id.
    pub fn running(&self) -> Option<u64> {
        self.lock().running
    }

    /// Counts for `/health`.
    pub fn counts(&self) -> Counts {
        let s = self.lock();
        Counts {
            queued: s.queue.len(),
            running: usize::from(s.running.is_some()),
            kept: s.finished.len(),
            kept_bytes: s.kept_bytes,
            ended: s.ended,
        }
    }

    /// Stops taking jobs and cancels those waiting; the worker ends after
    /// the running one.
    pub fn shut_down(&self) {
        let mut s = self.lock();
        s.shutdown = true;
        let waiting: Vec<u64> = s.queue.drain(..).collect();
        for id in waiting {
            self.finish(&mut s, id, Status::Cancelled, json!({"reason": "shutdown"}));
        }
        if let Some(id) = s.running {
            if let Some(j) = s.jobs.get(&id) {
                j.cancel.store(true, Ordering::SeqCst);
            }
        }
        drop(s);
        self.wake.notify_all();
    }

    fn finish(&self, s: &mut State, id: u64, status: Status, data: Value) {
        let mut bytes = 0;
        if let Some(j) = s.jobs.get_mut(&id) {
            j.status = status;
            j.stage = None;
            // The request's input images are not needed any more.
            j.request.init_image = None;
            j.request.mask = None;
            bytes = j.images.iter().map(|i| i.len() as u64).sum::<u64>();
            j.push(status.name(), data);
        }
        if s.running == Some(id) {
            s.running = None;
        }
        s.ended[match status {
            Status::Done => 0,
            Status::Failed => 1,
            _ => 2,
        }] += 1;
        s.kept_bytes += bytes;
        s.finished.push_back(id);
        while s.finished.len() > self.keep_finished
            || (s.kept_bytes > self.keep_bytes && s.finished.len() > 1)
        {
            let Some(old) = s.finished.pop_front() else {
                break;
            };
            if let Some(j) = s.jobs.remove(&old) {
                let b: u64 = j.images.iter().map(|i| i.len() as u64).sum();
                s.kept_bytes = s.kept_bytes.saturating_sub(b);
            }
        }
    }

    /// The next job for the worker, blocking; `None` once shut down.
    fn next(&self) -> Option<(u64, GenerateRequest, Arc<AtomicBool>)> {
        let mut s = self.lock();
        loop {
            if s.shutdown {
                return None;
            }
            if let Some(id) = s.queue.pop_front() {
                if !s.jobs.contains_key(&id) {
                    continue;
                }
                s.started += 1;
                let seq = s.started;
                s.running = Some(id);
                let Some(job) = s.jobs.get_mut(&id) else {
                    continue;
                };
                job.status = Status::Running;
                job.started_seq = Some(seq);
                job.push("started", json!({"started": seq}));
                return Some((id, job.request.clone(), job.cancel.clone()));
            }
            s = self.wake.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Updates running job `id`.
    fn update(&self, id: u64, f: impl FnOnce(&mut Job)) {
        if let Some(j) = self.lock().jobs.get_mut(&id) {
            f(j);
        }
    }
}

/// The worker: takes jobs in order and runs them on `pipe` until the queue
/// shuts down.
pub fn work(queue: &Queue, pipe: &Pipeline) {
    while let Some((id, req, cancel)) = queue.next() {
        // A bug that panics anywhere in a job fails that job, not the server.
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_job(queue, pipe, id, &req, &cancel)
        }));
        if let Err(p) = ran {
            let msg = format!(
                "internal error (a bug; please report it): {}",
                panic_text(&*p)
            );
            queue.update(id, |j| j.error = Some(msg.clone()));
            let mut s = queue.lock();
            queue.finish(&mut s, id, Status::Failed, json!({"error": msg}));
        }
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

fn run_job(queue: &Queue, pipe: &Pipeline, id: u64, req: &GenerateRequest, cancel: &AtomicBool) {
    {
        let t0 = Instant::now();
        let mut stage: Option<(&'static str, Instant)> = None;
        let mut denoise_start = t0;
        let close_stage = |queue: &Queue, stage: &mut Option<(&'static str, Instant)>| {
            if let Some((name, t)) = stage.take() {
                let s = t.elapsed().as_secs_f64();
                queue.update(id, |j| {
                    j.stages.push((name, s));
                    j.push("stage_end", json!({"stage": name, "s": s}));
                });
            }
        };
        let result = pipe.generate_with(req, &mut |p| {
            if cancel.load(Ordering::SeqCst) {
                return Err(Error::Cancelled);
            }
            match p {
                Progress::Stage(st) => {
                    close_stage(queue, &mut stage);
                    let now = Instant::now();
                    if st == crate::pipeline::Stage::Denoise {
                        denoise_start = now;
                    }
                    stage = Some((st.name(), now));
                    queue.update(id, |j| {
                        j.stage = Some(st.name());
                        j.push("stage", json!({"stage": st.name()}));
                    });
                }
                Progress::Step { step, total, .. } => {
                    let secs = denoise_start.elapsed().as_secs_f64().max(1e-9);
                    let rate = step as f64 / secs;
                    let eta = (total - step) as f64 / rate.max(1e-9);
                    queue.update(id, |j| {
                        j.step = (step, total);
                        j.rate = (rate, eta);
                        j.push(
                            "progress",
                            json!({"step": step, "steps": total, "it_per_s": rate, "eta_s": eta}),
                        );
                    });
                }
            }
            Ok(())
        });
        close_stage(queue, &mut stage);
        let wall = t0.elapsed().as_secs_f64();
        let (status, data) = match result.and_then(|out| {
            let s = &out.settings;
            let text = pipe.image_metadata(req, s);
            let infotext = text
                .iter()
                .find(|(k, _)| *k == "parameters")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            let images = out
                .images
                .iter()
                .map(|img| {
                    crate::image_io::png_bytes(img, s.width, s.height, &text)
                        .map(|(b, _)| Arc::new(b))
                })
                .collect::<crate::error::Result<Vec<_>>>()?;
            Ok((out, images, infotext))
        }) {
            Ok((out, images, infotext)) => {
                let s = &out.settings;
                let settings = json!({
                    "steps": s.steps, "cfg_scale": s.cfg, "shift": s.shift,
                    "width": s.width, "height": s.height,
                    "peak_memory_bytes": out.peak_memory,
                });
                let profile = out.profile.as_ref().map(profile_json);
                let n = images.len();
                queue.update(id, |j| {
                    j.settings = Some(settings.clone());
                    j.images = images;
                    j.infotexts = vec![infotext; n];
                    let stages: Vec<Value> = j
                        .stages
                        .iter()
                        .map(|(n, s)| json!({"name": n, "s": s}))
                        .collect();
                    j.push(
                        "profile",
                        json!({"wall_s": wall, "stages": stages, "step": profile}),
                    );
                });
                let urls: Vec<String> = (0..n).map(|i| format!("/jobs/{id}/images/{i}")).collect();
                (
                    Status::Done,
                    json!({"images": urls, "settings": settings, "wall_s": wall}),
                )
            }
            Err(Error::Cancelled) => (Status::Cancelled, json!({})),
            Err(e) => {
                let msg = e.to_string();
                queue.update(id, |j| j.error = Some(msg.clone()));
                (Status::Failed, json!({"error": msg}))
            }
        };
        let mut s = queue.lock();
        queue.finish(&mut s, id, status, data);
    }
}

/// A step's per-op profile as JSON for the page's chart: the ops in order
/// with start and duration (ms, when the adapter has timestamps) and the
/// totals per kernel family.
pub fn profile_json(p: &Profile) -> Value {
    let ms = |ns: Option<f64>| ns.map(|v| v / 1e6);
    let ops: Vec<Value> = p
        .entries
        .iter()
        .map(|e| {
            json!({
                "label": e.label,
                "kernel": e.kernel(),
                "start_ms": ms(e.start_ns),
                "ms": ms(e.gpu_ns),
                "flops": e.flops,
                "bytes": e.bytes,
            })
        })
        .collect();
    let families: Vec<Value> = p
        .by_family()
        .iter()
        .map(|(k, t)| json!({"kernel": k, "ms": t.ns / 1e6, "ops": t.count}))
        .collect();
    json!({
        "source": format!("{:?}", p.source),
        "wall_ms": p.wall_ns / 1e6,
        "gpu_ms": p.gpu_ns() / 1e6,
        "ops": ops,
        "kernels": families,
    })
}
