//! Prompt embeddings as diffusers' SD3 `encode_prompt` builds them: CLIP-L and
//! CLIP-G penultimate states side by side (768 + 1280), zero-padded to the
//! joint width, followed on the token axis by T5's states, or by zeros of the
//! same length when T5 is absent; pooled = [CLIP-L pooled ‖ CLIP-G pooled].
//!
//! Each encoder is loaded, run and dropped in turn, so its GPU memory is free
//! again before the next one (and the MMDiT) needs it — unless the caller
//! keeps them ([`TextModels`], a server).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::lora::{Component, Loras};
use crate::models::{clip, t5};
use crate::ops::elementwise::Act;
use crate::tensor::DType;
use crate::tokenize::PromptTokenizer;
use crate::weights::text::TextSource;

/// Where the text encoders and their tokenizers are.
#[derive(Clone, Debug)]
pub struct TextPaths {
    /// CLIP-L weights: a diffusers component folder, a separate file, or an all-in-one file.
    pub clip_l: PathBuf,
    /// CLIP-G weights, likewise.
    pub clip_g: PathBuf,
    /// T5 weights; `None` runs without T5 (zeros, as diffusers does).
    pub t5: Option<PathBuf>,
    /// CLIP-L tokenizer folder; `None`: the built-in one.
    pub tokenizer_l: Option<PathBuf>,
    /// CLIP-G tokenizer folder; `None`: the built-in one.
    pub tokenizer_g: Option<PathBuf>,
    /// T5 tokenizer folder; `None`: the built-in one (used with `t5`).
    pub tokenizer_t5: Option<PathBuf>,
}

impl TextPaths {
    /// The encoders and tokenizers of a diffusers model folder; T5 is used
    /// when `text_encoder_3/` is present.
    pub fn from_folder(root: &Path) -> Result<TextPaths> {
        let need = |sub: &str| -> Result<PathBuf> {
            let p = root.join(sub);
            if p.is_dir() {
                Ok(p)
            } else {
                Err(Error::Io(format!(
                    "{}: missing (a diffusers SD3 folder has {sub}/)",
                    p.display()
                )))
            }
        };
        let t5 = root.join("text_encoder_3");
        let has_t5 = t5.is_dir();
        Ok(TextPaths {
            clip_l: need("text_encoder")?,
            clip_g: need("text_encoder_2")?,
            t5: has_t5.then_some(t5),
            tokenizer_l: Some(need("tokenizer")?),
            tokenizer_g: Some(need("tokenizer_2")?),
            tokenizer_t5: if has_t5 {
                Some(need("tokenizer_3")?)
            } else {
                None
            },
        })
    }
}

/// Opens one text encoder's weights: a diffusers component folder, a
/// separate file, or the `text_encoders.<name>.` part of an all-in-one file.
pub fn open_encoder(path: &Path, name: &str) -> Result<TextSource> {
    Ok(if path.is_dir() {
        TextSource::open_folder(path)?
    } else {
        TextSource::open_file(path, name)?
    })
}

/// A prompt that did not fit an encoder's token limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncation {
    /// `clip_l`, `clip_g` or `t5`.
    pub encoder: &'static str,
    /// Index of the prompt.
    pub prompt: usize,
    /// Tokens dropped.
    pub dropped: usize,
}

/// The conditioning of a batch of prompts.
#[derive(Clone, Debug)]
pub struct PromptEmbeddings {
    /// [batch, 77 + t5_tokens, width].
    pub context: Vec<f32>,
    /// [batch, pooled_width].
    pub pooled: Vec<f32>,
    /// Prompts.
    pub batch: usize,
    /// Tokens per prompt (77 + T5's).
    pub tokens: usize,
    /// Joint width (4096 in SD3).
    pub width: usize,
    /// Pooled width (2048 in SD3).
    pub pooled_width: usize,
    /// Prompts that were cut short.
    pub truncated: Vec<Truncation>,
}

/// An error when a token id lies outside the encoder's vocabulary: the
/// tokenizer belongs to another model.
fn check_vocab(tok: &PromptTokenizer, ids: &[Vec<u32>], name: &str, vocab: usize) -> Result<()> {
    match ids.iter().flatten().find(|&&i| i as usize >= vocab) {
        Some(id) => Err(Error::Io(format!(
            "{}: token id {id} is outside {name}'s vocabulary of {vocab}: this tokenizer does not belong to these weights (pass --tokenizers with the model's tokenizer folders)",
            tok.path.display()
        ))),
        None => Ok(()),
    }
}

fn tokenize(
    tok: &PromptTokenizer,
    name: &'static str,
    prompts: &[String],
    truncated: &mut Vec<Truncation>,
) -> Result<Vec<Vec<u32>>> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let t = tok.encode(p)?;
            if t.dropped > 0 {
                truncated.push(Truncation {
                    encoder: name,
                    prompt: i,
                    dropped: t.dropped,
                });
            }
            Ok(t.ids)
        })
        .collect()
}

/// Encodes `prompts`; `width` is the transformer's joint width (its
/// `context_dim`), `t5_tokens` the T5 length (256 by default in SD3).
pub fn encode_prompts(
    gpu: &Gpu,
    paths: &TextPaths,
    prompts: &[String],
    t5_tokens: usize,
    width: usize,
    matrix: DType,
) -> Result<PromptEmbeddings> {
    let none = Loras::default();
    encode_prompts_with(gpu, paths, prompts, t5_tokens, width, matrix, &none)
}

/// Text encoders kept on the GPU between calls (a server's): each is loaded
/// by its first use.
#[derive(Default)]
pub struct TextModels {
    clip_l: Option<clip::Clip>,
    clip_g: Option<clip::Clip>,
    t5: Option<t5::T5>,
}

/// [`encode_prompts`] with LoRA updates merged into the encoders' weights.
pub fn encode_prompts_with(
    gpu: &Gpu,
    paths: &TextPaths,
    prompts: &[String],
    t5_tokens: usize,
    width: usize,
    matrix: DType,
    loras: &Loras,
) -> Result<PromptEmbeddings> {
    encode_prompts_kept(
        gpu, paths, prompts, t5_tokens, width, matrix, loras, None, None,
    )
}

/// One run of a CLIP encoder over `batch` prompts, recorded on shape-only
/// weights (limits checks, memory budgets).
pub fn clip_graph(
    gpu: &Gpu,
    w: &crate::weights::ShapeOnlyWeights,
    config: &clip::ClipConfig,
    matrix: DType,
    batch: usize,
) -> Result<crate::graph::Graph> {
    let m = clip::Clip::load_from(gpu, config, w, matrix)?;
    let mut g = crate::graph::Graph::new(gpu.target());
    let ids = g.input("ids", &[batch * crate::tokenize::CLIP_TOKENS], DType::U32);
    let rows = g.input("pool_rows", &[batch], DType::U32);
    m.forward(&mut g, ids, rows, batch)?;
    Ok(g)
}

/// [`clip_graph`] for T5 over `tokens` tokens.
pub fn t5_graph(
    gpu: &Gpu,
    w: &crate::weights::ShapeOnlyWeights,
    config: &t5::T5Config,
    matrix: DType,
    batch: usize,
    tokens: usize,
) -> Result<crate::graph::Graph> {
    let m = t5::T5::load_from(gpu, config, "shared.weight", w, matrix)?;
    let mut g = crate::graph::Graph::new(gpu.target());
    let ids = g.input("ids", &[batch * tokens], DType::U32);
    let bias = g.input("position_bias", &[config.heads, tokens, tokens], DType::F32);
    m.forward(&mut g, ids, bias, batch)?;
    Ok(g)
}

/// Intermediates and inputs of one run of `g`: what a memory budget keeps free.
fn run_bytes(g: &crate::graph::Graph) -> u64 {
    g.pooled_bytes() + g.input_bytes()
}

/// [`encode_prompts_with`], taking the encoders from `kept` when it holds
/// them and leaving them there (instead of freeing them) when given; with a
/// memory `budget` (bytes), the layers of an encoder that do not fit are
/// streamed (see [`crate::stream`]).
#[allow(clippy::too_many_arguments)]
pub fn encode_prompts_kept(
    gpu: &Gpu,
    paths: &TextPaths,
    prompts: &[String],
    t5_tokens: usize,
    width: usize,
    matrix: DType,
    loras: &Loras,
    mut kept: Option<&mut TextModels>,
    budget: Option<u64>,
) -> Result<PromptEmbeddings> {
    let batch = prompts.len();
    if batch == 0 {
        return Err(Error::Graph("no prompts to encode".into()));
    }
    let mut truncated = Vec::new();
    let mut run_clip = |weights: &Path,
                        tok_dir: &Option<PathBuf>,
                        name: &'static str,
                        act: Act,
                        component: Component|
     -> Result<(Vec<f32>, Vec<f32>, usize, usize)> {
        let tok = match (tok_dir, component) {
            (Some(d), _) => PromptTokenizer::clip(d)?,
            (None, Component::ClipL) => PromptTokenizer::builtin_clip_l()?,
            (None, _) => PromptTokenizer::builtin_clip_g()?,
        };
        let ids = tokenize(&tok, name, prompts, &mut truncated)?;
        let load = || -> Result<clip::Clip> {
            let src = open_encoder(weights, name)?;
            let config = clip::detect(&src, act)?;
            check_vocab(&tok, &ids, name, config.vocab)?;
            let budget = match budget {
                Some(b) => {
                    let w = crate::weights::ShapeOnlyWeights::new(gpu)?;
                    Some((b, run_bytes(&clip_graph(gpu, &w, &config, matrix, batch)?)))
                }
                None => None,
            };
            clip::Clip::load_budgeted(
                gpu,
                &config,
                &loras.provider(component, &src),
                matrix,
                budget,
            )
        };
        let slot = kept.as_deref_mut().map(|k| match component {
            Component::ClipL => &mut k.clip_l,
            _ => &mut k.clip_g,
        });
        let mut owned = None;
        let model: &clip::Clip = match slot {
            Some(slot) => {
                if slot.is_none() {
                    *slot = Some(load()?);
                }
                slot.as_ref().expect("loaded above")
            }
            None => owned.insert(load()?),
        };
        check_vocab(&tok, &ids, name, model.config.vocab)?;
        let (seq, pooled) = clip::encode(gpu, model, &ids)?;
        Ok((seq, pooled, model.config.hidden, model.config.projection))
    };
    let (seq_l, pool_l, dl, pl) = run_clip(
        &paths.clip_l,
        &paths.tokenizer_l,
        "clip_l",
        Act::QuickGelu,
        Component::ClipL,
    )?;
    let (seq_g, pool_g, dg, pg) = run_clip(
        &paths.clip_g,
        &paths.tokenizer_g,
        "clip_g",
        Act::GeluErf,
        Component::ClipG,
    )?;
    if dl + dg > width {
        return Err(Error::Graph(format!(
            "CLIP widths {dl} + {dg} exceed the transformer's context width {width}: these encoders do not belong to this model"
        )));
    }
    let t5_out = match (&paths.t5, &paths.tokenizer_t5) {
        (Some(w), tdir) => {
            let tok = match tdir {
                Some(d) => PromptTokenizer::t5(d, t5_tokens)?,
                None => PromptTokenizer::builtin_t5(t5_tokens)?,
            };
            let ids = tokenize(&tok, "t5", prompts, &mut truncated)?;
            let load = || -> Result<t5::T5> {
                let src = open_encoder(w, "t5xxl")?;
                let (config, shared) = t5::T5::detect(&src)?;
                check_vocab(&tok, &ids, "t5xxl", config.vocab)?;
                let provider = loras.provider(Component::T5, &src);
                let budget = match budget {
                    Some(b) => {
                        let w = crate::weights::ShapeOnlyWeights::new(gpu)?;
                        let g = t5_graph(gpu, &w, &config, matrix, batch, t5_tokens)?;
                        Some((b, run_bytes(&g)))
                    }
                    None => None,
                };
                t5::T5::load_budgeted(gpu, &config, shared, &provider, matrix, budget)
            };
            let mut owned = None;
            let model: &t5::T5 = match kept.map(|k| &mut k.t5) {
                Some(slot) => {
                    if slot.is_none() {
                        *slot = Some(load()?);
                    }
                    slot.as_ref().expect("loaded above")
                }
                None => owned.insert(load()?),
            };
            check_vocab(&tok, &ids, "t5xxl", model.config.vocab)?;
            if model.config.d_model != width {
                return Err(Error::Graph(format!(
                    "T5 width {} differs from the transformer's context width {width}",
                    model.config.d_model
                )));
            }
            Some(t5::encode(gpu, model, &ids)?)
        }
        _ => None,
    };
    let clip_tokens = crate::tokenize::CLIP_TOKENS;
    let tokens = clip_tokens + t5_tokens;
    let mut context = vec![0f32; batch * tokens * width];
    for b in 0..batch {
        for t in 0..clip_tokens {
            let row = &mut context[(b * tokens + t) * width..][..width];
            row[..dl].copy_from_slice(&seq_l[(b * clip_tokens + t) * dl..][..dl]);
            row[dl..dl + dg].copy_from_slice(&seq_g[(b * clip_tokens + t) * dg..][..dg]);
        }
        if let Some(t5) = &t5_out {
            let dst = (b * tokens + clip_tokens) * width;
            context[dst..dst + t5_tokens * width]
                .copy_from_slice(&t5[b * t5_tokens * width..][..t5_tokens * width]);
        }
    }
    let mut pooled = Vec::with_capacity(batch * (pl + pg));
    for b in 0..batch {
        pooled.extend_from_slice(&pool_l[b * pl..][..pl]);
        pooled.extend_from_slice(&pool_g[b * pg..][..pg]);
    }
    Ok(PromptEmbeddings {
        context,
        pooled,
        batch,
        tokens,
        width,
        pooled_width: pl + pg,
        truncated,
    })
}
