//! LoRAs: low-rank weight updates read from the files people download for
//! SD3 and SD3.5, matched to the model's own tensors, and merged into them on
//! the GPU as each weight is uploaded (W += strength · α / r · up · down).
//!
//! Layouts read (the tensor-name suffix says which matrix is which):
//! - diffusers / PEFT: `transformer.<diffusers module>.lora_A/lora_B.weight`,
//!   `text_encoder.` (CLIP-L), `text_encoder_2.` (CLIP-G), `text_encoder_3.`
//!   (T5); α from the header's `lora_adapter_metadata` as diffusers reads it
//!   (`lora_alpha`, `r`, `alpha_pattern`, `rank_pattern`, `use_rslora`);
//! - kohya / sd-scripts: `lora_unet_<Stability module, '.' → '_'>`,
//!   `lora_te1_` / `lora_te2_` / `lora_te3_`, with `lora_down` / `lora_up`
//!   and a scalar `alpha` per module;
//! - Stability / ComfyUI: `diffusion_model.<Stability module>`,
//!   `base_model.model.<diffusers module>`, `lora_transformer_<diffusers
//!   module, '.' → '_'>`, with any of the matrix suffixes.
//!
//! α: a module's `alpha` tensor (0 counts as r, as kohya does), else the
//! PEFT metadata, else r (scale 1). r is the down matrix's row count. A fused
//! qkv's up rows split over q, k and v with down shared, and the modulations
//! stored as (scale, shift) in one layout and (shift, scale) in the other
//! have their up rows swapped by halves — as ComfyUI applies them. Every
//! tensor of a file must find its module: a key that matches nothing, a
//! matrix whose shape does not fit, or another kind of adapter (LoHa, LoKr,
//! DoRA, OFT, full diffs) is an error naming the file and the keys.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::Graph;
use crate::tensor::{DType, Tensor};
use crate::weights::mmdit::diffusers_recipe;
use crate::weights::recipe::Recipe;
use crate::weights::{Checkpoint, ShapeOnlyWeights, TensorProvider};

/// Largest |strength| accepted.
pub const MAX_STRENGTH: f32 = 100.0;
/// Most LoRAs one run may merge.
pub const MAX_LORAS: usize = 32;
/// Highest rank accepted per module.
pub const MAX_RANK: usize = 4096;

/// One `--lora FILE[:STRENGTH]`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    /// The safetensors file.
    pub path: PathBuf,
    /// Its strength (1 = as trained).
    pub strength: f32,
}

impl LoraSpec {
    /// Parses `FILE` or `FILE:STRENGTH` (the part after the last ':' is a
    /// strength only when it reads as a number, so paths with colons work).
    pub fn parse(s: &str) -> Result<LoraSpec> {
        let (path, strength) = match s.rsplit_once(':') {
            Some((p, v)) if !p.is_empty() && v.trim().parse::<f32>().is_ok() => {
                (p, v.trim().parse::<f32>().unwrap_or(1.0))
            }
            _ => (s, 1.0),
        };
        if path.is_empty() {
            return Err(Error::Graph(
                "--lora needs a file: FILE or FILE:STRENGTH".into(),
            ));
        }
        if !(strength.is_finite() && strength.abs() <= MAX_STRENGTH) {
            return Err(Error::Graph(format!(
                "--lora {path}: the strength must be a number in [-{MAX_STRENGTH}, {MAX_STRENGTH}], got {strength}"
            )));
        }
        Ok(LoraSpec {
            path: PathBuf::from(path),
            strength,
        })
    }
}

/// The models a LoRA can change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    /// The MMDiT.
    Mmdit,
    /// CLIP-L.
    ClipL,
    /// CLIP-G.
    ClipG,
    /// T5-XXL.
    T5,
}

impl Component {
    /// The name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            Component::Mmdit => "the MMDiT",
            Component::ClipL => "CLIP-L",
            Component::ClipG => "CLIP-G",
            Component::T5 => "T5",
        }
    }

    /// The component's prefix in diffusers' `lora_adapter_metadata`.
    fn metadata_prefix(self) -> &'static str {
        match self {
            Component::Mmdit => "transformer",
            Component::ClipL => "text_encoder",
            Component::ClipG => "text_encoder_2",
            Component::T5 => "text_encoder_3",
        }
    }
}

/// Where a module's update lands: rows of a tensor the model asks for.
#[derive(Clone, Debug, PartialEq)]
struct Target {
    /// The name the model loads (the provider's name).
    tensor: String,
    /// First row changed.
    row: usize,
    /// Rows changed.
    rows: usize,
    /// Columns (inputs; a convolution's in · kh · kw).
    cols: usize,
    /// The layouts order the two halves of these rows differently.
    swap: bool,
}

/// Every module of one component under each name a LoRA may give it.
#[derive(Default)]
struct Targets {
    /// Dotted names (Stability's and diffusers' / transformers').
    dotted: HashMap<String, Target>,
    /// The same with '.' → '_' (kohya, OneTrainer).
    flat: HashMap<String, Target>,
}

impl Targets {
    fn add(&mut self, module: &str, t: Target) {
        self.flat.insert(module.replace('.', "_"), t.clone());
        self.dotted.insert(module.to_string(), t);
    }
}

/// What a model asks its provider for, recorded on shape-only weights.
struct Recorder<'a> {
    inner: &'a ShapeOnlyWeights,
    seen: RefCell<Vec<(Vec<String>, Vec<usize>)>>,
}

impl TensorProvider for Recorder<'_> {
    fn tensor(&self, gpu: &Gpu, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.seen
            .borrow_mut()
            .push((vec![name.to_string()], shape.to_vec()));
        self.inner.tensor(gpu, name, shape, dtype)
    }
    fn tensor_concat(
        &self,
        gpu: &Gpu,
        names: &[String],
        shape: &[usize],
        dtype: DType,
    ) -> Result<Tensor> {
        self.seen
            .borrow_mut()
            .push((names.to_vec(), shape.to_vec()));
        self.inner.tensor_concat(gpu, names, shape, dtype)
    }
    fn host(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.inner.host(name, shape)
    }
}

/// The matrices (≥ 2 axes, named `*.weight`) `load` asks for, as targets
/// under their own names; `mmdit_depth` adds diffusers' names of an MMDiT's
/// canonical (Stability) names.
fn record_targets(
    gpu: &Gpu,
    mmdit_depth: Option<usize>,
    load: impl FnOnce(&dyn TensorProvider) -> Result<()>,
) -> Result<Targets> {
    let shapes = ShapeOnlyWeights::new(gpu)?;
    let rec = Recorder {
        inner: &shapes,
        seen: RefCell::new(Vec::new()),
    };
    load(&rec)?;
    let mut t = Targets::default();
    for (names, shape) in rec.seen.into_inner() {
        if shape.len() < 2 || names.is_empty() {
            continue;
        }
        let cols: usize = shape[1..].iter().product();
        let part = shape[0] / names.len();
        for name in &names {
            let Some(module) = name.strip_suffix(".weight") else {
                continue;
            };
            let own = Target {
                tensor: name.clone(),
                row: 0,
                rows: part,
                cols,
                swap: false,
            };
            t.add(module, own.clone());
            let Some(depth) = mmdit_depth else {
                continue;
            };
            let recipe = diffusers_recipe(name, depth);
            let stored = recipe.names().len();
            for (i, d) in recipe.names().iter().enumerate() {
                let Some(dm) = d.strip_suffix(".weight") else {
                    continue;
                };
                t.add(
                    dm,
                    Target {
                        row: i * (shape[0] / stored),
                        rows: shape[0] / stored,
                        swap: matches!(recipe, Recipe::SwapHalves(_)),
                        ..own.clone()
                    },
                );
            }
        }
    }
    Ok(t)
}

/// One module's update, ready to merge: `up` [rows, r] already scaled by
/// strength · α / r and in the target's row order.
#[derive(Clone, Debug)]
pub struct Delta {
    row: usize,
    rows: usize,
    rank: usize,
    down: Vec<f32>,
    up: Vec<f32>,
}

/// The updates of every LoRA of a run, by component and tensor.
#[derive(Default)]
pub struct Loras {
    deltas: BTreeMap<Component, HashMap<String, Vec<Delta>>>,
    /// What was read: (file, strength, sha256 hex, modules per component).
    pub summary: Vec<LoraSummary>,
}

/// What one LoRA file changed.
#[derive(Clone, Debug)]
pub struct LoraSummary {
    /// The file.
    pub path: PathBuf,
    /// Its strength.
    pub strength: f32,
    /// SHA-256 of the file, hex.
    pub sha256: String,
    /// Modules changed per component.
    pub modules: BTreeMap<Component, usize>,
    /// Modules of T5 left out because the run has no T5.
    pub skipped_t5: usize,
}

/// The model's architectures, to match LoRA modules against.
pub struct Architectures<'a> {
    /// The MMDiT.
    pub mmdit: &'a crate::weights::mmdit::MmditConfig,
    /// CLIP-L.
    pub clip_l: &'a crate::models::clip::ClipConfig,
    /// CLIP-G.
    pub clip_g: &'a crate::models::clip::ClipConfig,
    /// T5, when the run has it.
    pub t5: Option<&'a crate::models::t5::T5Config>,
}

/// The matrix suffixes of the layouts read: (suffix, is the up matrix).
const MATRIX_SUFFIXES: &[(&str, bool)] = &[
    (".lora_up.weight", true),
    (".lora_down.weight", false),
    (".lora_B.weight", true),
    (".lora_A.weight", false),
    (".lora_B.default.weight", true),
    (".lora_A.default.weight", false),
    (".lora.up.weight", true),
    (".lora.down.weight", false),
    (".lora_linear_layer.up.weight", true),
    (".lora_linear_layer.down.weight", false),
];

/// Name fragments of adapters that are not plain LoRA.
const OTHER_ADAPTERS: &[(&str, &str)] = &[
    ("hada_", "LoHa"),
    ("lokr_", "LoKr"),
    ("oft_", "OFT"),
    ("dora_scale", "DoRA"),
    ("lora_magnitude_vector", "DoRA"),
    ("lora_mid", "LoCon (Tucker)"),
    (".diff", "a full weight difference"),
    ("set_weight", "a weight replacement"),
    ("w_norm", "a norm difference"),
    ("b_norm", "a norm difference"),
    ("lora_B.bias", "a LoRA bias"),
];

/// The prefixes of the layouts read: (prefix, component, dotted names?).
const PREFIXES: &[(&str, Component, bool)] = &[
    ("transformer.", Component::Mmdit, true),
    ("base_model.model.", Component::Mmdit, true),
    ("model.diffusion_model.", Component::Mmdit, true),
    ("diffusion_model.", Component::Mmdit, true),
    ("lora_unet_", Component::Mmdit, false),
    ("lora_transformer_", Component::Mmdit, false),
    ("text_encoder_2.", Component::ClipG, true),
    ("text_encoder_3.", Component::T5, true),
    ("text_encoder.", Component::ClipL, true),
    ("lora_te1_", Component::ClipL, false),
    ("lora_te2_", Component::ClipG, false),
    ("lora_te3_", Component::T5, false),
];

#[derive(Default)]
struct Module {
    up: Option<String>,
    down: Option<String>,
    alpha: Option<String>,
}

fn lora_error(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Graph(format!("LoRA {}: {msg}", path.display()))
}

/// SHA-256 of a file, streamed.
fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut f = crate::files::open_regular(path)
        .map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// PEFT's config for one component, from `lora_adapter_metadata`.
struct PeftConfig {
    r: Option<f64>,
    alpha: Option<f64>,
    rank_pattern: Vec<(String, f64)>,
    alpha_pattern: Vec<(String, f64)>,
    rslora: bool,
}

impl PeftConfig {
    fn read(path: &Path, ck: &Checkpoint, c: Component) -> Result<Option<PeftConfig>> {
        let Some(text) = ck.metadata.get("lora_adapter_metadata") else {
            return Ok(None);
        };
        let json: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| lora_error(path, format!("lora_adapter_metadata: {e}")))?;
        let p = c.metadata_prefix();
        let get = |k: &str| json.get(format!("{p}.{k}"));
        if get("r").is_none() && get("lora_alpha").is_none() {
            return Ok(None);
        }
        let pattern = |k: &str| -> Result<Vec<(String, f64)>> {
            let mut out = Vec::new();
            for (key, v) in get(k).and_then(|v| v.as_object()).into_iter().flatten() {
                let lit = key.trim_start_matches('^');
                if lit.chars().any(|c| "*+?()[]{}|\\$".contains(c)) {
                    return Err(lora_error(
                        path,
                        format!("{p}.{k}: the pattern {key:?} is a regular expression; only module names are supported"),
                    ));
                }
                let v = v
                    .as_f64()
                    .ok_or_else(|| lora_error(path, format!("{p}.{k}: {key:?} is not a number")))?;
                out.push((lit.to_string(), v));
            }
            Ok(out)
        };
        Ok(Some(PeftConfig {
            r: get("r").and_then(|v| v.as_f64()),
            alpha: get("lora_alpha").and_then(|v| v.as_f64()),
            rank_pattern: pattern("rank_pattern")?,
            alpha_pattern: pattern("alpha_pattern")?,
            rslora: get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false),
        }))
    }

    /// α / r for `module` (PEFT matches a pattern at a module's end, at a
    /// '.' boundary).
    fn scale(&self, module: &str, rank: usize) -> f64 {
        let find = |pats: &[(String, f64)]| {
            pats.iter()
                .find(|(p, _)| module == p || module.ends_with(&format!(".{p}")))
                .map(|(_, v)| *v)
        };
        let r = find(&self.rank_pattern).or(self.r).unwrap_or(rank as f64);
        let alpha = find(&self.alpha_pattern).or(self.alpha).unwrap_or(r);
        if self.rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }
}

/// A matrix flattened to 2-D: [rows, everything else].
fn as_matrix(shape: &[usize]) -> Option<(usize, usize)> {
    let (&rows, rest) = shape.split_first()?;
    let cols = rest.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    (!rest.is_empty()).then_some((rows, cols))
}

impl Loras {
    /// Reads every LoRA of `specs` and matches each of its modules to the
    /// model described by `arch`; nothing touches the GPU's memory beyond
    /// recording shapes.
    pub fn load(
        gpu: &Gpu,
        specs: &[LoraSpec],
        arch: &Architectures,
        dtype: DType,
    ) -> Result<Loras> {
        let mut out = Loras::default();
        if specs.is_empty() {
            return Ok(out);
        }
        if specs.len() > MAX_LORAS {
            return Err(Error::Graph(format!(
                "{} LoRAs: at most {MAX_LORAS} can be merged at once",
                specs.len()
            )));
        }
        let mut targets = BTreeMap::new();
        let m = arch.mmdit;
        targets.insert(
            Component::Mmdit,
            record_targets(gpu, Some(m.depth), |p| {
                crate::models::mmdit::Mmdit::load_from(gpu, m, p, dtype).map(|_| ())
            })?,
        );
        for (c, cfg) in [
            (Component::ClipL, arch.clip_l),
            (Component::ClipG, arch.clip_g),
        ] {
            targets.insert(
                c,
                record_targets(gpu, None, |p| {
                    crate::models::clip::Clip::load_from(gpu, cfg, p, dtype).map(|_| ())
                })?,
            );
        }
        if let Some(cfg) = arch.t5 {
            targets.insert(
                Component::T5,
                record_targets(gpu, None, |p| {
                    crate::models::t5::T5::load_from(gpu, cfg, "shared.weight", p, dtype)
                        .map(|_| ())
                })?,
            );
        }
        for spec in specs {
            out.read_file(spec, &targets)?;
        }
        Ok(out)
    }

    fn read_file(&mut self, spec: &LoraSpec, targets: &BTreeMap<Component, Targets>) -> Result<()> {
        let path = &spec.path;
        if !path.is_file() {
            return Err(lora_error(path, "no such file"));
        }
        let ck = Checkpoint::open(std::slice::from_ref(path))?;
        if ck.tensors.is_empty() {
            return Err(lora_error(path, "holds no tensors"));
        }
        // Group the tensors by module.
        let mut modules: BTreeMap<String, Module> = BTreeMap::new();
        let mut unknown = Vec::new();
        for name in ck.tensors.keys() {
            if let Some((_, kind)) = OTHER_ADAPTERS.iter().find(|(f, _)| name.contains(f)) {
                return Err(lora_error(
                    path,
                    format!("'{name}' is {kind}; only plain LoRA (up · down) is supported"),
                ));
            }
            if let Some(m) = name.strip_suffix(".alpha") {
                modules.entry(m.to_string()).or_default().alpha = Some(name.clone());
                continue;
            }
            match MATRIX_SUFFIXES.iter().find(|(s, _)| name.ends_with(s)) {
                Some((s, up)) => {
                    let m = modules
                        .entry(name[..name.len() - s.len()].to_string())
                        .or_default();
                    let slot = if *up { &mut m.up } else { &mut m.down };
                    if let Some(prev) = slot.replace(name.clone()) {
                        return Err(lora_error(
                            path,
                            format!("'{prev}' and '{name}' are the same matrix of one module"),
                        ));
                    }
                }
                None => unknown.push(name.clone()),
            }
        }
        let mut peft: BTreeMap<Component, Option<PeftConfig>> = BTreeMap::new();
        let mut count: BTreeMap<Component, usize> = BTreeMap::new();
        let mut pending: Vec<(Component, Delta, String)> = Vec::new();
        let mut skipped_t5 = 0;
        for (module, parts) in &modules {
            let resolved = PREFIXES.iter().find_map(|(prefix, c, dotted)| {
                let rest = module.strip_prefix(prefix)?;
                let t = targets.get(c)?;
                let hit = if *dotted {
                    t.dotted.get(rest)
                } else {
                    t.flat.get(rest)
                };
                hit.map(|h| (*c, h, rest, *prefix))
            });
            let Some((component, target, local, prefix)) = resolved else {
                let t5_key = PREFIXES
                    .iter()
                    .any(|(p, c, _)| *c == Component::T5 && module.starts_with(p));
                if t5_key && !targets.contains_key(&Component::T5) {
                    // T5 does not run: its update cannot change the image.
                    skipped_t5 += 1;
                    continue;
                }
                for n in [&parts.up, &parts.down, &parts.alpha].into_iter().flatten() {
                    unknown.push(n.clone());
                }
                continue;
            };
            let (Some(up_name), Some(down_name)) = (&parts.up, &parts.down) else {
                return Err(lora_error(
                    path,
                    format!("module '{module}' has only one of its two matrices"),
                ));
            };
            let (us, up) = ck.read_f32(up_name)?;
            let (ds, down) = ck.read_f32(down_name)?;
            let bad = |what: String| lora_error(path, format!("module '{module}': {what}"));
            let (Some((up_rows, up_rank)), Some((rank, down_cols))) =
                (as_matrix(&us), as_matrix(&ds))
            else {
                return Err(bad(format!("up {us:?} and down {ds:?} must be matrices")));
            };
            let up_extra = us
                .iter()
                .skip(2)
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .unwrap_or(usize::MAX);
            if up_rank != rank || up_extra != 1 || rank == 0 || rank > MAX_RANK {
                return Err(bad(format!(
                    "up {us:?} and down {ds:?} do not share one rank (1..={MAX_RANK})"
                )));
            }
            if up_rows != target.rows {
                return Err(bad(format!(
                    "up has {up_rows} rows but {} of {} has {} (a LoRA for another model?)",
                    target.tensor,
                    component.name(),
                    target.rows
                )));
            }
            let (row, rows) = (target.row, target.rows);
            if down_cols != target.cols {
                return Err(bad(format!(
                    "down has {down_cols} columns but {} of {} takes {} inputs (a LoRA for another model?)",
                    target.tensor,
                    component.name(),
                    target.cols
                )));
            }
            let ratio = match &parts.alpha {
                Some(a) => {
                    let (_, v) = ck.read_f32(a)?;
                    let alpha = *v
                        .first()
                        .filter(|_| v.len() == 1)
                        .ok_or_else(|| bad(format!("'{a}' must hold one number")))?
                        as f64;
                    if !alpha.is_finite() {
                        return Err(bad(format!("'{a}' is not finite")));
                    }
                    if alpha == 0.0 {
                        1.0
                    } else {
                        alpha / rank as f64
                    }
                }
                None => {
                    let cfg = match peft.get(&component) {
                        Some(c) => c,
                        None => {
                            let c = if prefix.ends_with('.') {
                                PeftConfig::read(path, &ck, component)?
                            } else {
                                None
                            };
                            peft.entry(component).or_insert(c)
                        }
                    };
                    cfg.as_ref().map_or(1.0, |c| c.scale(local, rank))
                }
            };
            let scale = spec.strength as f64 * ratio;
            if !scale.is_finite() {
                return Err(bad("its scale is not finite".into()));
            }
            if up.iter().chain(&down).any(|v| !v.is_finite()) {
                return Err(bad("holds NaN or infinite values".into()));
            }
            let half = rows / 2;
            let mut scaled = vec![0f32; rows * rank];
            for r in 0..rows {
                let dst = if target.swap { (r + half) % rows } else { r };
                for k in 0..rank {
                    scaled[dst * rank + k] = (scale * up[r * rank + k] as f64) as f32;
                }
            }
            *count.entry(component).or_default() += 1;
            pending.push((
                component,
                Delta {
                    row,
                    rows,
                    rank,
                    down,
                    up: scaled,
                },
                target.tensor.clone(),
            ));
        }
        if !unknown.is_empty() {
            let n = unknown.len();
            unknown.truncate(5);
            return Err(lora_error(
                path,
                format!(
                    "{n} tensor(s) match no module of this model (a LoRA for another model, or a layout not read here): {}",
                    unknown.join(", ")
                ),
            ));
        }
        for (c, d, tensor) in pending {
            self.deltas
                .entry(c)
                .or_default()
                .entry(tensor)
                .or_default()
                .push(d);
        }
        self.summary.push(LoraSummary {
            path: path.clone(),
            strength: spec.strength,
            sha256: sha256_file(path)?,
            modules: count,
            skipped_t5,
        });
        Ok(())
    }

    /// Whether nothing is merged.
    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty()
    }

    /// A provider that merges this run's updates for `component` into the
    /// tensors of `inner` as they are uploaded.
    pub fn provider<'a>(
        &'a self,
        component: Component,
        inner: &'a dyn TensorProvider,
    ) -> MergingProvider<'a> {
        MergingProvider {
            inner,
            deltas: self.deltas.get(&component),
        }
    }
}

/// Tensors of `inner` with LoRA updates merged on the GPU.
pub struct MergingProvider<'a> {
    inner: &'a dyn TensorProvider,
    deltas: Option<&'a HashMap<String, Vec<Delta>>>,
}

impl MergingProvider<'_> {
    /// Merges `deltas` (each placed `offset` rows further) into `base`.
    /// The updates of the parts of a dim-0 concatenation of `names` (q, k,
    /// v), each placed at its part's first row.
    fn concat_deltas(&self, names: &[String], shape: &[usize]) -> Vec<(usize, &Delta)> {
        let part = shape.first().copied().unwrap_or(0) / names.len().max(1);
        names
            .iter()
            .enumerate()
            .flat_map(|(i, n)| {
                self.deltas
                    .and_then(|d| d.get(n))
                    .into_iter()
                    .flatten()
                    .map(move |d| (i * part, d))
            })
            .collect()
    }

    /// The updates stacked into one low-rank pair for a [rows, cols] weight:
    /// down [rank, cols], up [rows, rank] (scaled, zero outside each
    /// update's rows).
    fn stack(
        gpu: &Gpu,
        rows: usize,
        cols: usize,
        deltas: &[(usize, &Delta)],
    ) -> Result<(Tensor, Tensor)> {
        let rank: usize = deltas.iter().map(|(_, d)| d.rank).sum();
        let mut down = Vec::with_capacity(rank * cols);
        let mut up = vec![0f32; rows * rank];
        let mut k0 = 0;
        for (offset, d) in deltas {
            down.extend_from_slice(&d.down);
            for r in 0..d.rows {
                let dst = offset + d.row + r;
                up[dst * rank + k0..][..d.rank].copy_from_slice(&d.up[r * d.rank..][..d.rank]);
            }
            k0 += d.rank;
        }
        Ok((
            Tensor::from_f32(gpu, &[rank, cols], DType::F32, &down)?,
            Tensor::from_f32(gpu, &[rows, rank], DType::F32, &up)?,
        ))
    }

    /// A block-quantized weight keeps its blocks; the updates ride beside it
    /// as a low-rank pair the layer applies in its pass.
    fn beside(gpu: &Gpu, mut base: Tensor, deltas: &[(usize, &Delta)]) -> Result<Tensor> {
        let Some((rows, cols)) = as_matrix(&base.shape) else {
            return Ok(base);
        };
        let (down, up) = Self::stack(gpu, rows, cols, deltas)?;
        base.low_rank = Some(std::sync::Arc::new(crate::models::layers::LowRank {
            down,
            up,
        }));
        Ok(base)
    }

    fn merge(
        &self,
        gpu: &Gpu,
        base: Tensor,
        deltas: &[(usize, &Delta)],
        dtype: DType,
    ) -> Result<Tensor> {
        let shape = base.shape.clone();
        let Some((rows, cols)) = as_matrix(&shape) else {
            return Ok(base);
        };
        let (a, b) = Self::stack(gpu, rows, cols, deltas)?;
        let mut g = Graph::new(gpu.target());
        let w = g.weight("weight", &base);
        let w = g.reshape(w, &[rows, cols])?;
        let a = g.weight("lora_down", &a);
        let b = g.weight("lora_up", &b);
        let out = crate::ops::lora::lora_merge(&mut g, w, a, b, dtype)?;
        g.keep(out);
        let plan = g.plan(gpu)?;
        plan.run(gpu)?;
        let mut t = plan.tensor(out)?;
        t.shape = shape;
        Ok(t)
    }
}

impl TensorProvider for MergingProvider<'_> {
    fn tensor(&self, gpu: &Gpu, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        match self.deltas.and_then(|d| d.get(name)) {
            Some(ds) if dtype != DType::U32 => {
                let base = self.inner.tensor(gpu, name, shape, dtype)?;
                let ds: Vec<(usize, &Delta)> = ds.iter().map(|d| (0, d)).collect();
                self.merge(gpu, base, &ds, dtype)
            }
            _ => self.inner.tensor(gpu, name, shape, dtype),
        }
    }
    fn tensor_concat(
        &self,
        gpu: &Gpu,
        names: &[String],
        shape: &[usize],
        dtype: DType,
    ) -> Result<Tensor> {
        let ds = self.concat_deltas(names, shape);
        let base = self.inner.tensor_concat(gpu, names, shape, dtype)?;
        if ds.is_empty() || dtype == DType::U32 {
            return Ok(base);
        }
        self.merge(gpu, base, &ds, dtype)
    }
    fn host(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.inner.host(name, shape)
    }
    fn matrix(&self, gpu: &Gpu, name: &str, shape: &[usize], matrix: DType) -> Result<Tensor> {
        // A float matrix a LoRA changes is merged in f16 (the merge writes
        // f32 or f16); a block-quantized one keeps its blocks and gets the
        // update beside it; the others stay in their file's encoding.
        let Some(ds) = self.deltas.and_then(|d| d.get(name)) else {
            return self.inner.matrix(gpu, name, shape, matrix);
        };
        let base = self.inner.matrix(gpu, name, shape, matrix)?;
        if crate::quant::block(base.dtype).is_some() {
            let ds: Vec<(usize, &Delta)> = ds.iter().map(|d| (0, d)).collect();
            return Self::beside(gpu, base, &ds);
        }
        drop(base);
        self.tensor(gpu, name, shape, matrix)
    }
    fn matrix_concat(
        &self,
        gpu: &Gpu,
        names: &[String],
        shape: &[usize],
        matrix: DType,
    ) -> Result<Tensor> {
        if !names
            .iter()
            .any(|n| self.deltas.is_some_and(|d| d.contains_key(n)))
        {
            return self.inner.matrix_concat(gpu, names, shape, matrix);
        }
        let base = self.inner.matrix_concat(gpu, names, shape, matrix)?;
        if crate::quant::block(base.dtype).is_some() {
            let ds = self.concat_deltas(names, shape);
            return Self::beside(gpu, base, &ds);
        }
        drop(base);
        self.tensor_concat(gpu, names, shape, matrix)
    }
}
