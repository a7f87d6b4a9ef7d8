//! Text-encoder checkpoints. CLIP and T5 tensors carry transformers' names in
//! every layout users download; only the prefix differs: none in diffusers
//! folders (`text_encoder/model.safetensors`) and in the separate files
//! (`clip_l.safetensors`, `t5xxl_fp16.safetensors`), and
//! `text_encoders.<name>.transformer.` in Stability's all-in-one files. T5
//! encoder GGUFs (city96's `t5-v1_1-xxl-encoder-Q8_0.gguf`, written by
//! llama.cpp's converter) use llama.cpp's names (`enc.blk.N.attn_q`, …),
//! mapped here from transformers'.

use std::path::{Path, PathBuf};

use super::recipe::Recipe;
use super::{Checkpoint, WeightsError};

/// One text encoder's tensors.
pub struct TextSource {
    /// The tensors.
    pub ck: Checkpoint,
    /// Prefix before transformers' names.
    pub prefix: String,
    /// The diffusers `config.json`, when there is one.
    pub config: Option<serde_json::Value>,
    /// Where it came from.
    pub path: PathBuf,
    /// llama.cpp's T5 encoder names (GGUF files).
    llama_t5: bool,
}

/// llama.cpp's name of a transformers T5 encoder tensor (gguf-py's
/// tensor_mapping for the t5encoder architecture).
fn llama_t5_name(name: &str) -> Option<String> {
    if matches!(name, "shared.weight" | "encoder.embed_tokens.weight") {
        return Some("token_embd.weight".into());
    }
    if name == "encoder.final_layer_norm.weight" {
        return Some("enc.output_norm.weight".into());
    }
    let rest = name.strip_prefix("encoder.block.")?;
    let (b, part) = rest.split_once('.')?;
    let to = match part {
        "layer.0.layer_norm.weight" => "attn_norm",
        "layer.0.SelfAttention.q.weight" => "attn_q",
        "layer.0.SelfAttention.k.weight" => "attn_k",
        "layer.0.SelfAttention.v.weight" => "attn_v",
        "layer.0.SelfAttention.o.weight" => "attn_o",
        "layer.0.SelfAttention.relative_attention_bias.weight" => "attn_rel_b",
        "layer.1.layer_norm.weight" => "ffn_norm",
        "layer.1.DenseReluDense.wi_0.weight" => "ffn_gate",
        "layer.1.DenseReluDense.wi_1.weight" => "ffn_up",
        "layer.1.DenseReluDense.wo.weight" => "ffn_down",
        _ => return None,
    };
    Some(format!("enc.blk.{b}.{to}.weight"))
}

impl TextSource {
    /// Opens a diffusers component folder (`model.safetensors`, or shards with an index json).
    pub fn open_folder(dir: &Path) -> Result<TextSource, WeightsError> {
        let ck = Checkpoint::open_diffusers_component(dir, "model")?;
        let config = super::read_config(dir)?;
        Ok(TextSource {
            ck,
            prefix: String::new(),
            config,
            path: dir.to_path_buf(),
            llama_t5: false,
        })
    }

    /// Opens a single file: a separate encoder file, or an all-in-one
    /// checkpoint holding `text_encoders.<name>.transformer.*`.
    pub fn open_file(path: &Path, name: &str) -> Result<TextSource, WeightsError> {
        let ck = Checkpoint::open(&[path.to_path_buf()])?;
        let all_in_one = format!("text_encoders.{name}.transformer.");
        let prefix = if ck.with_prefix(&all_in_one).next().is_some() {
            all_in_one
        } else {
            String::new()
        };
        let llama_t5 = ck.tensors.contains_key("enc.blk.0.attn_q.weight");
        Ok(TextSource {
            ck,
            prefix,
            config: None,
            path: path.to_path_buf(),
            llama_t5,
        })
    }

    /// Whether the all-in-one file at `path` holds encoder `name`.
    pub fn in_file(path: &Path, name: &str) -> bool {
        Checkpoint::open(&[path.to_path_buf()])
            .map(|ck| {
                ck.with_prefix(&format!("text_encoders.{name}.transformer."))
                    .next()
                    .is_some()
            })
            .unwrap_or(false)
    }

    fn recipe(&self, name: &str) -> Recipe {
        if self.llama_t5 {
            if let Some(n) = llama_t5_name(name) {
                return Recipe::Direct(n);
            }
        }
        Recipe::Direct(format!("{}{name}", self.prefix))
    }

    /// Whether a tensor is present.
    pub fn has(&self, name: &str) -> bool {
        self.ck.has_recipe(&self.recipe(name))
    }

    /// Shape of a tensor.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, WeightsError> {
        self.ck.recipe_shape(&self.recipe(name))
    }

    /// The shape of a tensor as exactly `N` positive dimensions (`layout`
    /// names them for the error message).
    pub fn dims<const N: usize>(
        &self,
        name: &str,
        layout: &str,
    ) -> Result<[usize; N], WeightsError> {
        self.ck.recipe_dims::<N>(&self.recipe(name), layout)
    }

    /// Reads a tensor as f32, checking its shape.
    pub fn read(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, WeightsError> {
        self.ck.read_recipe(&self.recipe(name), expected)
    }

    /// Number of distinct layer indices under `prefix` (e.g. `text_model.encoder.layers.`).
    pub fn count_layers(&self, prefix: &str) -> usize {
        if self.llama_t5 && prefix == "encoder.block." {
            return self.ck.indices_under("enc.blk.").len();
        }
        self.ck
            .indices_under(&format!("{}{prefix}", self.prefix))
            .len()
    }

    /// A number from config.json.
    pub fn config_num(&self, key: &str) -> Option<f64> {
        self.config.as_ref()?.get(key)?.as_f64()
    }

    /// A string from config.json.
    pub fn config_str(&self, key: &str) -> Option<String> {
        Some(self.config.as_ref()?.get(key)?.as_str()?.to_string())
    }
}

impl super::RecipeSource for TextSource {
    fn checkpoint(&self) -> &Checkpoint {
        &self.ck
    }
    fn recipe_of(&self, name: &str) -> Recipe {
        self.recipe(name)
    }
}
