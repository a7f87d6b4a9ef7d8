//! `sd3 inspect`: what a checkpoint holds, without loading it onto a GPU.

use std::collections::BTreeMap;
use std::fmt::{self, Write};
use std::path::{Path, PathBuf};

use super::mmdit::{Layout, MmditConfig, MmditSource};
use super::{Checkpoint, WeightsError};

/// One component of a checkpoint and the tensors found for it.
#[derive(Clone, Debug, Default)]
pub struct Component {
    /// Tensors.
    pub tensors: usize,
    /// Parameters (elements).
    pub params: u64,
    /// Stored dtype → tensor count.
    pub dtypes: BTreeMap<String, usize>,
    /// Bytes on the GPU with `--dtype f16`: matrices kept in their packed
    /// file encoding (f16, bf16, fp8; the VAE's and scaled fp8 ones widened
    /// to f16), f32 matrices as f16, everything else f32.
    pub gpu_bytes: u64,
}

/// What `sd3 inspect` reports.
#[derive(Clone, Debug)]
pub struct Report {
    /// The path inspected.
    pub path: PathBuf,
    /// "Stability single file", "diffusers folder", …
    pub layout: String,
    /// The detected MMDiT, when there is one.
    pub mmdit: Option<MmditConfig>,
    /// Components by name (transformer, vae, clip_l, clip_g, t5xxl), present ones only.
    pub components: BTreeMap<&'static str, Component>,
}

fn add(c: &mut Component, ck: &Checkpoint, prefix: &str, packed: bool) {
    for (name, e) in ck.with_prefix(prefix) {
        let n = e.shape.iter().product::<usize>() as u64;
        c.tensors += 1;
        c.params += n;
        let label = match e.quant {
            Some(q) => q.name().to_uppercase(),
            None => format!("{:?}", e.dtype),
        };
        *c.dtypes.entry(label).or_default() += 1;
        let matrix = e.shape.len() >= 2 && name.ends_with(".weight");
        let scaled = ck.weight_scale(name).ok().flatten().is_some();
        c.gpu_bytes += match e.quant.or(crate::DType::packed_from(e.dtype)) {
            Some(d) if matrix && packed && !scaled => d.bytes(n as usize),
            // A GGUF block tensor outside the matrices is widened to f32.
            _ if matrix => 2 * n,
            _ => 4 * n,
        };
    }
}

/// Single-file prefixes of each component (Stability all-in-one files).
const SINGLE_FILE_PARTS: &[(&str, &str)] = &[
    ("transformer", "model.diffusion_model."),
    ("vae", "first_stage_model."),
    ("clip_l", "text_encoders.clip_l."),
    ("clip_g", "text_encoders.clip_g."),
    ("t5xxl", "text_encoders.t5xxl."),
];

/// Diffusers sub-folders of each component.
const FOLDER_PARTS: &[(&str, &str, &str)] = &[
    ("transformer", "transformer", "diffusion_pytorch_model"),
    ("vae", "vae", "diffusion_pytorch_model"),
    ("clip_l", "text_encoder", "model"),
    ("clip_g", "text_encoder_2", "model"),
    ("t5xxl", "text_encoder_3", "model"),
];

/// Inspects a single file or a diffusers folder.
pub fn inspect(path: &Path) -> Result<Report, WeightsError> {
    let meta = std::fs::metadata(path).map_err(|e| super::io_err(path, e))?;
    let mut components = BTreeMap::new();
    let layout;
    if meta.is_dir() {
        let is_model_root =
            path.join("model_index.json").exists() || path.join("transformer").is_dir();
        if is_model_root {
            layout = "diffusers folder".to_string();
            for (name, sub, stem) in FOLDER_PARTS {
                let dir = path.join(sub);
                if dir.is_dir() {
                    let ck = Checkpoint::open_diffusers_component(&dir, stem)?;
                    let mut c = Component::default();
                    add(&mut c, &ck, "", *name != "vae");
                    components.insert(*name, c);
                }
            }
        } else {
            layout = "diffusers transformer folder".to_string();
            let ck = Checkpoint::open_diffusers_component(path, "diffusion_pytorch_model")?;
            let mut c = Component::default();
            add(&mut c, &ck, "", true);
            components.insert("transformer", c);
        }
    } else {
        let ck = Checkpoint::open(&[path.to_path_buf()])?;
        for (name, prefix) in SINGLE_FILE_PARTS {
            let mut c = Component::default();
            add(&mut c, &ck, prefix, *name != "vae");
            if c.tensors > 0 {
                components.insert(*name, c);
            }
        }
        if components.is_empty() {
            // Separately downloaded parts: a bare transformer, VAE or text encoder.
            let guess: &[(&str, &str)] = &[
                ("transformer", "joint_blocks."),
                ("transformer", "transformer_blocks."),
                ("vae", "decoder."),
                ("clip", "text_model."),
                ("t5xxl", "encoder.block."),
                // llama.cpp's T5-encoder names (GGUF).
                ("t5xxl", "enc.blk."),
            ];
            for (name, prefix) in guess {
                if ck.with_prefix(prefix).next().is_some() {
                    let mut c = Component::default();
                    add(&mut c, &ck, "", *name != "vae");
                    components.insert(*name, c);
                    break;
                }
            }
        }
        layout = if components.is_empty() {
            return Err(WeightsError::Unsupported(format!(
                "{}: no SD3 component found (no 'model.diffusion_model.', 'first_stage_model.', 'text_encoders.*', \
                 'joint_blocks.', 'transformer_blocks.', 'decoder.', 'text_model.', 'encoder.block.' or 'enc.blk.' tensors)",
                path.display()
            )));
        } else {
            "Stability single file".to_string()
        };
    }
    let mmdit = if components.contains_key("transformer") {
        Some(MmditSource::open(path)?.config)
    } else {
        None
    };
    Ok(Report {
        path: path.to_path_buf(),
        layout,
        mmdit,
        components,
    })
}

fn count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1} M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "model: {}", self.path.display())?;
        writeln!(f, "layout: {}", self.layout)?;
        if let Some(c) = &self.mmdit {
            let mut extra = String::new();
            if c.qk_norm {
                extra.push_str(", qk RMSNorm");
            }
            if let (Some(a), Some(b)) = (
                c.dual_attention_layers.first(),
                c.dual_attention_layers.last(),
            ) {
                let _ = write!(extra, ", dual attention in blocks {a}-{b}");
            }
            writeln!(
                f,
                "variant: {} (depth {}, hidden {}, heads {}, patch {}, pos grid {}×{}, context {}, pooled {}{extra})",
                c.variant_name(),
                c.depth,
                c.hidden,
                c.heads,
                c.patch,
                c.pos_embed_max,
                c.pos_embed_max,
                c.context_dim,
                c.pooled_dim
            )?;
        }
        for name in ["transformer", "vae", "clip_l", "clip_g", "clip", "t5xxl"] {
            match self.components.get(name) {
                Some(c) => {
                    let dts: Vec<String> =
                        c.dtypes.iter().map(|(d, n)| format!("{d} ×{n}")).collect();
                    writeln!(
                        f,
                        "{name:<12} present: {} parameters in {} tensors ({}); {:.1} MiB on the GPU with --dtype f16",
                        count(c.params),
                        c.tensors,
                        dts.join(", "),
                        c.gpu_bytes as f64 / (1u64 << 20) as f64
                    )?;
                }
                None if name != "clip" => writeln!(f, "{name:<12} absent")?,
                None => {}
            }
        }
        Ok(())
    }
}

impl MmditSource {
    /// Whether the tensors use Stability's names.
    pub fn is_single_file(&self) -> bool {
        matches!(self.layout, Layout::SingleFile { .. })
    }
}
