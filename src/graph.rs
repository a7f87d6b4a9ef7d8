//! The executor: record labelled ops once, plan buffers/pipelines/bind groups
//! once per set of shapes, replay many times in one compute pass.
//!
//! Recording allocates nothing. A [`Value`] is a shaped view of a *storage*:
//! an input (written before each run), a weight (a [`Tensor`] bound as it is),
//! or an intermediate that one op writes. [`Graph::reshape`] makes a new view of
//! the same storage for free. Planning assigns intermediates to buffers by
//! liveness (largest first, a buffer shared only by storages whose live op
//! ranges do not overlap), so values not marked with [`Graph::keep`] may be
//! overwritten by later ops.

use std::sync::Arc;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::gpu::{profile::Profile, Access, Gpu, PipelineKey, TrackedBuffer};
use crate::stream::BlockStream;
use crate::target::Target;
use crate::tensor::{create_storage, numel, read_buffer, shape_str, DType, Tensor};

/// Handle to a value recorded in a [`Graph`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Value(usize);

/// Work an op does, for FLOP/s and GB/s in profiles.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    /// Floating-point operations (a multiply-add counts 2).
    pub flops: u64,
    /// Bytes read and written in global memory (ideal, each once).
    pub bytes: u64,
}

/// One dispatch as an op module describes it.
#[derive(Clone, Debug)]
pub struct OpCall {
    /// The kernel and its specialisation.
    pub key: PipelineKey,
    /// Bytes of the op's `#[repr(C)]` params struct (bound at binding 0).
    pub params: Vec<u8>,
    /// One entry per binding of the kernel: the value bound there, or `None`
    /// for a binding this call does not use. Written bindings must be values
    /// made by [`Graph::alloc`] for this call.
    pub args: Vec<Option<Value>>,
    /// Workgroup counts.
    pub workgroups: [u32; 3],
    /// FLOPs and bytes.
    pub cost: Cost,
}

#[derive(Clone, Debug)]
enum Source {
    Input,
    Weight(Tensor),
    /// Written by the op with this index; `None` until recorded.
    Op(Option<usize>),
}

#[derive(Clone, Debug)]
struct Storage {
    bytes: u64,
    dtype: DType,
    source: Source,
    kept: bool,
    name: String,
}

#[derive(Clone, Debug)]
struct ValueInfo {
    shape: Vec<usize>,
    storage: usize,
}

#[derive(Clone, Debug)]
struct Node {
    label: String,
    /// The implementation(s) that recorded it, outermost first
    /// (`composed`, …); empty for ops with a single implementation.
    implementation: String,
    call: OpCall,
}

/// A recorded sequence of ops.
pub struct Graph {
    values: Vec<ValueInfo>,
    storages: Vec<Storage>,
    nodes: Vec<Node>,
    scopes: Vec<String>,
    implementations: Vec<&'static str>,
    target: Target,
    feedback: Vec<(Value, Value)>,
}

impl Graph {
    /// An empty graph for `target` (what op families choose implementations by).
    pub fn new(target: Target) -> Graph {
        Graph {
            values: Vec::new(),
            storages: Vec::new(),
            nodes: Vec::new(),
            scopes: Vec::new(),
            implementations: Vec::new(),
            target,
            feedback: Vec::new(),
        }
    }

    /// The element type ops give their outputs now: the target's activation
    /// dtype, which [`Graph::with_activation`] scopes.
    pub fn act(&self) -> DType {
        self.target.activation
    }

    /// Runs `f` with op outputs of element type `dtype` (e.g. f32 for a
    /// residual stream that would overflow f16). The target's activation type
    /// is set for the scope, so implementation choices follow it too: no
    /// tensor-core (f16-input) kernel is chosen inside an f32 scope.
    pub fn with_activation<T>(&mut self, dtype: DType, f: impl FnOnce(&mut Graph) -> T) -> T {
        let outer = std::mem::replace(&mut self.target.activation, dtype);
        let r = f(self);
        self.target.activation = outer;
        r
    }

    /// After every run, copy kept value `from` into input `to` on the GPU
    /// (state carried from one run to the next, e.g. the latents of a
    /// denoising loop, without a round trip through the CPU).
    pub fn feedback(&mut self, from: Value, to: Value) -> Result<()> {
        let (fs, ts) = (self.values[from.0].storage, self.values[to.0].storage);
        let (f, t) = (&self.storages[fs], &self.storages[ts]);
        if !matches!(t.source, Source::Input) || !f.kept || f.bytes != t.bytes || f.dtype != t.dtype
        {
            return Err(Error::Graph(format!(
                "feedback from '{}' to '{}' needs a kept value and an input of the same size and type",
                f.name, t.name
            )));
        }
        self.feedback.push((from, to));
        Ok(())
    }

    /// The device as recording sees it.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Runs `f` with every node it records tagged as recorded by
    /// implementation `name` (nested implementations join with `/`).
    pub fn with_implementation<T>(
        &mut self,
        name: &'static str,
        f: impl FnOnce(&mut Graph) -> T,
    ) -> T {
        self.implementations.push(name);
        let r = f(self);
        self.implementations.pop();
        r
    }

    fn add_storage(
        &mut self,
        shape: &[usize],
        dtype: DType,
        source: Source,
        name: String,
    ) -> Value {
        self.storages.push(Storage {
            bytes: dtype.bytes(numel(shape)).max(4),
            dtype,
            source,
            kept: false,
            name,
        });
        self.values.push(ValueInfo {
            shape: shape.to_vec(),
            storage: self.storages.len() - 1,
        });
        Value(self.values.len() - 1)
    }

    /// An input written with [`Plan::write`] before each run. Inputs are kept.
    pub fn input(&mut self, name: &str, shape: &[usize], dtype: DType) -> Value {
        let v = self.add_storage(shape, dtype, Source::Input, name.to_string());
        self.keep(v);
        v
    }

    /// A tensor already on the GPU (a weight), bound directly, never copied.
    pub fn weight(&mut self, name: &str, t: &Tensor) -> Value {
        let shape = t.shape.clone();
        self.add_storage(&shape, t.dtype, Source::Weight(t.clone()), name.to_string())
    }

    /// A new intermediate for the next recorded op to write (used by op modules).
    pub fn alloc(&mut self, shape: &[usize], dtype: DType) -> Value {
        let name = self.label("value");
        self.add_storage(shape, dtype, Source::Op(None), name)
    }

    /// Keeps `v` alive to the end of a run so [`Plan::read`] can fetch it
    /// (outputs, and intermediates to compare against a reference).
    pub fn keep(&mut self, v: Value) {
        let s = self.values[v.0].storage;
        self.storages[s].kept = true;
    }

    /// Shape of a value.
    pub fn shape(&self, v: Value) -> &[usize] {
        &self.values[v.0].shape
    }

    /// Element type of a value.
    pub fn dtype(&self, v: Value) -> DType {
        self.storages[self.values[v.0].storage].dtype
    }

    /// The same data under another shape with the same element count.
    pub fn reshape(&mut self, v: Value, shape: &[usize]) -> Result<Value> {
        if numel(shape) != numel(self.shape(v)) {
            return Err(Error::Shape {
                op: self.label("reshape"),
                msg: format!(
                    "cannot reshape {} to {}",
                    shape_str(self.shape(v)),
                    shape_str(shape)
                ),
            });
        }
        let storage = self.values[v.0].storage;
        self.values.push(ValueInfo {
            shape: shape.to_vec(),
            storage,
        });
        Ok(Value(self.values.len() - 1))
    }

    /// Runs `f` with `name` appended to the label scope (`mmdit` → `block3` → `attn`).
    pub fn scoped<T>(&mut self, name: &str, f: impl FnOnce(&mut Graph) -> T) -> T {
        self.scopes.push(name.to_string());
        let r = f(self);
        self.scopes.pop();
        r
    }

    /// The label an op of kind `kind` recorded now gets: `scope.path.kind`.
    pub fn label(&self, kind: &str) -> String {
        if self.scopes.is_empty() {
            kind.to_string()
        } else {
            format!("{}.{kind}", self.scopes.join("."))
        }
    }

    /// A shape error for an op of kind `kind` at the current scope.
    pub fn shape_error(&self, kind: &str, msg: impl Into<String>) -> Error {
        Error::Shape {
            op: self.label(kind),
            msg: msg.into(),
        }
    }

    /// Records one dispatch. `kind` becomes the last part of the label and the
    /// kernel family reported in profiles comes from the call's kernel.
    pub fn record(&mut self, kind: &str, call: OpCall) -> Result<()> {
        let label = self.label(kind);
        let bindings = call.key.kernel.bindings;
        if call.args.len() != bindings.len() {
            return Err(Error::Graph(format!(
                "{label}: {} arguments for {} bindings of {}",
                call.args.len(),
                bindings.len(),
                call.key.kernel.entry
            )));
        }
        let idx = self.nodes.len();
        for (arg, b) in call.args.iter().zip(bindings) {
            let Some(v) = arg else { continue };
            if v.0 >= self.values.len() {
                return Err(Error::Graph(format!("{label}: unknown value {v:?}")));
            }
            let s = self.values[v.0].storage;
            if b.access == Access::ReadWrite {
                match &mut self.storages[s].source {
                    Source::Op(def) if def.is_none() => *def = Some(idx),
                    _ => {
                        return Err(Error::Graph(format!(
                            "{label}: binding '{}' writes a value that is not a fresh intermediate",
                            b.name
                        )))
                    }
                }
            } else if let Source::Op(None) = self.storages[s].source {
                return Err(Error::Graph(format!(
                    "{label}: binding '{}' reads a value no op has written",
                    b.name
                )));
            }
        }
        let implementation = self.implementations.join("/");
        self.nodes.push(Node {
            label,
            implementation,
            call,
        });
        Ok(())
    }

    /// Number of recorded dispatches.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether nothing has been recorded.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Labels of the recorded ops, in order.
    pub fn labels(&self) -> Vec<&str> {
        self.nodes.iter().map(|n| n.label.as_str()).collect()
    }

    /// The implementation that recorded each op, in order (empty for ops
    /// with a single implementation).
    pub fn implementations(&self) -> Vec<&str> {
        self.nodes
            .iter()
            .map(|n| n.implementation.as_str())
            .collect()
    }

    /// Bytes of the weights bound into this graph (their full shapes, even for
    /// shape-only tensors).
    pub fn weight_bytes(&self) -> u64 {
        self.storages
            .iter()
            .filter(|s| matches!(s.source, Source::Weight(_)))
            .map(|s| s.bytes)
            .sum()
    }

    /// Bytes of the graph's inputs.
    pub fn input_bytes(&self) -> u64 {
        self.storages
            .iter()
            .filter(|s| matches!(s.source, Source::Input))
            .map(|s| s.bytes)
            .sum()
    }

    /// Bytes the intermediates of a plan of this graph would take after
    /// buffer reuse (computed without allocating anything).
    pub fn pooled_bytes(&self) -> u64 {
        self.assign_pool().0.iter().sum()
    }

    /// Greedy by size: each intermediate takes the first pooled buffer whose
    /// tenants' live ranges are disjoint from its own (every pooled buffer is
    /// at least as large, since larger storages were placed first). Returns
    /// the pooled buffer sizes and each storage's buffer index.
    fn assign_pool(&self) -> (Vec<u64>, Vec<usize>) {
        let live = self.liveness();
        let mut order: Vec<usize> = (0..self.storages.len())
            .filter(|&s| live[s].is_some())
            .collect();
        order.sort_by_key(|&s| std::cmp::Reverse(self.storages[s].bytes));
        let mut pool: Vec<(u64, Vec<(usize, usize)>)> = Vec::new();
        let mut slot = vec![usize::MAX; self.storages.len()];
        for &s in &order {
            let Some((a, b)) = live[s] else { continue };
            let found = pool
                .iter()
                .position(|(_, ranges)| ranges.iter().all(|&(c, d)| b < c || d < a));
            let i = match found {
                Some(i) => i,
                None => {
                    pool.push((self.storages[s].bytes, Vec::new()));
                    pool.len() - 1
                }
            };
            pool[i].1.push((a, b));
            slot[s] = i;
        }
        (pool.into_iter().map(|(b, _)| b).collect(), slot)
    }

    /// Labels, kernel families and costs of the recorded ops.
    pub fn op_costs(&self) -> Vec<(&str, &'static str, Cost)> {
        self.nodes
            .iter()
            .map(|n| (n.label.as_str(), n.call.key.kernel.entry, n.call.cost))
            .collect()
    }

    /// Total cost of the recorded ops.
    pub fn cost(&self) -> Cost {
        self.nodes.iter().fold(Cost::default(), |a, n| Cost {
            flops: a.flops + n.call.cost.flops,
            bytes: a.bytes + n.call.cost.bytes,
        })
    }

    /// Checks every dispatch and buffer against the GPU's limits without
    /// creating anything: a dry run for architectures too big to execute here.
    pub fn validate(&self, gpu: &Gpu) -> Result<()> {
        self.validate_limits(&gpu.limits)
    }

    /// [`Graph::validate`] against given limits (e.g. another adapter's).
    pub fn validate_limits(&self, limits: &wgpu::Limits) -> Result<()> {
        let max_wg = limits.max_compute_workgroups_per_dimension;
        for n in &self.nodes {
            for &w in &n.call.workgroups {
                if w > max_wg {
                    return Err(Error::Gpu(crate::gpu::GpuError::Limit {
                        what: format!(
                            "{}: dispatch of {:?} workgroups",
                            n.label, n.call.workgroups
                        ),
                        needed: w as u64,
                        limit: max_wg as u64,
                    }));
                }
            }
        }
        let limit = limits
            .max_buffer_size
            .min(limits.max_storage_buffer_binding_size);
        for s in &self.storages {
            if s.bytes > limit {
                return Err(Error::Gpu(crate::gpu::GpuError::Limit {
                    what: format!("buffer for {} ({} bytes)", s.name, s.bytes),
                    needed: s.bytes,
                    limit,
                }));
            }
        }
        Ok(())
    }

    /// Live op range of each intermediate storage: (first writer, last reader).
    fn liveness(&self) -> Vec<Option<(usize, usize)>> {
        let end = self.nodes.len();
        let mut live: Vec<Option<(usize, usize)>> = self
            .storages
            .iter()
            .map(|s| match s.source {
                Source::Op(Some(def)) => Some((def, if s.kept { end } else { def })),
                _ => None,
            })
            .collect();
        for (i, n) in self.nodes.iter().enumerate() {
            for v in n.call.args.iter().flatten() {
                if let Some((_, last)) = &mut live[self.values[v.0].storage] {
                    *last = (*last).max(i);
                }
            }
        }
        live
    }

    /// Plans the graph for `gpu`: buffers, pipelines, bind groups and params,
    /// all created here once.
    pub fn plan(self, gpu: &Gpu) -> Result<Plan> {
        self.validate(gpu)?;
        let (pool, slot) = self.assign_pool();
        let pool_buffers: Vec<Arc<TrackedBuffer>> = pool
            .iter()
            .enumerate()
            .map(|(i, bytes)| create_storage(gpu, &format!("pool{i}"), *bytes).map(Arc::new))
            .collect::<Result<_>>()?;
        let mut buffers: Vec<Option<Arc<TrackedBuffer>>> = Vec::with_capacity(self.storages.len());
        for (s, st) in self.storages.iter().enumerate() {
            buffers.push(match &st.source {
                Source::Input => Some(Arc::new(create_storage(gpu, &st.name, st.bytes)?)),
                Source::Weight(t) => Some(t.buffer.clone()),
                Source::Op(Some(_)) => Some(pool_buffers[slot[s]].clone()),
                // Allocated but never written: nothing can read it.
                Source::Op(None) => None,
            });
        }
        let pooled_bytes = pool.iter().sum();
        let (stream, segments) = self.segments()?;

        // Every op's params in one uniform buffer, each at an aligned offset.
        let align = gpu.limits.min_uniform_buffer_offset_alignment.max(16) as usize;
        let mut params = Vec::new();
        let mut offsets = Vec::with_capacity(self.nodes.len());
        for n in &self.nodes {
            offsets.push(params.len());
            params.extend_from_slice(&n.call.params);
            params.resize(params.len().div_ceil(align) * align, 0);
        }
        params.resize(params.len().max(16), 0);
        let params_buf = gpu.guarded("the params buffer", params.len() as u64, || {
            gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("params"),
                size: params.len() as u64,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })?;
        gpu.write_buffer("the params buffer", &params_buf, &params)?;
        let dummy = create_storage(gpu, "unused", 16)?;

        let mut ops = Vec::with_capacity(self.nodes.len());
        for (n, &off) in self.nodes.iter().zip(&offsets) {
            if n.call.key.flags.contains(&"W_F16") && !gpu.caps.f16_weights {
                return Err(Error::Graph(format!(
                    "{}: this adapter cannot unpack f16 weights in shaders (no SHADER_F16_IN_F32); use f32 weights",
                    n.label
                )));
            }
            let pipeline = gpu.pipeline(&n.call.key)?;
            let layout = pipeline.get_bind_group_layout(0);
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &params_buf,
                    offset: off as u64,
                    size: wgpu::BufferSize::new(n.call.params.len().div_ceil(16) as u64 * 16),
                }),
            }];
            for (i, arg) in n.call.args.iter().enumerate() {
                let buf: &wgpu::Buffer = match arg {
                    Some(v) => buffers[self.values[v.0].storage]
                        .as_deref()
                        .ok_or_else(|| {
                            Error::Graph(format!("{}: reads a value never written", n.label))
                        })?,
                    None => &dummy,
                };
                entries.push(wgpu::BindGroupEntry {
                    binding: i as u32 + 1,
                    resource: buf.as_entire_binding(),
                });
            }
            let bind_group = gpu.guarded(&format!("the bind group of {}", n.label), 0, || {
                gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some(&n.label),
                    layout: &layout,
                    entries: &entries,
                })
            })?;
            ops.push(PlannedOp {
                label: n.label.clone(),
                implementation: n.implementation.clone(),
                family: n.call.key.kernel.entry,
                pipeline,
                bind_group,
                workgroups: n.call.workgroups,
                cost: n.call.cost,
            });
        }
        let feedback = self
            .feedback
            .iter()
            .map(|&(from, to)| {
                let fs = self.values[from.0].storage;
                let ts = self.values[to.0].storage;
                match (&buffers[fs], &buffers[ts]) {
                    (Some(a), Some(b)) => Ok((a.clone(), b.clone(), self.storages[ts].bytes)),
                    _ => Err(Error::Graph(format!(
                        "feedback from '{}': the value is never written",
                        self.storages[fs].name
                    ))),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Plan {
            ops,
            feedback,
            values: self.values,
            storages: self.storages,
            buffers,
            _params: params_buf,
            _dummy: dummy,
            pooled_bytes,
            stream,
            segments,
        })
    }

    /// The streamed block each op reads weights of (at most one), and the
    /// ops split into segments at each change of block (ops reading no
    /// streamed weight join the segment before them).
    fn segments(&self) -> Result<(Option<Arc<BlockStream>>, Vec<Segment>)> {
        let mut stream: Option<Arc<BlockStream>> = None;
        let mut segments: Vec<Segment> = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let mut block = None;
            for v in n.call.args.iter().flatten() {
                let Source::Weight(t) = &self.storages[self.values[v.0].storage].source else {
                    continue;
                };
                let Some(r) = &t.stream else { continue };
                match &stream {
                    Some(s) if !Arc::ptr_eq(s, &r.stream) => {
                        return Err(Error::Graph(format!(
                            "{}: weights of two streamed models in one plan",
                            n.label
                        )))
                    }
                    _ => stream = Some(r.stream.clone()),
                }
                match block {
                    Some(b) if b != r.block => {
                        return Err(Error::Graph(format!(
                            "{}: reads weights of streamed blocks {b} and {}",
                            n.label, r.block
                        )))
                    }
                    _ => block = Some(r.block),
                }
            }
            match (segments.last_mut(), block) {
                (Some(last), None) => last.ops.end = i + 1,
                (Some(last), Some(b)) if last.block.is_none() || last.block == Some(b) => {
                    last.ops.end = i + 1;
                    last.block = Some(b);
                }
                _ => segments.push(Segment {
                    ops: i..i + 1,
                    block,
                }),
            }
        }
        if stream.is_none() {
            segments = vec![Segment {
                ops: 0..self.nodes.len(),
                block: None,
            }];
        }
        Ok((stream, segments))
    }
}

/// Waits until fewer than two streamed segments are in flight, so that the
/// staging memory of block uploads stays at about two blocks.
fn limit_inflight(
    gpu: &Gpu,
    inflight: &mut std::collections::VecDeque<wgpu::SubmissionIndex>,
) -> Result<()> {
    while inflight.len() >= 2 {
        if let Some(i) = inflight.pop_front() {
            gpu.wait_for(i)?;
        }
    }
    Ok(())
}

/// A run of ops submitted together: with streaming, those of one block.
#[derive(Clone, Debug)]
struct Segment {
    ops: std::ops::Range<usize>,
    block: Option<usize>,
}

struct PlannedOp {
    label: String,
    implementation: String,
    family: &'static str,
    pipeline: Arc<wgpu::ComputePipeline>,
    bind_group: wgpu::BindGroup,
    workgroups: [u32; 3],
    cost: Cost,
}

/// A planned graph: every buffer, pipeline and bind group exists; a run only
/// encodes the prebuilt dispatch list.
pub struct Plan {
    ops: Vec<PlannedOp>,
    /// (from, to, bytes): copies encoded after every run.
    feedback: Vec<(Arc<TrackedBuffer>, Arc<TrackedBuffer>, u64)>,
    values: Vec<ValueInfo>,
    storages: Vec<Storage>,
    buffers: Vec<Option<Arc<TrackedBuffer>>>,
    _params: wgpu::Buffer,
    _dummy: TrackedBuffer,
    pooled_bytes: u64,
    /// The stream of the streamed weights the plan binds, if any.
    stream: Option<Arc<BlockStream>>,
    /// The ops in submission order (one segment unless streamed).
    segments: Vec<Segment>,
}

impl Plan {
    fn storage_of(&self, v: Value) -> Result<(&Storage, &ValueInfo)> {
        let info = self
            .values
            .get(v.0)
            .ok_or_else(|| Error::Graph(format!("unknown value {v:?}")))?;
        Ok((&self.storages[info.storage], info))
    }

    /// Writes an input's data (f32 values; converted for f16 inputs).
    pub fn write(&self, gpu: &Gpu, v: Value, data: &[f32]) -> Result<()> {
        let (s, info) = self.storage_of(v)?;
        if !matches!(s.source, Source::Input) {
            return Err(Error::Graph(format!("'{}' is not an input", s.name)));
        }
        if data.len() != numel(&info.shape) {
            return Err(Error::Graph(format!(
                "input '{}' of shape {} needs {} values, got {}",
                s.name,
                shape_str(&info.shape),
                numel(&info.shape),
                data.len()
            )));
        }
        let bytes: Vec<u8> = match s.dtype {
            DType::F32 => bytemuck::cast_slice(data).to_vec(),
            DType::F16 => {
                let h: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
                bytemuck::cast_slice(&h).to_vec()
            }
            DType::U32 => {
                let u: Vec<u32> = data.iter().map(|&x| x as u32).collect();
                bytemuck::cast_slice(&u).to_vec()
            }
            other => {
                return Err(Error::Graph(format!(
                    "input '{}' is {}: inputs are f32, f16 or u32",
                    s.name,
                    other.name()
                )))
            }
        };
        self.write_bytes(v, bytes, gpu)
    }

    /// Writes a u32 input (token ids).
    pub fn write_u32(&self, gpu: &Gpu, v: Value, data: &[u32]) -> Result<()> {
        let (s, info) = self.storage_of(v)?;
        if s.dtype != DType::U32 || data.len() != numel(&info.shape) {
            return Err(Error::Graph(format!(
                "input '{}' is {} of shape {}; got {} u32 values",
                s.name,
                s.dtype.name(),
                shape_str(&info.shape),
                data.len()
            )));
        }
        self.write_bytes(v, bytemuck::cast_slice(data).to_vec(), gpu)
    }

    fn write_bytes(&self, v: Value, mut bytes: Vec<u8>, gpu: &Gpu) -> Result<()> {
        let storage = self.values[v.0].storage;
        let buf = self.buffers[storage]
            .as_ref()
            .ok_or_else(|| Error::Graph("input has no buffer".into()))?;
        bytes.resize(bytes.len().div_ceil(4) * 4, 0);
        gpu.write_buffer("an input upload", buf, &bytes)?;
        Ok(())
    }

    /// Reads a kept value (input, weight, or one marked with [`Graph::keep`]).
    pub fn read(&self, gpu: &Gpu, v: Value) -> Result<Vec<f32>> {
        let (s, info) = self.storage_of(v)?;
        if !s.kept && !matches!(s.source, Source::Weight(_)) {
            return Err(Error::Graph(format!(
                "'{}' was not kept: its buffer is reused; mark it with Graph::keep before planning",
                s.name
            )));
        }
        let buf = self.buffers[info.storage]
            .as_ref()
            .ok_or_else(|| Error::Graph(format!("'{}' was never written", s.name)))?;
        read_buffer(gpu, buf, s.dtype, numel(&info.shape))
    }

    /// Labels of the planned ops, in order.
    pub fn labels(&self) -> Vec<&str> {
        self.ops.iter().map(|o| o.label.as_str()).collect()
    }

    /// Number of dispatches per run.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether the plan has no dispatches.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// A kept value as a standalone [`Tensor`] sharing the plan's buffer (the
    /// buffer lives as long as either does).
    pub fn tensor(&self, v: Value) -> Result<Tensor> {
        let (s, info) = self.storage_of(v)?;
        if !s.kept {
            return Err(Error::Graph(format!("'{}' was not kept", s.name)));
        }
        let buffer = self.buffers[info.storage]
            .clone()
            .ok_or_else(|| Error::Graph(format!("'{}' was never written", s.name)))?;
        Ok(Tensor {
            buffer,
            shape: info.shape.clone(),
            dtype: s.dtype,
            low_rank: None,
            stream: None,
        })
    }

    /// Fills every intermediate buffer with `value` (a debug and test hook:
    /// poisoning with NaN proves that every output element is written by a run).
    pub fn fill_intermediates(&self, gpu: &Gpu, value: f32) {
        for (s, buf) in self.storages.iter().zip(&self.buffers) {
            if let (Source::Op(Some(_)), Some(buf)) = (&s.source, buf) {
                let words = (buf.size() / 4) as usize;
                gpu.queue
                    .write_buffer(buf, 0, bytemuck::cast_slice(&vec![value; words]));
            }
        }
    }

    /// Bytes of the pooled intermediate buffers (after reuse).
    pub fn pooled_bytes(&self) -> u64 {
        self.pooled_bytes
    }

    /// Bytes the intermediates would take without reuse.
    pub fn unpooled_bytes(&self) -> u64 {
        self.storages
            .iter()
            .filter(|s| matches!(s.source, Source::Op(Some(_))))
            .map(|s| s.bytes)
            .sum()
    }

    /// Encodes every dispatch into `pass`, with timestamps around each when a
    /// query set is given.
    fn encode(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        range: std::ops::Range<usize>,
        queries: Option<&wgpu::QuerySet>,
    ) {
        for (j, op) in self.ops[range].iter().enumerate() {
            if let Some(q) = queries {
                pass.write_timestamp(q, 2 * j as u32);
            }
            pass.set_pipeline(&op.pipeline);
            pass.set_bind_group(0, &op.bind_group, &[]);
            let [x, y, z] = op.workgroups;
            if x > 0 && y > 0 && z > 0 {
                pass.dispatch_workgroups(x, y, z);
            }
            if let Some(q) = queries {
                pass.write_timestamp(q, 2 * j as u32 + 1);
            }
        }
    }

    /// Runs every op once, all in one compute pass (one per block when
    /// weights are streamed, each submitted after its block's upload), and
    /// waits for the GPU.
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        self.submit_run(gpu, true)
    }

    /// [`Plan::run`] without waiting: later submissions run after it.
    pub fn submit(&self, gpu: &Gpu) -> Result<()> {
        self.submit_run(gpu, false)
    }

    fn submit_run(&self, gpu: &Gpu, wait: bool) -> Result<()> {
        let finish = |enc: wgpu::CommandEncoder| -> Result<()> {
            if wait {
                gpu.submit_and_wait("a graph run", enc.finish())?;
            } else {
                gpu.guarded("a graph run", 0, || gpu.queue.submit([enc.finish()]))?;
            }
            Ok(())
        };
        let Some(stream) = &self.stream else {
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            self.encode_run(&mut enc)?;
            return finish(enc);
        };
        let _run = stream.lock_runs();
        let mut inflight = std::collections::VecDeque::new();
        let last = self.segments.len().saturating_sub(1);
        for (k, seg) in self.segments.iter().enumerate() {
            if let Some(b) = seg.block {
                limit_inflight(gpu, &mut inflight)?;
                stream.ensure(gpu, b)?;
            }
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                self.encode(&mut pass, seg.ops.clone(), None);
            }
            if k == last {
                self.encode_feedback(&mut enc);
                finish(enc)?;
            } else {
                inflight
                    .push_back(gpu.guarded("a graph run", 0, || gpu.queue.submit([enc.finish()]))?);
            }
        }
        Ok(())
    }

    /// Whether the plan streams block weights (runs in several submissions).
    pub fn is_streamed(&self) -> bool {
        self.stream.is_some()
    }

    /// Encodes one run (its compute pass, then the feedback copies) into
    /// `enc`, for callers that chain several plans in one submission; a
    /// streamed plan cannot be (see [`Plan::run`]).
    pub fn encode_run(&self, enc: &mut wgpu::CommandEncoder) -> Result<()> {
        if self.stream.is_some() {
            return Err(Error::Graph(
                "a plan with streamed weights runs in several submissions: use Plan::run".into(),
            ));
        }
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            self.encode(&mut pass, 0..self.ops.len(), None);
        }
        self.encode_feedback(enc);
        Ok(())
    }

    fn encode_feedback(&self, enc: &mut wgpu::CommandEncoder) {
        for (from, to, bytes) in &self.feedback {
            enc.copy_buffer_to_buffer(from, 0, to, 0, *bytes);
        }
    }

    /// The buffer holding a kept value or an input (for copies between plans).
    pub fn buffer(&self, v: Value) -> Result<&wgpu::Buffer> {
        let (s, info) = self.storage_of(v)?;
        if !s.kept {
            return Err(Error::Graph(format!("'{}' was not kept", s.name)));
        }
        self.buffers[info.storage]
            .as_deref()
            .map(|b| &**b)
            .ok_or_else(|| Error::Graph(format!("'{}' was never written", s.name)))
    }

    /// Runs once and measures each op: GPU timestamps between the dispatches of
    /// one pass where the adapter allows it, one pass per op where it only has
    /// pass timestamps, and the wall clock of the whole submit otherwise.
    pub fn run_profiled(&self, gpu: &Gpu) -> Result<Profile> {
        use crate::gpu::profile::{OpTiming, TimingSource};
        let caps = gpu.caps;
        let source = if caps.timestamps_inside_passes {
            TimingSource::InsidePass
        } else if caps.timestamps {
            TimingSource::PassPerOp
        } else {
            TimingSource::WallClock
        };
        let per_set = (wgpu::QUERY_SET_MAX_QUERIES / 2) as usize;
        let mut ticks: Vec<u64> = Vec::new();
        let _run = self.stream.as_ref().map(|s| s.lock_runs());
        if let Some(s) = &self.stream {
            s.take_stats();
        }
        let mut inflight = std::collections::VecDeque::new();
        let t0 = Instant::now();
        if source == TimingSource::WallClock {
            self.run(gpu)?;
        } else {
            let mut sets = Vec::new();
            let last = self.segments.len().saturating_sub(1);
            for (k, seg) in self.segments.iter().enumerate() {
                if let (Some(stream), Some(b)) = (&self.stream, seg.block) {
                    limit_inflight(gpu, &mut inflight)?;
                    stream.ensure(gpu, b)?;
                }
                let mut enc = gpu.device.create_command_encoder(&Default::default());
                for start in seg.ops.clone().step_by(per_set) {
                    let end = (start + per_set).min(seg.ops.end);
                    let count = 2 * (end - start) as u32;
                    let qs = gpu.guarded("a timestamp query set", count as u64 * 8, || {
                        gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
                            label: Some("op timestamps"),
                            ty: wgpu::QueryType::Timestamp,
                            count,
                        })
                    })?;
                    if source == TimingSource::InsidePass {
                        let mut pass = enc.begin_compute_pass(&Default::default());
                        self.encode(&mut pass, start..end, Some(&qs));
                    } else {
                        for (j, op) in self.ops[start..end].iter().enumerate() {
                            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                                label: Some(&op.label),
                                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                                    query_set: &qs,
                                    beginning_of_pass_write_index: Some(2 * j as u32),
                                    end_of_pass_write_index: Some(2 * j as u32 + 1),
                                }),
                            });
                            self.encode(&mut pass, start + j..start + j + 1, None);
                        }
                    }
                    let resolve = gpu.guarded("a timestamp buffer", count as u64 * 8, || {
                        gpu.device.create_buffer(&wgpu::BufferDescriptor {
                            label: Some("timestamps"),
                            size: count as u64 * 8,
                            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                            mapped_at_creation: false,
                        })
                    })?;
                    enc.resolve_query_set(&qs, 0..count, &resolve, 0);
                    sets.push((qs, resolve, count));
                }
                if k == last {
                    self.encode_feedback(&mut enc);
                    gpu.submit_and_wait("a profiled graph run", enc.finish())?;
                } else {
                    inflight.push_back(gpu.guarded("a profiled graph run", 0, || {
                        gpu.queue.submit([enc.finish()])
                    })?);
                }
            }
            for (_, resolve, count) in &sets {
                let bytes = gpu.read_bytes(resolve, *count as u64 * 8)?;
                ticks.extend(bytemuck::pod_collect_to_vec::<u8, u64>(&bytes));
            }
        }
        let wall_ns = t0.elapsed().as_nanos() as f64;
        let period = gpu.queue.get_timestamp_period() as f64;
        let base = ticks.first().copied().unwrap_or(0);
        let entries = self
            .ops
            .iter()
            .enumerate()
            .map(|(i, op)| {
                let (start_ns, gpu_ns) = if ticks.len() >= 2 * (i + 1) {
                    let (a, b) = (ticks[2 * i], ticks[2 * i + 1]);
                    (
                        Some(a.saturating_sub(base) as f64 * period),
                        Some(b.saturating_sub(a) as f64 * period),
                    )
                } else {
                    (None, None)
                };
                OpTiming {
                    label: op.label.clone(),
                    implementation: op.implementation.clone(),
                    family: op.family.to_string(),
                    start_ns,
                    gpu_ns,
                    flops: op.cost.flops,
                    bytes: op.cost.bytes,
                }
            })
            .collect();
        Ok(Profile {
            entries,
            wall_ns,
            source,
            uploads: self.stream.as_ref().map(|s| s.take_stats()),
        })
    }
}
