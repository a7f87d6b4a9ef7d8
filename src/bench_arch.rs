//! `sd3 bench --arch …`: the real architectures (real shapes, real op
//! sequence) with seeded random weights made on the GPU, no checkpoint needed.
//! Runs text encoding, N denoising steps and the VAE decode, timing every op.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::denoise::{DenoiseOptions, Denoiser};
use crate::error::{Error, Result};
use crate::gpu::profile::{json_str, Profile};
use crate::gpu::Gpu;
use crate::graph::{Cost, Graph};
use crate::models::clip::{Clip, ClipConfig};
use crate::models::mmdit::{Mmdit, TIMESTEP_DIM};
use crate::models::t5::{T5Config, T5};
use crate::models::vae::{Vae, VaeRun};
use crate::ops::attention::HEAD_DIM;
use crate::ops::elementwise::Act;
use crate::sampler::{noise, FlowMatchEuler, Rng};
use crate::tensor::DType;
use crate::tokenize::CLIP_TOKENS;
use crate::weights::mmdit::MmditConfig;
use crate::weights::vae::{VaeConfig, LATENT_CHANNELS, SD3_SCALING_FACTOR, SD3_SHIFT_FACTOR};
use crate::weights::RandomWeights;

/// A benchmarkable architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// A few-MB model with every SD3 feature, for CI and the no-download demo.
    Tiny,
    /// SD3 medium (2B).
    Sd3Medium,
    /// SD3.5 medium (2.5B, dual attention, qk-norm).
    Sd35Medium,
    /// SD3.5 large (8B).
    Sd35Large,
}

/// Every component's architecture.
#[derive(Clone, Debug)]
pub struct ArchSpec {
    /// The diffusion transformer.
    pub mmdit: MmditConfig,
    /// The autoencoder.
    pub vae: VaeConfig,
    /// CLIP-L.
    pub clip_l: ClipConfig,
    /// CLIP-G.
    pub clip_g: ClipConfig,
    /// T5.
    pub t5: T5Config,
    /// T5 tokens.
    pub t5_tokens: usize,
}

fn clip(hidden: usize, layers: usize, vocab: usize, act: Act) -> ClipConfig {
    ClipConfig {
        hidden,
        heads: hidden / HEAD_DIM,
        layers,
        vocab,
        positions: CLIP_TOKENS,
        projection: hidden,
        intermediate: 4 * hidden,
        act,
        eps: 1e-5,
        pool_at_max_id: true,
        eos_token_id: 2,
    }
}

fn mmdit(
    depth: usize,
    hidden: usize,
    pos: usize,
    qk: bool,
    dual: usize,
    context: usize,
    pooled: usize,
) -> MmditConfig {
    MmditConfig {
        depth,
        hidden,
        heads: hidden / HEAD_DIM,
        in_channels: LATENT_CHANNELS,
        out_channels: LATENT_CHANNELS,
        patch: 2,
        context_dim: context,
        pooled_dim: pooled,
        pos_embed_max: pos,
        qk_norm: qk,
        dual_attention_layers: (0..dual).collect(),
    }
}

impl Arch {
    /// Parses `tiny`, `sd3-medium`, `sd3.5-medium`, `sd3.5-large`.
    pub fn parse(s: &str) -> Result<Arch> {
        Ok(match s {
            "tiny" => Arch::Tiny,
            "sd3-medium" => Arch::Sd3Medium,
            "sd3.5-medium" => Arch::Sd35Medium,
            "sd3.5-large" => Arch::Sd35Large,
            _ => {
                return Err(Error::Graph(format!(
                    "unknown architecture '{s}': tiny, sd3-medium, sd3.5-medium or sd3.5-large"
                )))
            }
        })
    }

    /// The architecture's shapes.
    pub fn spec(self) -> ArchSpec {
        let sd3_vae = VaeConfig {
            latent_channels: LATENT_CHANNELS,
            image_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_groups: 32,
            scaling_factor: SD3_SCALING_FACTOR,
            shift_factor: SD3_SHIFT_FACTOR,
            has_encoder: false,
        };
        let t5xxl = T5Config {
            d_model: 4096,
            heads: 64,
            d_ff: 10240,
            layers: 24,
            vocab: 32128,
            buckets: 32,
            max_distance: 128,
            eps: 1e-6,
        };
        let real = |m: MmditConfig| ArchSpec {
            mmdit: m,
            vae: sd3_vae.clone(),
            clip_l: clip(768, 12, 49408, Act::QuickGelu),
            clip_g: clip(1280, 32, 49408, Act::GeluErf),
            t5: t5xxl.clone(),
            t5_tokens: 256,
        };
        match self {
            Arch::Tiny => ArchSpec {
                mmdit: mmdit(2, 64, 32, true, 1, 192, 128),
                vae: VaeConfig {
                    block_out_channels: vec![32, 64],
                    layers_per_block: 1,
                    ..sd3_vae
                },
                clip_l: clip(64, 2, 1000, Act::QuickGelu),
                clip_g: clip(64, 2, 1000, Act::GeluErf),
                t5: T5Config {
                    d_model: 192,
                    heads: 2,
                    d_ff: 128,
                    layers: 2,
                    vocab: 500,
                    buckets: 32,
                    max_distance: 128,
                    eps: 1e-6,
                },
                t5_tokens: 32,
            },
            Arch::Sd3Medium => real(mmdit(24, 1536, 192, false, 0, 4096, 2048)),
            Arch::Sd35Medium => real(mmdit(24, 1536, 384, true, 13, 4096, 2048)),
            Arch::Sd35Large => real(mmdit(38, 2432, 192, true, 0, 4096, 2048)),
        }
    }
}

pub use crate::weights::ShapeOnlyWeights;

/// The graphs one generation records: text encoders, one MMDiT step, VAE decode.
pub struct ArchGraphs {
    /// (component, graph).
    pub graphs: Vec<(&'static str, Graph)>,
    /// Each graph's streamable blocks (transformer blocks and encoder
    /// layers): (bytes, layout group) each, for streaming plans.
    pub blocks: Vec<(&'static str, Vec<(u64, usize)>)>,
}

/// Records (without running) every graph of `arch` at `width`×`height`, batch
/// `batch` (2 with CFG), with shape-only weights: shape checks and FLOP counts.
pub fn record_graphs(
    gpu: &Gpu,
    arch: Arch,
    width: usize,
    height: usize,
    batch: usize,
    activation: DType,
) -> Result<ArchGraphs> {
    record_graphs_with(gpu, arch, width, height, batch, activation, activation)
}

/// [`record_graphs`] with the text encoders' and the MMDiT's matrices stored
/// as `weights` (f16, bf16, fp8: as a checkpoint in that encoding keeps them
/// on the GPU); the VAE's stay in the activation type.
pub fn record_graphs_with(
    gpu: &Gpu,
    arch: Arch,
    width: usize,
    height: usize,
    batch: usize,
    activation: DType,
    weights: DType,
) -> Result<ArchGraphs> {
    let mut target = gpu.target();
    target.activation = activation;
    let spec = arch.spec();
    let w = ShapeOnlyWeights::new(gpu)?;
    let mut graphs = Vec::new();
    let mut blocks = Vec::new();
    for (name, cfg) in [("clip_l", &spec.clip_l), ("clip_g", &spec.clip_g)] {
        let mut m = Clip::load_from(gpu, cfg, &w, weights)?;
        blocks.push((
            name,
            crate::stream::block_sizes(m.layers.iter_mut().map(|b| b.tensors_mut())),
        ));
        let mut g = Graph::new(target.clone());
        let ids = g.input("ids", &[batch * CLIP_TOKENS], DType::U32);
        let rows = g.input("pool_rows", &[batch], DType::U32);
        m.forward(&mut g, ids, rows, batch)?;
        graphs.push((name, g));
    }
    let mut t5 = T5::load_from(gpu, &spec.t5, "shared.weight", &w, weights)?;
    blocks.push((
        "t5",
        crate::stream::block_sizes(t5.blocks.iter_mut().map(|b| b.tensors_mut())),
    ));
    let mut g = Graph::new(target.clone());
    let ids = g.input("ids", &[batch * spec.t5_tokens], DType::U32);
    let bias = g.input(
        "bias",
        &[spec.t5.heads, spec.t5_tokens, spec.t5_tokens],
        DType::F32,
    );
    t5.forward(&mut g, ids, bias, batch)?;
    graphs.push(("t5", g));
    let mut m = Mmdit::load_from(gpu, &spec.mmdit, &w, weights)?;
    blocks.push((
        "mmdit",
        crate::stream::block_sizes(m.joint_blocks.iter_mut().map(|b| b.tensors_mut())),
    ));
    let (lh, lw) = (
        height / 8 * 8 / spec.vae.scale_factor(),
        width / 8 * 8 / spec.vae.scale_factor(),
    );
    let mut g = Graph::new(target.clone());
    let x = g.input("latents", &[batch, LATENT_CHANNELS, lh, lw], DType::F32);
    let c = g.input(
        "context",
        &[batch, CLIP_TOKENS + spec.t5_tokens, spec.mmdit.context_dim],
        DType::F32,
    );
    let p = g.input("pooled", &[batch, spec.mmdit.pooled_dim], DType::F32);
    let t = g.input("t_emb", &[batch, TIMESTEP_DIM], DType::F32);
    m.forward(&mut g, x, c, p, t)?;
    graphs.push(("mmdit", g));
    let mut v = Vae::load_from(gpu, &spec.vae, &w, activation)?;
    v.activation = activation;
    let mut g = Graph::new(target.clone());
    let z = g.input(
        "latents",
        &[batch / 2 + batch % 2, LATENT_CHANNELS, lh, lw],
        DType::F32,
    );
    v.decode(&mut g, z)?;
    graphs.push(("vae", g));
    Ok(ArchGraphs { graphs, blocks })
}

/// One stage's plan under a memory budget.
#[derive(Clone, Debug, PartialEq)]
pub struct StagePlan {
    /// The graph: clip_l, clip_g, t5, mmdit, vae.
    pub name: &'static str,
    /// Peak bytes: weights kept, block slots, activations.
    pub peak: u64,
    /// Blocks kept resident, of `blocks`.
    pub resident: usize,
    /// Streamable blocks (0 for a stage without them).
    pub blocks: usize,
    /// Bytes uploaded from host memory per run (per step for the MMDiT).
    pub streamed_bytes: u64,
}

/// Every stage of `g` planned within `budget` bytes: streamable blocks that
/// do not fit are streamed (a stage without blocks keeps its peak, which may
/// exceed the budget); an error when a stage cannot fit even streaming all.
pub fn plan_budget(g: &ArchGraphs, budget: u64) -> Result<Vec<StagePlan>> {
    let mut out = Vec::new();
    for (name, graph) in &g.graphs {
        let total = graph.weight_bytes() + graph.pooled_bytes() + graph.input_bytes();
        let blocks = g
            .blocks
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.as_slice())
            .unwrap_or(&[]);
        if blocks.is_empty() {
            out.push(StagePlan {
                name,
                peak: total,
                resident: 0,
                blocks: 0,
                streamed_bytes: 0,
            });
            continue;
        }
        let fixed = total.saturating_sub(blocks.iter().map(|b| b.0).sum());
        let (r, peak) = crate::stream::choose_resident(fixed, blocks, budget)
            .map_err(|e| Error::Graph(format!("{name}: {e}")))?;
        out.push(StagePlan {
            name,
            peak,
            resident: r,
            blocks: blocks.len(),
            streamed_bytes: blocks[r..].iter().map(|b| b.0).sum(),
        });
    }
    Ok(out)
}

/// Op class of a kernel family, for the report.
pub fn op_class(family: &str) -> &'static str {
    match family {
        "linear" => "linear",
        "attention" | "softmax" => "attention",
        "layer_norm" | "rms_norm" | "adaln_modulate" | "group_norm" | "gated_residual" => {
            "norm/modulate"
        }
        "conv2d" | "upsample2x" => "conv",
        _ => "other",
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Architecture.
    pub arch: Arch,
    /// Image width.
    pub width: usize,
    /// Image height.
    pub height: usize,
    /// Denoising steps.
    pub steps: usize,
    /// Guidance scale (> 1 doubles the MMDiT batch).
    pub cfg: f32,
    /// Matrix storage.
    pub dtype: DType,
    /// Storage of the text encoders' and the MMDiT's matrices (f16, bf16,
    /// fp8, GGML blocks: random bits of that encoding); the VAE's follow `dtype`.
    pub weights: DType,
    /// Which stages: any of text, mmdit, vae.
    pub components: Vec<String>,
    /// Weight seed.
    pub seed: u64,
}

/// One stage's measurements.
#[derive(Clone, Debug)]
pub struct StageReport {
    /// `text`, `step 3`, `vae`…
    pub name: String,
    /// GPU time, ns.
    pub ns: f64,
    /// FLOPs counted.
    pub flops: u64,
}

/// The benchmark's result.
#[derive(Clone, Debug)]
pub struct BenchReport {
    /// Adapter line.
    pub adapter: String,
    /// Driver.
    pub driver: String,
    /// Features in use.
    pub features: String,
    /// Stages in order.
    pub stages: Vec<StageReport>,
    /// All profiles (text encoders, each step, VAE) merged.
    pub ops: Profile,
    /// Peak GPU memory in storage buffers.
    pub peak_memory: u64,
    /// The decoded image (RGB8) when the VAE ran.
    pub image: Option<(Vec<u8>, usize, usize)>,
}

/// Runs the benchmark.
pub fn run(gpu: &Gpu, o: &BenchOptions) -> Result<BenchReport> {
    let spec = o.arch.spec();
    let f = spec.vae.scale_factor() * spec.mmdit.patch;
    if o.width == 0 || o.height == 0 || !o.width.is_multiple_of(f) || !o.height.is_multiple_of(f) {
        return Err(Error::Graph(format!(
            "width and height must be positive multiples of {f}"
        )));
    }
    let want = |c: &str| o.components.iter().any(|x| x == c);
    gpu.memory.reset_peak();
    let weights = RandomWeights { seed: o.seed };
    let do_cfg = o.cfg > 1.0;
    let batch = if do_cfg { 2 } else { 1 };
    let mut stages = Vec::new();
    let mut profiles: Vec<Profile> = Vec::new();
    let tokens = CLIP_TOKENS + spec.t5_tokens;
    let mut context = vec![0f32; batch * tokens * spec.mmdit.context_dim];
    let mut pooled = vec![0f32; batch * spec.mmdit.pooled_dim];
    if want("text") {
        let mut text_ns = 0.0;
        let mut text_flops = 0;
        let ids: Vec<u32> = (0..batch * CLIP_TOKENS)
            .map(|i| {
                if i % CLIP_TOKENS == 10 {
                    spec.clip_l.vocab as u32 - 1
                } else {
                    (i % CLIP_TOKENS) as u32
                }
            })
            .collect();
        for (name, cfg) in [("clip_l", &spec.clip_l), ("clip_g", &spec.clip_g)] {
            let m = Clip::load_from(gpu, cfg, &weights, o.weights)?;
            let mut g = Graph::new(gpu.target());
            let idv = g.input("ids", &[batch * CLIP_TOKENS], DType::U32);
            let rows = g.input("pool_rows", &[batch], DType::U32);
            let (seq, pool) = g.scoped(name, |g| m.forward(g, idv, rows, batch))?;
            g.keep(seq);
            g.keep(pool);
            let plan = g.plan(gpu)?;
            plan.write_u32(gpu, idv, &ids)?;
            plan.write_u32(
                gpu,
                rows,
                &(0..batch as u32)
                    .map(|b| b * CLIP_TOKENS as u32 + 10)
                    .collect::<Vec<_>>(),
            )?;
            let p = plan.run_profiled(gpu)?;
            text_ns += p.gpu_ns();
            text_flops += p.entries.iter().map(|e| e.flops).sum::<u64>();
            profiles.push(p);
        }
        let t5 = T5::load_from(gpu, &spec.t5, "shared.weight", &weights, o.weights)?;
        let mut g = Graph::new(gpu.target());
        let idv = g.input("ids", &[batch * spec.t5_tokens], DType::U32);
        let bias = g.input(
            "bias",
            &[spec.t5.heads, spec.t5_tokens, spec.t5_tokens],
            DType::F32,
        );
        let out = t5.forward(&mut g, idv, bias, batch)?;
        g.keep(out);
        let plan = g.plan(gpu)?;
        plan.write_u32(
            gpu,
            idv,
            &(0..(batch * spec.t5_tokens) as u32)
                .map(|i| i % spec.t5.vocab as u32)
                .collect::<Vec<_>>(),
        )?;
        plan.write(gpu, bias, &t5.position_bias(spec.t5_tokens))?;
        let p = plan.run_profiled(gpu)?;
        text_ns += p.gpu_ns();
        text_flops += p.entries.iter().map(|e| e.flops).sum::<u64>();
        let t5_out = plan.read(gpu, out)?;
        profiles.push(p);
        for b in 0..batch {
            let dst = (b * tokens + CLIP_TOKENS) * spec.mmdit.context_dim;
            let n = spec.t5_tokens * spec.mmdit.context_dim;
            context[dst..dst + n].copy_from_slice(&t5_out[b * n..(b + 1) * n]);
        }
        stages.push(StageReport {
            name: "text encoders".into(),
            ns: text_ns,
            flops: text_flops,
        });
    }
    let (lh, lw) = (
        o.height / spec.vae.scale_factor(),
        o.width / spec.vae.scale_factor(),
    );
    let n = LATENT_CHANNELS * lh * lw;
    let mut latents = noise(Rng::Native, o.seed, n);
    if want("mmdit") {
        let m = Mmdit::load_from(gpu, &spec.mmdit, &weights, o.weights)?;
        if pooled.iter().all(|v| *v == 0.0) {
            pooled = noise(Rng::Native, o.seed + 1, pooled.len());
        }
        let d = Denoiser::new(
            gpu,
            &m,
            &DenoiseOptions {
                batch: 1,
                height: lh,
                width: lw,
                tokens,
                guidance: o.cfg,
                skip_layers: None,
                inpaint: false,
                control: Vec::new(),
            },
        )?;
        d.set_conditioning(gpu, &context, &pooled)?;
        d.set_latents(gpu, &latents)?;
        let schedule = FlowMatchEuler::new(o.steps, 3.0);
        d.run(gpu, &schedule, 0, &|_| true, &mut |i, p| {
            if let Some(p) = p {
                stages.push(StageReport {
                    name: format!("mmdit step {}", i + 1),
                    ns: p.gpu_ns(),
                    flops: p.entries.iter().map(|e| e.flops).sum(),
                });
                profiles.push(p);
            }
            Ok(())
        })?;
        latents = d.latents(gpu)?;
    }
    let mut image = None;
    if want("vae") {
        let v = Vae::load_from(gpu, &spec.vae, &weights, o.dtype)?;
        let run = VaeRun::decoder(gpu, &v, 1, lh, lw)?;
        let g_in = latents.clone();
        let out = run.run(gpu, &g_in)?;
        let p = run.plan().run_profiled(gpu)?;
        stages.push(StageReport {
            name: "vae decode".into(),
            ns: p.gpu_ns(),
            flops: p.entries.iter().map(|e| e.flops).sum(),
        });
        profiles.push(p);
        let rgb = crate::image_io::to_rgb8(&out, [1, 3, o.height, o.width])?;
        image = rgb.into_iter().next().map(|i| (i, o.width, o.height));
    }
    let mut entries = Vec::new();
    let mut wall = 0.0;
    let mut source = crate::gpu::profile::TimingSource::WallClock;
    for p in profiles {
        wall += p.wall_ns;
        source = p.source;
        entries.extend(p.entries);
    }
    let f = gpu.caps;
    Ok(BenchReport {
        adapter: format!(
            "{:?} {} ({:?})",
            gpu.info.backend, gpu.info.name, gpu.info.device_type
        ),
        driver: format!("{} {}", gpu.info.driver, gpu.info.driver_info),
        features: format!(
            "shader-f16 {}, subgroup {}, timestamps {}, timestamps-inside-passes {}; matrices {} (text encoders, MMDiT), activations {}",
            f.f16,
            f.subgroup,
            f.timestamps,
            f.timestamps_inside_passes,
            o.weights.name(),
            o.dtype.name()
        ),
        stages,
        ops: Profile {
            entries,
            wall_ns: wall,
            source,
            uploads: None,
        },
        peak_memory: gpu.memory.peak(),
        image,
    })
}

/// Totals per op class: (ns, cost).
pub fn by_class(p: &Profile) -> BTreeMap<&'static str, (f64, Cost)> {
    let mut m: BTreeMap<&'static str, (f64, Cost)> = BTreeMap::new();
    for e in &p.entries {
        let t = m.entry(op_class(&e.family)).or_default();
        t.0 += e.gpu_ns.unwrap_or(0.0);
        t.1.flops += e.flops;
        t.1.bytes += e.bytes;
    }
    m
}

fn rate(x: u64, ns: f64) -> f64 {
    if ns > 0.0 {
        x as f64 / ns
    } else {
        0.0
    }
}

impl BenchReport {
    /// The human-readable report.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "adapter: {}\ndriver: {}\nfeatures: {}",
            self.adapter, self.driver, self.features
        );
        let total: f64 = self.stages.iter().map(|x| x.ns).sum();
        let _ = writeln!(
            s,
            "\n{:<20} {:>10} {:>6} {:>10}",
            "stage", "ms", "%", "TFLOP/s"
        );
        for st in &self.stages {
            let _ = writeln!(
                s,
                "{:<20} {:>10.3} {:>6.1} {:>10.3}",
                st.name,
                st.ns / 1e6,
                100.0 * st.ns / total.max(1.0),
                rate(st.flops, st.ns) / 1e3
            );
        }
        let _ = writeln!(
            s,
            "\n{:<16} {:>10} {:>6} {:>10} {:>9}",
            "op class", "ms", "%", "TFLOP/s", "GB/s"
        );
        for (class, (ns, c)) in by_class(&self.ops) {
            let _ = writeln!(
                s,
                "{:<16} {:>10.3} {:>6.1} {:>10.3} {:>9.1}",
                class,
                ns / 1e6,
                100.0 * ns / total.max(1.0),
                rate(c.flops, ns) / 1e3,
                rate(c.bytes, ns)
            );
        }
        let _ = writeln!(
            s,
            "\n{}",
            self.ops
                .table(20)
                .lines()
                .skip_while(|l| !l.starts_with("top"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        let _ = writeln!(
            s,
            "\npeak GPU memory (storage buffers): {:.1} MiB",
            self.peak_memory as f64 / (1u64 << 20) as f64
        );
        s
    }

    /// The same content as JSON.
    pub fn json(&self) -> String {
        let mut s = String::from("{");
        let _ = write!(
            s,
            "\"adapter\":{},\"driver\":{},\"features\":{},",
            json_str(&self.adapter),
            json_str(&self.driver),
            json_str(&self.features)
        );
        s.push_str("\"stages\":[");
        for (i, st) in self.stages.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(
                s,
                "{{\"name\":{},\"ms\":{},\"flops\":{},\"tflops\":{}}}",
                json_str(&st.name),
                st.ns / 1e6,
                st.flops,
                rate(st.flops, st.ns) / 1e3
            );
        }
        s.push_str("],\"op_classes\":{");
        for (i, (class, (ns, c))) in by_class(&self.ops).into_iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(
                s,
                "{}:{{\"ms\":{},\"flops\":{},\"bytes\":{},\"tflops\":{},\"gbps\":{}}}",
                json_str(class),
                ns / 1e6,
                c.flops,
                c.bytes,
                rate(c.flops, ns) / 1e3,
                rate(c.bytes, ns)
            );
        }
        s.push_str("},\"top_ops\":[");
        let mut ops: Vec<_> = self.ops.entries.iter().collect();
        ops.sort_by(|a, b| b.gpu_ns.unwrap_or(0.0).total_cmp(&a.gpu_ns.unwrap_or(0.0)));
        for (i, e) in ops.iter().take(20).enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(
                s,
                "{{\"label\":{},\"family\":{},\"ms\":{},\"flops\":{}}}",
                json_str(&e.label),
                json_str(&e.family),
                e.gpu_ns.unwrap_or(0.0) / 1e6,
                e.flops
            );
        }
        let _ = write!(s, "],\"peak_memory_bytes\":{}}}", self.peak_memory);
        s
    }
}
