//! GPU context: adapter choice, device creation with the adapter's real limits
//! and optional features, and the pipeline cache.

mod params;
mod pipeline;
pub mod profile;
pub mod shader;

pub use params::{Field, ParamScalar, ParamsLayout, Scalar};

use crate::target::{CoopConfig, GemmTile, KernelChoice, Target};

use std::fmt;

pub use pipeline::{bind_group_layout, Access, Binding, Kernel, PipelineCache, PipelineKey};

/// Errors at the GPU boundary: no adapter, a failed device request, a limit too small.
#[derive(Debug)]
pub enum GpuError {
    /// No adapter matched the backend/adapter selection.
    NoAdapter {
        /// What was asked for, in words.
        wanted: String,
        /// The adapters that were present.
        available: Vec<String>,
    },
    /// The backend name was not one of vulkan, metal, dx12, gl.
    UnknownBackend(String),
    /// `request_device` failed.
    RequestDevice(String),
    /// A buffer or dispatch exceeds what the adapter allows.
    Limit {
        /// What was being created.
        what: String,
        /// The size or count needed.
        needed: u64,
        /// The adapter's limit.
        limit: u64,
    },
    /// Reading a buffer back from the GPU failed.
    Readback(String),
    /// A shader failed to preprocess (missing include, unbalanced `#if`).
    Shader(String),
    /// The device was lost (driver reset, GPU removed, or destroyed).
    DeviceLost(String),
    /// An allocation did not fit the GPU's memory.
    OutOfMemory {
        /// What was being created.
        what: String,
        /// Bytes asked for.
        bytes: u64,
        /// Bytes the engine held in storage buffers at the time.
        held: u64,
        /// The adapter's largest buffer.
        max_buffer: u64,
    },
    /// The device reported a validation or internal error.
    Device(String),
}

impl fmt::Display for GpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuError::NoAdapter { wanted, available } => {
                write!(f, "no GPU adapter matches {wanted}")?;
                if available.is_empty() {
                    write!(f, "; no adapter was found at all (is a Vulkan, Metal, DX12 or GL driver installed?)")
                } else {
                    write!(f, "; available: {}", available.join(", "))
                }
            }
            GpuError::UnknownBackend(b) => {
                write!(
                    f,
                    "unknown backend '{b}': expected vulkan, metal, dx12 or gl"
                )
            }
            GpuError::RequestDevice(e) => write!(f, "could not create the GPU device: {e}"),
            GpuError::Limit {
                what,
                needed,
                limit,
            } => write!(
                f,
                "{what} needs {needed}, but this adapter's limit is {limit}"
            ),
            GpuError::Readback(e) => write!(f, "reading a buffer back from the GPU failed: {e}"),
            GpuError::Shader(e) => write!(f, "shader preprocessing failed: {e}"),
            GpuError::DeviceLost(e) => write!(
                f,
                "the GPU device was lost ({e}); nothing more can run on it (restart to retry)"
            ),
            GpuError::OutOfMemory {
                what,
                bytes,
                held,
                max_buffer,
            } => write!(
                f,
                "out of GPU memory creating {what}: asked for {bytes} bytes while the engine held {held}; \
                 this adapter allows buffers of up to {max_buffer} bytes (try a smaller size or batch, or --dtype f16)"
            ),
            GpuError::Device(e) => write!(f, "the GPU reported an error: {e}"),
        }
    }
}

impl std::error::Error for GpuError {}

/// How to choose and configure the GPU.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// `vulkan`, `metal`, `dx12` or `gl`; all backends when `None`.
    pub backend: Option<String>,
    /// Adapter index (as listed by `sd3 devices`) or a case-insensitive name substring.
    pub adapter: Option<String>,
    /// Keep naga's injected bounds/loop checks and workgroup zero-initialisation.
    /// Off by default for speed: our own shape checks guard every dispatch.
    pub runtime_checks: bool,
    /// Do not use SHADER_F16 / SUBGROUP even when present (exercises the fallbacks).
    pub portable_only: bool,
    /// `auto` or `portable`: which op implementations recording may choose
    /// (`--kernels`, `SD3_KERNELS`); auto when `None`.
    pub kernels: Option<String>,
    /// Store activations as f16 where the adapter has SHADER_F16.
    pub f16_activations: bool,
    /// Apply the GEMM tile `sd3 tune` stored for this adapter, if any (the
    /// CLI sets this; the library default reads no cache).
    pub tuned_tiles: bool,
}

impl GpuOptions {
    /// Options from the environment: `SD3_BACKEND`, `SD3_ADAPTER`,
    /// `SD3_RUNTIME_CHECKS=1`, `SD3_KERNELS=auto|portable`.
    pub fn from_env() -> Self {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        GpuOptions {
            backend: get("SD3_BACKEND"),
            adapter: get("SD3_ADAPTER"),
            runtime_checks: get("SD3_RUNTIME_CHECKS").is_some_and(|v| v != "0"),
            portable_only: false,
            kernels: get("SD3_KERNELS"),
            f16_activations: false,
            tuned_tiles: false,
        }
    }
}

/// Optional capabilities that the engine uses when the adapter offers them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// `SHADER_F16`: f16 arithmetic in WGSL.
    pub f16: bool,
    /// `SUBGROUP`: subgroup operations.
    pub subgroup: bool,
    /// `TIMESTAMP_QUERY`: pass-boundary GPU timestamps.
    pub timestamps: bool,
    /// `TIMESTAMP_QUERY_INSIDE_PASSES`: timestamps between dispatches of one pass.
    pub timestamps_inside_passes: bool,
    /// Downlevel `SHADER_F16_IN_F32`: `unpack2x16float`, which f16 weights need.
    pub f16_weights: bool,
}

/// Describes one adapter, for `sd3 devices` and for error messages.
#[derive(Clone, Debug)]
pub struct AdapterReport {
    /// Index in enumeration order (what `--adapter N` refers to).
    pub index: usize,
    /// Backend, name, driver and type.
    pub info: wgpu::AdapterInfo,
    /// The adapter's best limits.
    pub limits: wgpu::Limits,
    /// The adapter's features.
    pub features: wgpu::Features,
    /// Its cooperative-matrix configurations (empty without the feature).
    pub coop: Vec<CoopConfig>,
}

impl AdapterReport {
    /// One line: index, backend, name, type.
    pub fn summary(&self) -> String {
        format!(
            "[{}] {:?} {} ({:?})",
            self.index, self.info.backend, self.info.name, self.info.device_type
        )
    }
}

fn parse_backends(backend: Option<&str>) -> Result<wgpu::Backends, GpuError> {
    Ok(match backend.map(|b| b.to_ascii_lowercase()) {
        None => wgpu::Backends::all(),
        Some(b) => match b.as_str() {
            "vulkan" | "vk" => wgpu::Backends::VULKAN,
            "metal" | "mtl" => wgpu::Backends::METAL,
            "dx12" | "d3d12" => wgpu::Backends::DX12,
            "gl" | "gles" | "opengl" => wgpu::Backends::GL,
            _ => return Err(GpuError::UnknownBackend(b)),
        },
    })
}

fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

fn enumerate(backends: wgpu::Backends) -> Vec<wgpu::Adapter> {
    pollster::block_on(instance().enumerate_adapters(backends))
}

/// Lists every adapter of the given backend (all when `None`).
pub fn list_adapters(backend: Option<&str>) -> Result<Vec<AdapterReport>, GpuError> {
    let backends = parse_backends(backend)?;
    Ok(enumerate(backends)
        .iter()
        .enumerate()
        .map(|(index, a)| AdapterReport {
            index,
            info: a.get_info(),
            limits: a.limits(),
            features: a.features(),
            coop: if a
                .features()
                .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
            {
                coop_configs(a)
            } else {
                Vec::new()
            },
        })
        .collect())
}

fn type_rank(t: wgpu::DeviceType) -> u32 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

fn backend_rank(b: wgpu::Backend) -> u32 {
    // GL lacks f16 and subgroups in wgpu: prefer any native API over it.
    match b {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        _ => 1,
    }
}

/// GPU memory the engine holds in storage buffers: now and at its peak.
#[derive(Debug, Default)]
pub struct MemoryCounter {
    current: std::sync::atomic::AtomicU64,
    peak: std::sync::atomic::AtomicU64,
}

impl MemoryCounter {
    /// Bytes held now.
    pub fn current(&self) -> u64 {
        self.current.load(std::sync::atomic::Ordering::Relaxed)
    }
    /// Most bytes held at once since creation or the last [`MemoryCounter::reset_peak`].
    pub fn peak(&self) -> u64 {
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }
    /// Starts a new peak measurement from the current level.
    pub fn reset_peak(&self) {
        self.peak
            .store(self.current(), std::sync::atomic::Ordering::Relaxed);
    }
    fn add(&self, bytes: u64) {
        let now = self
            .current
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed)
            + bytes;
        self.peak
            .fetch_max(now, std::sync::atomic::Ordering::Relaxed);
    }
    fn sub(&self, bytes: u64) {
        self.current
            .fetch_sub(bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A storage buffer counted in [`Gpu::memory`] until dropped.
#[derive(Debug)]
pub struct TrackedBuffer {
    buffer: wgpu::Buffer,
    bytes: u64,
    counter: std::sync::Arc<MemoryCounter>,
}

impl TrackedBuffer {
    pub(crate) fn new(
        buffer: wgpu::Buffer,
        counter: std::sync::Arc<MemoryCounter>,
    ) -> TrackedBuffer {
        let bytes = buffer.size();
        counter.add(bytes);
        TrackedBuffer {
            buffer,
            bytes,
            counter,
        }
    }
}

impl std::ops::Deref for TrackedBuffer {
    type Target = wgpu::Buffer;
    fn deref(&self) -> &wgpu::Buffer {
        &self.buffer
    }
}

impl Drop for TrackedBuffer {
    fn drop(&mut self) {
        self.counter.sub(self.bytes);
    }
}

/// The cooperative-matrix configurations an adapter offers.
pub fn coop_configs(adapter: &wgpu::Adapter) -> Vec<CoopConfig> {
    fn ty(t: wgpu::CooperativeScalarType) -> &'static str {
        match t {
            wgpu::CooperativeScalarType::F16 => "f16",
            wgpu::CooperativeScalarType::F32 => "f32",
            wgpu::CooperativeScalarType::I32 => "i32",
            wgpu::CooperativeScalarType::U32 => "u32",
        }
    }
    adapter
        .cooperative_matrix_properties()
        .into_iter()
        .map(|p| CoopConfig {
            m: p.m_size,
            n: p.n_size,
            k: p.k_size,
            ab: ty(p.ab_type),
            c: ty(p.cr_type),
        })
        .collect()
}

/// What the device reported outside our error scopes: uncaptured errors
/// (wgpu's default would panic) and the loss of the device.
#[derive(Debug, Default)]
struct Faults {
    errors: std::sync::Mutex<Vec<String>>,
    lost: std::sync::Mutex<Option<String>>,
}

impl Faults {
    fn lost(&self) -> Option<String> {
        self.lost.lock().map(|l| l.clone()).unwrap_or(None)
    }
}

/// The device the engine runs on.
pub struct Gpu {
    /// The wgpu device.
    pub device: wgpu::Device,
    /// Its queue.
    pub queue: wgpu::Queue,
    /// The adapter's description.
    pub info: wgpu::AdapterInfo,
    /// The limits the device was created with (the adapter's best).
    pub limits: wgpu::Limits,
    /// Optional features in use.
    pub caps: Capabilities,
    /// Whether shader runtime checks and workgroup zero-init are on.
    pub runtime_checks: bool,
    pipelines: PipelineCache,
    /// Storage-buffer memory held by the engine.
    pub memory: std::sync::Arc<MemoryCounter>,
    faults: std::sync::Arc<Faults>,
    /// Which op implementations recording may choose.
    pub kernels: KernelChoice,
    /// Element type of activations (f16 only where SHADER_F16 is enabled).
    pub activation: crate::tensor::DType,
    readbacks: std::sync::atomic::AtomicU64,
    /// Cooperative-matrix configurations (empty unless the feature is enabled).
    pub coop: Vec<CoopConfig>,
    /// The portable GEMM's tile ([`GemmTile::DEFAULT`] until a tuning cache
    /// is applied, see [`crate::tune::apply_cached`]).
    pub gemm_tile: GemmTile,
    /// What applying the tuning cache did, when it said something.
    pub tuning: Option<String>,
}

impl Gpu {
    /// Chooses an adapter as `opts` says and creates the device.
    ///
    /// Without an explicit adapter, the first discrete GPU wins, then integrated,
    /// virtual, other and CPU adapters; native APIs before GL.
    pub fn new(opts: &GpuOptions) -> Result<Gpu, GpuError> {
        let backends = parse_backends(opts.backend.as_deref())?;
        let adapters = enumerate(backends);
        let describe = |a: &wgpu::Adapter| {
            let i = a.get_info();
            format!("{:?} {}", i.backend, i.name)
        };
        let wanted = || {
            format!(
                "backend {} / adapter {}",
                opts.backend.as_deref().unwrap_or("any"),
                opts.adapter.as_deref().unwrap_or("any")
            )
        };
        let chosen = match opts.adapter.as_deref() {
            Some(sel) => {
                if let Ok(i) = sel.parse::<usize>() {
                    adapters.get(i)
                } else {
                    let sel = sel.to_lowercase();
                    adapters
                        .iter()
                        .find(|a| a.get_info().name.to_lowercase().contains(&sel))
                }
            }
            None => adapters.iter().min_by_key(|a| {
                let i = a.get_info();
                (type_rank(i.device_type), backend_rank(i.backend))
            }),
        };
        let Some(adapter) = chosen else {
            return Err(GpuError::NoAdapter {
                wanted: wanted(),
                available: adapters.iter().map(describe).collect(),
            });
        };
        Self::from_adapter(adapter, opts)
    }

    fn from_adapter(adapter: &wgpu::Adapter, opts: &GpuOptions) -> Result<Gpu, GpuError> {
        let kernels = match opts.kernels.as_deref() {
            None => KernelChoice::Auto,
            Some(k) => KernelChoice::parse(k).ok_or_else(|| {
                GpuError::RequestDevice(format!(
                    "--kernels / SD3_KERNELS is '{k}': expected auto or portable"
                ))
            })?,
        };
        let offered = adapter.features();
        let mut want =
            wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
        if !opts.portable_only {
            want |= wgpu::Features::SHADER_F16
                | wgpu::Features::SUBGROUP
                | wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        let features = offered & want;
        let coop_on = features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX);
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("sd3-wgpu"),
            required_features: features,
            required_limits: limits.clone(),
            // SAFETY: the experimental feature (cooperative matrix) is only
            // requested when the adapter reports it; its shaders go through the
            // same reference tests as every other kernel.
            experimental_features: if coop_on {
                unsafe { wgpu::ExperimentalFeatures::enabled() }
            } else {
                wgpu::ExperimentalFeatures::disabled()
            },
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| GpuError::RequestDevice(e.to_string()))?;
        let faults = std::sync::Arc::new(Faults::default());
        let f = faults.clone();
        device.on_uncaptured_error(std::sync::Arc::new(move |e: wgpu::Error| {
            if let Ok(mut v) = f.errors.lock() {
                v.push(e.to_string());
            }
        }));
        let f = faults.clone();
        device.set_device_lost_callback(move |reason, msg| {
            if let Ok(mut l) = f.lost.lock() {
                *l = Some(if msg.is_empty() {
                    format!("{reason:?}")
                } else {
                    format!("{reason:?}: {msg}")
                });
            }
        });
        let caps = Capabilities {
            f16: features.contains(wgpu::Features::SHADER_F16),
            subgroup: features.contains(wgpu::Features::SUBGROUP),
            timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
            timestamps_inside_passes: features.contains(
                wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES,
            ),
            f16_weights: adapter
                .get_downlevel_capabilities()
                .flags
                .contains(wgpu::DownlevelFlags::SHADER_F16_IN_F32),
        };
        let mut gpu = Gpu {
            device,
            queue,
            info: adapter.get_info(),
            limits,
            caps,
            runtime_checks: opts.runtime_checks,
            pipelines: PipelineCache::default(),
            memory: Default::default(),
            faults,
            kernels,
            activation: if opts.f16_activations && caps.f16 {
                crate::tensor::DType::F16
            } else {
                crate::tensor::DType::F32
            },
            readbacks: Default::default(),
            gemm_tile: GemmTile::DEFAULT,
            tuning: None,
            coop: if coop_on {
                coop_configs(adapter)
            } else {
                Vec::new()
            },
        };
        if opts.tuned_tiles {
            gpu.tuning = crate::tune::apply_cached(&mut gpu);
        }
        Ok(gpu)
    }

    /// The device as recording sees it (see [`Target`]).
    pub fn target(&self) -> Target {
        Target {
            f16: self.caps.f16,
            f16_weights: self.caps.f16_weights,
            subgroup: self.caps.subgroup,
            subgroup_max: self.info.subgroup_max_size,
            coop: self.coop.clone(),
            limits: self.limits.clone(),
            activation: self.activation,
            kernels: self.kernels,
            gemm_tile: self.gemm_tile,
        }
    }

    /// An error if the device was lost or reported an error outside our
    /// error scopes since the last call.
    pub fn check_health(&self) -> Result<(), GpuError> {
        if let Some(l) = self.faults.lost() {
            return Err(GpuError::DeviceLost(l));
        }
        let first = self
            .faults
            .errors
            .lock()
            .ok()
            .and_then(|mut v| (!v.is_empty()).then(|| v.drain(..).next()).flatten());
        match first {
            Some(e) => Err(GpuError::Device(e)),
            None => Ok(()),
        }
    }

    /// Runs `f`, which creates or submits GPU work, inside error scopes for
    /// out-of-memory, validation and internal errors: what they catch, and a
    /// lost device, become errors naming `what` (and `bytes`, for memory).
    pub fn guarded<T>(&self, what: &str, bytes: u64, f: impl FnOnce() -> T) -> Result<T, GpuError> {
        self.check_health()?;
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let internal = self.device.push_error_scope(wgpu::ErrorFilter::Internal);
        let out = f();
        // Scopes pop innermost first.
        let internal = pollster::block_on(internal.pop());
        let validation = pollster::block_on(validation.pop());
        let oom = pollster::block_on(oom.pop());
        self.check_health()?;
        if oom.is_some() {
            return Err(GpuError::OutOfMemory {
                what: what.to_string(),
                bytes,
                held: self.memory.current(),
                max_buffer: self.limits.max_buffer_size,
            });
        }
        if let Some(e) = validation.or(internal) {
            return Err(GpuError::Device(format!("{what}: {e}")));
        }
        Ok(out)
    }

    /// Submits one command buffer (inside error scopes) and waits for it.
    pub fn submit_and_wait(&self, what: &str, cmd: wgpu::CommandBuffer) -> Result<(), GpuError> {
        self.guarded(what, 0, || self.queue.submit([cmd]))?;
        self.wait()
    }

    /// Writes `bytes` into `buffer` at offset 0 (inside error scopes).
    pub fn write_buffer(
        &self,
        what: &str,
        buffer: &wgpu::Buffer,
        bytes: &[u8],
    ) -> Result<(), GpuError> {
        self.guarded(what, bytes.len() as u64, || {
            self.queue.write_buffer(buffer, 0, bytes)
        })
    }

    /// The compiled pipeline for a kernel and specialisation, created on first use.
    pub fn pipeline(
        &self,
        key: &PipelineKey,
    ) -> Result<std::sync::Arc<wgpu::ComputePipeline>, GpuError> {
        self.pipelines.get(self, key)
    }

    /// How many distinct pipelines have been built so far.
    pub fn pipeline_count(&self) -> usize {
        self.pipelines.len()
    }

    /// Bind-group layout of a kernel (cached with its pipeline).
    pub fn bind_group_layout(&self, key: &PipelineKey) -> Result<wgpu::BindGroupLayout, GpuError> {
        Ok(self.pipeline(key)?.get_bind_group_layout(0))
    }

    /// Checks that a buffer of `bytes` bytes can be created and bound as storage.
    pub fn check_buffer_size(&self, what: &str, bytes: u64) -> Result<(), GpuError> {
        let limit = self
            .limits
            .max_buffer_size
            .min(self.limits.max_storage_buffer_binding_size);
        if bytes > limit {
            return Err(GpuError::Limit {
                what: format!("buffer for {what} ({bytes} bytes)"),
                needed: bytes,
                limit,
            });
        }
        Ok(())
    }

    /// Waits until all submitted work has finished; an error if the device
    /// was lost or reported an error meanwhile.
    pub fn wait(&self) -> Result<(), GpuError> {
        let polled = self.device.poll(wgpu::PollType::wait_indefinitely());
        self.check_health()?;
        polled
            .map(|_| ())
            .map_err(|e| GpuError::DeviceLost(e.to_string()))
    }

    /// Blocks until submission `index` has finished on the GPU.
    pub fn wait_for(&self, index: wgpu::SubmissionIndex) -> Result<(), GpuError> {
        let polled = self.device.poll(wgpu::PollType::Wait {
            submission_index: Some(index),
            timeout: None,
        });
        self.check_health()?;
        polled
            .map(|_| ())
            .map_err(|e| GpuError::DeviceLost(e.to_string()))
    }

    /// How many buffers have been read back to the CPU so far.
    pub fn readbacks(&self) -> u64 {
        self.readbacks.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reads a whole buffer (or its first `bytes`) back to the CPU.
    pub fn read_bytes(&self, buffer: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>, GpuError> {
        self.readbacks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let size = bytes.div_ceil(4) * 4;
        let staging = self.guarded("a readback buffer", size, || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })?;
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(buffer, 0, &staging, 0, size);
        self.submit_and_wait("a copy for readback", enc.finish())?;
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        // The work is done; the map callback may still be fired by another
        // thread's poll. Wait for it (bounded), checking the device meanwhile.
        let t0 = std::time::Instant::now();
        let mapped = loop {
            match rx.recv_timeout(std::time::Duration::from_millis(2)) {
                Ok(r) => break r,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                    if t0.elapsed() < std::time::Duration::from_secs(30) =>
                {
                    self.check_health()?;
                    let _ = self.device.poll(wgpu::PollType::Poll);
                }
                Err(_) => {
                    self.check_health()?;
                    return Err(GpuError::Readback(
                        "the buffer was never mapped (the device stopped answering)".into(),
                    ));
                }
            }
        };
        if let Err(e) = mapped {
            self.check_health()?;
            return Err(GpuError::Readback(e.to_string()));
        }
        let view = staging
            .get_mapped_range(..)
            .map_err(|e| GpuError::Readback(e.to_string()))?;
        let mut out = view.to_vec();
        drop(view);
        staging.unmap();
        out.truncate(bytes as usize);
        Ok(out)
    }
}
