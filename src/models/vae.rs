//! The SD3 autoencoder (16-channel AutoencoderKL): decoder, encoder, latent
//! scale/shift, tiled decoding and the float → u8 conversion diffusers uses.
//!
//! Fields follow diffusers' names (`decoder.up_blocks.0.resnets.1.conv2`);
//! Stability/LDM checkpoints are mapped onto them by [`VaeSource`].

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::{Graph, Plan, Value};
use crate::ops::elementwise;
use crate::ops::linear::{Gemm, LinearParams};
use crate::ops::{conv, layout, linear, norm, softmax};
use crate::tensor::{numel, DType, Tensor};
use crate::weights::vae::{VaeConfig, VaeSource};
use crate::weights::TensorProvider;

const EPS: f32 = 1e-6;

/// Weight and bias of a conv, GroupNorm or linear layer.
#[derive(Clone)]
pub struct Layer {
    /// Weight (conv [out, in, k, k], linear [out, in], norm [c]).
    pub weight: Tensor,
    /// Bias.
    pub bias: Tensor,
}

impl Layer {
    fn bind(&self, g: &mut Graph) -> (Value, Value) {
        (
            g.weight("weight", &self.weight),
            g.weight("bias", &self.bias),
        )
    }
    fn conv(&self, g: &mut Graph, x: Value, stride: usize, pad: [usize; 2]) -> Result<Value> {
        let (w, b) = self.bind(g);
        conv::conv2d_padded(g, x, w, Some(b), stride, pad)
    }
    fn conv3(&self, g: &mut Graph, x: Value) -> Result<Value> {
        self.conv(g, x, 1, [1, 1])
    }
    fn group_norm(&self, g: &mut Graph, x: Value, groups: usize, silu: bool) -> Result<Value> {
        let (w, b) = self.bind(g);
        norm::group_norm(g, x, groups, Some(w), Some(b), EPS, silu)
    }
    /// GroupNorm by `norm` (+SiLU), then this 3×3 conv: one fused kernel
    /// where the adapter has tensor cores.
    fn norm_conv3(
        &self,
        g: &mut Graph,
        x: Value,
        norm: &Layer,
        groups: usize,
        silu: bool,
    ) -> Result<Value> {
        let (weight, bias) = norm.bind(g);
        let fold = conv::GroupNormFold {
            groups,
            weight,
            bias,
            eps: EPS,
            silu,
        };
        let (w, b) = self.bind(g);
        conv::norm_conv2d(g, x, fold, w, Some(b), 1, [1, 1])
    }
    fn linear(&self, g: &mut Graph, x: Value) -> Result<Value> {
        let (w, b) = self.bind(g);
        linear::linear(g, x, w, Some(b))
    }
}

/// GroupNorm+SiLU → conv → GroupNorm+SiLU → conv, plus a (1×1 conv) shortcut.
#[derive(Clone)]
pub struct ResnetBlock {
    /// First norm.
    pub norm1: Layer,
    /// First 3×3 conv.
    pub conv1: Layer,
    /// Second norm.
    pub norm2: Layer,
    /// Second 3×3 conv.
    pub conv2: Layer,
    /// 1×1 conv when the channel count changes.
    pub conv_shortcut: Option<Layer>,
}

impl ResnetBlock {
    fn forward(&self, g: &mut Graph, x: Value, groups: usize) -> Result<Value> {
        let h = g.scoped("conv1", |g| {
            self.conv1.norm_conv3(g, x, &self.norm1, groups, true)
        })?;
        let h = g.scoped("conv2", |g| {
            self.conv2.norm_conv3(g, h, &self.norm2, groups, true)
        })?;
        let skip = match &self.conv_shortcut {
            Some(s) => g.scoped("shortcut", |g| s.conv(g, x, 1, [0, 0]))?,
            None => x,
        };
        elementwise::add(g, skip, h)
    }
}

/// Most bytes one chunk of the mid block's attention scores may take.
pub const SCORE_CHUNK_BYTES: usize = 64 << 20;

/// Single-head self-attention over all positions (the mid block's).
#[derive(Clone)]
pub struct AttentionBlock {
    /// GroupNorm before attention.
    pub group_norm: Layer,
    /// Query projection.
    pub to_q: Layer,
    /// Key projection.
    pub to_k: Layer,
    /// Value projection.
    pub to_v: Layer,
    /// Output projection.
    pub to_out: Layer,
    /// Most bytes one chunk of attention scores may take (queries are
    /// processed in chunks that fit).
    pub score_chunk_bytes: usize,
}

impl AttentionBlock {
    fn forward(&self, g: &mut Graph, x: Value, groups: usize) -> Result<Value> {
        let s = g.shape(x).to_vec();
        let (b, c, hw) = (s[0], s[1], s[2] * s[3]);
        let h = self.group_norm.group_norm(g, x, groups, false)?;
        let tokens = layout::nchw_to_tokens(g, h)?;
        let q = g.scoped("to_q", |g| self.to_q.linear(g, tokens))?;
        let k = g.scoped("to_k", |g| self.to_k.linear(g, tokens))?;
        let v = g.scoped("to_v", |g| self.to_v.linear(g, tokens))?;
        // One head of width c. The full scores would be [b, hw, hw] (1 GiB at
        // 1024² in f32): queries go in chunks whose scores stay under
        // SCORE_CHUNK_BYTES, each chunk's buffer reused by the next.
        let vt = layout::permute(g, v, &[0, 2, 1])?;
        let rows = (self.score_chunk_bytes / (4 * b * hw).max(1)).clamp(1, hw);
        let scale = 1.0 / (c as f32).sqrt();
        let mut out: Option<Value> = None;
        for (i, start) in (0..hw).step_by(rows).enumerate() {
            let len = rows.min(hw - start);
            let part = g.scoped(&format!("chunk{i}"), |g| {
                let scores = g.alloc(&[b, len, hw], DType::F32);
                let u = |v: usize| v as u32;
                let qk = Gemm {
                    p: LinearParams {
                        m: u(len),
                        n: u(hw),
                        k: u(c),
                        batch_inner: 1,
                        lda: u(c),
                        ldw: u(c),
                        ldy: u(hw),
                        x_off: u(start * c),
                        x_sb: u(hw * c),
                        w_sb: u(hw * c),
                        y_sb: u(len * hw),
                        ..Default::default()
                    },
                    batch_outer: b,
                };
                linear::gemm(g, "scores", q, k, None, scores, qk)?;
                let scores = g.reshape(scores, &[b, 1, len, hw])?;
                let probs = softmax::attention_softmax(g, scores, scale, false, None)?;
                let probs = g.reshape(probs, &[b, len, hw])?;
                linear::batched_matmul(g, probs, vt)
            })?;
            out = Some(match out {
                None => part,
                Some(o) => layout::concat(g, o, part, 1)?,
            });
        }
        let out = out.ok_or_else(|| g.shape_error("attention", "no positions to attend over"))?;
        let out = g.scoped("to_out", |g| self.to_out.linear(g, out))?;
        let out = layout::permute(g, out, &[0, 2, 1])?;
        let out = g.reshape(out, &s)?;
        elementwise::add(g, x, out)
    }
}

/// Resnet, attention, resnet at the lowest resolution.
#[derive(Clone)]
pub struct MidBlock {
    /// The two resnets.
    pub resnets: Vec<ResnetBlock>,
    /// The attention between them.
    pub attention: AttentionBlock,
}

impl MidBlock {
    fn forward(&self, g: &mut Graph, x: Value, groups: usize) -> Result<Value> {
        let x = g.scoped("resnets.0", |g| self.resnets[0].forward(g, x, groups))?;
        let x = g.scoped("attention", |g| self.attention.forward(g, x, groups))?;
        g.scoped("resnets.1", |g| self.resnets[1].forward(g, x, groups))
    }
}

/// One resolution level: resnets, then an optional resampling conv.
#[derive(Clone)]
pub struct Level {
    /// Resnets.
    pub resnets: Vec<ResnetBlock>,
    /// Downsampler (encoder: stride-2 conv after (0, 1) padding) or upsampler
    /// (decoder: nearest 2× then 3×3 conv).
    pub resample: Option<Layer>,
}

/// latents → image.
#[derive(Clone)]
pub struct Decoder {
    /// 3×3 conv from the latent channels.
    pub conv_in: Layer,
    /// Mid block.
    pub mid_block: MidBlock,
    /// Up blocks, coarsest first.
    pub up_blocks: Vec<Level>,
    /// Final GroupNorm (+SiLU).
    pub conv_norm_out: Layer,
    /// 3×3 conv to image channels.
    pub conv_out: Layer,
}

/// image → latent distribution (mean, logvar).
#[derive(Clone)]
pub struct Encoder {
    /// 3×3 conv from image channels.
    pub conv_in: Layer,
    /// Down blocks, finest first.
    pub down_blocks: Vec<Level>,
    /// Mid block.
    pub mid_block: MidBlock,
    /// Final GroupNorm (+SiLU).
    pub conv_norm_out: Layer,
    /// 3×3 conv to 2·latent channels.
    pub conv_out: Layer,
}

/// The autoencoder.
#[derive(Clone)]
pub struct Vae {
    /// Architecture and latent scale/shift.
    pub config: VaeConfig,
    /// Element type of its activations (the device's at load; see
    /// [`crate::decode::decode_auto`] for the f32 retry after an f16 overflow).
    pub activation: DType,
    /// Decoder.
    pub decoder: Decoder,
    /// Encoder, when the checkpoint has one.
    pub encoder: Option<Encoder>,
}

struct Loader<'a> {
    gpu: &'a Gpu,
    src: &'a dyn TensorProvider,
    matrix: DType,
}

impl Loader<'_> {
    fn layer(&self, name: &str, weight: &[usize]) -> Result<Layer> {
        let wdt = if weight.len() > 1 {
            self.matrix
        } else {
            DType::F32
        };
        Ok(Layer {
            weight: self
                .src
                .tensor(self.gpu, &format!("{name}.weight"), weight, wdt)?,
            bias: self
                .src
                .tensor(self.gpu, &format!("{name}.bias"), &[weight[0]], DType::F32)?,
        })
    }
    fn conv(&self, name: &str, cout: usize, cin: usize, k: usize) -> Result<Layer> {
        self.layer(name, &[cout, cin, k, k])
    }
    fn resnet(&self, name: &str, cin: usize, cout: usize) -> Result<ResnetBlock> {
        Ok(ResnetBlock {
            norm1: self.layer(&format!("{name}.norm1"), &[cin])?,
            conv1: self.conv(&format!("{name}.conv1"), cout, cin, 3)?,
            norm2: self.layer(&format!("{name}.norm2"), &[cout])?,
            conv2: self.conv(&format!("{name}.conv2"), cout, cout, 3)?,
            conv_shortcut: if cin != cout {
                Some(self.conv(&format!("{name}.conv_shortcut"), cout, cin, 1)?)
            } else {
                None
            },
        })
    }
    fn mid(&self, name: &str, c: usize) -> Result<MidBlock> {
        let a = format!("{name}.attentions.0");
        Ok(MidBlock {
            resnets: vec![
                self.resnet(&format!("{name}.resnets.0"), c, c)?,
                self.resnet(&format!("{name}.resnets.1"), c, c)?,
            ],
            attention: AttentionBlock {
                group_norm: self.layer(&format!("{a}.group_norm"), &[c])?,
                to_q: self.layer(&format!("{a}.to_q"), &[c, c])?,
                to_k: self.layer(&format!("{a}.to_k"), &[c, c])?,
                to_v: self.layer(&format!("{a}.to_v"), &[c, c])?,
                to_out: self.layer(&format!("{a}.to_out.0"), &[c, c])?,
                score_chunk_bytes: SCORE_CHUNK_BYTES,
            },
        })
    }
}

impl Vae {
    /// Uploads the VAE; conv and linear weights stored as `matrix` (f32 or f16).
    pub fn load(gpu: &Gpu, src: &VaeSource, matrix: DType) -> Result<Vae> {
        Self::load_from(gpu, &src.config, src, matrix)
    }

    /// Builds the VAE of architecture `config` with tensors from `src`.
    pub fn load_from(
        gpu: &Gpu,
        config: &VaeConfig,
        src: &dyn TensorProvider,
        matrix: DType,
    ) -> Result<Vae> {
        let c = config.clone();
        let l = Loader { gpu, src, matrix };
        let ch = &c.block_out_channels;
        let levels = ch.len();
        let top = ch[levels - 1];
        let mut up_blocks = Vec::with_capacity(levels);
        let mut prev = top;
        for i in 0..levels {
            let out = ch[levels - 1 - i];
            let resnets = (0..=c.layers_per_block)
                .map(|j| {
                    l.resnet(
                        &format!("decoder.up_blocks.{i}.resnets.{j}"),
                        if j == 0 { prev } else { out },
                        out,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let resample = if i + 1 < levels {
                Some(l.conv(
                    &format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                    out,
                    out,
                    3,
                )?)
            } else {
                None
            };
            up_blocks.push(Level { resnets, resample });
            prev = out;
        }
        let decoder = Decoder {
            conv_in: l.conv("decoder.conv_in", top, c.latent_channels, 3)?,
            mid_block: l.mid("decoder.mid_block", top)?,
            up_blocks,
            conv_norm_out: l.layer("decoder.conv_norm_out", &[ch[0]])?,
            conv_out: l.conv("decoder.conv_out", c.image_channels, ch[0], 3)?,
        };
        let encoder = if c.has_encoder {
            let mut down_blocks = Vec::with_capacity(levels);
            let mut prev = ch[0];
            for (i, &out) in ch.iter().enumerate() {
                let resnets = (0..c.layers_per_block)
                    .map(|j| {
                        l.resnet(
                            &format!("encoder.down_blocks.{i}.resnets.{j}"),
                            if j == 0 { prev } else { out },
                            out,
                        )
                    })
                    .collect::<Result<Vec<_>>>()?;
                let resample = if i + 1 < levels {
                    Some(l.conv(
                        &format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                        out,
                        out,
                        3,
                    )?)
                } else {
                    None
                };
                down_blocks.push(Level { resnets, resample });
                prev = out;
            }
            Some(Encoder {
                conv_in: l.conv("encoder.conv_in", ch[0], c.image_channels, 3)?,
                down_blocks,
                mid_block: l.mid("encoder.mid_block", top)?,
                conv_norm_out: l.layer("encoder.conv_norm_out", &[top])?,
                conv_out: l.conv("encoder.conv_out", 2 * c.latent_channels, top, 3)?,
            })
        } else {
            None
        };
        Ok(Vae {
            config: c,
            decoder,
            encoder,
            activation: gpu.activation,
        })
    }

    /// How many image pixels one latent pixel becomes (8 for SD3).
    pub fn scale(&self) -> usize {
        self.config.scale_factor()
    }

    /// Records decoding: sampler latents [b, 16, h, w] (before scale/shift) →
    /// image [b, 3, h·s, w·s] in about [-1, 1].
    pub fn decode(&self, g: &mut Graph, latents: Value) -> Result<Value> {
        g.with_activation(self.activation, |g| self.decode_inner(g, latents))
    }

    fn decode_inner(&self, g: &mut Graph, latents: Value) -> Result<Value> {
        let c = &self.config;
        let s = g.shape(latents).to_vec();
        if s.len() != 4 || s[1] != c.latent_channels {
            return Err(g.shape_error(
                "vae.decode",
                format!(
                    "latents must be [batch, {}, h, w], found {s:?}",
                    c.latent_channels
                ),
            ));
        }
        let groups = c.norm_groups;
        g.scoped("vae.decoder", |g| {
            let z = elementwise::affine(g, latents, 1.0 / c.scaling_factor, c.shift_factor)?;
            let d = &self.decoder;
            let mut x = g.scoped("conv_in", |g| d.conv_in.conv3(g, z))?;
            x = g.scoped("mid_block", |g| d.mid_block.forward(g, x, groups))?;
            for (i, level) in d.up_blocks.iter().enumerate() {
                x = g.scoped(&format!("up_blocks.{i}"), |g| {
                    let mut x = x;
                    for (j, r) in level.resnets.iter().enumerate() {
                        x = g.scoped(&format!("resnets.{j}"), |g| r.forward(g, x, groups))?;
                    }
                    if let Some(up) = &level.resample {
                        let u = conv::upsample_nearest2x(g, x)?;
                        x = g.scoped("upsampler", |g| up.conv3(g, u))?;
                    }
                    Ok::<_, Error>(x)
                })?;
            }
            g.scoped("conv_out", |g| {
                d.conv_out.norm_conv3(g, x, &d.conv_norm_out, groups, true)
            })
        })
    }

    /// Records encoding: image [b, 3, H, W] in [-1, 1] → latents [b, 16, H/s, W/s]
    /// as the sampler uses them ((mean − shift) · scale).
    pub fn encode(&self, g: &mut Graph, image: Value) -> Result<Value> {
        let c = &self.config;
        let moments = self.encode_moments(g, image)?;
        g.with_activation(self.activation, |g| {
            let mean = layout::slice(g, moments, 1, 0, c.latent_channels)?;
            elementwise::affine(
                g,
                mean,
                c.scaling_factor,
                -c.shift_factor * c.scaling_factor,
            )
        })
    }

    /// Records the encoder up to its latent distribution: image [b, 3, H, W]
    /// → moments [b, 2·16, H/s, W/s], the mean's channels then the log
    /// variance's (see [`latents_from_moments`]).
    pub fn encode_moments(&self, g: &mut Graph, image: Value) -> Result<Value> {
        g.with_activation(self.activation, |g| self.encode_inner(g, image))
    }

    fn encode_inner(&self, g: &mut Graph, image: Value) -> Result<Value> {
        let c = &self.config;
        let Some(e) = &self.encoder else {
            return Err(Error::Graph(
                "this VAE checkpoint has no encoder tensors (encoder.*)".into(),
            ));
        };
        let s = g.shape(image).to_vec();
        let f = self.scale();
        if s.len() != 4
            || s[1] != c.image_channels
            || !s[2].is_multiple_of(f)
            || !s[3].is_multiple_of(f)
        {
            return Err(g.shape_error(
                "vae.encode",
                format!(
                    "image must be [batch, {}, H, W] with H, W multiples of {f}, found {s:?}",
                    c.image_channels
                ),
            ));
        }
        let groups = c.norm_groups;
        g.scoped("vae.encoder", |g| {
            let mut x = g.scoped("conv_in", |g| e.conv_in.conv3(g, image))?;
            for (i, level) in e.down_blocks.iter().enumerate() {
                x = g.scoped(&format!("down_blocks.{i}"), |g| {
                    let mut x = x;
                    for (j, r) in level.resnets.iter().enumerate() {
                        x = g.scoped(&format!("resnets.{j}"), |g| r.forward(g, x, groups))?;
                    }
                    if let Some(down) = &level.resample {
                        x = g.scoped("downsampler", |g| down.conv(g, x, 2, [0, 1]))?;
                    }
                    Ok::<_, Error>(x)
                })?;
            }
            x = g.scoped("mid_block", |g| e.mid_block.forward(g, x, groups))?;
            g.scoped("conv_out", |g| {
                e.conv_out.norm_conv3(g, x, &e.conv_norm_out, groups, true)
            })
        })
    }
}

/// The latents an encoder's moments [batch, 2·c, h, w] give as the sampler uses
/// them, (z − shift) · scale: z = the mean, or with `eps` (standard normal
/// values, one per latent value, [b, c, h, w]) a sample of the distribution,
/// mean + exp(logvar / 2) · eps with the log variance clamped to [−30, 20]
/// (diffusers' `DiagonalGaussianDistribution`).
pub fn latents_from_moments(
    config: &VaeConfig,
    moments: &[f32],
    batch: usize,
    eps: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let c = config.latent_channels;
    let per_pixel = 2 * c * batch;
    if per_pixel == 0 || !moments.len().is_multiple_of(per_pixel) {
        return Err(Error::Graph(format!(
            "moments of {} values do not split into {batch} images of 2·{c} channels",
            moments.len()
        )));
    }
    let plane = moments.len() / per_pixel;
    let n = moments.len() / 2;
    if let Some(e) = eps {
        if e.len() != n {
            return Err(Error::Graph(format!(
                "{} noise values for {n} latent values",
                e.len()
            )));
        }
    }
    let mut out = Vec::with_capacity(n);
    for (bi, m) in moments.chunks(2 * c * plane).enumerate() {
        let (mean, logvar) = m.split_at(c * plane);
        for (i, (&mu, &lv)) in mean.iter().zip(logvar).enumerate() {
            let z = match eps {
                Some(e) => mu + (0.5 * lv.clamp(-30.0, 20.0)).exp() * e[bi * c * plane + i],
                None => mu,
            };
            out.push((z - config.shift_factor) * config.scaling_factor);
        }
    }
    Ok(out)
}

/// A planned decode (or encode) for one input shape.
pub struct VaeRun {
    plan: Plan,
    input: Value,
    output: Value,
    /// Output shape.
    pub out_shape: Vec<usize>,
}

impl VaeRun {
    /// Plans decoding of latents [batch, 16, h, w].
    pub fn decoder(gpu: &Gpu, vae: &Vae, batch: usize, h: usize, w: usize) -> Result<VaeRun> {
        let mut g = Graph::new(gpu.target());
        let input = g.input(
            "latents",
            &[batch, vae.config.latent_channels, h, w],
            DType::F32,
        );
        let output = vae.decode(&mut g, input)?;
        Self::finish(gpu, g, input, output)
    }

    /// Plans encoding of images [batch, 3, h, w].
    pub fn encoder(gpu: &Gpu, vae: &Vae, batch: usize, h: usize, w: usize) -> Result<VaeRun> {
        let mut g = Graph::new(gpu.target());
        let input = g.input(
            "image",
            &[batch, vae.config.image_channels, h, w],
            DType::F32,
        );
        let output = vae.encode(&mut g, input)?;
        Self::finish(gpu, g, input, output)
    }

    /// Plans the encoder up to its moments (see [`Vae::encode_moments`]).
    pub fn encoder_moments(
        gpu: &Gpu,
        vae: &Vae,
        batch: usize,
        h: usize,
        w: usize,
    ) -> Result<VaeRun> {
        let mut g = Graph::new(gpu.target());
        let input = g.input(
            "image",
            &[batch, vae.config.image_channels, h, w],
            DType::F32,
        );
        let output = vae.encode_moments(&mut g, input)?;
        Self::finish(gpu, g, input, output)
    }

    fn finish(gpu: &Gpu, mut g: Graph, input: Value, output: Value) -> Result<VaeRun> {
        g.keep(output);
        let out_shape = g.shape(output).to_vec();
        Ok(VaeRun {
            plan: g.plan(gpu)?,
            input,
            output,
            out_shape,
        })
    }

    /// Runs with `data` as input.
    pub fn run(&self, gpu: &Gpu, data: &[f32]) -> Result<Vec<f32>> {
        self.plan.write(gpu, self.input, data)?;
        self.plan.run(gpu)?;
        self.plan.read(gpu, self.output)
    }

    /// The plan (for profiling and memory figures).
    pub fn plan(&self) -> &Plan {
        &self.plan
    }
}

/// Whether decoding latents [batch, 16, h, w] in one piece fits the adapter's
/// limits and `budget` bytes of intermediates (checked without allocating).
pub fn fits(
    gpu: &Gpu,
    vae: &Vae,
    batch: usize,
    h: usize,
    w: usize,
    budget: Option<u64>,
) -> Result<bool> {
    let mut g = Graph::new(gpu.target());
    let x = g.input(
        "latents",
        &[batch, vae.config.latent_channels, h, w],
        DType::F32,
    );
    let y = vae.decode(&mut g, x)?;
    g.keep(y);
    if g.validate(gpu).is_err() {
        return Ok(false);
    }
    Ok(budget.is_none_or(|b| g.pooled_bytes() <= b))
}

/// Tiles along one axis of `len` latent pixels: (start, tile length) with
/// `overlap` shared between neighbours; the last tile ends at the edge.
fn tiles(len: usize, tile: usize, overlap: usize) -> Vec<usize> {
    if len <= tile {
        return vec![0];
    }
    let step = tile - overlap;
    let mut starts: Vec<usize> = (0..)
        .map(|i| i * step)
        .take_while(|&s| s + tile < len)
        .collect();
    starts.push(len - tile);
    starts
}

/// Linear ramp weights of one tile along an axis of image pixels: 1 inside,
/// falling towards tile edges that overlap a neighbour.
fn ramp(n: usize, ramp_before: usize, ramp_after: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let a = if ramp_before > 0 {
                ((i as f32 + 0.5) / ramp_before as f32).min(1.0)
            } else {
                1.0
            };
            let b = if ramp_after > 0 {
                ((n - i) as f32 - 0.5) / ramp_after as f32
            } else {
                1.0
            };
            a.min(b.min(1.0))
        })
        .collect()
}

/// Decodes latents [batch, 16, h, w] → image [batch, 3, h·s, w·s] in tiles of
/// `tile`×`tile` latent pixels overlapping by `overlap`, blended linearly
/// across each overlap so no seam shows. All tiles share one planned graph.
///
/// Each tile normalises (GroupNorm) and attends (mid block) over its own
/// pixels only, as diffusers' tiled decoding does, so the result approximates
/// the full decode; larger tiles approximate it better.
pub fn decode_tiled(
    gpu: &Gpu,
    vae: &Vae,
    latents: &[f32],
    shape: [usize; 4],
    tile: usize,
    overlap: usize,
) -> Result<Vec<f32>> {
    let [b, _, h, w] = shape;
    let (th, tw) = (tile.min(h), tile.min(w));
    let run = VaeRun::decoder(gpu, vae, b, th, tw)?;
    let oc = run.out_shape[1];
    stitch_tiles(latents, shape, tile, overlap, vae.scale(), oc, |part| {
        run.run(gpu, part)
    })
}

/// The tiling and blending of [`decode_tiled`] around any tile function
/// `decode`: [b, c, th, tw] → [b, oc, th·f, tw·f].
pub fn stitch_tiles(
    latents: &[f32],
    shape: [usize; 4],
    tile: usize,
    overlap: usize,
    f: usize,
    oc: usize,
    mut decode: impl FnMut(&[f32]) -> Result<Vec<f32>>,
) -> Result<Vec<f32>> {
    let [b, c, h, w] = shape;
    if numel(&shape) != latents.len() {
        return Err(Error::Graph(format!(
            "latents of shape {shape:?} need {} values, got {}",
            numel(&shape),
            latents.len()
        )));
    }
    if tile == 0 || overlap >= tile {
        return Err(Error::Graph(format!(
            "tile {tile} must be positive and larger than the overlap {overlap}"
        )));
    }
    let (th, tw) = (tile.min(h), tile.min(w));
    let (oh, ow) = (h * f, w * f);
    let mut acc = vec![0f32; b * oc * oh * ow];
    let mut wsum = vec![0f32; oh * ow];
    let ys = tiles(h, th, overlap);
    let xs = tiles(w, tw, overlap);
    // Ramps only where a neighbour overlaps, over the true overlap in pixels.
    let before = |i: usize, starts: &[usize], t: usize| {
        if i > 0 {
            (starts[i - 1] + t - starts[i]) * f
        } else {
            0
        }
    };
    let after = |i: usize, starts: &[usize], t: usize| {
        if i + 1 < starts.len() {
            (starts[i] + t - starts[i + 1]) * f
        } else {
            0
        }
    };
    for (yi, &y0) in ys.iter().enumerate() {
        for (xi, &x0) in xs.iter().enumerate() {
            let mut part = vec![0f32; b * c * th * tw];
            for bc in 0..b * c {
                for y in 0..th {
                    let src = (bc * h + y0 + y) * w + x0;
                    part[(bc * th + y) * tw..][..tw].copy_from_slice(&latents[src..src + tw]);
                }
            }
            let img = decode(&part)?;
            if img.len() != b * oc * th * f * tw * f {
                return Err(Error::Graph(format!(
                    "a tile decoded to {} values, expected {}",
                    img.len(),
                    b * oc * th * f * tw * f
                )));
            }
            let ry = ramp(th * f, before(yi, &ys, th), after(yi, &ys, th));
            let rx = ramp(tw * f, before(xi, &xs, tw), after(xi, &xs, tw));
            for y in 0..th * f {
                for x in 0..tw * f {
                    let wgt = ry[y] * rx[x];
                    let (gy, gx) = (y0 * f + y, x0 * f + x);
                    wsum[gy * ow + gx] += wgt;
                    for bc in 0..b * oc {
                        acc[(bc * oh + gy) * ow + gx] += wgt * img[(bc * th * f + y) * tw * f + x];
                    }
                }
            }
        }
    }
    for bc in 0..b * oc {
        for (i, &ws) in wsum.iter().enumerate() {
            acc[bc * oh * ow + i] /= ws;
        }
    }
    Ok(acc)
}

/// Image values in [-1, 1] → u8, exactly as diffusers' postprocess and PIL
/// conversion do it in f32: round-half-even(clamp(x / 2 + 0.5, 0, 1) · 255).
pub fn to_u8(x: f32) -> u8 {
    let v = (x / 2.0 + 0.5).clamp(0.0, 1.0);
    (v * 255.0).round_ties_even() as u8
}

/// u8 → the encoder's [-1, 1] input, as diffusers' preprocess computes it.
pub fn from_u8(v: u8) -> f32 {
    (v as f32 / 255.0) * 2.0 - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latents_from_moments_samples_clamps_and_checks_sizes() {
        let config = VaeConfig {
            latent_channels: 2,
            image_channels: 3,
            block_out_channels: vec![4],
            layers_per_block: 1,
            norm_groups: 1,
            scaling_factor: 2.0,
            shift_factor: 0.5,
            has_encoder: true,
        };
        // Batch 2, 2 channels, 1 pixel: [mean0, mean1, logvar0, logvar1] each.
        let moments = [1.0, 2.0, 0.0, 100.0, -1.0, 0.0, -100.0, 2.0];
        let mean = latents_from_moments(&config, &moments, 2, None).unwrap();
        assert_eq!(mean, [1.0, 3.0, -3.0, -1.0]);
        let eps = [1.0, 1.0, 1.0, -1.0];
        let z = latents_from_moments(&config, &moments, 2, Some(&eps)).unwrap();
        // std = exp(logvar / 2), logvar clamped to [-30, 20].
        let want = [
            (1.0 + 1.0 - 0.5) * 2.0,
            (2.0 + 10f32.exp() - 0.5) * 2.0,
            (-1.0 + (-15f32).exp() - 0.5) * 2.0,
            (0.0 - 1f32.exp() - 0.5) * 2.0,
        ];
        for (a, b) in z.iter().zip(want) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{z:?} vs {want:?}"
            );
        }
        assert!(latents_from_moments(&config, &moments, 2, Some(&eps[..3])).is_err());
        assert!(latents_from_moments(&config, &moments[..7], 2, None).is_err());
        assert!(latents_from_moments(&config, &moments, 0, None).is_err());
        // One image of two pixels reads the same values differently.
        let one = latents_from_moments(&config, &moments, 1, None).unwrap();
        assert_eq!(one, [1.0, 3.0, -1.0, 199.0]);
    }
}
