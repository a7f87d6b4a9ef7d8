//! Kernel descriptions and the pipeline cache.
//!
//! A [`Kernel`] names its shader file, entry point and storage bindings once;
//! both the bind-group layout and every bind group are derived from that list.
//! Binding 0 is always the op's `params` uniform; the listed storage bindings
//! follow from binding 1 in order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{shader, Gpu, GpuError};

/// How a kernel accesses a storage binding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// `var<storage, read>`
    Read,
    /// `var<storage, read_write>`
    ReadWrite,
}

/// One storage binding of a kernel: its WGSL variable name and access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Binding {
    /// Name of the WGSL global.
    pub name: &'static str,
    /// Read-only input or written output.
    pub access: Access,
}

impl Binding {
    /// A read-only input.
    pub const fn read(name: &'static str) -> Binding {
        Binding {
            name,
            access: Access::Read,
        }
    }
    /// A written output.
    pub const fn write(name: &'static str) -> Binding {
        Binding {
            name,
            access: Access::ReadWrite,
        }
    }
}

/// A compute entry point of a shader file with its binding list.
#[derive(Debug)]
pub struct Kernel {
    /// Shader file in `shaders/`.
    pub file: &'static str,
    /// Entry point.
    pub entry: &'static str,
    /// Layout of the params struct bound at 0 (checked field by field
    /// against the WGSL `struct Params` in tests).
    pub params: &'static super::ParamsLayout,
    /// Storage bindings, bound at 1, 2, … (binding 0 is the params uniform).
    pub bindings: &'static [Binding],
    /// Preprocessor flags this kernel understands (each may be on or off).
    pub flags: &'static [&'static str],
    /// Override constants with every value the engine may set per call
    /// (op selectors such as the activation).
    pub constants: &'static [(&'static str, &'static [f64])],
    /// Numbers Rust owns and the WGSL declares as `override NAME: u32;`
    /// *without* a default — tile and workgroup sizes, flag bits — set from
    /// these values at every pipeline creation, so the two sides cannot drift
    /// (a missing one fails pipeline creation; the portability test checks
    /// that both sides name the same set).
    pub overrides: &'static [(&'static str, u32)],
    /// Numbers the WGSL must fix as `const NAME: u32` (they size private
    /// arrays or vectors) and Rust needs too (for the dispatch); the
    /// portability test checks that both sides hold the same value.
    pub consts: &'static [(&'static str, u32)],
}

/// A kernel with one specialisation: preprocessor flags and override constants.
#[derive(Clone, Debug)]
pub struct PipelineKey {
    /// The kernel.
    pub kernel: &'static Kernel,
    /// Flags that are set.
    pub flags: Vec<&'static str>,
    /// Override constant values.
    pub constants: Vec<(&'static str, f64)>,
}

impl PipelineKey {
    /// The default specialisation of `kernel`.
    pub fn new(kernel: &'static Kernel) -> PipelineKey {
        PipelineKey {
            kernel,
            flags: Vec::new(),
            constants: Vec::new(),
        }
    }

    /// The kernel's fixed overrides followed by this call's constants: what
    /// the pipeline is created with.
    pub fn all_constants(&self) -> Vec<(&'static str, f64)> {
        let mut c: Vec<(&'static str, f64)> = self
            .kernel
            .overrides
            .iter()
            .map(|&(n, v)| (n, v as f64))
            .collect();
        c.extend_from_slice(&self.constants);
        c
    }

    fn id(&self) -> (usize, String) {
        let mut flags = self.flags.clone();
        flags.sort_unstable();
        let consts: Vec<String> = self
            .constants
            .iter()
            .map(|(k, v)| format!("{k}={}", v.to_bits()))
            .collect();
        (
            self.kernel as *const Kernel as usize,
            format!("{}|{}", flags.join(","), consts.join(",")),
        )
    }
}

type Entry = Arc<wgpu::ComputePipeline>;

/// Pipelines and shader modules, each built once per specialisation.
#[derive(Default)]
pub struct PipelineCache {
    pipelines: Mutex<HashMap<(usize, String), Entry>>,
    modules: Mutex<HashMap<(String, String), Arc<wgpu::ShaderModule>>>,
}

impl PipelineCache {
    /// Number of pipelines built.
    pub fn len(&self) -> usize {
        self.pipelines.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// Whether no pipeline has been built yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn module(&self, gpu: &Gpu, key: &PipelineKey) -> Result<Arc<wgpu::ShaderModule>, GpuError> {
        let mut flags = key.flags.clone();
        flags.sort_unstable();
        let mkey = (key.kernel.file.to_string(), flags.join(","));
        let mut modules = self.modules.lock().map_err(|_| poisoned())?;
        if let Some(m) = modules.get(&mkey) {
            return Ok(m.clone());
        }
        let src = shader::preprocess(key.kernel.file, &flags)?;
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(key.kernel.file),
            source: wgpu::ShaderSource::Wgsl(src.into()),
        };
        let module = if gpu.runtime_checks {
            gpu.device.create_shader_module(desc)
        } else {
            // SAFETY: every dispatch is preceded by the op's own shape checks, and
            // every kernel guards its own indices; the portability and
            // runtime-checks test passes cover the same kernels with checks on.
            unsafe {
                gpu.device
                    .create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked())
            }
        };
        let module = Arc::new(module);
        modules.insert(mkey, module.clone());
        Ok(module)
    }

    /// The pipeline for `key`, built on first use.
    pub fn get(&self, gpu: &Gpu, key: &PipelineKey) -> Result<Entry, GpuError> {
        if let Some(f) = key.flags.iter().find(|f| !key.kernel.flags.contains(f)) {
            return Err(GpuError::Shader(format!(
                "{} ({}): unknown flag '{f}' (the kernel knows {:?})",
                key.kernel.file, key.kernel.entry, key.kernel.flags
            )));
        }
        let id = key.id();
        if let Some(p) = self.pipelines.lock().map_err(|_| poisoned())?.get(&id) {
            return Ok(p.clone());
        }
        // wgpu reports invalid shaders and pipelines through error scopes, not
        // return values: turn them into errors instead of the default panic.
        let scope = gpu.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self.module(gpu, key)?;
        let layout = bind_group_layout(&gpu.device, key.kernel);
        let pl = gpu
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(key.kernel.entry),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
        let pipeline = gpu
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(key.kernel.entry),
                layout: Some(&pl),
                module: &module,
                entry_point: Some(key.kernel.entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &key.all_constants(),
                    zero_initialize_workgroup_memory: gpu.runtime_checks,
                },
                cache: None,
            });
        if let Some(e) = pollster::block_on(scope.pop()) {
            // A lost device fails every creation: say so rather than blame the shader.
            gpu.check_health()?;
            self.modules.lock().map_err(|_| poisoned())?.clear();
            return Err(GpuError::Shader(format!(
                "{} ({}) flags {:?} constants {:?}: {e}",
                key.kernel.file, key.kernel.entry, key.flags, key.constants
            )));
        }
        let p = Arc::new(pipeline);
        self.pipelines
            .lock()
            .map_err(|_| poisoned())?
            .insert(id, p.clone());
        Ok(p)
    }
}

fn poisoned() -> GpuError {
    GpuError::Shader("pipeline cache lock poisoned by a panic".into())
}

/// The bind-group layout derived from a kernel's binding list.
pub fn bind_group_layout(device: &wgpu::Device, kernel: &Kernel) -> wgpu::BindGroupLayout {
    let mut entries = vec![wgpu::BindGroupLayoutEntry {
        binding: 0,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Uniform,
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }];
    for (i, b) in kernel.bindings.iter().enumerate() {
        entries.push(wgpu::BindGroupLayoutEntry {
            binding: i as u32 + 1,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage {
                    read_only: b.access == Access::Read,
                },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        });
    }
    device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some(kernel.entry),
        entries: &entries,
    })
}
